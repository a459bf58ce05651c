//! The journal: where small appends are made durable first, so that many runs each appending
//! a token at a time neither wait for an SQLite transaction nor each rewrite a page of the
//! log's table at every commit.
//!
//! The log's table, `batches` (`batches.rs`), is keyed by `(run_id, last seq)`, which keeps
//! every run's log together for replays. But an append of one event into it dirties one page of that run, and a commit writes
//! every dirty page to the WAL: with a thousand runs streaming tokens, a commit of a few hundred
//! single-event appends writes a few hundred pages (4 KiB each for ~200 bytes of data each).
//!
//! So a small append goes to the journal instead: records appended to segment files
//! (`journal_file.rs`), in shards by run id. [`Journaled::append`] does it: under the shard's
//! lock it checks that the events continue the run's log, writes their records with one
//! `write`, notes them as the run's *pending* events and adds them to the cache's tail; then
//! the run's followers are woken. No transaction. The writer thread does it for the small
//! appends of a whole group at once, before the group's transaction (one `write`, and one sync
//! with `synchronous = FULL`, for many appends); with `inline_appends` the caller's task does
//! it for its own append, without the thread hop (waiting for the shard if another caller holds
//! it).
//!
//! Pending events move into `batches` on the writer thread. Once a run's add up to
//! [`APPLY_BYTES`] or [`APPLY_EVENTS`], or its log has closed, the run is *due*; after each
//! group the writer moves a few due runs (one multi-row insert each) within a budget, so a
//! thousand runs that fill their page, or finish, at the same moment are moved over the next
//! groups rather than in one. A run that went quiet with events pending (behind [`WINDOW`]
//! newer records) is moved at the next group. An append the journal does not take — one that
//! closes the log, a large one (a batch of [`APPLY_BYTES`] or more), one that would take the
//! run past [`CAP_BYTES`] or [`CAP_EVENTS`] pending, an append to a run the writer is busy with
//! or does not have in the cache — goes through the writer: into `batches`, with the run's
//! pending events before it, except that a run's terminal event alone is inserted as it is and
//! its pending events follow later as a due run. Segments are deleted once every record in
//! them is in `batches` (or belongs to a deleted run).
//!
//! So `batches` holds every run's log up to its first pending event, plus possibly the terminal
//! event after a gap. Readers are never shown the gap: a run with pending events is always in
//! the cache, whose tail holds every event from the first pending one on, and a read from the
//! database stops at the first missing seq. When the store opens, whatever the journal holds
//! is moved into `batches` before anything else runs.
//!
//! The writer changes the bookkeeping of pending events only once its transaction has
//! committed: while it runs, the appends it moves stay pending, and the runs its commands touch
//! are marked *busy*, so the inline path leaves them to the writer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sluice_protocol::RawEvent;
use sluice_store::{Error, FastMap, FastSet};

use crate::cache::{Change, RunCache, RunState, check_continues};
use crate::journal_file::JournalFile;

/// A run is due to have its pending events moved to `batches` once their envelopes add up to
/// this many bytes (about one page of the table)…
pub(crate) const APPLY_BYTES: usize = 4096;

/// …or once there are this many of them.
pub(crate) const APPLY_EVENTS: usize = 48;

/// A run with this many bytes pending is moved with its next append, due or not: the pending
/// events (and the cache's tail, which holds them) stay bounded when the writer falls behind.
pub(crate) const CAP_BYTES: usize = 4 * APPLY_BYTES;

/// …likewise with this many events pending.
pub(crate) const CAP_EVENTS: usize = 4 * APPLY_EVENTS;

/// A run whose oldest pending event has this many newer journal records behind it is moved at
/// the next group, however few its events: it keeps the journal's front from moving.
pub(crate) const WINDOW: i64 = 131_072;

/// Segments are released once the journal's front can move by this many records.
pub(crate) const RELEASE_STEP: i64 = 4096;

