//! The writer thread: owns the read-write connection and group-commits every write command.
//!
//! Most small appends never come here: the caller's task journals them (see `journal.rs`).
//! Those that do (with `synchronous = FULL`, or while their run was busy) run first in a group,
//! journaled with one `write` (and one sync), with no SQLite transaction. Then everything else
//! runs in one transaction, together with the end-of-group journal work: moving due runs'
//! pending events into `batches`, within a budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use sluice_protocol::{RawEvent, RunRecord};
use sluice_store::{Error, FastMap, FastSet, Notifier, Result};
use tokio::sync::{mpsc, oneshot};

use crate::cache::{RunCache, RunState, check_continues};
use crate::checkpoint::{self, Checkpointer};
use crate::journal::{APPLY_BYTES, Journals, Outcome, SharedJournal};
use crate::{SqliteOptions, batches};

/// After a failed transaction the writer waits this long before it moves pending events again
/// while idle.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The most bytes of pending events one transaction moves into `batches` (and the most credit
/// the pacer saves up).
const IDLE_MOVE_BUDGET: usize = 64 * APPLY_BYTES;

/// The pace of the moves: twice the journal's recent inflow, at least this many bytes a
/// second.
const MOVE_FLOOR: f64 = 1024.0 * 1024.0;

/// How far back the journal's inflow is averaged (an exponential average), in seconds.
const INFLOW_TAU: f64 = 0.5;

/// Paces the moves of pending events into `batches`. Runs streaming in step (a thousand agents
/// started together) fill their page, or finish, at the same moment; moving a thousand runs at
/// once takes the writer a core for tens of milliseconds, which the streams feel. So moves
/// spend a credit that refills at twice the journal's recent inflow: the backlog still shrinks
/// (and the cap on pending events bounds it anyway), but the work is spread out.
#[derive(Debug)]
struct Pacer {
    last: Instant,
    recorded: u64,
    /// Bytes a second journaled, averaged.
    inflow: f64,
    credit: f64,
}

impl Pacer {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            recorded: 0,
            inflow: 0.0,
            credit: IDLE_MOVE_BUDGET as f64,
        }
    }

    /// Adds the credit earned since the last call, given the journal's byte count now.
    fn refill(&mut self, recorded: u64) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        let grown = recorded.saturating_sub(self.recorded) as f64;
        self.recorded = recorded;
        if dt > 0.0 {
            let alpha = 1.0 - (-dt / INFLOW_TAU).exp();
            self.inflow += alpha * (grown / dt - self.inflow);
        }
        let rate = (2.0 * self.inflow).max(MOVE_FLOOR);
        self.credit = (self.credit + dt * rate).min(IDLE_MOVE_BUDGET as f64);
    }

    /// How many bytes may be moved now.
    fn budget(&self) -> usize {
        if self.credit <= 0.0 {
            0
        } else {
            self.credit as usize
        }
    }

    fn spend(&mut self, bytes: usize) {
        self.credit -= bytes as f64;
    }

    /// How long until the credit reaches `bytes` at the current pace.
    fn wait_for(&self, bytes: usize) -> Duration {
        let rate = (2.0 * self.inflow).max(MOVE_FLOOR);
        Duration::from_secs_f64(((bytes as f64 - self.credit) / rate).max(0.0))
    }
}

/// What a row costs in the WAL besides its data, roughly (key, header, cell pointer).
const ROW_BYTES: usize = 64;

/// A failure that ends a whole write transaction, reported to every command in it.
type Fatal = Arc<dyn std::error::Error + Send + Sync>;

/// SQLite rolled back the open transaction by itself after a failed statement.
#[derive(Debug)]
struct TransactionLost;

impl std::fmt::Display for TransactionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SQLite rolled the write transaction back")
    }
}

impl std::error::Error for TransactionLost {}

/// Where a command's outcome goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// A run record with its indexed columns pulled out, serialised by the caller (off the writer).
#[derive(Debug)]
pub(crate) struct RunRow {
    id: String,
    workflow: String,
    status: &'static str,
    session_id: Option<String>,
    owner: Option<String>,
    finished_at: Option<i64>,
    last_seq: u64,
    json: String,
}

impl RunRow {
    /// Serialises `record`.
    pub(crate) fn new(record: &RunRecord) -> Result<Self> {
        Ok(Self {
            id: record.id.clone(),
            workflow: record.workflow.clone(),
            status: record.status.as_str(),
            session_id: record.session_id.clone(),
            owner: record.owner.clone(),
            finished_at: record.finished_at.map(|t| t.as_micros()),
            last_seq: record.last_seq,
            json: serde_json::to_string(record)?,
        })
    }
}

/// One write, as sent to the writer thread.
#[derive(Debug)]
pub(crate) enum Command {
    CreateRun {
        row: RunRow,
        reply: Reply<()>,
    },
    PutRun {
        row: RunRow,
        reply: Reply<()>,
    },
    DeleteRun {
        id: String,
        reply: Reply<()>,
    },
    Append {
        run_id: String,
        events: Vec<RawEvent>,
        reply: Reply<()>,
    },
    Finish {
        row: RunRow,
        terminal: RawEvent,
        reply: Reply<()>,
    },
    PutCheckpoint {
        run_id: String,
        data: Bytes,
        reply: Reply<()>,
    },
    InboxPush {
        run_id: String,
        event_type: String,
        data: String,
        received_at: i64,
        reply: Reply<u64>,
    },
    InboxAck {
        run_id: String,
        up_to: u64,
        reply: Reply<()>,
    },
    CreateSession {
        id: String,
        json: String,
        reply: Reply<()>,
    },
    PutSession {
        id: String,
        json: String,
        reply: Reply<()>,
    },
    DeleteSession {
        id: String,
        reply: Reply<bool>,
    },
    /// Journaled appends made runs due: wakes the writer to move them (no reply).
    Maintain,
}

impl Command {
    /// The run the command is about, if any.
    fn run_id(&self) -> Option<&str> {
        match self {
            Self::CreateRun { row, .. } | Self::PutRun { row, .. } | Self::Finish { row, .. } => {
                Some(&row.id)
            }
            Self::DeleteRun { id, .. } => Some(id),
            Self::Append { run_id, .. }
            | Self::PutCheckpoint { run_id, .. }
            | Self::InboxPush { run_id, .. }
            | Self::InboxAck { run_id, .. } => Some(run_id),
            Self::CreateSession { .. }
            | Self::PutSession { .. }
            | Self::DeleteSession { .. }
            | Self::Maintain => None,
        }
    }

