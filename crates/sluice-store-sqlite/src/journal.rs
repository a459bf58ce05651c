//! The journal: where small appends are made durable first, so that many runs each appending
//! a token at a time do not each rewrite a page of the `events` table at every commit.
//!
//! The `events` table is clustered by `(run_id, seq)`, which keeps every run's log together for
//! replays. But an append of one event into it dirties one page of that run, and a commit writes
//! every dirty page to the WAL: with a thousand runs streaming tokens, a commit of a few hundred
//! single-event appends writes a few hundred pages (4 KiB each for ~200 bytes of data each).
//!
//! So a small append goes to the journal instead: records appended to segment files
//! (`journal_file.rs`), one `write` per group commit, in no SQLite transaction. The writer keeps
//! each run's journaled events in memory (*pending*). Once they add up to [`APPLY_BYTES`] or
//! [`APPLY_EVENTS`] the run is *due*: due runs are moved into `events` (one multi-row insert
//! each) a few at a time after the appends of a group were acknowledged, with a budget that
//! grows with what the group journaled, so a thousand runs that fill their page at the same
//! moment are moved over the next groups instead of all in one. A run that reaches
//! [`CAP_BYTES`] or [`CAP_EVENTS`] pending (the writer is behind) is moved at once with its
//! append; one that sat behind [`WINDOW`] newer records (a run that went quiet) is moved at the
//! next commit. A closing append, or a large one (a batch of [`APPLY_BYTES`] or more), skips
//! the journal and is written to `events` directly, with the run's pending events before it.
//! Segments are deleted once every record in them is in `events` (or belongs to a deleted run).
//!
//! Readers never read the journal: a run's pending events are also in the shared cache's tail
//! (see `cache.rs`), which always reaches back to the last event in `events`. When the store
//! opens, whatever the journal holds is moved into `events` before anything else runs.
//!
//! This module is the in-memory bookkeeping; the SQL is in `writer.rs`. Every change made while
//! a group commit runs can be rolled back with the group.

use std::collections::{BTreeMap, HashMap, VecDeque};

use sluice_protocol::RawEvent;

/// A run is due to have its pending events moved to `events` once their envelopes add up to
/// this many bytes (about one page of the table)…
pub(crate) const APPLY_BYTES: usize = 4096;

/// …or once there are this many of them.
pub(crate) const APPLY_EVENTS: usize = 48;

/// A run with this many bytes pending is moved with its next append, due or not: the pending
/// events (and the cache's tail, which holds them) stay bounded when the writer falls behind.
pub(crate) const CAP_BYTES: usize = 4 * APPLY_BYTES;

/// …likewise with this many events pending.
pub(crate) const CAP_EVENTS: usize = 4 * APPLY_EVENTS;

/// A run whose oldest pending event has this many newer journal records behind it is applied
/// at the next commit, however few its events: it keeps the journal's front from moving.
pub(crate) const WINDOW: i64 = 131_072;

/// The journal's front is released once it can move by this many records.
pub(crate) const TRUNCATE_STEP: i64 = 4096;

/// One run's journaled events that are not in `events` yet.
#[derive(Debug)]
struct Pending {
    events: Vec<RawEvent>,
    bytes: usize,
    /// The journal position of the first of them.
    oldest_pos: i64,
    /// Whether the run is in the due queue.
    queued: bool,
}

impl Pending {
    fn is_due(&self) -> bool {
        self.bytes >= APPLY_BYTES || self.events.len() >= APPLY_EVENTS
    }
}

/// How to restore one run's pending events when a group rolls back.
#[derive(Debug)]
enum Undo {
    /// It had none.
    Absent,
    /// It had these first `len` events (later ones came with the group), `bytes` of them.
    Prefix { len: usize, bytes: usize },
    /// The group took them: these are they (cut back to what it had before the group).
    Taken(Pending),
}

/// Where an append goes.
#[derive(Debug)]
pub(crate) enum Route {
    /// Into `events`, now: these events (the run's pending ones, then the append's).
    Direct(Vec<RawEvent>),
    /// Into the journal, at consecutive positions from this one.
    Journal(i64),
}

impl Route {
    #[cfg(test)]
    fn is_journal(&self) -> bool {
        matches!(self, Self::Journal(_))
    }
}

/// Whether an append of `events` is small enough for the journal (else it goes to `events`).
fn small(events: &[RawEvent], bytes: usize) -> bool {
    !events.is_empty() && bytes < APPLY_BYTES && events.len() < APPLY_EVENTS
}