/// One run's journaled events that are not in `batches` yet, with their journal positions.
#[derive(Debug, Default)]
struct Pending {
    events: VecDeque<RawEvent>,
    positions: VecDeque<i64>,
    bytes: usize,
    /// Whether the run is in the due queue.
    queued: bool,
    /// Its log is closed (the terminal event is in `batches`): due, whatever its size.
    closed: bool,
}

impl Pending {
    fn is_due(&self) -> bool {
        self.closed || self.bytes >= APPLY_BYTES || self.events.len() >= APPLY_EVENTS
    }
}

fn bytes_of<'a>(events: impl IntoIterator<Item = &'a RawEvent>) -> usize {
    events.into_iter().map(|e| e.json().len()).sum()
}

/// Which runs have events in the journal only, and which of them are due.
#[derive(Debug)]
pub(crate) struct Journal {
    pending: FastMap<String, Pending>,
    /// Runs with pending events, by the position of their oldest one.
    by_oldest: BTreeMap<i64, String>,
    /// Runs whose pending events should move, oldest first (entries may be stale:
    /// [`Journal::next_due`] skips runs that are no longer due).
    due: VecDeque<String>,
    /// The position the next record gets.
    next_pos: i64,
    /// The front as of the last release of segments.
    released: i64,
    /// Every run with pending events is due (the store is closing).
    closing: bool,
    /// Bytes of events recorded so far.
    recorded: u64,
}

impl Journal {
    /// Bookkeeping for an empty journal whose next record goes at `next_pos`.
    pub(crate) fn new(next_pos: i64) -> Self {
        Self {
            pending: FastMap::default(),
            by_oldest: BTreeMap::new(),
            due: VecDeque::new(),
            next_pos,
            released: next_pos,
            closing: false,
            recorded: 0,
        }
    }

    /// Whether an append of `batches` to `run_id` belongs in the journal: it is small, does not
    /// close the log, and keeps the run's pending events under the cap.
    pub(crate) fn takes(&self, run_id: &str, events: &[RawEvent]) -> bool {
        let bytes = bytes_of(events);
        let (had_bytes, had_len) = self
            .pending
            .get(run_id)
            .map_or((0, 0), |p| (p.bytes, p.events.len()));
        !events.is_empty()
            && !events.last().is_some_and(RawEvent::is_terminal)
            && bytes < APPLY_BYTES
            && events.len() < APPLY_EVENTS
            && had_bytes + bytes < CAP_BYTES
            && had_len + events.len() < CAP_EVENTS
    }

    /// Notes `events` of `run_id`, written at consecutive positions from `first_pos`, as
    /// pending. Returns whether the writer should be woken: the due queue was empty and is
    /// not any more, or the front may be released (every [`RELEASE_STEP`] records).
    pub(crate) fn record(&mut self, run_id: &str, events: &[RawEvent], first_pos: i64) -> bool {
        let queue_was_empty = self.due.is_empty();
        let step_before = self.next_pos / RELEASE_STEP;
        let p = self.pending.entry(run_id.to_owned()).or_default();
        if p.events.is_empty() {
            self.by_oldest.insert(first_pos, run_id.to_owned());
        }
        for (pos, e) in (first_pos..).zip(events) {
            p.events.push_back(e.clone());
            p.positions.push_back(pos);
        }
        let bytes = bytes_of(events);
        p.bytes += bytes;
        self.recorded += bytes as u64;
        self.next_pos = self
            .next_pos
            .max(first_pos + i64::try_from(events.len()).unwrap_or(i64::MAX));
        if !p.queued && p.is_due() {
            p.queued = true;
            self.due.push_back(run_id.to_owned());
        }
        (queue_was_empty && !self.due.is_empty()) || self.next_pos / RELEASE_STEP != step_before
    }

    /// Bytes of events recorded so far (the writer's moves keep pace with its growth).
    pub(crate) fn recorded(&self) -> u64 {
        self.recorded
    }

    /// How many of the run's events are pending.
    pub(crate) fn pending_len(&self, run_id: &str) -> usize {
        self.pending.get(run_id).map_or(0, |p| p.events.len())
    }

