//! The committed state of open logs, shared by the writer and the readers: where each open log
//! stands, and its newest committed events (the *tail*), so that live followers read what was
//! just committed from memory instead of from the database.
//!
//! The tail always holds every event of the run that is only in the journal (see
//! `journal.rs`): it is trimmed only down to the last event in the `batches` table. So a read
//! is answered either from the tail or, for older events, from `batches`, never from the
//! journal.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use sluice_protocol::RawEvent;
use sluice_store::{Error, FastMap, Result};

/// A run's tail keeps at most this many events (besides the whole last append)…
const TAIL_EVENTS: usize = 64;

/// …and at most about this many bytes of envelopes (at least the newest event). A follower
/// that has fallen further behind reads from the database, at its own pace.
const TAIL_BYTES: usize = 8 * 1024;

/// Where a run's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunState {
    /// The seq of the last event (0 for an empty log).
    pub(crate) last_seq: u64,
    /// Whether the last event is terminal: nothing can be appended.
    pub(crate) closed: bool,
}

/// Checks that `events` continue a log standing at `state`; returns the state after them.
pub(crate) fn check_continues(
    run_id: &str,
    state: Option<RunState>,
    events: &[RawEvent],
) -> Result<RunState> {
    let state = state.ok_or_else(|| Error::run_not_found(run_id))?;
    if state.closed {
        return Err(Error::LogClosed {
            run_id: run_id.to_owned(),
        });
    }
    let mut expected = state.last_seq + 1;
    for (i, e) in events.iter().enumerate() {
        if e.is_terminal() && i + 1 < events.len() {
            // Nothing may follow a terminal event: the batch is refused whole.
            return Err(Error::LogClosed {
                run_id: run_id.to_owned(),
            });
        }
        if e.seq() != expected {
            return Err(Error::SeqConflict {
                run_id: run_id.to_owned(),
                expected,
                got: e.seq(),
            });
        }
        expected += 1;
    }
    Ok(RunState {
        last_seq: expected - 1,
        closed: events.last().is_some_and(RawEvent::is_terminal),
    })
}

/// One open log: its committed state and its newest committed events, contiguous and ending at
/// `state.last_seq` (possibly empty), holding at least every event after `applied_upto`.
#[derive(Debug)]
struct Entry {
    state: RunState,
    /// The last seq in the `batches` table; later ones are in the journal (and the tail).
    applied_upto: u64,
    tail: VecDeque<RawEvent>,
    tail_bytes: usize,
}

impl Entry {
    fn new(state: RunState) -> Self {
        Self {
            state,
            applied_upto: state.last_seq,
            tail: VecDeque::new(),
            tail_bytes: 0,
        }
    }

    /// Moves the entry to `state`, with `appended` the events committed to get there.
    fn advance(&mut self, state: RunState, appended: Vec<RawEvent>, applied_upto: u64) {
        self.applied_upto = applied_upto;
        let continues = appended
            .first()
            .is_some_and(|e| e.seq() == self.state.last_seq + 1)
            && appended.last().is_some_and(|e| e.seq() == state.last_seq);
        if !continues {
            // Nothing new (a record update), or state from elsewhere: the tail must still end at
            // last_seq, so it is kept only if nothing moved.
            if state.last_seq != self.state.last_seq {
                self.tail.clear();
                self.tail_bytes = 0;
            }
            self.state = state;
            return;
        }
        self.state = state;
        // The whole last append stays, however long: a follower woken by this commit finds all
        // of it here (a run writing big batches is read from memory batch after batch).
        let keep_from = appended.first().map_or(u64::MAX, RawEvent::seq);
        for e in appended {
            self.tail_bytes += e.json().len();
            self.tail.push_back(e);
        }
        while self.tail.len() > TAIL_EVENTS || (self.tail_bytes > TAIL_BYTES && self.tail.len() > 1)
        {
            // Events of the last append, and events only in the journal, stay.
            if self
                .tail
                .front()
                .is_none_or(|old| old.seq() >= keep_from || old.seq() > self.applied_upto)
            {
                break;
            }
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.json().len();
            }
        }
        if self.tail.capacity() > 4 * TAIL_EVENTS && self.tail.len() < self.tail.capacity() / 4 {
            self.tail
                .shrink_to(2 * self.tail.len().max(TAIL_EVENTS / 2));
        }
    }
}