/// The writer's journal bookkeeping.
#[derive(Debug)]
pub(crate) struct Journal {
    pending: HashMap<String, Pending>,
    /// Runs with pending events, by the position of their oldest one.
    by_oldest: BTreeMap<i64, String>,
    next_pos: i64,
    /// Every record below this position has been released.
    truncated_below: i64,
    /// Runs whose pending events should move to `events`, oldest first (entries may be stale:
    /// [`Journal::next_due`] skips runs that are no longer due).
    due: VecDeque<String>,
    /// Every run with pending events is due (the store is closing).
    closing: bool,
    /// What the open group changed, to roll it back: how each run's pending state was before
    /// the group (without copying the events).
    undo: HashMap<String, Undo>,
    /// `next_pos` and `truncated_below` when the group began.
    at_begin: (i64, i64),
}

fn bytes_of(events: &[RawEvent]) -> usize {
    events.iter().map(|e| e.json().len()).sum()
}

impl Journal {
    /// Bookkeeping for a journal whose next row goes at `next_pos` and whose rows below
    /// `lowest` are gone (an empty journal: both the same).
    pub(crate) fn new(next_pos: i64, lowest: i64) -> Self {
        Self {
            pending: HashMap::new(),
            by_oldest: BTreeMap::new(),
            next_pos,
            truncated_below: lowest,
            due: VecDeque::new(),
            closing: false,
            undo: HashMap::new(),
            at_begin: (next_pos, lowest),
        }
    }

    /// A group commit begins.
    pub(crate) fn begin_group(&mut self) {
        self.undo.clear();
        self.at_begin = (self.next_pos, self.truncated_below);
    }

    /// The group committed: its changes stay.
    pub(crate) fn commit_group(&mut self) {
        self.undo.clear();
    }

    /// The group failed: back to how things were when it began.
    pub(crate) fn rollback_group(&mut self) {
        for (run, undo) in self.undo.drain() {
            let now = self.pending.remove(&run);
            if let Some(now) = &now {
                self.by_oldest.remove(&now.oldest_pos);
            }
            let before = match undo {
                Undo::Absent => None,
                Undo::Taken(before) => Some(before),
                Undo::Prefix { len, bytes } => now.map(|mut p| {
                    p.events.truncate(len);
                    p.bytes = bytes;
                    p
                }),
            };
            if let Some(mut before) = before.filter(|p| !p.events.is_empty()) {
                self.by_oldest.insert(before.oldest_pos, run.clone());
                // The queue may have lost it (it was taken): queue it again if due.
                before.queued = before.is_due();
                if before.queued {
                    self.due.push_back(run.clone());
                }
                self.pending.insert(run, before);
            }
        }
        (self.next_pos, self.truncated_below) = self.at_begin;
    }

    /// Notes how the run's pending events stand before the group first changes them.
    fn save(&mut self, run_id: &str) {
        if !self.undo.contains_key(run_id) {
            let undo = match self.pending.get(run_id) {
                Some(p) => Undo::Prefix {
                    len: p.events.len(),
                    bytes: p.bytes,
                },
                None => Undo::Absent,
            };
            self.undo.insert(run_id.to_owned(), undo);
        }
    }

    /// How many of the run's events are pending (in the journal only).
    pub(crate) fn pending_len(&self, run_id: &str) -> usize {
        self.pending.get(run_id).map_or(0, |p| p.events.len())
    }

    /// Whether [`Journal::route`] would journal this append (it is small and does not close
    /// the log, and the run's pending events stay under the cap).
    pub(crate) fn journals(&self, run_id: &str, events: &[RawEvent], closes: bool) -> bool {
        let bytes = bytes_of(events);
        let (had_bytes, had_len) = self
            .pending
            .get(run_id)
            .map_or((0, 0), |p| (p.bytes, p.events.len()));
        !closes
            && small(events, bytes)
            && had_bytes + bytes < CAP_BYTES
            && had_len + events.len() < CAP_EVENTS
    }