    /// The bytes of the run's pending events from the `skip`-th on.
    #[cfg(test)]
    pub(crate) fn pending_bytes(&self, run_id: &str, skip: usize) -> usize {
        self.pending
            .get(run_id)
            .map_or(0, |p| bytes_of(p.events.iter().skip(skip)))
    }

    /// The run's pending events from the `skip`-th on (the first `skip` are being moved).
    pub(crate) fn pending_from(&self, run_id: &str, skip: usize) -> Vec<RawEvent> {
        self.pending
            .get(run_id)
            .map(|p| p.events.iter().skip(skip).cloned().collect())
            .unwrap_or_default()
    }

    /// The highest seq up to which the run's log is in `batches` without a gap, for a log
    /// standing at `last_seq`.
    pub(crate) fn applied_upto(&self, run_id: &str, last_seq: u64) -> u64 {
        self.pending
            .get(run_id)
            .and_then(|p| p.events.front())
            .map_or(last_seq, |e| e.seq().saturating_sub(1))
    }

    /// The first `n` pending events of the run are in `batches` now.
    pub(crate) fn moved(&mut self, run_id: &str, n: usize) {
        let Some(p) = self.pending.get_mut(run_id) else {
            return;
        };
        let n = n.min(p.events.len());
        if n == 0 {
            return;
        }
        if let Some(old) = p.positions.front() {
            self.by_oldest.remove(old);
        }
        let gone: Vec<RawEvent> = p.events.drain(..n).collect();
        p.positions.drain(..n);
        p.bytes -= bytes_of(&gone);
        match p.positions.front() {
            Some(&oldest) => {
                self.by_oldest.insert(oldest, run_id.to_owned());
                if !p.queued && p.is_due() {
                    p.queued = true;
                    self.due.push_back(run_id.to_owned());
                }
            }
            None => {
                self.pending.remove(run_id);
            }
        }
    }

    /// The run is gone: its pending events are dropped (their records are skipped at replay).
    pub(crate) fn forget(&mut self, run_id: &str) {
        let n = self.pending_len(run_id);
        self.moved(run_id, n);
    }

    /// The run's log closed: its pending events are due.
    pub(crate) fn close(&mut self, run_id: &str) {
        if let Some(p) = self.pending.get_mut(run_id) {
            p.closed = true;
            if !p.queued {
                p.queued = true;
                self.due.push_back(run_id.to_owned());
            }
        }
    }

    /// The next due run, oldest first.
    pub(crate) fn next_due(&mut self) -> Option<String> {
        while let Some(run) = self.due.pop_front() {
            if let Some(p) = self.pending.get_mut(&run) {
                p.queued = false;
                if self.closing || p.is_due() {
                    return Some(run);
                }
            }
        }
        None
    }

    /// Puts a run taken with [`Journal::next_due`] back (its move did not commit).
    pub(crate) fn requeue(&mut self, run_id: &str) {
        if let Some(p) = self.pending.get_mut(run_id)
            && !p.queued
        {
            p.queued = true;
            self.due.push_front(run_id.to_owned());
        }
    }

    /// Queues every run with pending events, due or not (the store is closing).
    pub(crate) fn make_all_due(&mut self) {
        self.closing = true;
        self.due.clear();
        self.due.extend(self.by_oldest.values().cloned());
        for p in self.pending.values_mut() {
            p.queued = true;
        }
    }

    /// Runs whose oldest pending event is more than [`WINDOW`] records behind.
    pub(crate) fn stragglers(&self) -> Vec<String> {
        let limit = self.next_pos - WINDOW;
        self.by_oldest
            .range(..limit)
            .map(|(_, run)| run.clone())
            .collect()
    }

