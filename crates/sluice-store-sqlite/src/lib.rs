//! A durable implementation of [`sluice_store::Store`] on SQLite.
//!
//! One database file holds run records, every run's event log, checkpoints, inboxes and sessions.
//! It passes the same conformance suite as the in-memory backend and survives restarts: open the
//! same path again and every acknowledged write is there.
//!
//! ```no_run
//! # fn demo() -> sluice_store::Result<()> {
//! use std::sync::Arc;
//! use sluice_store_sqlite::{SqliteOptions, SqliteStore};
//! let store: Arc<dyn sluice_store::Store> =
//!     Arc::new(SqliteStore::open("data/sluice.db", SqliteOptions::default())?);
//! # drop(store); Ok(()) }
//! ```
//!
//! # Layout
//! - `lib.rs`: [`SqliteStore`], the [`Store`] implementation that routes each call to the writer
//!   or to a reader.
//! - `options.rs`: [`SqliteOptions`] and [`Synchronous`].
//! - `schema.rs`: the tables, the ordered migrations (tracked in `PRAGMA user_version`, see
//!   [`SCHEMA_VERSION`]) and how connections are set up.
//! - `writer.rs`: the writer thread and its group commit.
//! - `journal.rs`, `journal_file.rs`: where small appends are made durable first (the
//!   bookkeeping, and the segment files `<db>-events/*.log`).
//! - `checkpoint.rs`: the checkpoint thread, which keeps WAL checkpoints off the writer.
//! - `reader.rs`: the pool of read-only connections and the read queries.
//! - `batches.rs`: how a log is stored: a row per run of consecutive events.
//! - `cache.rs`: the committed `run_id → (last_seq, closed)` of open logs, and each one's
//!   newest committed events, from which live followers read.
//!
//! # How writes are committed
//! The database runs in WAL mode. Most appends never reach a transaction: a small append goes
//! to the journal (see *Where events are written* below). One dedicated OS thread owns the only
//! read-write connection and receives every write (appends, `finish`, records, checkpoints,
//! inbox, sessions) over a bounded channel; the caller awaits a reply. (With
//! [`SqliteOptions::inline_appends`], a small append to a run the cache knows is journaled by
//! the caller's task itself and never reaches the thread.) The thread **group-commits**: it
//! takes the first
//! queued command, adds whatever else is already queued (until the queue is empty, the group holds
//! [`SqliteOptions::max_batch`] events, or [`SqliteOptions::commit_window`] has passed), and
//! commits the group in two parts: the small appends go to the journal file with one `write`
//! (see below), and are acknowledged; the rest runs in one SQLite transaction. Then it replies
//! to every caller and wakes the followers of every run that got events (through a
//! [`Notifier`]; nobody polls). It never sleeps waiting for company:
//! a lone append commits at once, and groups grow by themselves while a commit is in progress.
//! (After a group it stays awake for about 50 µs before it sleeps, so a caller that appends again
//! right after its reply finds it awake.)
//!
//! Each command succeeds or fails on its own inside the group. Appends and `finish` are checked
//! against the writer's cache of each open log's last seq and closed flag (loaded from the
//! database on a run's first touch), before they write anything; the other commands of more
//! than one statement run under a savepoint. A rejected command (unknown run, seq conflict, closed
//! log, duplicate id) leaves nothing behind and does not affect the others. Only a failure of the
//! transaction itself (I/O error, full disk) fails the whole group. An append's events go in with
//! one `INSERT` per row of the log (see below) through a cached prepared statement.
//!
//! # Where events are written
//! A run's log lives in the `batches` table, a row per run of consecutive events (up to about
//! 64 KiB of them, LZ4-compressed), keyed by `(run_id, last seq)` so that replaying a run reads
//! a few rows (`batches.rs` says why not a row per event). Writing there one event at a time
//! would dirty one page per run per commit: with a thousand runs each streaming a token at a
//! time, every commit would write hundreds of 4 KiB pages to the WAL for a few hundred 200-byte
//! events. So a small
//! append goes to the *journal* first: append-only segment files next to the database
//! (`<db>-events/`), one record per event, in 8 shards by run id. Under the shard's lock the
//! events are checked against the run's cached state, their records written with one `write`
//! for the whole group (and synced once with `synchronous = FULL`), and they are added to the
//! cache's tail; then the followers are woken, all before the group's transaction. With
//! [`SqliteOptions::inline_appends`] the caller's task does this itself for its own append: no
//! thread hop at all (a caller that finds the shard held waits for it). Once about a page of a
//! run's events (4 KiB, or 48 events) has piled up there, or its log has closed, the run is
//! *due*, and the writer moves its journaled events into `batches` with one insert, paced at
//! twice the journal's recent inflow (at least 1 MiB/s), so that a thousand runs filling their
//! page or finishing at the same moment are moved over the next few hundred milliseconds
//! instead of taking a core at once. A run is also moved with its next append when it has 16
//! KiB pending (the writer is behind), or when it has gone quiet for a while (131,072 newer
//! journal records). A batch of 4 KiB or more goes to `batches` directly, after the run's
//! pending events. A run's terminal event is inserted at once, and its pending events follow
//! when it is moved: `batches` then has a gap for a while, which no reader sees (a read from the
//! database stops at the first missing seq, and the run's cache entry, which holds every
//! journaled event, stays until the move). Segments are deleted once every record in them is in
//! `batches`, and when the store opens whatever the journal still holds is moved into `batches`
//! first (a record torn by a crash in the middle of a write is left out: it was never
//! acknowledged). Readers never read the journal.
//!
//! [`finish`](Store::finish) writes the final record and the terminal event in the same
//! transaction, so a reader that sees the terminal event sees the final record.
//!
//! The writer changes the journal's bookkeeping only after its transaction commits, and the
//! runs its commands touch are *busy* meanwhile: their small appends go to the writer too, so
//! a run's state and pending events cannot change under a transaction that works on them.
//!
//! Checkpoints (copying the WAL back into the database file, with its fsyncs) run on a separate
//! thread every few MiB of commits, concurrently with the writer; the writer itself only finishes
//! one, briefly, when the WAL has grown to about 128 MiB, so that the WAL starts over.
//!
//! Reads run on a few read-only connections ([`SqliteOptions::read_connections`]), each on a
//! reader thread of its own taking reads from one queue, never on the async runtime (a read
//! goes from one reader thread to the next without waiting for the runtime to schedule
//! anything); WAL lets them proceed while the writer commits, each seeing the last commit made
//! before it started. A read of an open log at or near its end (a live follower) is answered
//! from memory instead: after each commit the writer adds the appended events to the cache's
//! *tail* of that run (its newest 64 events, at most about 8 KiB of them), so a follower woken
//! by a commit gets the new events without a query or a thread hop. A follower further behind
//! reads from the database; the tail's bound keeps memory per open run small however many
//! followers there are.
//!
//! # What survives a crash
//! A write is acknowledged only after it is durable — its transaction committed, or (a small
//! append) its records written to the journal — so an acknowledged write is visible to every
//! later read, and a write whose call has not returned may or may not be there (each part of
//! a group commits or fails as a whole, and each command within it is atomic).
//!
//! - **The process dies** (`kill -9`, panic, OOM kill) — with any [`Synchronous`] level: every
//!   acknowledged write survives. A commit has been written to the WAL file, and a journaled
//!   append to its segment (both into the OS page cache) before the reply, and the OS keeps
//!   them when the process dies.
//! - **The OS crashes or the power fails** — this depends on [`SqliteOptions::synchronous`]:
//!   - [`Synchronous::Full`]: every acknowledged write survives (the WAL is fsynced at every
//!     group commit, the journal at every write).
//!   - [`Synchronous::Normal`] (the default): the database stays consistent, but the most recent
//!     acknowledged commits may be lost — those made since the WAL was last fsynced, which
//!     happens at each checkpoint: about every 4 MiB of committed data, more if the checkpoint
//!     thread falls behind (the OS may also have written them back on its own by then). The
//!     checkpoint thread syncs the journal's segments before each checkpoint, so the database
//!     never holds events that follow journaled ones the OS lost. What is lost is a suffix of
//!     whole transactions and journal writes: every run's log is still contiguous from seq 1,
//!     and a finished run is either finished with its terminal event or not finished at all.
//!   - [`Synchronous::Off`]: recent commits may be lost and the database file may be corrupted.
//!
//! # Why rusqlite
//! The store needs one long-lived writer connection on its own thread, with prepared multi-row
//! inserts reused for every commit, explicit `BEGIN IMMEDIATE`/savepoints, and control of
//! pragmas and checkpoints; readers run on a few connections on threads of their own. rusqlite
//! gives that directly, synchronously, with SQLite bundled (no system library, builds
//! anywhere). An async wrapper such as sqlx would add a runtime-driven connection pool and
//! per-query overhead between the store and SQLite without helping a single-writer design.
//!
//! The path must name a file on a local file system (WAL needs shared memory between the
//! connections of this process); the store is the only writer of its file: it holds an OS lock
//! (`flock`) on `<db>.lock` while open, and [`SqliteStore::open`] fails when another process
//! holds it (after waiting 2 s, for a store of this process that is still closing).