/// What a commit did to one run, for [`RunCache::apply`].
#[derive(Debug)]
pub(crate) struct Change<'a> {
    pub(crate) run_id: &'a str,
    /// The state after the commit (`None`: the run does not exist).
    pub(crate) state: Option<RunState>,
    /// The events the commit appended, in order.
    pub(crate) appended: Vec<RawEvent>,
    /// The last seq of the run in the `batches` table after the commit.
    pub(crate) applied_upto: u64,
}

/// `run_id -> (RunState, tail)` for runs whose log is open, as committed.
///
/// It is filled after each commit of the writer and after each journaled append (see
/// `journal.rs`), so an entry is never ahead of what is durable nor older than what was
/// acknowledged. Readers use it to answer `last_seq` and live reads without a query, and fall
/// back to the database on a miss. Runs whose log is closed leave it once every event of theirs
/// is in `batches`: their state never changes, and their readers read the rest from the
/// database. A run that has events only in the journal is always here (an entry leaves when
/// its log is closed and fully moved, or the run is deleted), so a run that is not here has
/// all its events in `batches`.
///
/// The map is split into [`SHARDS`] parts by run id, each under its own lock: the writer
/// thread applying a commit and the followers reading their run's tail on the runtime's
/// threads then rarely wait for each other (a lock held by a preempted thread stalls whoever
/// wants it, the writer included). Every operation is about one run, so nothing needs two
/// shards at once.
#[derive(Debug)]
pub(crate) struct RunCache {
    shards: Vec<Mutex<FastMap<String, Entry>>>,
}

/// How many independently locked parts the cache is split into.
const SHARDS: usize = 16;

impl Default for RunCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl RunCache {
    fn lock(&self, run_id: &str) -> MutexGuard<'_, FastMap<String, Entry>> {
        self.shards[sluice_store::run_shard(run_id, self.shards.len())]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The committed state of an open log, if cached.
    pub(crate) fn get(&self, run_id: &str) -> Option<RunState> {
        self.lock(run_id).get(run_id).map(|e| e.state)
    }