    /// Every record below this position is in `batches` (or belongs to a deleted run).
    pub(crate) fn front(&self) -> i64 {
        self.by_oldest
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_pos)
    }

    /// Where segments can be released up to, when the front moved by [`RELEASE_STEP`]
    /// records since the last release.
    pub(crate) fn release(&mut self) -> Option<i64> {
        let front = self.front();
        (front - self.released >= RELEASE_STEP).then(|| {
            self.released = front;
            front
        })
    }

    /// Whether the writer has journal work: due runs, stragglers, or segments to release.
    pub(crate) fn has_work(&self) -> bool {
        !self.due.is_empty() || self.has_work_besides_due()
    }

    /// Whether the writer has journal work other than due runs: stragglers, or segments to
    /// release (not paced).
    pub(crate) fn has_work_besides_due(&self) -> bool {
        self.by_oldest
            .keys()
            .next()
            .is_some_and(|&oldest| oldest < self.next_pos - WINDOW)
            || self.front() - self.released >= RELEASE_STEP
    }
}

/// The journal's bookkeeping and its file, shared by the callers' tasks and the writer thread.
#[derive(Debug)]
pub(crate) struct Journaled {
    pub(crate) journal: Journal,
    pub(crate) file: JournalFile,
    /// Runs the writer's open transaction is working on: appends to them go through the writer.
    pub(crate) busy: FastSet<String>,
}

/// How many shards the journal has. Each run's events go to one (by a hash of its id), each
/// shard with its own lock, files and bookkeeping, so that the callers' tasks on different
/// threads rarely wait for each other's `write`.
pub(crate) const SHARDS: usize = 8;

/// The journal's shards.
#[derive(Debug)]
pub(crate) struct Journals {
    shards: Vec<Mutex<Journaled>>,
    /// Set while the writer sleeps waiting for a command: only then does it need a wake-up
    /// when runs become due (awake, it looks for due runs after every group).
    writer_asleep: AtomicBool,
}

/// The shards, shared by the callers' tasks and the writer thread.
pub(crate) type SharedJournal = Arc<Journals>;

impl Journals {
    pub(crate) fn new(shards: Vec<Journaled>) -> Self {
        Self {
            shards: shards.into_iter().map(Mutex::new).collect(),
            writer_asleep: AtomicBool::new(false),
        }
    }

    /// The writer is about to sleep (`true`) or has woken (`false`).
    pub(crate) fn set_writer_asleep(&self, asleep: bool) {
        self.writer_asleep.store(asleep, Ordering::SeqCst);
    }

    /// Whether a journaling caller that made runs due should wake the writer.
    pub(crate) fn writer_asleep(&self) -> bool {
        self.writer_asleep.load(Ordering::SeqCst)
    }

    /// The shard of a run (FNV-1a of its id: the same in every process).
    pub(crate) fn index(&self, run_id: &str) -> usize {
        sluice_store::run_shard(run_id, self.shards.len())
    }