mod batches;
mod cache;
mod checkpoint;
mod journal;
mod journal_file;
mod options;
mod reader;
mod schema;
mod writer;

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use sluice_protocol::{RawEvent, RunRecord, SessionRecord, Timestamp};
use sluice_store::{Error, InboxEntry, Notifier, Result, RunFilter, RunPage, Store};
use tokio::sync::{mpsc, oneshot};

use crate::cache::RunCache;
use crate::journal::{Journal, Journaled, Journals, Outcome, SharedJournal};
use crate::journal_file::JournalFile;
use crate::reader::ReadPool;
use crate::writer::{Command, Reply, RunRow, Writer};

pub use options::{SqliteOptions, Synchronous};
pub use schema::SCHEMA_VERSION;

/// How many write commands may wait for the writer before callers wait to enqueue.
const WRITE_QUEUE: usize = 4096;

/// The SQLite store. Dropping it closes the write queue: the writer thread commits what is
/// queued and exits; [`close`](SqliteStore::close) also waits for that.
pub struct SqliteStore {
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    readers: Arc<ReadPool>,
    cache: Arc<RunCache>,
    notifier: Arc<Notifier>,
    /// The journal, where the caller's task writes small appends itself (`None` unless
    /// [`SqliteOptions::inline_appends`], and with `synchronous = FULL`: then the writer does
    /// it for whole groups, one write and one sync for many).
    journal: Option<SharedJournal>,
    writer: std::thread::JoinHandle<()>,
}