    /// Decides where an append of `events` (already checked to continue the log) goes, and
    /// records it. `closes`: the append ends with a terminal event.
    pub(crate) fn route(&mut self, run_id: &str, events: &[RawEvent], closes: bool) -> Route {
        if !self.journals(run_id, events, closes) {
            let mut all = self.take(run_id);
            all.extend_from_slice(events);
            return Route::Direct(all);
        }
        let bytes = bytes_of(events);
        self.save(run_id);
        let first = self.next_pos;
        self.next_pos += i64::try_from(events.len()).unwrap_or(i64::MAX);
        let entry = self
            .pending
            .entry(run_id.to_owned())
            .or_insert_with(|| Pending {
                events: Vec::new(),
                bytes: 0,
                oldest_pos: first,
                queued: false,
            });
        if entry.events.is_empty() {
            entry.oldest_pos = first;
            self.by_oldest.insert(first, run_id.to_owned());
        }
        entry.events.extend_from_slice(events);
        entry.bytes += bytes;
        if !entry.queued && entry.is_due() {
            entry.queued = true;
            self.due.push_back(run_id.to_owned());
        }
        Route::Journal(first)
    }

    /// The next due run (whose pending events should move to `events`), oldest first.
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

    /// Queues every run with pending events, due or not (the store is closing).
    pub(crate) fn make_all_due(&mut self) {
        self.closing = true;
        self.due.clear();
        self.due.extend(self.by_oldest.values().cloned());
        for p in self.pending.values_mut() {
            p.queued = true;
        }
    }

    /// The bytes a run has pending.
    pub(crate) fn pending_bytes(&self, run_id: &str) -> usize {
        self.pending.get(run_id).map_or(0, |p| p.bytes)
    }

    /// Whether the end of a group has work to do: due runs, stragglers, or a front that can move.
    pub(crate) fn has_work(&self) -> bool {
        !self.due.is_empty()
            || self
                .by_oldest
                .keys()
                .next()
                .is_some_and(|&oldest| oldest < self.next_pos - WINDOW)
            || self.truncation().is_some()
    }

    /// Removes and returns the run's pending events (to write them to `events`, or because the
    /// run is gone).
    pub(crate) fn take(&mut self, run_id: &str) -> Vec<RawEvent> {
        if !self.pending.contains_key(run_id) {
            return Vec::new();
        }
        self.save(run_id);
        let Some(p) = self.pending.remove(run_id) else {
            return Vec::new();
        };
        self.by_oldest.remove(&p.oldest_pos);
        // A rollback must give back what the run had before the group: keep that part.
        let out = p.events.clone();
        if let Some(undo) = self.undo.get_mut(run_id)
            && let Undo::Prefix { len, bytes } = *undo
        {
            let mut before = p;
            before.events.truncate(len);
            before.bytes = bytes;
            *undo = Undo::Taken(before);
        }
        out
    }

    /// Runs whose oldest pending event is more than [`WINDOW`] rows behind.
    pub(crate) fn stragglers(&self) -> Vec<String> {
        let limit = self.next_pos - WINDOW;
        self.by_oldest
            .range(..limit)
            .map(|(_, run)| run.clone())
            .collect()
    }

