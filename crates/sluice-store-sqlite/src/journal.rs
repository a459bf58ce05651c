//! The journal: where small appends are made durable first, so that many runs each appending
//! a token at a time do not each rewrite a page of the `events` table at every commit.
//!
//! The `events` table is clustered by `(run_id, seq)`, which keeps every run's log together for
//! replays. But an append of one event into it dirties one page of that run, and a commit writes
//! every dirty page to the WAL: with a thousand runs streaming tokens, a commit of a few hundred
//! single-event appends writes a few hundred pages (4 KiB each for ~200 bytes of data each).
//!
//! So a small append goes to the `journal` table instead, whose key (`pos`) only grows: all the
//! appends of a commit land on its last page or two. The writer keeps each run's journaled
//! events in memory (*pending*) and moves them into `events` in one multi-row insert once they
//! add up to [`APPLY_BYTES`] or [`APPLY_EVENTS`], when the log closes, or when they have sat
//! behind [`WINDOW`] newer journal rows (a run that went quiet). Rows of the journal are never
//! deleted one by one: the front of the table, below the oldest pending row of any run, is cut
//! off every [`TRUNCATE_STEP`] rows. A large append (a batch of [`APPLY_BYTES`] or more) skips
//! the journal and is written to `events` directly, with the run's pending events before it.
//!
//! Readers never read the journal: a run's pending events are also in the shared cache's tail
//! (see `cache.rs`), which always reaches back to the last event in `events`. When the store
//! opens, whatever the journal holds is moved into `events` before anything else runs.
//!
//! This module is the in-memory bookkeeping; the SQL is in `writer.rs`. Every change made while
//! a group commit runs can be rolled back with the group.

use std::collections::{BTreeMap, HashMap};

use sluice_protocol::RawEvent;

/// A run's pending events are moved to `events` once their envelopes add up to this many
/// bytes (about one page of the table).
pub(crate) const APPLY_BYTES: usize = 4096;

/// …or once there are this many of them (at most the cache's tail length).
pub(crate) const APPLY_EVENTS: usize = 48;

/// A run whose oldest pending event has this many newer journal rows behind it is applied at
/// the next commit, however few its events: it keeps the journal's front from moving.
pub(crate) const WINDOW: i64 = 131_072;

/// The journal's front is cut off once it can move by this many rows.
pub(crate) const TRUNCATE_STEP: i64 = 4096;

/// One run's journaled events that are not in `events` yet.
#[derive(Debug)]
struct Pending {
    events: Vec<RawEvent>,
    bytes: usize,
    /// The journal position of the first of them.
    oldest_pos: i64,
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

/// The writer's journal bookkeeping.
#[derive(Debug)]
pub(crate) struct Journal {
    pending: HashMap<String, Pending>,
    /// Runs with pending events, by the position of their oldest one.
    by_oldest: BTreeMap<i64, String>,
    next_pos: i64,
    /// Every row below this position has been deleted.
    truncated_below: i64,
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
            if let Some(before) = before.filter(|p| !p.events.is_empty()) {
                self.by_oldest.insert(before.oldest_pos, run.clone());
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

    /// Decides where an append of `events` (already checked to continue the log) goes, and
    /// records it. `closes`: the append ends with a terminal event.
    pub(crate) fn route(&mut self, run_id: &str, events: &[RawEvent], closes: bool) -> Route {
        let (had_bytes, had_len) = self
            .pending
            .get(run_id)
            .map_or((0, 0), |p| (p.bytes, p.events.len()));
        let bytes = bytes_of(events);
        if closes || had_bytes + bytes >= APPLY_BYTES || had_len + events.len() >= APPLY_EVENTS {
            let mut all = self.take(run_id);
            all.extend_from_slice(events);
            return Route::Direct(all);
        }
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
            });
        if entry.events.is_empty() {
            entry.oldest_pos = first;
            self.by_oldest.insert(first, run_id.to_owned());
        }
        entry.events.extend_from_slice(events);
        entry.bytes += bytes;
        Route::Journal(first)
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

    /// Where the journal's front can be cut (every row below is in `events`, or belongs to a
    /// deleted run), when it moved by [`TRUNCATE_STEP`] rows at least.
    pub(crate) fn truncation(&self) -> Option<i64> {
        let low = self
            .by_oldest
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_pos);
        (low - self.truncated_below >= TRUNCATE_STEP).then_some(low)
    }

    /// The rows below `below` were deleted.
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
    fn small_appends_wait_in_the_journal_until_a_page_is_full() {
        let mut j = Journal::new(1, 1);
        j.begin_group();
        let mut seq = 0;
        let mut direct = None;
        for round in 0..APPLY_EVENTS {
            seq += 1;
            match j.route("a", &[ev(seq, 8)], false) {
                Route::Journal(pos) => assert_eq!(pos, round as i64 + 1),
                Route::Direct(all) => {
                    direct = Some(all);
                    break;
                }
            }
        }
        let all = direct.expect("moved once enough piled up");
        assert_eq!(seqs(&all), (1..=seq).collect::<Vec<_>>());
        assert_eq!(j.pending_len("a"), 0);
        // A big append goes straight through, with nothing pending.
        let big = ev(seq + 1, APPLY_BYTES);
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
        // Many other runs keep appending; each applies itself when its page is full.
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