    /// What the command counts for against `max_batch`.
    fn weight(&self) -> usize {
        match self {
            Self::Append { events, .. } => events.len().max(1),
            _ => 1,
        }
    }

    /// Roughly how many bytes the command adds to the WAL.
    fn bytes(&self) -> usize {
        match self {
            Self::Append { events, .. } => events.iter().map(|e| e.json().len() + ROW_BYTES).sum(),
            Self::Finish { row, terminal, .. } => {
                row.json.len() + terminal.json().len() + 2 * ROW_BYTES
            }
            Self::CreateRun { row, .. } | Self::PutRun { row, .. } => row.json.len() + ROW_BYTES,
            Self::PutCheckpoint { data, .. } => data.len() + ROW_BYTES,
            Self::InboxPush { data, .. } => data.len() + 2 * ROW_BYTES,
            Self::CreateSession { json, .. } | Self::PutSession { json, .. } => {
                json.len() + ROW_BYTES
            }
            Self::DeleteRun { .. } | Self::InboxAck { .. } | Self::DeleteSession { .. } => {
                ROW_BYTES
            }
            Self::Maintain => 0,
        }
    }

    /// Whether the command needs a savepoint to fail alone: it runs several statements and can
    /// fail after the first. (An append is checked against the log's state before it writes, so
    /// only an I/O-level failure can interrupt it; that fails the whole group instead.)
    fn needs_savepoint(&self) -> bool {
        matches!(
            self,
            Self::DeleteRun { .. } | Self::Finish { .. } | Self::InboxPush { .. }
        )
    }

    /// Replies with `err` without running the command.
    fn fail(self, err: Error) {
        let done = match self {
            Self::InboxPush { reply, .. } => Done::Id(reply, Err(err)),
            Self::DeleteSession { reply, .. } => Done::Flag(reply, Err(err)),
            Self::CreateRun { reply, .. }
            | Self::PutRun { reply, .. }
            | Self::DeleteRun { reply, .. }
            | Self::Append { reply, .. }
            | Self::Finish { reply, .. }
            | Self::PutCheckpoint { reply, .. }
            | Self::InboxAck { reply, .. }
            | Self::CreateSession { reply, .. }
            | Self::PutSession { reply, .. } => Done::Unit(reply, Err(err)),
            Self::Maintain => return,
        };
        done.send();
    }
}

/// A command that ran inside the open transaction, with the outcome to send once it commits.
enum Done {
    Unit(Reply<()>, Result<()>),
    Id(Reply<u64>, Result<u64>),
    Flag(Reply<bool>, Result<bool>),
    /// Nothing to answer.
    None,
}

impl Done {
    fn is_ok(&self) -> bool {
        match self {
            Self::Unit(_, r) => r.is_ok(),
            Self::Id(_, r) => r.is_ok(),
            Self::Flag(_, r) => r.is_ok(),
            Self::None => true,
        }
    }

    /// Turns a success into `err()`: the transaction it ran in did not commit.
    fn undo(&mut self, err: impl FnOnce() -> Error) {
        match self {
            Self::Unit(_, r @ Ok(_)) => *r = Err(err()),
            Self::Id(_, r @ Ok(_)) => *r = Err(err()),
            Self::Flag(_, r @ Ok(_)) => *r = Err(err()),
            _ => {}
        }
    }

    fn send(self) {
        // A caller that stopped waiting (its future was dropped) needs no answer.
        match self {
            Self::Unit(tx, r) => drop(tx.send(r)),
            Self::Id(tx, r) => drop(tx.send(r)),
            Self::Flag(tx, r) => drop(tx.send(r)),
            Self::None => {}
        }
    }
}

/// What the open transaction did to a run, on top of the committed [`RunCache`].
#[derive(Debug)]
struct Touched {
    /// The state after the transaction (`None`: the run does not exist).
    state: Option<RunState>,
    /// The events appended, in order (followers must be woken; they go to the cache's tail).
    appended: Vec<RawEvent>,
}

/// What the open transaction does to pending events: the journal's bookkeeping changes only
/// once it commits (the callers' tasks go on journaling meanwhile).
#[derive(Debug, Default)]
struct Moves {
    /// Runs whose first n pending events the transaction writes to `batches`.
    taken: FastMap<String, usize>,
    /// Runs deleted by the transaction.
    forgotten: FastSet<String>,
    /// Runs whose log the transaction closes while events of theirs stay pending.
    closed: Vec<String>,
    /// Due runs taken from the queue (put back if the transaction fails).
    popped: Vec<String>,
    /// Roughly how many bytes the moves add to the WAL (they are most of what it receives
    /// when many runs stream: the checkpoint thread is nudged by this too).
    bytes: usize,
}

/// The write side of the store, run on its own thread by [`Writer::run`].
pub(crate) struct Writer {
    conn: Connection,
    cache: Arc<RunCache>,
    notifier: Arc<Notifier>,
    /// Runs the open transaction has looked at or changed.
    touched: FastMap<String, Touched>,
    /// Set when a command without a savepoint failed after it began writing: the transaction
    /// holds part of it, so it must not commit.
    interrupted: Option<Fatal>,
    /// The journal, shared with the callers' tasks (see `journal.rs`).
    shared: SharedJournal,
    /// What the open transaction does to the journal, applied once it commits.
    moves: Moves,
    /// Spreads the moves of pending events over time.
    pacer: Pacer,
    /// Each shard's byte count when last seen.
    recorded_seen: Vec<u64>,
    /// When the last transaction failed, if the last one did.
    failing_since: Option<Instant>,
    commit_window: Duration,
    max_batch: usize,
    /// Takes checkpoints off this thread; `None` in unit tests.
    checkpointer: Option<Checkpointer>,
    /// Bytes committed since the last checkpoint nudge.
    since_checkpoint: usize,
}

