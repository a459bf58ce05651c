use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_protocol::{RawEvent, RunRecord, RunStatus, SessionRecord, Timestamp};

use crate::Result;

/// Which runs [`Store::list_runs`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only these states (empty: all).
    pub statuses: Vec<RunStatus>,
    /// Only this session.
    pub session_id: Option<String>,
    /// Only runs created by this key label.
    pub owner: Option<String>,
    /// Only runs that finished before this instant.
    pub finished_before: Option<Timestamp>,
    /// Page size (backends cap it at 1,000; 0 means 50).
    pub limit: usize,
    /// Continue after this run id (the previous page's `next_cursor`).
    pub cursor: Option<String>,
}

/// About how many bytes of records (as JSON) one page of [`Store::list_runs`] holds: a page
/// ends after the record that reaches it (so it holds at least one), and says where the next
/// begins. Records carry their `input` and `result`, so `limit` alone would let one listing of
/// a thousand large runs take a gigabyte.
pub const PAGE_BYTES: usize = 4 << 20;

/// One page of runs, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunPage {
    /// The runs, newest (largest id) first.
    pub runs: Vec<RunRecord>,
    /// The id to pass as the next page's cursor; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// An event sent into a run from outside (client tool results, human input), kept durably until
/// the run has consumed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Position in the run's inbox, from 1, assigned by the store.
    pub id: u64,
    /// The event type (`tool-results`, `input`, …).
    pub event_type: String,
    /// Its payload.
    pub data: Value,
    /// When it arrived.
    pub received_at: Timestamp,
}

/// Everything Sluice persists. One implementation per backend; all pass [`crate::conformance`].
///
/// Ordering promises every backend keeps:
/// - [`append`](Store::append) and [`finish`](Store::finish) are durable (per the backend's
///   documented commit policy) before they return, and an event is visible to
///   [`read`](Store::read) only once it is.
/// - The log of a run is contiguous from seq 1 and ends at most once, with a terminal event
///   (`chain-completed`, `chain-error`, `chain-cancelled`), which is always its last event.
/// - [`finish`](Store::finish) makes the final record visible no later than the terminal event.
/// - A write that fails writes nothing: a refused batch leaves the log as it was.
///
/// The record's `last_seq` is what its writer last stored: exact for a finished run (set by
/// `finish`) and at the points where the engine saves the record (pausing, resuming); while a
/// run is active its log runs ahead of it, and [`last_seq`](Store::last_seq) is the live value.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- run records ----

    /// Stores a new run record.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`](crate::Error::AlreadyExists) if the id is taken.
    async fn create_run(&self, record: &RunRecord) -> Result<()>;

    /// The record of a run, if it exists.
    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>>;

    /// Replaces an existing run record.
    ///
    /// # Errors
    /// [`Error::NotFound`](crate::Error::NotFound) if there is no such run.
    async fn put_run(&self, record: &RunRecord) -> Result<()>;

    /// Runs matching `filter`, newest first, one page.
    async fn list_runs(&self, filter: &RunFilter) -> Result<RunPage>;

    /// Removes a run with its log, checkpoint and inbox. Removing a missing run is not an error.
    async fn delete_run(&self, id: &str) -> Result<()>;

    // ---- the event log ----

    /// Appends events to a run's log: contiguous seqs starting at the log's last seq + 1. A
    /// terminal event may only be the last of the batch (it closes the log; runs normally end
    /// through [`finish`](Store::finish)). The batch is written whole or not at all.
    ///
    /// An empty batch writes nothing and notifies no one: it returns `Ok(())` for an open log
    /// and the same errors as any append otherwise.
    ///
    /// # Errors
    /// [`NotFound`](crate::Error::NotFound) for an unknown run,
    /// [`SeqConflict`](crate::Error::SeqConflict) when the seqs do not continue the log,
    /// [`LogClosed`](crate::Error::LogClosed) after a terminal event, or when a terminal event
    /// in the batch is followed by more events.
    async fn append(&self, run_id: &str, events: &[RawEvent]) -> Result<()>;

    /// Whether [`append`](Store::append) groups appends by itself under load: a group commit
    /// on another thread, whose round trip lets a run's next batch grow while it waits. The
    /// engine's driver then commits a small batch at once instead of yielding first to let it
    /// grow, which would only add a wait. Default: `false`.
    fn groups_appends(&self) -> bool {
        false
    }

    /// A hint that the run's log will see no appends for a while (its run waits for input):
    /// a backend may let go of what it keeps in memory for the log's live readers, who read
    /// what they still need from the store. Default: nothing.
    fn idle(&self, run_id: &str) {
        let _ = run_id;
    }

    /// Atomically replaces the run record and appends the terminal event, whose seq must be
    /// both the log's last seq + 1 and `record.last_seq`. Readers that see the terminal event see
    /// the final record. When it fails, neither the record nor the log changed.
    ///
    /// # Errors
    /// As [`append`](Store::append); [`SeqConflict`](crate::Error::SeqConflict) also when
    /// `terminal.seq()` is not `record.last_seq` (`expected` is then `record.last_seq`);
    /// [`Backend`](crate::Error::Backend) when `terminal` is not a terminal event (a caller's
    /// bug).
    async fn finish(&self, record: &RunRecord, terminal: &RawEvent) -> Result<()>;

    /// Up to `limit` events with `seq > after`, in order. Unknown runs give an empty list.
    async fn read(&self, run_id: &str, after: u64, limit: usize) -> Result<Vec<RawEvent>>;

    /// The seq of the last committed event (0 for an empty or unknown log).
    async fn last_seq(&self, run_id: &str) -> Result<u64>;

    /// Resolves once the run's log holds an event with `seq > after`. Cancel-safe: dropping the
    /// future unsubscribes. Implementations subscribe first, then check committed state, so a
    /// commit between the two is never missed.
    async fn wait_for(&self, run_id: &str, after: u64) -> Result<()>;

    // ---- checkpoints ----

    /// Stores the run's checkpoint (opaque to the store), replacing the previous one.
    async fn put_checkpoint(&self, run_id: &str, checkpoint: Bytes) -> Result<()>;

    /// The run's latest checkpoint.
    async fn get_checkpoint(&self, run_id: &str) -> Result<Option<Bytes>>;

    // ---- inbox ----

    /// Durably queues an inbound event for a run; returns its inbox id.
    ///
    /// # Errors
    /// [`NotFound`](crate::Error::NotFound) for an unknown run.
    async fn inbox_push(&self, run_id: &str, event_type: &str, data: &Value) -> Result<u64>;

    /// The run's unconsumed inbound events, oldest first.
    async fn inbox_read(&self, run_id: &str) -> Result<Vec<InboxEntry>>;

    /// Drops inbound events with `id <= up_to` (the run has consumed and checkpointed them).
    async fn inbox_ack(&self, run_id: &str, up_to: u64) -> Result<()>;

    // ---- sessions ----

    /// Stores a new session.
    ///
    /// # Errors
    /// [`AlreadyExists`](crate::Error::AlreadyExists) if the id is taken.
    async fn create_session(&self, session: &SessionRecord) -> Result<()>;

    /// A session, if it exists.
    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>>;

    /// Replaces an existing session.
    ///
    /// # Errors
    /// [`NotFound`](crate::Error::NotFound) if there is no such session.
    async fn put_session(&self, session: &SessionRecord) -> Result<()>;

    /// Removes a session; returns whether it existed.
    async fn delete_session(&self, id: &str) -> Result<bool>;
}