    /// The committed events with `seq > after` (at most `limit`), when the cache can tell them
    /// all: `Some(empty)` when nothing is committed past `after`, `None` when the database must
    /// be asked (the run is not cached, or `after` is older than its tail).
    pub(crate) fn read(&self, run_id: &str, after: u64, limit: usize) -> Option<Vec<RawEvent>> {
        let runs = self.lock(run_id);
        let entry = runs.get(run_id)?;
        if after >= entry.state.last_seq {
            return Some(Vec::new());
        }
        let first = entry.tail.front()?.seq();
        if first > after + 1 {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        Some(entry.tail.iter().skip(skip).take(limit).cloned().collect())
    }

    /// Pending events of the run moved into `batches`: every event before `first_pending` is
    /// there now (`None`: all of them). A closed log whose every event is there leaves the
    /// cache.
    pub(crate) fn moved(&self, run_id: &str, first_pending: Option<u64>) {
        let mut runs = self.lock(run_id);
        if let Some(entry) = runs.get_mut(run_id) {
            let upto = first_pending.map_or(entry.state.last_seq, |s| s.saturating_sub(1));
            entry.applied_upto = entry.applied_upto.max(upto);
            if entry.state.closed && entry.applied_upto >= entry.state.last_seq {
                runs.remove(run_id);
            }
        }
    }

    /// Drops the run's tail down to the events that are only in the journal (which must stay:
    /// reads never go to the journal); its state stays. Readers then read from `batches`.
    pub(crate) fn trim(&self, run_id: &str) {
        let mut runs = self.lock(run_id);
        if let Some(entry) = runs.get_mut(run_id) {
            while let Some(old) = entry.tail.front() {
                if old.seq() > entry.applied_upto {
                    break;
                }
                entry.tail_bytes -= old.json().len();
                entry.tail.pop_front();
            }
            entry.tail.shrink_to_fit();
        }
    }

    /// Records what a commit made of these runs.
    pub(crate) fn apply<'a>(&self, changes: impl IntoIterator<Item = Change<'a>>) {
        for change in changes {
            let mut runs = self.lock(change.run_id);
            match change.state {
                // A closed log stays while events of it are only in the journal.
                Some(state) if !state.closed || change.applied_upto < state.last_seq => {
                    match runs.get_mut(change.run_id) {
                        Some(entry) => entry.advance(state, change.appended, change.applied_upto),
                        None => {
                            // A run seen for the first time this commit: its tail starts with what
                            // the commit appended, when that ends at the committed state.
                            let start = RunState {
                                last_seq: change
                                    .appended
                                    .first()
                                    .map_or(state.last_seq, |e| e.seq().saturating_sub(1)),
                                closed: false,
                            };
                            let mut entry = Entry::new(start);
                            entry.advance(state, change.appended, change.applied_upto);
                            runs.insert(change.run_id.to_owned(), entry);
                        }
                    }
                }
                _ => {
                    runs.remove(change.run_id);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(seq: u64, text_len: usize) -> RawEvent {
        let json = format!("{{\"seq\":{seq},\"text\":\"{}\"}}", "x".repeat(text_len));
        RawEvent::from_parts(seq, "tick", bytes::Bytes::from(json))
    }

    fn open(last_seq: u64) -> Option<RunState> {
        Some(RunState {
            last_seq,
            closed: false,
        })
    }

    fn seqs(v: Option<Vec<RawEvent>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(RawEvent::seq).collect())
    }

    #[test]
    fn an_idle_log_keeps_only_what_is_not_yet_in_events() {
        let cache = RunCache::default();
        // One big append, all of it in `batches`: the whole append is the tail.
        cache.apply([Change {
            run_id: "r",
            state: open(2),
            appended: vec![ev(1, 4), ev(2, 100_000)],
            applied_upto: 2,
        }]);
        assert_eq!(seqs(cache.read("r", 0, 10)), Some(vec![1, 2]));
        cache.trim("r");
        assert_eq!(seqs(cache.read("r", 0, 10)), None, "read from the database");
        assert_eq!(seqs(cache.read("r", 2, 10)), Some(vec![]), "at the end");
        assert_eq!(cache.get("r"), open(2), "the state stays");
        // Events only in the journal stay, whatever the hint.
        cache.apply([Change {
            run_id: "r",
            state: open(4),
            appended: vec![ev(3, 4), ev(4, 4)],
            applied_upto: 2,
        }]);
        cache.trim("r");
        assert_eq!(seqs(cache.read("r", 2, 10)), Some(vec![3, 4]));
        // New appends fill the tail again.
        cache.apply([Change {
            run_id: "r",
            state: open(5),
            appended: vec![ev(5, 4)],
            applied_upto: 5,
        }]);
        assert_eq!(seqs(cache.read("r", 2, 10)), Some(vec![3, 4, 5]));
        cache.trim("r");
        assert_eq!(seqs(cache.read("r", 2, 10)), None);
    }

    #[test]
    fn serves_the_tail_and_sends_older_cursors_to_the_database() {
        let cache = RunCache::default();
        cache.apply([Change {
            run_id: "r",
            state: open(3),
            appended: (1..=3).map(|s| ev(s, 4)).collect(),
            applied_upto: 3,
        }]);
        assert_eq!(seqs(cache.read("r", 0, 10)), Some(vec![1, 2, 3]));
        assert_eq!(seqs(cache.read("r", 1, 1)), Some(vec![2]));
        assert_eq!(seqs(cache.read("r", 3, 10)), Some(vec![]));
        assert_eq!(seqs(cache.read("other", 0, 10)), None);
        // Far more than the tail holds: only the newest stay, older cursors miss.
        let n = TAIL_EVENTS as u64 * 2;
        cache.apply([Change {
            run_id: "r",
            state: open(3 + n),
            appended: (4..=3 + n).map(|s| ev(s, 4)).collect(),
            applied_upto: 3 + n,
        }]);
        assert_eq!(seqs(cache.read("r", 0, 10)), None);
        let newest = seqs(cache.read("r", 2 + n, 10)).unwrap();
        assert_eq!(newest, vec![3 + n]);
        let from = 3 + n - TAIL_EVENTS as u64;
        assert_eq!(
            seqs(cache.read("r", from, 1000)).unwrap().len(),
            TAIL_EVENTS
        );
    }

    #[test]
    fn one_commit_of_many_runs_reaches_every_shard() {
        let cache = RunCache::default();
        let ids: Vec<String> = (0..100).map(|i| format!("run_{i}")).collect();
        let used: std::collections::HashSet<usize> = ids
            .iter()
            .map(|id| sluice_store::run_shard(id, SHARDS))
            .collect();
        assert!(
            used.len() > SHARDS / 2,
            "the ids spread over {} shards",
            used.len()
        );
        cache.apply(ids.iter().enumerate().map(|(i, id)| Change {
            run_id: id,
            state: open(i as u64 + 1),
            appended: (1..=i as u64 + 1).map(|s| ev(s, 4)).collect(),
            applied_upto: i as u64 + 1,
        }));
        for (i, id) in ids.iter().enumerate() {
            let n = i as u64 + 1;
            assert_eq!(cache.get(id), open(n), "{id}");
            let newest = seqs(cache.read(id, n - 1, 10));
            assert_eq!(newest, Some(vec![n]), "{id}");
        }
        // Closing every log with everything in `batches` empties every shard.
        cache.apply(ids.iter().enumerate().map(|(i, id)| Change {
            run_id: id,
            state: Some(RunState {
                last_seq: i as u64 + 1,
                closed: true,
            }),
            appended: Vec::new(),
            applied_upto: i as u64 + 1,
        }));
        assert!(ids.iter().all(|id| cache.get(id).is_none()));
    }

    #[test]
    fn events_only_in_the_journal_are_never_trimmed() {
        let cache = RunCache::default();
        let n = TAIL_EVENTS as u64 * 3;
        cache.apply([Change {
            run_id: "r",
            state: open(n),
            appended: (1..=n).map(|s| ev(s, 4)).collect(),
            applied_upto: 0,
        }]);
        assert_eq!(seqs(cache.read("r", 0, 1000)).unwrap().len() as u64, n);
        // Once they are in `batches`, the tail shrinks to its bounds at the next commit.
        cache.apply([Change {
            run_id: "r",
            state: open(n + 1),
            appended: vec![ev(n + 1, 4)],
            applied_upto: n + 1,
        }]);
        assert_eq!(cache.read("r", 0, 1000), None);
        assert_eq!(
            seqs(cache.read("r", n + 1 - TAIL_EVENTS as u64, 1000))
                .unwrap()
                .len(),
            TAIL_EVENTS
        );
    }

    #[test]
    fn bounds_bytes_and_forgets_closed_and_jumping_runs() {
        let cache = RunCache::default();
        let big = TAIL_BYTES / 2;
        // One append keeps all its events, whatever their size.
        cache.apply([Change {
            run_id: "r",
            state: open(4),
            appended: (1..=4).map(|s| ev(s, big)).collect(),
            applied_upto: 4,
        }]);
        assert_eq!(seqs(cache.read("r", 0, 10)), Some(vec![1, 2, 3, 4]));
        // The next one trims the older ones to the byte budget: the newest one or two stay.
        cache.apply([Change {
            run_id: "r",
            state: open(5),
            appended: vec![ev(5, big)],
            applied_upto: 5,
        }]);
        assert_eq!(cache.read("r", 2, 10), None);
        assert_eq!(seqs(cache.read("r", 4, 10)), Some(vec![5]));
        // A state that moved without the events (loaded from elsewhere) empties the tail.
        cache.apply([Change {
            run_id: "r",
            state: open(9),
            appended: Vec::new(),
            applied_upto: 9,
        }]);
        assert_eq!(cache.read("r", 8, 10), None);
        assert_eq!(seqs(cache.read("r", 9, 10)), Some(vec![]));
        // A closed log leaves the cache.
        cache.apply([Change {
            run_id: "r",
            state: Some(RunState {
                last_seq: 10,
                closed: true,
            }),
            appended: vec![ev(10, 1)],
            applied_upto: 10,
        }]);
        assert_eq!(cache.get("r"), None);
        assert_eq!(cache.read("r", 9, 10), None);
    }
}
