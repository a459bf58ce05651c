//! The journal on disk: append-only segment files next to the database, where small appends
//! are made durable with one `write` (per append, or per group on the writer), outside any
//! SQLite transaction. Each shard of the journal has its own files (`SS-POSITION.log`).
//!
//! A record is one event of one run:
//!
//! ```text
//! len: u32 LE | check: u32 LE (FNV-1a of the body) | body (len bytes)
//! body = run_id_len: u16 LE | run_id | seq: u64 LE | type_len: u16 LE | type | envelope JSON
//! ```
//!
//! Records are numbered (*positions*) in the order they were written, from the first segment's
//! name on; the bookkeeping of which runs still have records that are not in `batches` is in
//! `journal.rs`. A segment is deleted once no run has a pending record in it. When the store
//! opens, [`replay`] copies every record of a run that still exists into `batches` (ignoring the
//! ones already there) and deletes the segments; a torn record at the end of the last segment
//! (the process died in the middle of a `write`) ends the replay of that segment.
//!
//! Durability: a `write` puts the records in the OS page cache, which outlives the process
//! (`kill -9`). With `synchronous = FULL` every write is followed by `fdatasync` before any
//! append is acknowledged; with `NORMAL` the segments are synced before each checkpoint syncs
//! the WAL (see `checkpoint.rs`), so the database never holds events that come after journaled
//! ones lost to a power cut; with `OFF` nothing is synced.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use sluice_protocol::RawEvent;
use sluice_store::{Error, Result};

/// A segment is closed, and a new one begun, once it holds this many bytes.
const SEGMENT_BYTES: u64 = 16 << 20;

/// A segment whose records are all in the database is replaced by a new one once it holds
/// this much (see [`JournalFile::roll_if_drained`]).
const DRAINED_ROLL: u64 = 1 << 20;

/// The bytes before a record's body: its length and its check.
const HEADER: usize = 8;

/// Where the journal of the database at `db` lives: `<db>-events/`.
pub(crate) fn dir_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-events");
    PathBuf::from(name)
}