    /// Where the journal's front can be cut (every record below is in `events`, or belongs to
    /// a deleted run), when it moved by [`TRUNCATE_STEP`] records at least.
    pub(crate) fn truncation(&self) -> Option<i64> {
        let low = self
            .by_oldest
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_pos);
        (low - self.truncated_below >= TRUNCATE_STEP).then_some(low)
    }

    /// Every record below this position is in `events` (or belongs to a deleted run).
    pub(crate) fn front(&self) -> i64 {
        self.truncated_below
    }

    /// The records below `below` were released.
    pub(crate) fn truncated(&mut self, below: i64) {
        self.truncated_below = below;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use sluice_protocol::{Timestamp, kind};

    fn ev(seq: u64, text_len: usize) -> RawEvent {
        let data = format!("{{\"text\":\"{}\"}}", "x".repeat(text_len));
        RawEvent::encode(seq, "r", "tick", Timestamp::now(), Some(1), &data)
    }

    fn seqs(v: &[RawEvent]) -> Vec<u64> {
        v.iter().map(RawEvent::seq).collect()
    }

    #[test]
    fn small_appends_wait_in_the_journal_and_become_due_when_a_page_is_full() {
        let mut j = Journal::new(1, 1);
        j.begin_group();
        let mut seq = 0;
        while j.next_due().is_none() {
            seq += 1;
            assert!(
                seq <= APPLY_EVENTS as u64,
                "due by a page's worth of events"
            );
            assert!(j.journals("a", &[ev(seq, 8)], false));
            assert!(matches!(
                j.route("a", &[ev(seq, 8)], false),
                Route::Journal(pos) if pos == seq as i64
            ));
        }
        // Popped, it is out of the queue; still due (not moved), its next append queues it
        // again, once.
        assert_eq!(j.next_due(), None);
        for _ in 0..2 {
            seq += 1;
            assert!(j.route("a", &[ev(seq, 8)], false).is_journal());
        }
        assert_eq!(j.next_due().as_deref(), Some("a"));
        assert_eq!(j.next_due(), None);
        // Not moved yet, it keeps journaling up to the cap; the append reaching it takes them.
        let mut direct = None;
        while direct.is_none() {
            seq += 1;
            if let Route::Direct(all) = j.route("a", &[ev(seq, 8)], false) {
                direct = Some(all);
            }
        }
        let all = direct.unwrap();
        assert_eq!(seqs(&all), (1..=seq).collect::<Vec<_>>());
        assert!(all.len() <= CAP_EVENTS);
        assert_eq!(j.pending_len("a"), 0);
        // A big append goes straight through, with nothing pending.
        let big = ev(seq + 1, APPLY_BYTES);
        assert!(!j.journals("a", std::slice::from_ref(&big), false));
        assert!(matches!(j.route("a", &[big], false), Route::Direct(v) if v.len() == 1));
        // A closing append takes the pending ones with it.
        assert!(matches!(
            j.route("a", &[ev(seq + 2, 1)], false),
            Route::Journal(_)
        ));
        let term = RawEvent::encode(
            seq + 3,
            "r",
            kind::CHAIN_COMPLETED,
            Timestamp::now(),
            None,
            "{}",
        );
        match j.route("a", &[term], true) {
            Route::Direct(v) => assert_eq!(seqs(&v), vec![seq + 2, seq + 3]),
            Route::Journal(_) => panic!("a closing append is never journaled"),
        }
    }

    #[test]
    fn a_rolled_back_take_of_a_due_run_queues_it_again() {
        let mut j = Journal::new(1, 1);
        j.begin_group();
        for seq in 1..=APPLY_EVENTS as u64 {
            let _ = j.route("a", &[ev(seq, 1)], false);
        }
        j.commit_group();
        j.begin_group();
        assert_eq!(j.next_due().as_deref(), Some("a"));
        assert_eq!(j.take("a").len(), APPLY_EVENTS);
        j.rollback_group();
        assert_eq!(j.pending_len("a"), APPLY_EVENTS);
        assert_eq!(j.next_due().as_deref(), Some("a"));
    }

    #[test]
    fn rollback_restores_pending_positions_and_the_front() {
        let mut j = Journal::new(10, 10);
        j.begin_group();
        assert!(matches!(
            j.route("a", &[ev(1, 1)], false),
            Route::Journal(10)
        ));
        j.commit_group();
        j.begin_group();
        assert!(matches!(
            j.route("a", &[ev(2, 1)], false),
            Route::Journal(11)
        ));
        assert!(matches!(
            j.route("b", &[ev(1, 1)], false),
            Route::Journal(12)
        ));
        assert_eq!(j.take("a").len(), 2);
        j.rollback_group();
        assert_eq!(j.pending_len("a"), 1);
        assert_eq!(j.pending_len("b"), 0);
        j.begin_group();
        assert!(matches!(
            j.route("b", &[ev(1, 1)], false),
            Route::Journal(11)
        ));
        // The front is held by "a"'s row at 10.
        assert_eq!(j.truncation(), None);
    }

    #[test]
    fn quiet_runs_are_applied_and_the_front_moves() {
        let mut j = Journal::new(1, 1);
        j.begin_group();
        assert!(matches!(
            j.route("quiet", &[ev(1, 1)], false),
            Route::Journal(1)
        ));
        let mut seq = 0;
        let mut busy = 0;
        // Many other runs keep appending; each is moved when it reaches the cap.
        while j.stragglers().is_empty() {
            seq += 1;
            let run = format!("busy{}", busy % 100);
            busy += 1;
            let _ = j.route(&run, &[ev(seq, 100)], false);
        }
        assert_eq!(j.stragglers(), vec!["quiet".to_owned()]);
        assert_eq!(j.truncation(), None, "the quiet run holds the front");
        assert_eq!(j.take("quiet").len(), 1);
        let cut = j.truncation().expect("the front can move now");
        assert!(cut > WINDOW / 2, "{cut}");
        j.truncated(cut);
        assert_eq!(j.truncation(), None);
    }
}