    /// Locks the shard of `run_id`.
    pub(crate) fn of(&self, run_id: &str) -> MutexGuard<'_, Journaled> {
        self.shard(self.index(run_id))
    }

    /// Locks shard `i`.
    pub(crate) fn shard(&self, i: usize) -> MutexGuard<'_, Journaled> {
        lock(&self.shards[i % self.shards.len()])
    }

    /// How many shards there are.
    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`, if it is not locked (the writer's optional work skips a shard a caller
    /// holds: that caller may have been preempted in the middle of its `write`).
    pub(crate) fn try_shard(&self, i: usize) -> Option<MutexGuard<'_, Journaled>> {
        match self.shards[i % self.shards.len()].try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Whether a shard not locked right now has work for the writer.
    pub(crate) fn has_work(&self) -> bool {
        (0..self.len()).any(|i| self.try_shard(i).is_some_and(|s| s.journal.has_work()))
    }

    /// One look at every shard not locked right now: the bytes recorded so far (`seen` keeps
    /// each shard's last known count, for the locked ones), and whether there is work besides
    /// due runs, and due runs.
    pub(crate) fn survey(&self, seen: &mut Vec<u64>) -> Survey {
        seen.resize(self.len(), 0);
        let mut survey = Survey::default();
        for (i, n) in seen.iter_mut().enumerate() {
            if let Some(s) = self.try_shard(i) {
                *n = s.journal.recorded();
                survey.other_work |= s.journal.has_work_besides_due();
                survey.due |= s.journal.has_work();
            }
        }
        survey.recorded = seen.iter().sum();
        survey
    }
}

/// What [`Journals::survey`] saw.
#[derive(Debug, Default)]
pub(crate) struct Survey {
    /// Bytes recorded by every shard so far.
    pub(crate) recorded: u64,
    /// Work other than due runs (stragglers, segments to release).
    pub(crate) other_work: bool,
    /// Any journal work, due runs included.
    pub(crate) due: bool,
}

/// What [`Journaled::append`] made of one append.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Journaled; the log now ends at this seq (its followers are to be woken).
    Journaled(u64),
    /// Refused (the events do not continue the log): this is the error.
    Refused(Error),
    /// Not for the journal: the writer must do it.
    Declined,
}

/// Locks the shared journal.
pub(crate) fn lock(shared: &Mutex<Journaled>) -> MutexGuard<'_, Journaled> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Journaled {
    /// Journals every append of `appends` it can, in order, with one `write`: checks each
    /// against the cache (a run not cached, or busy, is declined), writes their records, then
    /// notes them as pending and adds them to the cache's tail. A failed write refuses every
    /// append it carried.
    ///
    /// Returns each append's outcome, and whether the writer should be woken (see
    /// [`Journal::record`]).
    pub(crate) fn append(
        &mut self,
        cache: &RunCache,
        appends: &[(&str, &[RawEvent])],
    ) -> (Vec<Outcome>, bool) {
        let mut outcomes = Vec::with_capacity(appends.len());
        // The state of each run after the appends journaled so far in this call.
        let mut states: FastMap<&str, RunState> = FastMap::default();
        let mut written: Vec<(usize, i64, RunState)> = Vec::new();
        // Runs with an append declined: their later ones must follow it through the writer.
        let mut declined: FastSet<&str> = FastSet::default();
        self.file.begin_group();
        for (i, &(run_id, events)) in appends.iter().enumerate() {
            if declined.contains(run_id)
                || self.busy.contains(run_id)
                || !self.journal.takes(run_id, events)
            {
                declined.insert(run_id);
                outcomes.push(Outcome::Declined);
                continue;
            }
            let Some(state) = states.get(run_id).copied().or_else(|| cache.get(run_id)) else {
                declined.insert(run_id);
                outcomes.push(Outcome::Declined);
                continue;
            };
            match check_continues(run_id, Some(state), events) {
                Ok(after) => {
                    let first = self.file.push(run_id, events);
                    states.insert(run_id, after);
                    written.push((i, first, after));
                    outcomes.push(Outcome::Journaled(after.last_seq));
                }
                Err(e) => outcomes.push(Outcome::Refused(e)),
            }
        }
        if written.is_empty() {
            return (outcomes, false);
        }
        if let Err(e) = self.file.write() {
            tracing::error!(error = %e, appends = written.len(), "writing to the journal failed");
            let e = Arc::new(e);
            for (i, _, _) in written {
                outcomes[i] =
                    Outcome::Refused(Error::backend("writing to the journal", Arc::clone(&e)));
            }
            return (outcomes, false);
        }
        if let Err(e) = self.file.commit_group() {
            tracing::error!(error = %e, "cannot begin a new journal segment");
        }
        let mut wake = false;
        for &(i, first, _) in &written {
            let (run_id, events) = appends[i];
            wake |= self.journal.record(run_id, events, first);
        }
        let journal = &self.journal;
        cache.apply(written.iter().map(|&(i, _, after)| {
            let (run_id, events) = appends[i];
            Change {
                run_id,
                state: Some(after),
                appended: events.to_vec(),
                applied_upto: journal.applied_upto(run_id, after.last_seq),
            }
        }));
        (outcomes, wake)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sluice_protocol::Timestamp;

    fn ev(seq: u64, text_len: usize) -> RawEvent {
        let data = format!("{{\"text\":\"{}\"}}", "x".repeat(text_len));
        RawEvent::encode(seq, "r", "tick", Timestamp::now(), Some(1), &data)
    }

    fn seqs(v: &[RawEvent]) -> Vec<u64> {
        v.iter().map(RawEvent::seq).collect()
    }

    #[test]
    fn small_appends_become_due_when_a_page_is_full_and_move_in_prefixes() {
        let mut j = Journal::new(1);
        let mut seq = 0;
        while j.next_due().is_none() {
            seq += 1;
            assert!(
                seq <= APPLY_EVENTS as u64,
                "due by a page's worth of events"
            );
            assert!(j.takes("a", &[ev(seq, 8)]));
            let _ = j.record("a", &[ev(seq, 8)], seq as i64);
        }
        assert_eq!(j.applied_upto("a", seq), 0);
        // Popped, it is out of the queue until something changes.
        assert_eq!(j.next_due(), None);
        // The writer moves what it saw; what came meanwhile stays pending.
        let seen = j.pending_from("a", 0);
        assert_eq!(seqs(&seen), (1..=seq).collect::<Vec<_>>());
        j.record("a", &[ev(seq + 1, 8)], seq as i64 + 1);
        j.moved("a", seen.len());
        assert_eq!(seqs(&j.pending_from("a", 0)), vec![seq + 1]);
        assert_eq!(j.applied_upto("a", seq + 1), seq);
        assert_eq!(j.front(), seq as i64 + 1);
        j.moved("a", 1);
        assert_eq!(j.pending_len("a"), 0);
        assert_eq!(j.applied_upto("a", seq + 1), seq + 1);
        assert_eq!(
            j.front(),
            seq as i64 + 2,
            "nothing pending: the front is the end"
        );
    }

    #[test]
    fn the_journal_declines_big_closing_and_capped_appends() {
        let mut j = Journal::new(1);
        assert!(!j.takes("a", &[]));
        assert!(!j.takes("a", &[ev(1, APPLY_BYTES)]));
        let term = RawEvent::encode(1, "r", "chain-completed", Timestamp::now(), None, "{}");
        assert!(!j.takes("a", &[term]));
        let mut seq = 0;
        while j.takes("a", &[ev(seq + 1, 8)]) {
            seq += 1;
            let _ = j.record("a", &[ev(seq, 8)], seq as i64);
        }
        // Declined where one more would reach a cap.
        let one = ev(seq + 1, 8).json().len();
        assert!(
            j.pending_bytes("a", 0) + one >= CAP_BYTES || j.pending_len("a") + 1 >= CAP_EVENTS,
            "{seq}"
        );
        assert!(seq > APPLY_EVENTS as u64, "{seq}");
    }

    #[test]
    fn a_closed_run_is_due_and_a_failed_move_is_queued_again() {
        let mut j = Journal::new(1);
        j.record("a", &[ev(1, 1), ev(2, 1)], 1);
        assert_eq!(j.next_due(), None);
        j.close("a");
        assert_eq!(j.next_due().as_deref(), Some("a"));
        j.requeue("a");
        assert_eq!(j.next_due().as_deref(), Some("a"));
        j.forget("a");
        j.requeue("a");
        assert_eq!(j.next_due(), None, "a forgotten run is not queued");
    }

    #[test]
    fn quiet_runs_become_stragglers_and_hold_the_front() {
        let mut j = Journal::new(1);
        j.record("quiet", &[ev(1, 1)], 1);
        let mut pos = 2;
        let mut busy = 0u64;
        while j.stragglers().is_empty() {
            let run = format!("busy{}", busy % 100);
            busy += 1;
            let _ = j.record(&run, &[ev(busy, 100)], pos);
            pos += 1;
            // Busy runs are moved as they become due.
            while let Some(due) = j.next_due() {
                let n = j.pending_len(&due);
                j.moved(&due, n);
            }
        }
        assert_eq!(j.stragglers(), vec!["quiet".to_owned()]);
        assert_eq!(j.front(), 1, "the quiet run holds the front");
        assert_eq!(j.release(), None);
        j.forget("quiet");
        let cut = j.release().expect("the front can move now");
        assert!(cut > WINDOW / 2, "{cut}");
        assert_eq!(j.release(), None);
    }
}