/// How long [`lock_store`] waits for a lock held by someone else before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the store's lock, `<db>.lock` beside the database: one process at a time may open it.
/// Two servers on one data directory would each take the other's runs for their own and
/// interleave their writes to the journal. The lock is the OS's (`flock`): it goes with the
/// process however it ends, so a crashed server never leaves a stale one.
fn lock_store(db: &Path) -> Result<File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::backend(format!("opening the lock file {}", path.display()), e))?;
    // A store of this process that was just dropped keeps the lock until its writer thread has
    // finished its last writes: that one is waited for, briefly.
    let waited = std::time::Instant::now();
    let locked = loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if waited.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other,
        }
    };
    match locked {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let by = match holder.trim().parse::<u32>() {
                Ok(pid) => format!("another process (pid {pid})"),
                Err(_) => String::from("another process"),
            };
            // The message says it all: no source, whose "operation would block" would only
            // be appended to it.
            return Err(Error::Backend {
                message: format!(
                    "{} is in use by {by} (its lock is {}): one server per data directory",
                    db.display(),
                    path.display()
                ),
                source: None,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::backend(format!("locking {}", path.display()), e));
        }
    }
    // Who holds it, for the message above (the lock itself is what counts).
    let _ = file.set_len(0);
    let _ = file.write_all(std::process::id().to_string().as_bytes());
    Ok(file)
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it and its parent directory if needed) the database at `path`, migrates
    /// its schema to [`SCHEMA_VERSION`], and starts the writer thread.
    ///
    /// Blocks while it opens the file and migrates: call it at startup.
    ///
    /// # Errors
    /// [`Error::Backend`] when the directory or file cannot be created or opened, the file
    /// cannot use WAL, or its schema is newer than this build.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::backend(format!("creating {}", parent.display()), e))?;
        }
        // Before anything reads or writes the database or its journal.
        let lock = lock_store(&path)?;
        let conn = schema::open_writer(&path, options.synchronous)?;
        let unsynced = (options.synchronous == Synchronous::Normal)
            .then(|| Arc::new(journal_file::Unsynced::default()));
        let dir = journal_file::dir_of(&path);
        let mut shards = Vec::with_capacity(journal::SHARDS);
        for shard in 0..journal::SHARDS {
            let file = JournalFile::create(
                &dir,
                shard,
                1,
                options.synchronous == Synchronous::Full,
                unsynced.clone(),
            )?;
            shards.push(Journaled {
                journal: Journal::new(file.next_pos()),
                file,
                busy: sluice_store::FastSet::default(),
            });
        }
        let readers = Arc::new(ReadPool::open(path.clone(), options.read_connections)?);
        let cache = Arc::new(RunCache::default());
        let notifier = Arc::new(Notifier::new());
        let (commands, rx) = mpsc::channel(WRITE_QUEUE);
        let checkpointer = checkpoint::Checkpointer::spawn(&path, options.synchronous, unsynced)?;
        let shared = Arc::new(Journals::new(shards));
        let journal = (options.inline_appends && options.synchronous != Synchronous::Full)
            .then(|| shared.clone());
        let writer = Writer::new(
            conn,
            shared,
            cache.clone(),
            notifier.clone(),
            &options,
            Some(checkpointer),
        );
        let writer = std::thread::Builder::new()
            .name("sluice-sqlite-writer".into())
            .spawn(move || {
                writer.run(rx);
                // Held until the last write is done and the connection closed.
                drop(lock);
            })
            .map_err(|e| Error::backend("starting the SQLite writer thread", e))?;
        Ok(Self {
            path,
            commands,
            readers,
            cache,
            notifier,
            journal,
            writer,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the store: the writer commits what is queued, and this returns once it has exited
    /// and the database is closed.
    ///
    /// # Errors
    /// [`Error::Backend`] if the writer thread panicked.
    pub async fn close(self) -> Result<()> {
        let Self {
            commands,
            readers,
            writer,
            ..
        } = self;
        drop(commands);
        drop(readers);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| Error::backend("waiting for the SQLite writer", e))?
            .map_err(|_| Error::Backend {
                message: "the SQLite writer thread panicked".into(),
                source: None,
            })
    }

    /// Sends a command to the writer and waits for its outcome.
    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> Error {
    Error::Backend {
        message: "the SQLite writer thread has stopped".into(),
        source: None,
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_run(&self, record: &RunRecord) -> Result<()> {
        let row = RunRow::new(record)?;
        self.write(|reply| Command::CreateRun { row, reply }).await
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| reader::get_run(conn, &id))
            .await
    }

    async fn put_run(&self, record: &RunRecord) -> Result<()> {
        let row = RunRow::new(record)?;
        self.write(|reply| Command::PutRun { row, reply }).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<RunPage> {
        let filter = filter.clone();
        self.readers
            .run(move |conn| reader::list_runs(conn, &filter))
            .await
    }

    async fn delete_run(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.write(|reply| Command::DeleteRun { id, reply }).await
    }

    async fn append(&self, run_id: &str, events: &[RawEvent]) -> Result<()> {
        if let Some(journal) = &self.journal {
            // A small append to a run in the cache is journaled right here (one short lock and
            // one `write`); anything else goes to the writer. A shard someone else holds is
            // waited for: its holders keep it for one `write` or one run's bookkeeping, and a
            // holder that was preempted runs again on the core this wait gives up, where the
            // writer's round trip costs a whole group (2.4 % of S2's appends found their shard
            // held; sent to the writer, they made its p99 41 ms instead of 7–9 ms, measured
            // with the driver's yield before small batches taken out).
            let mut shard = journal.of(run_id);
            let (mut outcomes, wake) = shard.append(&self.cache, &[(run_id, events)]);
            drop(shard);
            if wake && journal.writer_asleep() {
                // A full queue means a busy writer, which finds the due runs anyway.
                let _ = self.commands.try_send(Command::Maintain);
            }
            match outcomes.pop() {
                Some(Outcome::Journaled(seq)) => {
                    self.notifier.publish(run_id, seq);
                    return Ok(());
                }
                Some(Outcome::Refused(e)) => return Err(e),
                Some(Outcome::Declined) | None => {}
            }
        }
        let (run_id, events) = (run_id.to_owned(), events.to_vec());
        self.write(|reply| Command::Append {
            run_id,
            events,
            reply,
        })
        .await
    }

    /// Appends go through the writer thread's group commit, unless the caller's task journals
    /// them ([`SqliteOptions::inline_appends`]).
    fn groups_appends(&self) -> bool {
        self.journal.is_none()
    }

    /// Drops the run's cached tail (but for events only in the journal): a run that waits,
    /// for days perhaps, holds no copy of its last events in memory.
    fn idle(&self, run_id: &str) {
        self.cache.trim(run_id);
    }

    async fn finish(&self, record: &RunRecord, terminal: &RawEvent) -> Result<()> {
        let row = RunRow::new(record)?;
        let terminal = terminal.clone();
        self.write(|reply| Command::Finish {
            row,
            terminal,
            reply,
        })
        .await
    }

    async fn read(&self, run_id: &str, after: u64, limit: usize) -> Result<Vec<RawEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Live followers are usually at the end of an open log: what they need was just
        // committed and is in the cache's tail.
        if let Some(events) = self.cache.read(run_id, after, limit) {
            return Ok(events);
        }
        let run_id = run_id.to_owned();
        self.readers
            .run(move |conn| reader::read_events(conn, &run_id, after, limit))
            .await
    }

    async fn last_seq(&self, run_id: &str) -> Result<u64> {
        if let Some(state) = self.cache.get(run_id) {
            return Ok(state.last_seq);
        }
        let run_id = run_id.to_owned();
        self.readers
            .run(move |conn| reader::last_seq(conn, &run_id))
            .await
    }

    async fn wait_for(&self, run_id: &str, after: u64) -> Result<()> {
        let subscription = self.notifier.subscribe(run_id);
        if self.last_seq(run_id).await? > after {
            return Ok(());
        }
        subscription.wait(after).await;
        Ok(())
    }

    async fn put_checkpoint(&self, run_id: &str, checkpoint: Bytes) -> Result<()> {
        let run_id = run_id.to_owned();
        self.write(|reply| Command::PutCheckpoint {
            run_id,
            data: checkpoint,
            reply,
        })
        .await
    }

    async fn get_checkpoint(&self, run_id: &str) -> Result<Option<Bytes>> {
        let run_id = run_id.to_owned();
        self.readers
            .run(move |conn| reader::get_checkpoint(conn, &run_id))
            .await
    }

    async fn inbox_push(&self, run_id: &str, event_type: &str, data: &Value) -> Result<u64> {
        let data = serde_json::to_string(data)?;
        let (run_id, event_type) = (run_id.to_owned(), event_type.to_owned());
        let received_at = Timestamp::now().as_micros();
        self.write(|reply| Command::InboxPush {
            run_id,
            event_type,
            data,
            received_at,
            reply,
        })
        .await
    }

    async fn inbox_read(&self, run_id: &str) -> Result<Vec<InboxEntry>> {
        let run_id = run_id.to_owned();
        self.readers
            .run(move |conn| reader::inbox_read(conn, &run_id))
            .await
    }

    async fn inbox_ack(&self, run_id: &str, up_to: u64) -> Result<()> {
        let run_id = run_id.to_owned();
        self.write(|reply| Command::InboxAck {
            run_id,
            up_to,
            reply,
        })
        .await
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        let (id, json) = (session.id.clone(), serde_json::to_string(session)?);
        self.write(|reply| Command::CreateSession { id, json, reply })
            .await
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| reader::get_session(conn, &id))
            .await
    }

    async fn put_session(&self, session: &SessionRecord) -> Result<()> {
        let (id, json) = (session.id.clone(), serde_json::to_string(session)?);
        self.write(|reply| Command::PutSession { id, json, reply })
            .await
    }

    async fn delete_session(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(|reply| Command::DeleteSession { id, reply })
            .await
    }
}
