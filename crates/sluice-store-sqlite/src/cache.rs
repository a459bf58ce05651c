//! The committed state of recently written logs, shared by the writer and the readers.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Past this many entries the cache is emptied and refilled lazily (a safety bound: entries of
/// finished and deleted runs leave it as they happen).
const MAX_RUNS: usize = 65_536;

/// Where a run's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunState {
    /// The seq of the last event (0 for an empty log).
    pub(crate) last_seq: u64,
    /// Whether the last event is terminal: nothing can be appended.
    pub(crate) closed: bool,
}

/// `run_id -> RunState` for runs whose log is open, as committed.
///
/// Only the writer fills it, after each commit, so an entry is never older than what was
/// acknowledged to a writer. Readers use it to answer `last_seq` without a query and fall back to
/// the database on a miss. Runs whose log is closed are left out: their state never changes.
#[derive(Debug, Default)]
pub(crate) struct RunCache {
    runs: Mutex<HashMap<String, RunState>>,
}

impl RunCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, RunState>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed state of an open log, if cached.
    pub(crate) fn get(&self, run_id: &str) -> Option<RunState> {
        self.lock().get(run_id).copied()
    }

    /// Records what a commit made of these runs (`None`: the run does not exist).
    pub(crate) fn apply<'a>(&self, changes: impl IntoIterator<Item = (&'a str, Option<RunState>)>) {
        let mut runs = self.lock();
        if runs.len() > MAX_RUNS {
            runs.clear();
        }
        for (run_id, state) in changes {
            match state {
                Some(state) if !state.closed => {
                    if let Some(slot) = runs.get_mut(run_id) {
                        *slot = state;
                    } else {
                        runs.insert(run_id.to_owned(), state);
                    }
                }
                _ => {
                    runs.remove(run_id);
                }
            }
        }
    }
}