/// FNV-1a, 32 bits: enough to tell a torn or garbled record from a whole one.
fn check(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn segment_name(shard: usize, first_pos: i64) -> String {
    format!("{shard:02}-{first_pos:020}.log")
}

/// Segment files whose data has not been synced yet, for the checkpoint thread to sync before
/// it syncs the WAL (`synchronous = NORMAL`).
#[derive(Debug, Default)]
pub(crate) struct Unsynced {
    /// `(shard, segment)`, oldest first.
    files: Mutex<Vec<(usize, Arc<File>)>>,
}

impl Unsynced {
    fn push(&self, shard: usize, file: File) {
        self.lock().push((shard, Arc::new(file)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, Arc<File>)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs every segment written so far; afterwards keeps only the newest of each shard as
    /// it was when the sync began (it may have been written since).
    ///
    /// The fsyncs run without the lock: a journaling thread that starts a new segment
    /// meanwhile must not wait for the disk (on the async runtime, with inline appends, that
    /// would stall every task of the worker, and the shard's lock with it).
    pub(crate) fn sync(&self) {
        let files: Vec<(usize, Arc<File>)> = self.lock().clone();
        for (_, f) in &files {
            if let Err(e) = f.sync_data() {
                tracing::warn!(error = %e, "syncing a journal segment failed");
            }
        }
        // A segment that a newer one of its shard had replaced before the sync began was
        // complete when it was synced: it needs no further sync.
        let mut newest = std::collections::HashMap::new();
        for (i, (shard, _)) in files.iter().enumerate() {
            newest.insert(*shard, i);
        }
        let done: Vec<&Arc<File>> = files
            .iter()
            .enumerate()
            .filter(|(i, (shard, _))| newest.get(shard) != Some(i))
            .map(|(_, (_, f))| f)
            .collect();
        if done.is_empty() {
            return;
        }
        self.lock()
            .retain(|(_, f)| !done.iter().any(|d| Arc::ptr_eq(d, f)));
    }

    /// How many segments are listed to sync.
    #[cfg(test)]
    fn listed(&self) -> usize {
        self.lock().len()
    }
}

/// The segment being written, and the older ones not deleted yet.
#[derive(Debug)]
pub(crate) struct JournalFile {
    dir: PathBuf,
    /// Which of the journal's shards this is (in the segments' names).
    shard: usize,
    /// `(first position, path)` of every segment on disk, oldest first; the last is `file`.
    segments: VecDeque<(i64, PathBuf)>,
    file: File,
    /// Bytes of `file` written and kept.
    len: u64,
    /// `len` when the open group began (a failed write is cut back to it).
    group_start: u64,
    /// Records of the open group not written yet.
    buf: Vec<u8>,
    /// Position of the next record to be buffered.
    next_pos: i64,
    /// `next_pos` when the open group began.
    group_pos: i64,
    /// Sync after every write (`synchronous = FULL`).
    sync_each: bool,
    /// Segments for the checkpoint thread to sync (`None` unless `synchronous = NORMAL`).
    unsynced: Option<Arc<Unsynced>>,
    /// Set when a failed write could not be cut back: nothing more can be appended safely.
    broken: bool,
}

impl JournalFile {
    /// Starts an empty journal in `dir` (created if needed) whose first record is `next_pos`.
    /// The directory must hold no segments (they were replayed and deleted).
    pub(crate) fn create(
        dir: &Path,
        shard: usize,
        next_pos: i64,
        sync_each: bool,
        unsynced: Option<Arc<Unsynced>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::backend(format!("creating {}", dir.display()), e))?;
        let (path, file) = open_segment(dir, shard, next_pos)?;
        if let Some(u) = &unsynced {
            u.push(shard, clone(&file)?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shard,
            segments: VecDeque::from([(next_pos, path)]),
            file,
            len: 0,
            group_start: 0,
            buf: Vec::new(),
            next_pos,
            group_pos: next_pos,
            sync_each,
            unsynced,
            broken: false,
        })
    }

    /// A group commit begins.
    pub(crate) fn begin_group(&mut self) {
        self.buf.clear();
        self.group_start = self.len;
        self.group_pos = self.next_pos;
    }

    /// Buffers `events` of `run_id` as the next records; returns the position of the first.
    pub(crate) fn push(&mut self, run_id: &str, events: &[RawEvent]) -> i64 {
        let first = self.next_pos;
        for e in events {
            let ty = e.event_type();
            let body_len = 2 + run_id.len() + 8 + 2 + ty.len() + e.json().len();
            let start = self.buf.len();
            self.buf.extend_from_slice(&[0; HEADER]);
            self.buf
                .extend_from_slice(&short_len(run_id.len()).to_le_bytes());
            self.buf.extend_from_slice(run_id.as_bytes());
            self.buf.extend_from_slice(&e.seq().to_le_bytes());
            self.buf
                .extend_from_slice(&short_len(ty.len()).to_le_bytes());
            self.buf.extend_from_slice(ty.as_bytes());
            self.buf.extend_from_slice(e.json());
            let body = &self.buf[start + HEADER..];
            debug_assert_eq!(body.len(), body_len);
            let sum = check(body);
            let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
            self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            self.buf[start + 4..start + HEADER].copy_from_slice(&sum.to_le_bytes());
            self.next_pos += 1;
        }
        first
    }

    /// The position the next record gets.
    pub(crate) fn next_pos(&self) -> i64 {
        self.next_pos
    }

    /// Writes what the group buffered (and syncs it with `synchronous = FULL`). On failure the
    /// segment is cut back to where the group began and the group's records are gone.
    pub(crate) fn write(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.broken {
            return Err(io::Error::other(
                "the journal could not be repaired after a failed write",
            ));
        }
        let outcome = self.file.write_all(&self.buf).and_then(|()| {
            if self.sync_each {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match outcome {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(e) => {
                self.cut_back();
                Err(e)
            }
        }
    }

    fn cut_back(&mut self) {
        self.buf.clear();
        self.next_pos = self.group_pos;
        let cut = self.file.set_len(self.group_start).and_then(|()| {
            // The file is opened for appending: the next write goes to the new end.
            self.file.flush()
        });
        match cut {
            Ok(()) => self.len = self.group_start,
            Err(e) => {
                tracing::error!(error = %e, "cannot cut a failed write off the journal");
                self.broken = true;
            }
        }
    }

    /// The group committed: begins a new segment if this one is full.
    pub(crate) fn commit_group(&mut self) -> Result<()> {
        if self.len < SEGMENT_BYTES {
            return Ok(());
        }
        self.roll()
    }

    /// Every record journaled so far is in the database (`front`, the oldest position still
    /// pending, has reached the end): when the segment being written holds at least
    /// [`DRAINED_ROLL`] bytes, begins a new one so that this one can go. An idle server then
    /// keeps a small segment per shard, not one of up to [`SEGMENT_BYTES`]. Call between
    /// groups.
    pub(crate) fn roll_if_drained(&mut self, front: i64) -> Result<()> {
        if front < self.next_pos || self.len < DRAINED_ROLL {
            return Ok(());
        }
        self.roll()?;
        self.release_below(front);
        Ok(())
    }

    /// Begins a new segment at the next position.
    fn roll(&mut self) -> Result<()> {
        let (path, file) = open_segment(&self.dir, self.shard, self.next_pos)?;
        if let Some(u) = &self.unsynced {
            u.push(self.shard, clone(&file)?);
        }
        self.file = file;
        self.len = 0;
        self.group_start = 0;
        self.segments.push_back((self.next_pos, path));
        Ok(())
    }

    /// Deletes the segments all of whose records are below position `pos` (never the one being
    /// written).
    pub(crate) fn release_below(&mut self, pos: i64) {
        while self.segments.len() > 1 && self.segments.get(1).is_some_and(|(next, _)| *next <= pos)
        {
            if let Some((_, path)) = self.segments.pop_front()
                && let Err(e) = std::fs::remove_file(&path)
            {
                tracing::warn!(error = %e, path = %path.display(), "deleting a journal segment");
            }
        }
    }

    /// How many segments are on disk.
    #[cfg(test)]
    pub(crate) fn segments(&self) -> usize {
        self.segments.len()
    }
}

fn short_len(n: usize) -> u16 {
    // Run ids and event types are short (the protocol bounds them far below this).
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn clone(file: &File) -> Result<File> {
    file.try_clone()
        .map_err(|e| Error::backend("sharing a journal segment", e))
}

fn open_segment(dir: &Path, shard: usize, first_pos: i64) -> Result<(PathBuf, File)> {
    let path = dir.join(segment_name(shard, first_pos));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::backend(format!("creating {}", path.display()), e))?;
    Ok((path, file))
}

/// One record read back.
struct Record<'a> {
    run_id: &'a str,
    seq: u64,
    event_type: &'a str,
    json: &'a [u8],
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn parse_body(mut body: &[u8]) -> Option<Record<'_>> {
    let b = &mut body;
    let id_len = u16::from_le_bytes(take(b, 2)?.try_into().ok()?) as usize;
    let run_id = std::str::from_utf8(take(b, id_len)?).ok()?;
    let seq = u64::from_le_bytes(take(b, 8)?.try_into().ok()?);
    let ty_len = u16::from_le_bytes(take(b, 2)?.try_into().ok()?) as usize;
    let event_type = std::str::from_utf8(take(b, ty_len)?).ok()?;
    Some(Record {
        run_id,
        seq,
        event_type,
        json: body,
    })
}

/// Calls `each` for every whole record of `data`, in order; returns how many bytes they took
/// (the rest is a torn or garbled tail).
fn for_each_record(data: &[u8], mut each: impl FnMut(Record<'_>) -> Result<()>) -> Result<usize> {
    let mut at = 0;
    while data.len() - at >= HEADER {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let sum = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let Some(body) = data.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if check(body) != sum {
            break;
        }
        let Some(record) = parse_body(body) else {
            break;
        };
        each(record)?;
        at += HEADER + len;
    }
    Ok(at)
}

/// Copies every journaled event of a run that still exists into the log (one transaction;
/// events already there are left alone), then deletes the segments. Returns how many events
/// were copied.
pub(crate) fn replay(conn: &Connection, dir: &Path) -> Result<usize> {
    let what = "replaying the journal";
    let mut paths = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::backend(format!("listing {}", dir.display()), e)),
    };
    // Names are zero-padded positions: their order is the order of writing.
    paths.sort();
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| Error::backend(what, e))?;
    let moved;
    {
        let mut replay = crate::batches::Replay::new(&tx);
        let mut exists = tx
            .prepare("SELECT 1 FROM runs WHERE id = ?1")
            .map_err(|e| Error::backend(what, e))?;
        for path in &paths {
            let mut data = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(|e| Error::backend(format!("reading {}", path.display()), e))?;
            let used = for_each_record(&data, |r| {
                let known = exists
                    .exists([r.run_id])
                    .map_err(|e| Error::backend(what, e))?;
                if known {
                    let event = RawEvent::from_parts(
                        r.seq,
                        r.event_type,
                        bytes::Bytes::copy_from_slice(r.json),
                    );
                    replay
                        .add(r.run_id, event)
                        .map_err(|e| Error::backend(what, e))?;
                }
                Ok(())
            })?;
            if used < data.len() {
                tracing::warn!(
                    path = %path.display(),
                    kept = used,
                    dropped = data.len() - used,
                    "the journal segment ends in a torn record (an interrupted write); it is left out"
                );
            }
        }
        drop(exists);
        moved = replay.finish().map_err(|e| Error::backend(what, e))?;
    }
    tx.commit().map_err(|e| Error::backend(what, e))?;
    for path in &paths {
        std::fs::remove_file(path)
            .map_err(|e| Error::backend(format!("deleting {}", path.display()), e))?;
    }
    if moved > 0 {
        tracing::info!(events = moved, "moved journaled events into the log");
    }
    Ok(moved)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sluice_protocol::{Timestamp, kind};

    fn ev(run: &str, seq: u64) -> RawEvent {
        RawEvent::encode(
            seq,
            run,
            kind::TEXT_DELTA,
            Timestamp::now(),
            Some(1),
            r#"{"text":"é"}"#,
        )
    }

    fn records(dir: &Path) -> Vec<(String, u64, String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(p).unwrap();
            let used = for_each_record(&data, |r| {
                out.push((
                    r.run_id.to_owned(),
                    r.seq,
                    r.event_type.to_owned(),
                    r.json.to_vec(),
                ));
                Ok(())
            })
            .unwrap();
            assert_eq!(used, data.len());
        }
        out
    }

    #[test]
    fn records_round_trip_and_a_failed_write_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = JournalFile::create(&dir, 0, 7, false, None).unwrap();
        j.begin_group();
        let a = [ev("run_a", 1), ev("run_a", 2)];
        assert_eq!(j.push("run_a", &a), 7);
        assert_eq!(j.push("run_b", &[ev("run_b", 1)]), 9);
        j.write().unwrap();
        j.commit_group().unwrap();
        j.begin_group();
        assert_eq!(j.push("run_c", &[ev("run_c", 1)]), 10);
        j.cut_back();
        j.begin_group();
        assert_eq!(j.push("run_d", &[ev("run_d", 1)]), 10, "positions go back");
        j.write().unwrap();
        let got = records(&dir);
        let runs: Vec<_> = got.iter().map(|r| (r.0.as_str(), r.1)).collect();
        assert_eq!(
            runs,
            [("run_a", 1), ("run_a", 2), ("run_b", 1), ("run_d", 1)]
        );
        assert_eq!(got[0].2, kind::TEXT_DELTA);
        assert_eq!(got[1].3, a[1].json().to_vec());
    }

    #[test]
    fn a_torn_tail_is_left_out_of_the_replay() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("s.db");
        let conn = crate::schema::open_writer(&db, crate::Synchronous::Normal).unwrap();
        conn.execute(
            "INSERT INTO runs (id, workflow, status, record) VALUES ('run_a', 'wf', 'running', '{}')",
            [],
        )
        .unwrap();
        let dir = dir_of(&db);
        let mut j = JournalFile::create(&dir, 0, 1, false, None).unwrap();
        j.begin_group();
        j.push("run_a", &[ev("run_a", 1), ev("run_a", 2)]);
        j.push("run_gone", &[ev("run_gone", 1)]);
        j.write().unwrap();
        drop(j);
        // A third record cut short, as by a crash in the middle of a write.
        let path = dir.join(segment_name(0, 1));
        let mut data = std::fs::read(&path).unwrap();
        let whole = data.len();
        let head = data[..20].to_vec();
        data.extend_from_slice(&head);
        std::fs::write(&path, &data).unwrap();
        assert!(whole > 20);
        assert_eq!(
            replay(&conn, &dir).unwrap(),
            2,
            "the deleted run's record is skipped"
        );
        let seqs: Vec<u64> = crate::reader::read_events(&conn, "run_a", 0, 100)
            .unwrap()
            .iter()
            .map(RawEvent::seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "segments are gone"
        );
        // Replaying again (nothing there) is a no-op.
        assert_eq!(replay(&conn, &dir).unwrap(), 0);
    }

    /// An event of about 1 MiB: sixteen of them fill a segment.
    fn big_event() -> RawEvent {
        RawEvent::encode(
            1,
            "r",
            kind::TEXT_DELTA,
            Timestamp::now(),
            None,
            &format!("{{\"text\":\"{}\"}}", "x".repeat(1 << 20)),
        )
    }

    /// Journals `event` as a group of its own; returns its position.
    fn write_alone(j: &mut JournalFile, event: &RawEvent) -> i64 {
        j.begin_group();
        let pos = j.push("r", std::slice::from_ref(event));
        j.write().unwrap();
        j.commit_group().unwrap();
        pos
    }

    #[test]
    fn full_segments_rotate_and_are_released_once_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = JournalFile::create(&dir, 0, 1, false, None).unwrap();
        let big = big_event();
        let mut firsts = Vec::new();
        for _ in 0..40 {
            firsts.push(write_alone(&mut j, &big));
        }
        assert!(j.segments() >= 2, "{}", j.segments());
        let on_disk = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(on_disk, j.segments());
        // Nothing pending below the last record: every full segment goes.
        j.release_below(firsts[39]);
        assert_eq!(j.segments(), 1);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn a_drained_segment_is_replaced_once_it_holds_a_mebibyte() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let mut j = JournalFile::create(&dir, 0, 1, false, None).unwrap();
        let big = big_event();
        let first = write_alone(&mut j, &ev("r", 1));
        // Small: kept even though drained.
        j.roll_if_drained(j.next_pos()).unwrap();
        assert_eq!(j.segments(), 1);
        let mut last = first;
        while j.len < DRAINED_ROLL {
            last = write_alone(&mut j, &big);
        }
        // Not drained: a record is still pending.
        j.roll_if_drained(last).unwrap();
        assert_eq!(j.segments(), 1);
        assert!(j.len >= DRAINED_ROLL);
        // Drained: a new, empty segment, and the old one is gone from the disk.
        j.roll_if_drained(j.next_pos()).unwrap();
        assert_eq!(j.segments(), 1);
        assert_eq!(j.len, 0);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // Records go on from where they were.
        assert_eq!(write_alone(&mut j, &big), last + 1);
    }

    #[test]
    fn a_sync_lets_go_of_replaced_segments_and_keeps_each_shards_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("j");
        let unsynced = Arc::new(Unsynced::default());
        let big = big_event();
        let mut shards: Vec<JournalFile> = (0..2)
            .map(|i| JournalFile::create(&dir, i, 1, false, Some(unsynced.clone())).unwrap())
            .collect();
        assert_eq!(unsynced.listed(), 2);
        unsynced.sync();
        assert_eq!(
            unsynced.listed(),
            2,
            "the segments being written stay listed"
        );
        // Shard 0 fills its segment and starts a new one: the old one goes after one sync.
        let j = &mut shards[0];
        while j.segments() < 2 {
            write_alone(j, &big);
        }
        assert_eq!(unsynced.listed(), 3);
        unsynced.sync();
        assert_eq!(unsynced.listed(), 2);
        // A segment started after a sync's snapshot stays for the next sync.
        let files = unsynced.lock().clone();
        unsynced.push(1, clone(&files[0].1).unwrap());
        unsynced.sync();
        assert_eq!(unsynced.listed(), 2, "shard 1's older segment was replaced");
    }
}
