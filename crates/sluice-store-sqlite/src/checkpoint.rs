//! The checkpointer thread: copies committed WAL frames into the database file off the writer's
//! path, so the writer rarely waits for a checkpoint's copying and fsyncs.
//!
//! The protocol, for a writer that commits continuously:
//! 1. Every [`NUDGE_BYTES`] committed, the writer nudges this thread, which runs a passive
//!    checkpoint: it copies (and fsyncs, unless `synchronous = OFF`) every frame committed so far,
//!    concurrently with the writer and the readers.
//! 2. A passive checkpoint cannot let the WAL start over while the writer keeps adding frames,
//!    so once the WAL holds [`RESET_FRAMES`] frames, this thread catches up with a few more passes
//!    and then asks the writer to finish, and waits: after its next commit, the writer runs a
//!    passive checkpoint itself, which has only the frames committed during the last pass to copy.
//!    With every frame copied and no other writer, its next transaction starts the WAL over from
//!    the beginning (rewriting the same file, so the file stops growing).
//!
//! Under light load a background pass usually copies everything before the next commit, and the
//! WAL starts over without the writer's help. If checkpoints cannot keep up with the writer (the
//! disk is slower than the commit rate), SQLite's own automatic checkpoint on the writer takes
//! over at a larger WAL size (see `schema.rs`), slowing the writer down to the disk's pace.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use rusqlite::Connection;
use sluice_store::{Error, Result};

use crate::Synchronous;
use crate::journal_file::Unsynced;
use crate::schema::open_checkpointer;

/// Bytes committed between two background checkpoints.
pub(crate) const NUDGE_BYTES: usize = 4 << 20;

/// WAL frames (pages) past which the writer is asked to finish a checkpoint so the WAL restarts
/// (128 MiB with 4 KiB pages).
const RESET_FRAMES: i64 = 32_768;

/// Frames committed during a catch-up pass below which the writer is left the rest.
const CAUGHT_UP_FRAMES: i64 = 1_024;

/// Catch-up passes at most before the writer is asked to finish anyway.
const MAX_CATCH_UP_PASSES: usize = 8;

/// The writer's handle on the checkpoint thread: nudges it, finishes its checkpoints when asked,
/// and stops it when dropped.
pub(crate) struct Checkpointer {
    nudge: Option<SyncSender<()>>,
    /// Set by the thread when the writer should finish a checkpoint.
    reset_wanted: Arc<AtomicBool>,
    /// Tells the waiting thread the writer has finished (so their checkpoints never overlap).
    finished: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The journal's segments to sync before a checkpoint syncs the WAL (`synchronous =
    /// NORMAL`): the database must never hold events that follow journaled ones lost to a
    /// power cut.
    unsynced: Option<Arc<Unsynced>>,
}

impl Checkpointer {
    /// Opens the thread's connection and starts it.
    pub(crate) fn spawn(
        path: &Path,
        synchronous: Synchronous,
        unsynced: Option<Arc<Unsynced>>,
    ) -> Result<Self> {
        let conn = open_checkpointer(path, synchronous)?;
        let journal = unsynced.clone();
        let (nudge, nudges) = mpsc::sync_channel(1);
        let (finished, finishes) = mpsc::sync_channel(1);
        let reset_wanted = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&reset_wanted);
        let thread = std::thread::Builder::new()
            .name("sluice-sqlite-checkpoint".into())
            .spawn(move || run(&conn, journal.as_deref(), &nudges, &flag, &finishes))
            .map_err(|e| Error::backend("starting the SQLite checkpoint thread", e))?;
        Ok(Self {
            nudge: Some(nudge),
            reset_wanted,
            finished: Some(finished),
            thread: Some(thread),
            unsynced,
        })
    }

    /// Asks for a background checkpoint; a no-op if one is already asked for.
    pub(crate) fn nudge(&self) {
        if let Some(tx) = &self.nudge
            && let Err(TrySendError::Disconnected(())) = tx.try_send(())
        {
            tracing::warn!("the SQLite checkpoint thread has stopped");
        }
    }

    /// If the thread asked the writer to finish a checkpoint, runs `finish` (a checkpoint on the
    /// writer's connection) and lets the thread go on.
    pub(crate) fn finish_if_asked(&self, finish: impl FnOnce()) {
        if self.reset_wanted.swap(false, Ordering::Acquire) {
            if let Some(u) = &self.unsynced {
                u.sync();
            }
            finish();
            if let Some(tx) = &self.finished {
                let _ = tx.try_send(());
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.nudge.take());
        drop(self.finished.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the SQLite checkpoint thread panicked");
        }
    }
}

/// Runs a passive checkpoint on `conn`: copies what no reader still needs from the WAL into the
/// database file, never waiting for the writer or the readers. Returns the WAL's size in frames
/// as the checkpoint saw it.
pub(crate) fn passive(conn: &Connection) -> Option<i64> {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match result {
        Ok((wal_frames, copied)) => {
            tracing::trace!(wal_frames, copied, "checkpoint");
            Some(wal_frames)
        }
        Err(e) => {
            // SQLITE_BUSY when another checkpoint is running: the next one catches up.
            tracing::debug!(error = %e, "SQLite checkpoint did not run");
            None
        }
    }
}

/// One passive checkpoint per nudge, until the writer goes away. Once the WAL is long, further
/// passes catch up with the writer before it is asked to finish (so it has little left to copy).
fn run(
    conn: &Connection,
    journal: Option<&Unsynced>,
    nudges: &Receiver<()>,
    reset_wanted: &AtomicBool,
    finishes: &Receiver<()>,
) {
    let checkpoint = || {
        if let Some(j) = journal {
            j.sync();
        }
        passive(conn)
    };
    while nudges.recv().is_ok() {
        let Some(mut frames) = checkpoint() else {
            continue;
        };
        if frames < RESET_FRAMES {
            continue;
        }
        for _ in 0..MAX_CATCH_UP_PASSES {
            let Some(now) = checkpoint() else { break };
            let behind = now - frames;
            frames = now;
            if behind < CAUGHT_UP_FRAMES {
                break;
            }
        }
        if frames < RESET_FRAMES {
            // The WAL started over meanwhile (the writer found it fully copied).
            continue;
        }
        reset_wanted.store(true, Ordering::Release);
        // Stay out of the writer's way until it has finished (or is gone).
        if finishes.recv().is_err() {
            return;
        }
    }
}