fn db(what: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |e| Error::backend(what, e)
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

/// Seqs and ids are stored as SQLite integers; a value past `i64::MAX` is clamped (it can only
/// be an upper bound, as nothing stored reaches it).
pub(crate) fn to_sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads an integer the store wrote from a `u64`.
pub(crate) fn from_sql_int(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The committed state of a run's log, from the database (`None`: no such run).
fn load_state(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<RunState>> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?
        .exists([run_id])?;
    if !exists {
        return Ok(None);
    }
    let (last_seq, closed) = batches::last(conn, run_id)?.unwrap_or((0, false));
    Ok(Some(RunState { last_seq, closed }))
}

fn update_run(conn: &Connection, row: &RunRow) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(
            "UPDATE runs SET workflow = ?2, status = ?3, session_id = ?4, owner = ?5,
                             finished_at = ?6, record = ?7
             WHERE id = ?1",
        )
        .map_err(db("updating a run"))?;
    let changed = stmt
        .execute(params![
            row.id,
            row.workflow,
            row.status,
            row.session_id,
            row.owner,
            row.finished_at,
            row.json
        ])
        .map_err(db("updating a run"))?;
    if changed == 0 {
        return Err(Error::run_not_found(&row.id));
    }
    Ok(())
}

/// How long the writer keeps looking for a next command before it sleeps: a caller that appends
/// again right after its reply (the common case for a busy run) then finds the writer awake.
const SPIN: Duration = Duration::from_micros(50);

/// The next command, or `None` once every sender is gone.
fn next_command(rx: &mut mpsc::Receiver<Command>, journals: &Journals) -> Option<Command> {
    let started = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(cmd) => return Some(cmd),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if started.elapsed() < SPIN => {
                std::thread::yield_now()
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                // Journaling callers wake a sleeping writer when runs become due. Due runs
                // that appeared before the flag was up are caught by the check after it.
                journals.set_writer_asleep(true);
                if journals.has_work() {
                    journals.set_writer_asleep(false);
                    return Some(Command::Maintain);
                }
                let cmd = rx.blocking_recv();
                journals.set_writer_asleep(false);
                return cmd;
            }
        }
    }
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        shared: SharedJournal,
        cache: Arc<RunCache>,
        notifier: Arc<Notifier>,
        options: &SqliteOptions,
        checkpointer: Option<Checkpointer>,
    ) -> Self {
        Self {
            conn,
            cache,
            notifier,
            touched: FastMap::default(),
            interrupted: None,
            shared,
            moves: Moves::default(),
            pacer: Pacer::new(),
            recorded_seen: Vec::new(),
            failing_since: None,
            commit_window: options.commit_window,
            max_batch: options.max_batch.max(1),
            checkpointer,
            since_checkpoint: 0,
        }
    }

    /// Serves commands until every sender is gone and the queue is drained.
    ///
    /// Group commit: the first command of a group is waited for; then whatever is already queued
    /// joins it, until the queue is empty, the group holds `max_batch` events, or
    /// `commit_window` has passed. Under light load a command commits alone at once; under heavy
    /// load groups grow while the previous one commits.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::new();
        loop {
            let first = match rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::error::TryRecvError::Empty) if self.has_work() => {
                    match self.failing_since {
                        // After a failed transaction, idle moves wait a while (the disk may be
                        // full): the writer polls for commands meanwhile instead of spinning.
                        Some(at) if at.elapsed() < RETRY_AFTER_FAILURE => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        // Nothing queued: a good moment to move due runs into `batches`, at the
                        // pacer's pace.
                        _ => {
                            let survey = self.shared.survey(&mut self.recorded_seen);
                            self.pacer.refill(survey.recorded);
                            if survey.other_work || self.pacer.budget() >= APPLY_BYTES {
                                self.transaction(Vec::new(), self.pacer.budget());
                            } else {
                                // Short naps: a command arriving meanwhile waits at most 1 ms.
                                let nap = self.pacer.wait_for(APPLY_BYTES);
                                std::thread::sleep(
                                    nap.clamp(Duration::from_micros(100), Duration::from_millis(1)),
                                );
                            }
                        }
                    }
                    continue;
                }
                Err(_) => match next_command(&mut rx, &self.shared) {
                    Some(cmd) => cmd,
                    None => break,
                },
            };
            let started = Instant::now();
            let mut weight = first.weight();
            group.push(first);
            while weight < self.max_batch && started.elapsed() < self.commit_window {
                match rx.try_recv() {
                    Ok(cmd) => {
                        weight += cmd.weight();
                        group.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(std::mem::take(&mut group));
        }
        // A clean close leaves every event in `batches`: the next open has nothing to replay.
        for i in 0..self.shared.len() {
            self.shared.shard(i).journal.make_all_due();
        }
        while self.has_work() && self.failing_since.is_none() {
            self.transaction(Vec::new(), usize::MAX);
        }
        // Stop the checkpoint thread before the connection closes (closing the last connection
        // checkpoints the rest of the WAL).
        drop(self.checkpointer.take());
    }

    /// Whether the journal has work for the writer.
    fn has_work(&self) -> bool {
        self.shared.has_work()
    }

    /// Commits `group`: its small appends through the journal, the rest in one transaction;
    /// replies, then wakes followers.
    fn commit_group(&mut self, mut group: Vec<Command>) {
        group.retain(|cmd| !matches!(cmd, Command::Maintain));
        let rest = self.journal_appends(group);
        let survey = self.shared.survey(&mut self.recorded_seen);
        self.pacer.refill(survey.recorded);
        let budget = self.pacer.budget();
        if !rest.is_empty() || survey.other_work || (budget >= APPLY_BYTES && survey.due) {
            self.transaction(rest, budget);
        }
        if let Some(checkpointer) = &self.checkpointer {
            if self.since_checkpoint >= checkpoint::NUDGE_BYTES {
                checkpointer.nudge();
                self.since_checkpoint = 0;
            }
            checkpointer.finish_if_asked(|| {
                checkpoint::passive(&self.conn);
            });
        }
    }

    /// The first part of a group: journals the small appends of runs that no earlier command
    /// of the group leaves to the transaction, with one write, then replies to them and wakes
    /// their followers. Returns the other commands, in their order.
    fn journal_appends(&mut self, group: Vec<Command>) -> Vec<Command> {
        // Runs with a command left for the transaction: their later commands must follow it.
        let mut held: FastSet<&str> = FastSet::default();
        let mut picks = Vec::new();
        for (i, cmd) in group.iter().enumerate() {
            match cmd {
                Command::Append { run_id, .. } if !held.contains(run_id.as_str()) => picks.push(i),
                cmd => {
                    if let Some(id) = cmd.run_id() {
                        held.insert(id);
                    }
                }
            }
        }
        if picks.is_empty() {
            return group;
        }
        // One batch (one write) per shard; a run's appends are all in its shard, in order.
        let mut outcomes: Vec<Outcome> = picks.iter().map(|_| Outcome::Declined).collect();
        let mut by_shard: FastMap<usize, Vec<usize>> = FastMap::default();
        for (k, &i) in picks.iter().enumerate() {
            if let Some(id) = group[i].run_id() {
                by_shard.entry(self.shared.index(id)).or_default().push(k);
            }
        }
        for (shard, ks) in by_shard {
            let appends: Vec<(&str, &[RawEvent])> = ks
                .iter()
                .filter_map(|&k| match &group[picks[k]] {
                    Command::Append { run_id, events, .. } => {
                        Some((run_id.as_str(), events.as_slice()))
                    }
                    _ => None,
                })
                .collect();
            // The writer moves due runs after this group anyway: no need to wake it.
            let (outs, _) = self.shared.shard(shard).append(&self.cache, &appends);
            for (k, o) in ks.into_iter().zip(outs) {
                outcomes[k] = o;
            }
        }
        let mut slots: Vec<Option<Command>> = group.into_iter().map(Some).collect();
        let mut wake = Vec::new();
        for (i, outcome) in picks.into_iter().zip(outcomes) {
            // A declined append stays in its place, for the transaction.
            if matches!(outcome, Outcome::Declined) {
                continue;
            }
            let Some(Command::Append { run_id, reply, .. }) = slots[i].take() else {
                continue;
            };
            match outcome {
                Outcome::Journaled(seq) => {
                    drop(reply.send(Ok(())));
                    wake.push((run_id, seq));
                }
                Outcome::Refused(e) => drop(reply.send(Err(e))),
                Outcome::Declined => {}
            }
        }
        for (id, seq) in wake {
            self.notifier.publish(&id, seq);
        }
        slots.into_iter().flatten().collect()
    }

    /// Runs `group` in one transaction with the end-of-group journal work (moving at least
    /// `budget` bytes of due runs' pending events, when there are), commits, applies what it
    /// did to the journal and the cache, replies, then wakes followers.
    fn transaction(&mut self, group: Vec<Command>, budget: usize) {
        let mut done = Vec::with_capacity(group.len());
        let mut bytes = 0;
        let mut fatal: Option<Fatal> = None;
        // The runs the group works on are the writer's until it is over: their appends come
        // here meanwhile, so their state and pending events stay as the transaction sees them.
        let mut by_shard: FastMap<usize, Vec<&str>> = FastMap::default();
        for cmd in &group {
            if let Some(id) = cmd.run_id() {
                by_shard.entry(self.shared.index(id)).or_default().push(id);
            }
        }
        for (i, ids) in by_shard {
            let mut shard = self.shared.shard(i);
            shard.busy.extend(ids.into_iter().map(str::to_owned));
        }
        self.moves = Moves::default();
        if let Err(e) = self.exec("BEGIN IMMEDIATE") {
            fatal = Some(Arc::new(e));
        }
        for cmd in group {
            if let Some(e) = &fatal {
                cmd.fail(Error::backend(
                    "the write transaction failed",
                    Arc::clone(e),
                ));
                continue;
            }
            bytes += cmd.bytes();
            let (d, e) = self.apply_isolated(cmd);
            done.extend(d);
            fatal = e;
        }
        if fatal.is_none()
            && let Err(e) = self.maintain_journal(budget)
        {
            fatal = Some(Arc::new(e));
        }
        let outcome = match fatal {
            Some(e) => {
                if !self.conn.is_autocommit() {
                    // Best effort: the error that brought us here is the one reported.
                    let _ = self.exec("ROLLBACK");
                }
                Err(e)
            }
            None => self.exec("COMMIT").map_err(|e| -> Fatal {
                let _ = self.exec("ROLLBACK");
                Arc::new(e)
            }),
        };
        let moves = std::mem::take(&mut self.moves);
        let mut wake = Vec::new();
        match outcome {
            Ok(()) => {
                self.since_checkpoint += bytes + moves.bytes;
                self.failing_since = None;
                wake = self.committed(moves);
            }
            Err(e) => {
                tracing::error!(error = %e, commands = done.len(), "an SQLite write transaction failed");
                self.failing_since = Some(Instant::now());
                for run in &moves.popped {
                    self.shared.of(run).journal.requeue(run);
                }
                for i in 0..self.shared.len() {
                    self.shared.shard(i).busy.clear();
                }
                self.touched.clear();
                for d in &mut done {
                    d.undo(|| Error::backend("committing a write transaction", Arc::clone(&e)));
                }
            }
        }
        for d in done {
            d.send();
        }
        for (id, seq) in wake {
            self.notifier.publish(&id, seq);
        }
    }

    /// After a commit: applies what it did to the journal's bookkeeping and to the cache,
    /// releases segments whose records are all in `batches` now, frees the busy runs, and
    /// returns the followers to wake.
    fn committed(&mut self, moves: Moves) -> Vec<(String, u64)> {
        for (run, &n) in &moves.taken {
            let mut shard = self.shared.of(run);
            shard.journal.moved(run, n);
            if !self.touched.contains_key(run) {
                // Moved without a command of its own in the group: only its applied seq moved.
                let first_pending = shard
                    .journal
                    .pending_from(run, 0)
                    .first()
                    .map(RawEvent::seq);
                self.cache.moved(run, first_pending);
            }
        }
        for run in &moves.forgotten {
            self.shared.of(run).journal.forget(run);
        }
        for run in &moves.closed {
            self.shared.of(run).journal.close(run);
        }
        let mut wake = Vec::new();
        for (id, t) in &self.touched {
            match t.state {
                Some(state) if !t.appended.is_empty() => {
                    wake.push((id.clone(), state.last_seq));
                }
                // Deleted (or never there): followers wake, find it gone and end.
                None => wake.push((id.clone(), u64::MAX)),
                Some(_) => {}
            }
        }
        // Touched runs are busy: their pending events cannot change until they are freed below.
        // (The shards' locks are taken before the cache's, never inside it: the journaling
        // callers take them in that order.)
        let applied: Vec<u64> = self
            .touched
            .iter()
            .map(|(id, t)| {
                t.state.map_or(0, |s| {
                    self.shared.of(id).journal.applied_upto(id, s.last_seq)
                })
            })
            .collect();
        self.cache.apply(
            self.touched
                .iter_mut()
                .zip(applied)
                .map(|((id, t), applied_upto)| crate::cache::Change {
                    run_id: id.as_str(),
                    state: t.state,
                    appended: std::mem::take(&mut t.appended),
                    applied_upto,
                }),
        );
        self.touched.clear();
        for i in 0..self.shared.len() {
            let mut shard = self.shared.shard(i);
            let shard = &mut *shard;
            if let Some(front) = shard.journal.release() {
                shard.file.release_below(front);
            }
            if let Err(e) = shard.file.roll_if_drained(shard.journal.front()) {
                tracing::warn!(error = %e, "starting a new journal segment");
            }
            shard.busy.clear();
        }
        wake
    }

    /// Runs a statement without parameters through the statement cache.
    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(drop)
    }

    /// Runs one command so that its failure undoes only its own writes. The second value is a
    /// failure that ended the whole transaction; the first, the command's outcome if it ran.
    fn apply_isolated(&mut self, cmd: Command) -> (Option<Done>, Option<Fatal>) {
        let savepoint = cmd.needs_savepoint();
        if savepoint && let Err(e) = self.exec("SAVEPOINT cmd") {
            let e: Fatal = Arc::new(e);
            cmd.fail(Error::backend("opening a savepoint", Arc::clone(&e)));
            return (None, Some(e));
        }
        let d = self.apply(cmd);
        if savepoint {
            let step = if d.is_ok() {
                self.exec("RELEASE cmd")
            } else {
                self.exec("ROLLBACK TO cmd")
                    .and_then(|()| self.exec("RELEASE cmd"))
            };
            if let Err(e) = step {
                return (Some(d), Some(Arc::new(e)));
            }
        }
        let interrupted = self.interrupted.take();
        if self.conn.is_autocommit() {
            // SQLite rolled the whole transaction back (I/O error, disk full, …).
            return (Some(d), Some(Arc::new(TransactionLost)));
        }
        if let Some(e) = interrupted {
            return (Some(d), Some(e));
        }
        (Some(d), None)
    }

    /// Runs one command inside the open transaction.
    fn apply(&mut self, cmd: Command) -> Done {
        match cmd {
            Command::CreateRun { row, reply } => Done::Unit(reply, self.create_run(&row)),
            Command::PutRun { row, reply } => Done::Unit(reply, update_run(&self.conn, &row)),
            Command::DeleteRun { id, reply } => Done::Unit(reply, self.delete_run(&id)),
            Command::Append {
                run_id,
                events,
                reply,
            } => Done::Unit(reply, self.append(&run_id, &events)),
            Command::Finish {
                row,
                terminal,
                reply,
            } => Done::Unit(reply, self.finish(&row, &terminal)),
            Command::PutCheckpoint {
                run_id,
                data,
                reply,
            } => Done::Unit(reply, self.put_checkpoint(&run_id, &data)),
            Command::InboxPush {
                run_id,
                event_type,
                data,
                received_at,
                reply,
            } => Done::Id(
                reply,
                self.inbox_push(&run_id, &event_type, &data, received_at),
            ),
            Command::InboxAck {
                run_id,
                up_to,
                reply,
            } => Done::Unit(reply, self.inbox_ack(&run_id, up_to)),
            Command::CreateSession { id, json, reply } => {
                Done::Unit(reply, self.create_session(&id, &json))
            }
            Command::PutSession { id, json, reply } => {
                Done::Unit(reply, self.put_session(&id, &json))
            }
            Command::DeleteSession { id, reply } => Done::Flag(reply, self.delete_session(&id)),
            // Taken out of every group before it runs.
            Command::Maintain => Done::None,
        }
    }

    /// Inserts `events` as rows of the log.
    fn insert_events(&self, run_id: &str, events: &[RawEvent]) -> rusqlite::Result<()> {
        batches::insert(&self.conn, run_id, events)
    }

    /// Writes `events` (checked to continue the run's log, which `closes` or not) to `batches`:
    /// after the run's pending events, or, for a lone terminal event, by itself (the pending
    /// events follow once the run's turn as a due run comes).
    fn store_events(
        &mut self,
        run_id: &str,
        events: &[RawEvent],
        closes: bool,
    ) -> rusqlite::Result<()> {
        let skip = self.moves.taken.get(run_id).copied().unwrap_or(0);
        let pending = self.shared.of(run_id).journal.pending_from(run_id, skip);
        if pending.is_empty() {
            return self.insert_events(run_id, events);
        }
        if closes && events.len() == 1 {
            self.moves.closed.push(run_id.to_owned());
            return self.insert_events(run_id, events);
        }
        self.take_pending(run_id, skip, &pending);
        self.insert_events(run_id, &pending)?;
        self.insert_events(run_id, events)
    }

    /// Notes that the transaction writes `pending` (the run's pending events from the
    /// `skip`-th on) to `batches`.
    fn take_pending(&mut self, run_id: &str, skip: usize, pending: &[RawEvent]) {
        self.moves.bytes += pending
            .iter()
            .map(|e| e.json().len() + ROW_BYTES)
            .sum::<usize>();
        if !pending.is_empty() {
            self.moves
                .taken
                .insert(run_id.to_owned(), skip + pending.len());
        }
    }

    /// At the end of a group: moves into `batches` the pending events of runs that went quiet,
    /// and of due runs until `budget` bytes are moved.
    fn maintain_journal(&mut self, budget: usize) -> Result<()> {
        // (run, how many of its pending events this transaction took already, the rest).
        let mut picked: Vec<(String, usize, Vec<RawEvent>)> = Vec::new();
        let mut seen = FastSet::default();
        let moves = &mut self.moves;
        let mut pick = |run: String, journal: &crate::journal::Journal, moves: &Moves| {
            if moves.forgotten.contains(&run) || !seen.insert(run.clone()) {
                return 0;
            }
            let skip = moves.taken.get(&run).copied().unwrap_or(0);
            let events = journal.pending_from(&run, skip);
            let bytes = events.iter().map(|e| e.json().len()).sum();
            picked.push((run, skip, events));
            bytes
        };
        for i in 0..self.shared.len() {
            let Some(shard) = self.shared.try_shard(i) else {
                continue;
            };
            for run in shard.journal.stragglers() {
                pick(run, &shard.journal, moves);
            }
        }
        // Due runs, oldest first in each shard, the shards in turn.
        let mut moved = 0;
        let mut empty = vec![false; self.shared.len()];
        'rounds: while moved < budget && empty.iter().any(|e| !e) {
            for (i, done) in empty.iter_mut().enumerate() {
                if *done {
                    continue;
                }
                // A shard a caller holds is left for the next group.
                let Some(mut shard) = self.shared.try_shard(i) else {
                    *done = true;
                    continue;
                };
                let Some(run) = shard.journal.next_due() else {
                    *done = true;
                    continue;
                };
                moves.popped.push(run.clone());
                moved += pick(run, &shard.journal, moves);
                if moved >= budget {
                    break 'rounds;
                }
            }
        }
        self.pacer.spend(moved);
        for (run, skip, events) in picked {
            if events.is_empty() {
                continue;
            }
            self.take_pending(&run, skip, &events);
            self.insert_events(&run, &events)
                .map_err(db("moving journaled events"))?;
        }
        Ok(())
    }

    /// The state of a run's log as of the open transaction: what it did, else the committed
    /// cache, else the database.
    fn state(&mut self, run_id: &str) -> Result<Option<RunState>> {
        if let Some(t) = self.touched.get(run_id) {
            return Ok(t.state);
        }
        let state = match self.cache.get(run_id) {
            Some(state) => Some(state),
            None => load_state(&self.conn, run_id).map_err(db("loading a run's log state"))?,
        };
        self.touched.insert(
            run_id.to_owned(),
            Touched {
                state,
                appended: Vec::new(),
            },
        );
        Ok(state)
    }

    /// Records the state of a run after a command, with the events it appended.
    fn set_state(&mut self, run_id: &str, state: Option<RunState>, appended: &[RawEvent]) {
        let t = self
            .touched
            .entry(run_id.to_owned())
            .or_insert_with(|| Touched {
                state,
                appended: Vec::new(),
            });
        t.state = state;
        if state.is_none() {
            t.appended.clear();
        }
        t.appended.extend_from_slice(appended);
    }

    fn create_run(&mut self, row: &RunRow) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO runs (id, workflow, status, session_id, owner, finished_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(db("creating a run"))?;
        match stmt.execute(params![
            row.id,
            row.workflow,
            row.status,
            row.session_id,
            row.owner,
            row.finished_at,
            row.json
        ]) {
            Ok(_) => {}
            Err(e) if is_constraint(&e) => {
                return Err(Error::AlreadyExists {
                    what: "run",
                    id: row.id.clone(),
                });
            }
            Err(e) => return Err(Error::backend("creating a run", e)),
        }
        drop(stmt);
        self.set_state(
            &row.id,
            Some(RunState {
                last_seq: 0,
                closed: false,
            }),
            &[],
        );
        Ok(())
    }

    fn delete_run(&mut self, id: &str) -> Result<()> {
        for sql in [
            "DELETE FROM batches WHERE run_id = ?1",
            "DELETE FROM checkpoints WHERE run_id = ?1",
            "DELETE FROM inbox WHERE run_id = ?1",
            "DELETE FROM runs WHERE id = ?1",
        ] {
            let mut stmt = self
                .conn
                .prepare_cached(sql)
                .map_err(db("deleting a run"))?;
            stmt.execute([id]).map_err(db("deleting a run"))?;
        }
        // Its journal records go with the journal's front (and are skipped if the store reopens
        // before that: the journal is replayed for existing runs only).
        self.moves.forgotten.insert(id.to_owned());
        self.set_state(id, None, &[]);
        Ok(())
    }

    fn append(&mut self, run_id: &str, events: &[RawEvent]) -> Result<()> {
        let after = check_continues(run_id, self.state(run_id)?, events)?;
        if events.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store_events(run_id, events, after.closed) {
            // Rows of this append may be in the transaction already: it must not commit.
            self.interrupted = Some(Arc::new(Error::backend("appending events", e)));
            return Err(Error::Backend {
                message: "appending events failed".into(),
                source: None,
            });
        }
        self.set_state(run_id, Some(after), events);
        Ok(())
    }

    fn finish(&mut self, row: &RunRow, terminal: &RawEvent) -> Result<()> {
        if !terminal.is_terminal() {
            return Err(Error::Backend {
                message: format!(
                    "finish needs a terminal event, not {:?}",
                    terminal.event_type()
                ),
                source: None,
            });
        }
        if terminal.seq() != row.last_seq {
            return Err(Error::SeqConflict {
                run_id: row.id.clone(),
                expected: row.last_seq,
                got: terminal.seq(),
            });
        }
        let after = check_continues(
            &row.id,
            self.state(&row.id)?,
            std::slice::from_ref(terminal),
        )?;
        update_run(&self.conn, row)?;
        if let Err(e) = self.store_events(&row.id, std::slice::from_ref(terminal), true) {
            // The journal's bookkeeping moved already: the whole group must not commit.
            self.interrupted = Some(Arc::new(Error::backend("appending the terminal event", e)));
            return Err(Error::Backend {
                message: "appending the terminal event failed".into(),
                source: None,
            });
        }
        self.set_state(&row.id, Some(after), std::slice::from_ref(terminal));
        Ok(())
    }

    fn put_checkpoint(&mut self, run_id: &str, data: &[u8]) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR REPLACE INTO checkpoints (run_id, data) SELECT id, ?2 FROM runs WHERE id = ?1")
            .map_err(db("storing a checkpoint"))?;
        let changed = stmt
            .execute(params![run_id, data])
            .map_err(db("storing a checkpoint"))?;
        if changed == 0 {
            return Err(Error::run_not_found(run_id));
        }
        Ok(())
    }

    fn inbox_push(
        &mut self,
        run_id: &str,
        event_type: &str,
        data: &str,
        received_at: i64,
    ) -> Result<u64> {
        let id: i64 = self
            .conn
            .prepare_cached("UPDATE runs SET inbox_next = inbox_next + 1 WHERE id = ?1 RETURNING inbox_next - 1")
            .and_then(|mut stmt| stmt.query_row([run_id], |row| row.get(0)).optional())
            .map_err(db("numbering an inbox entry"))?
            .ok_or_else(|| Error::run_not_found(run_id))?;
        self.conn
            .prepare_cached("INSERT INTO inbox (run_id, id, type, data, received_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .and_then(|mut stmt| stmt.execute(params![run_id, id, event_type, data, received_at]))
            .map_err(db("queueing an inbox entry"))?;
        Ok(from_sql_int(id))
    }

    fn inbox_ack(&mut self, run_id: &str, up_to: u64) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM inbox WHERE run_id = ?1 AND id <= ?2")
            .and_then(|mut stmt| stmt.execute(params![run_id, to_sql_int(up_to)]))
            .map_err(db("acknowledging inbox entries"))?;
        Ok(())
    }

    fn create_session(&mut self, id: &str, json: &str) -> Result<()> {
        let result = self
            .conn
            .prepare_cached("INSERT INTO sessions (id, record) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute([id, json]));
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_constraint(&e) => Err(Error::AlreadyExists {
                what: "session",
                id: id.to_owned(),
            }),
            Err(e) => Err(Error::backend("creating a session", e)),
        }
    }

    fn put_session(&mut self, id: &str, json: &str) -> Result<()> {
        let changed = self
            .conn
            .prepare_cached("UPDATE sessions SET record = ?2 WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute([id, json]))
            .map_err(db("updating a session"))?;
        if changed == 0 {
            return Err(Error::session_not_found(id));
        }
        Ok(())
    }

    fn delete_session(&mut self, id: &str) -> Result<bool> {
        let changed = self
            .conn
            .prepare_cached("DELETE FROM sessions WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute([id]))
            .map_err(db("deleting a session"))?;
        Ok(changed > 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use serde_json::json;
    use sluice_protocol::Timestamp;
    use sluice_protocol::kind;

    use super::*;
    use crate::Synchronous;
    use crate::schema::open_writer;

    fn ev(run: &str, seq: u64) -> RawEvent {
        RawEvent::encode(seq, run, "tick", Timestamp::now(), None, "{}")
    }

    fn writer() -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("w.db");
        let conn = open_writer(&db, Synchronous::Normal).unwrap();
        let shards = (0..crate::journal::SHARDS)
            .map(|shard| {
                let file = crate::journal_file::JournalFile::create(
                    &crate::journal_file::dir_of(&db),
                    shard,
                    1,
                    false,
                    None,
                )
                .unwrap();
                crate::journal::Journaled {
                    journal: crate::journal::Journal::new(1),
                    file,
                    busy: FastSet::default(),
                }
            })
            .collect();
        let shared = Arc::new(crate::journal::Journals::new(shards));
        let w = Writer::new(
            conn,
            shared,
            Arc::default(),
            Arc::default(),
            &SqliteOptions::default(),
            None,
        );
        (dir, w)
    }

    fn create(id: &str) -> (Command, oneshot::Receiver<Result<()>>) {
        let (reply, rx) = oneshot::channel();
        let row = RunRow::new(&RunRecord::new(id, "wf", json!(null))).unwrap();
        (Command::CreateRun { row, reply }, rx)
    }

    fn append(
        run: &str,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> (Command, oneshot::Receiver<Result<()>>) {
        let (reply, rx) = oneshot::channel();
        let events = seqs.map(|s| ev(run, s)).collect();
        (
            Command::Append {
                run_id: run.to_owned(),
                events,
                reply,
            },
            rx,
        )
    }

    fn count(w: &Writer, sql: &str) -> i64 {
        w.conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// A run's events in `batches`.
    fn logged(w: &Writer, run: &str) -> i64 {
        w.conn
            .query_row(
                "SELECT coalesce(sum(last - first + 1), 0) FROM batches WHERE run_id = ?1",
                [run],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// A run's events as stored: in `batches`, or only in the journal.
    fn stored(w: &Writer, run: &str) -> i64 {
        logged(w, run) + w.shared.of(run).journal.pending_len(run) as i64
    }

    #[test]
    fn a_rejected_command_fails_alone_within_its_group() {
        let (_dir, mut w) = writer();
        let (cmds, rxs): (Vec<_>, Vec<_>) = [
            create("run_a"),
            create("run_b"),
            append("run_a", 1..=3),
            append("run_b", 2..=3), // gap: expected 1
            append("run_ghost", 1..=1),
            append("run_a", 4..=5),
            create("run_a"), // duplicate
            append("run_b", 1..=2),
        ]
        .into_iter()
        .unzip();
        w.commit_group(cmds);
        let outcomes: Vec<_> = rxs
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap())
            .collect();
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok() && outcomes[2].is_ok());
        assert!(
            matches!(
                outcomes[3],
                Err(Error::SeqConflict {
                    expected: 1,
                    got: 2,
                    ..
                })
            ),
            "{:?}",
            outcomes[3]
        );
        assert!(
            matches!(outcomes[4], Err(Error::NotFound { .. })),
            "{:?}",
            outcomes[4]
        );
        assert!(outcomes[5].is_ok());
        assert!(
            matches!(outcomes[6], Err(Error::AlreadyExists { .. })),
            "{:?}",
            outcomes[6]
        );
        assert!(outcomes[7].is_ok());
        assert_eq!(stored(&w, "run_a"), 5);
        assert_eq!(stored(&w, "run_b"), 2);
        assert_eq!(count(&w, "SELECT count(*) FROM runs"), 2);
        // The committed state reached the shared cache.
        assert_eq!(
            w.cache.get("run_a"),
            Some(RunState {
                last_seq: 5,
                closed: false
            })
        );
        assert_eq!(
            w.cache.get("run_b"),
            Some(RunState {
                last_seq: 2,
                closed: false
            })
        );
        assert_eq!(w.cache.get("run_ghost"), None);
    }

    #[test]
    fn a_compound_command_failing_midway_leaves_nothing_behind() {
        let (_dir, mut w) = writer();
        let (cmd, rx) = create("run_a");
        w.commit_group(vec![cmd]);
        rx.blocking_recv().unwrap().unwrap();
        // Plant a row that makes inbox_push's INSERT fail after its UPDATE has numbered it.
        w.conn
            .execute("INSERT INTO inbox (run_id, id, type, data, received_at) VALUES ('run_a', 1, 'x', '1', 0)", [])
            .unwrap();
        let (reply, mut rx) = oneshot::channel();
        let push = Command::InboxPush {
            run_id: "run_a".into(),
            event_type: "input".into(),
            data: "1".into(),
            received_at: 0,
            reply,
        };
        let (ok, mut ok_rx) = append("run_a", 1..=2);
        w.commit_group(vec![push, ok]);
        assert!(matches!(rx.try_recv().unwrap(), Err(Error::Backend { .. })));
        ok_rx.try_recv().unwrap().unwrap();
        // The savepoint undid the counter bump along with the failed insert.
        assert_eq!(
            count(&w, "SELECT inbox_next FROM runs WHERE id = 'run_a'"),
            1
        );
        assert_eq!(stored(&w, "run_a"), 2);
    }

    #[test]
    fn state_is_loaded_lazily_from_the_database() {
        let (_dir, mut w) = writer();
        let (cmd, rx) = create("run_a");
        w.commit_group(vec![cmd]);
        rx.blocking_recv().unwrap().unwrap();
        let term = RawEvent::encode(
            3,
            "run_a",
            kind::CHAIN_COMPLETED,
            Timestamp::now(),
            None,
            "{}",
        );
        let stored: Vec<RawEvent> = (1..=2)
            .map(|s| RawEvent::from_parts(s, "tick", Bytes::from_static(b"{}")))
            .collect();
        batches::insert(&w.conn, "run_a", &stored).unwrap();
        // A fresh writer on the same file knows nothing yet.
        w.cache = Arc::default();
        let (reply, mut rx) = oneshot::channel();
        w.commit_group(vec![Command::Append {
            run_id: "run_a".into(),
            events: vec![term],
            reply,
        }]);
        rx.try_recv().unwrap().unwrap();
        assert_eq!(w.cache.get("run_a"), None, "closed logs are not cached");
        let (again, mut rx) = append("run_a", 4..=4);
        w.commit_group(vec![again]);
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(Error::LogClosed { .. })
        ));
    }

    #[test]
    fn due_runs_move_into_events_over_several_groups() {
        let (_dir, mut w) = writer();
        const RUNS: usize = 200;
        let ids: Vec<String> = (0..RUNS).map(|i| format!("run_{i:03}")).collect();
        let (cmds, rxs): (Vec<_>, Vec<_>) = ids.iter().map(|id| create(id)).unzip();
        w.commit_group(cmds);
        rxs.into_iter()
            .for_each(|mut rx| rx.try_recv().unwrap().unwrap());
        // Every run appends one event at a time until each has a page's worth pending: all of
        // them become due in the same group.
        let mut seq = 0;
        while !ids
            .iter()
            .all(|id| w.shared.of(id).journal.pending_len(id) >= 48 || logged(&w, id) > 0)
        {
            seq += 1;
            let (cmds, rxs): (Vec<_>, Vec<_>) = ids.iter().map(|id| append(id, seq..=seq)).unzip();
            w.commit_group(cmds);
            rxs.into_iter()
                .for_each(|mut rx| rx.try_recv().unwrap().unwrap());
            assert!(seq < 48 + 1, "{seq}");
        }
        let moved = ids.iter().filter(|id| logged(&w, id) > 0).count();
        assert!(moved < RUNS, "not all moved in one group: {moved}");
        // The followers' view: every event readable from the cache, none lost.
        for id in &ids {
            assert_eq!(stored(&w, id), seq as i64, "{id}");
            assert_eq!(
                w.cache.read(id, 0, 1000).map(|v| v.len()),
                Some(seq as usize)
            );
        }
        // Idle time moves the rest; the journal's front moves on.
        while w.has_work() {
            w.transaction(Vec::new(), IDLE_MOVE_BUDGET);
        }
        // Only runs short of a page's worth are left pending.
        for id in &ids {
            assert_eq!(stored(&w, id), seq as i64, "{id}");
            assert!(logged(&w, id) > 0, "{id}");
            assert!(
                w.shared.of(id).journal.pending_bytes(id, 0) < APPLY_BYTES
                    && w.shared.of(id).journal.pending_len(id) < 48,
                "{id}"
            );
        }
        assert!((0..w.shared.len()).all(|i| w.shared.shard(i).journal.next_due().is_none()));
    }

    #[test]
    fn a_finished_runs_pending_events_follow_its_terminal_event_later() {
        let (_dir, mut w) = writer();
        let (cmd, rx) = create("run_a");
        w.commit_group(vec![cmd]);
        rx.blocking_recv().unwrap().unwrap();
        for seq in 1..=10 {
            let (cmd, mut rx) = append("run_a", seq..=seq);
            w.commit_group(vec![cmd]);
            rx.try_recv().unwrap().unwrap();
        }
        assert_eq!(logged(&w, "run_a"), 0, "journaled");
        let mut rec = RunRecord::new("run_a", "wf", json!(null));
        rec.status = sluice_protocol::RunStatus::Completed;
        rec.last_seq = 11;
        let terminal = RawEvent::encode(
            11,
            "run_a",
            kind::CHAIN_COMPLETED,
            Timestamp::now(),
            None,
            "{}",
        );
        let (reply, mut rx) = oneshot::channel();
        w.commit_group(vec![Command::Finish {
            row: RunRow::new(&rec).unwrap(),
            terminal,
            reply,
        }]);
        rx.try_recv().unwrap().unwrap();
        // The terminal event is in `batches`, alone; a reader of the database stops at the gap
        // and the cache has the whole log.
        assert_eq!(logged(&w, "run_a"), 1);
        assert!(
            crate::reader::read_events(&w.conn, "run_a", 0, 100)
                .unwrap()
                .is_empty()
        );
        let cached = w.cache.read("run_a", 0, 100).unwrap();
        assert_eq!(
            cached.iter().map(RawEvent::seq).collect::<Vec<_>>(),
            (1..=11).collect::<Vec<_>>()
        );
        assert_eq!(
            w.cache.get("run_a"),
            Some(RunState {
                last_seq: 11,
                closed: true
            })
        );
        // It is due: the next idle moment moves it, and it leaves the cache.
        assert!(w.has_work());
        while w.has_work() {
            w.transaction(Vec::new(), IDLE_MOVE_BUDGET);
        }
        assert_eq!(logged(&w, "run_a"), 11);
        assert_eq!(w.cache.get("run_a"), None);
        let all = crate::reader::read_events(&w.conn, "run_a", 0, 100).unwrap();
        assert_eq!(all.len(), 11);
    }
}
