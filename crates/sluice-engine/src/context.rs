use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sluice_protocol::{Timestamp, Usage, kind};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::CollectBuf;
use crate::event::{AnyEvent, WorkflowEvent};
use crate::step::Emit;
use crate::{Error, Result, StepError};

/// What step tasks tell their run's driver, in order, over one channel: stream events, events
/// sent to other steps, and the step's end. One channel keeps a step's stream events ahead of its
/// `step-completed`.
pub(crate) enum Msg {
    Stream {
        step: Option<u32>,
        event_type: Cow<'static, str>,
        data: Bytes,
        ts: Timestamp,
        /// A large event's share of the run's [`STREAM_BYTES`], given back once the driver
        /// has taken the event.
        held: Option<OwnedSemaphorePermit>,
    },
    Send {
        event: AnyEvent,
    },
    /// Boxed: a step ends once, its stream events are many, and every slot of the run's
    /// channel is as large as the largest message.
    Done(Box<Done>),
}

/// A step instance's end.
pub(crate) struct Done {
    pub step: u32,
    pub outcome: Result<Emit, Failure>,
    pub duration: Duration,
}

/// A step's final failure.
pub(crate) struct Failure {
    pub error: StepError,
    pub panicked: bool,
}

/// Stream events of at least this many bytes of `data` count against [`STREAM_BYTES`].
pub(crate) const LARGE_EVENT: usize = 4096;

/// The most bytes of large stream events a run's channel holds: the channel is bounded by
/// message count (a step that outruns the log waits), and this bounds it by size too, so that
/// a step writing megabyte events fast holds a few of them in memory, not a thousand. Smaller
/// events are not counted (a full channel of them is at most 4 MiB).
pub(crate) const STREAM_BYTES: usize = 8 << 20;

/// State of a run shared by its driver and its step instances.
pub(crate) struct RunShared {
    pub run_id: String,
    pub tx: mpsc::Sender<Msg>,
    /// [`STREAM_BYTES`] of room for large stream events on `tx`.
    pub stream_bytes: Arc<Semaphore>,
    pub state: Mutex<Map<String, Value>>,
    /// `collect_events` buffers, by step name.
    pub collected: Mutex<HashMap<String, CollectBuf>>,
    pub cancel: CancellationToken,
    pub usage: Mutex<Usage>,
    pub store: std::sync::Arc<dyn sluice_store::Store>,
    pub sessions: std::sync::Arc<crate::sessions::SessionLocks>,
    pub session_id: Option<String>,
    /// The run's workflow (for the stream event types it declares).
    pub workflow: crate::Workflow,
}

impl RunShared {
    pub fn state(&self) -> MutexGuard<'_, Map<String, Value>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn collected(&self) -> MutexGuard<'_, HashMap<String, CollectBuf>> {
        self.collected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a step instance still accepts writes from its `Context` (and clones of it).
///
/// Writers enter before they put a message on the run's channel and leave once it is there;
/// [`close`](StepGate::close) refuses new writers and waits for those inside, so that when the
/// step's `Done` goes on the channel every write that succeeded is ahead of it, and every later
/// write fails. Two atomic operations per write; no lock.
#[derive(Default)]
pub(crate) struct StepGate {
    /// `CLOSED` bit | number of writers inside.
    state: AtomicU64,
    left: Notify,
}

const CLOSED: u64 = 1 << 63;

/// A writer inside a [`StepGate`]; leaves on drop (also when the write is cancelled).
pub(crate) struct Entered<'a>(&'a StepGate);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let before = self.0.state.fetch_sub(1, Ordering::AcqRel);
        if before == CLOSED | 1 {
            self.0.left.notify_one();
        }
    }
}

impl StepGate {
    pub fn enter(&self) -> Option<Entered<'_>> {
        let before = self.state.fetch_add(1, Ordering::AcqRel);
        let entered = Entered(self);
        (before & CLOSED == 0).then_some(entered)
    }

    /// Refuses new writers and waits until the writers inside have left.
    pub async fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        while self.state.load(Ordering::Acquire) != CLOSED {
            // `notify_one` stores a permit when nobody waits yet, so no wake-up is lost.
            self.left.notified().await;
        }
    }
}

/// What a step instance gets besides its event: the run's shared state, its event stream, and
/// routing.
///
/// Cheap to clone. A clone moved into a spawned task writes to the same step instance, and only
/// while it runs: once the step has returned, writes and sends fail with
/// [`Error::StepCompleted`] (they would land outside the step).
#[derive(Clone)]
pub struct Context {
    shared: Arc<RunShared>,
    step: u32,
    step_name: Arc<str>,
    /// The delivery (event routed to this step) the instance runs for; stable across retries
    /// and restarts.
    delivery: u64,
    gate: Arc<StepGate>,
}

/// Bytes a thread's data buffer allocates at a time.
const DATA_CHUNK: usize = 64 * 1024;

thread_local! {
    /// Where this thread serialises stream event data: one allocation per chunk, and the `Bytes`
    /// handed to the driver share it, so no event costs a malloc/free pair across threads.
    static DATA_BUF: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

fn encode_data(data: &impl Serialize) -> Result<Bytes> {
    DATA_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.capacity() < 1024 {
            buf.reserve(DATA_CHUNK);
        }
        let mut writer = (&mut *buf).writer();
        match serde_json::to_writer(&mut writer, data) {
            Ok(()) => Ok(buf.split().freeze()),
            Err(e) => {
                buf.clear();
                Err(e.into())
            }
        }
    })
}

/// Event types a step may write with [`Context::write_event_to_stream`] besides its own names:
/// the step-level types of the protocol that carry model and tool activity.
const STEP_LEVEL: [&str; 7] = [
    kind::PROVIDER_STARTED,
    kind::TEXT_DELTA,
    kind::REASONING_DELTA,
    kind::TOOL_CALL_DELTA,
    kind::PROVIDER_COMPLETED,
    kind::TOOLS_STARTED,
    kind::TOOL_COMPLETED,
];

impl Context {
    pub(crate) fn new(
        shared: Arc<RunShared>,
        step: u32,
        step_name: Arc<str>,
        delivery: u64,
        gate: Arc<StepGate>,
    ) -> Self {
        Self {
            shared,
            step,
            step_name,
            delivery,
            gate,
        }
    }

    fn completed(&self) -> Error {
        Error::StepCompleted {
            step: self.step,
            name: self.step_name.to_string(),
        }
    }

    /// Room for a large stream event of `len` bytes on the run's channel (an event larger
    /// than the whole budget waits for all of it). Fails once the run has ended.
    async fn reserve(&self, len: usize) -> Result<OwnedSemaphorePermit> {
        let n = u32::try_from(len.min(STREAM_BYTES)).unwrap_or(u32::MAX);
        tokio::select! {
            p = self.shared.stream_bytes.clone().acquire_many_owned(n) => {
                p.map_err(|_| Error::RunEnded)
            }
            () = self.shared.tx.closed() => Err(Error::RunEnded),
        }
    }

    /// Puts a message on the run's channel on behalf of this step instance.
    async fn send(&self, msg: Msg) -> Result<()> {
        let Some(_inside) = self.gate.enter() else {
            return Err(self.completed());
        };
        self.shared.tx.send(msg).await.map_err(|_| Error::RunEnded)
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.shared.run_id
    }

    /// This step instance's number (1-based, unique within the run).
    pub fn step(&self) -> u32 {
        self.step
    }

    /// This step's name.
    pub fn step_name(&self) -> &str {
        &self.step_name
    }

    /// Appends an event to the run's stream, attributed to this step instance. It is in the log,
    /// and visible to readers, once the driver commits it (at the latest before the step's
    /// `step-completed`). Waits only when the run's bounded buffer is full (back-pressure).
    ///
    /// `event_type` is a step-level reserved type (`text-delta`, `tool-call-delta`,
    /// `provider-started`, …) or one of the workflow's own, declared with
    /// [`WorkflowBuilder::stream_event`](crate::WorkflowBuilder::stream_event).
    ///
    /// # Errors
    /// [`Error::InvalidEventType`] for a run-level or undeclared type, [`Error::Codec`] if `data`
    /// does not serialise, [`Error::RunEnded`] once the run is over, [`Error::StepCompleted`]
    /// from a `Context` kept after its step returned.
    pub async fn write_event_to_stream(
        &self,
        event_type: impl Into<Cow<'static, str>>,
        data: &impl Serialize,
    ) -> Result<()> {
        let event_type = event_type.into();
        let allowed = STEP_LEVEL.contains(&event_type.as_ref())
            || (!kind::is_reserved(&event_type)
                && self
                    .shared
                    .workflow
                    .inner
                    .stream_events
                    .contains(event_type.as_ref()));
        if !allowed {
            return Err(Error::InvalidEventType(event_type.into_owned()));
        }
        let data = encode_data(data)?;
        let held = if data.len() >= LARGE_EVENT {
            Some(self.reserve(data.len()).await?)
        } else {
            None
        };
        let msg = Msg::Stream {
            step: Some(self.step),
            event_type,
            data,
            ts: Timestamp::now(),
            held,
        };
        self.send(msg).await
    }

    /// Writes a typed event to the stream under its `NAME`.
    ///
    /// # Errors
    /// As [`write_event_to_stream`](Context::write_event_to_stream).
    pub async fn write<E: WorkflowEvent>(&self, event: &E) -> Result<()> {
        self.write_event_to_stream(E::NAME, event).await
    }

    /// Routes an event to the steps that accept it now, without ending this step.
    ///
    /// # Errors
    /// [`Error::Codec`] if it does not serialise, [`Error::RunEnded`] once the run is over,
    /// [`Error::StepCompleted`] from a `Context` kept after its step returned.
    pub async fn send_event<E: WorkflowEvent>(&self, event: E) -> Result<()> {
        let event = AnyEvent::new(&event)?;
        self.send(Msg::Send { event }).await
    }

    /// A value of the run's shared state.
    ///
    /// # Errors
    /// [`Error::Codec`] when the stored value does not fit `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let value = self.shared.state().get(key).cloned();
        Ok(value.map(serde_json::from_value).transpose()?)
    }

    /// Sets a value of the run's shared state (checkpointed at the next step boundary).
    ///
    /// # Errors
    /// [`Error::Codec`] when `value` does not serialise.
    pub fn set(&self, key: &str, value: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(value)?;
        self.shared.state().insert(key.to_owned(), value);
        Ok(())
    }

    /// Updates a value atomically with respect to other steps: `f` gets the current value and
    /// returns the new one, which is also returned.
    ///
    /// # Errors
    /// [`Error::Codec`] when the stored value does not fit `T` or the new one does not serialise.
    pub fn update<T, F>(&self, key: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Clone,
        F: FnOnce(Option<T>) -> T,
    {
        let mut state = self.shared.state();
        let current = state
            .get(key)
            .cloned()
            .map(serde_json::from_value)
            .transpose()?;
        let new = f(current);
        state.insert(key.to_owned(), serde_json::to_value(&new)?);
        Ok(new)
    }

    /// Buffers `event` for this step and, once events of all the `expected` types have arrived
    /// (a type listed twice needs two), returns them in the order of `expected` and clears them
    /// from the buffer. Until then returns `None` (the step should return [`Emit::none`]).
    /// The buffer is part of the run's checkpoint.
    ///
    /// It buffers one event per delivery (the event that started this step instance), so a
    /// retried or re-run instance neither buffers its event twice nor loses a set it completed:
    /// it gets the same set again. Call it once per step instance.
    pub fn collect_events(&self, event: AnyEvent, expected: &[&str]) -> Option<Vec<AnyEvent>> {
        let mut all = self.shared.collected();
        let buf = all.entry(self.step_name.to_string()).or_default();
        if let Some((_, set)) = buf.done.iter().find(|(d, _)| *d == self.delivery) {
            return Some(set.clone());
        }
        if !buf.pending.iter().any(|(d, _)| *d == self.delivery) {
            buf.pending.push((self.delivery, event));
        }
        let mut picked: Vec<usize> = Vec::with_capacity(expected.len());
        for want in expected {
            let found = buf
                .pending
                .iter()
                .enumerate()
                .position(|(i, (_, e))| e.name == *want && !picked.contains(&i))?;
            picked.push(found);
        }
        let out: Vec<AnyEvent> = picked.iter().map(|&i| buf.pending[i].1.clone()).collect();
        let mut index = 0;
        buf.pending.retain(|_| {
            let keep = !picked.contains(&index);
            index += 1;
            keep
        });
        // Kept until the instance ends, for its retries.
        buf.done.push((self.delivery, out.clone()));
        Some(out)
    }

    /// Buffers `event` and returns all `n` once `n` events of type `E` have arrived.
    ///
    /// # Errors
    /// [`Error::Codec`] when an event does not serialise or decode.
    pub fn collect<E: WorkflowEvent>(&self, event: E, n: usize) -> Result<Option<Vec<E>>> {
        let expected = vec![E::NAME; n];
        match self.collect_events(AnyEvent::new(&event)?, &expected) {
            Some(events) => Ok(Some(
                events.iter().map(AnyEvent::decode).collect::<Result<_>>()?,
            )),
            None => Ok(None),
        }
    }

    /// The session the run belongs to, if any.
    pub fn session_id(&self) -> Option<&str> {
        self.shared.session_id.as_deref()
    }

    /// The state of the run's session (for agents: the conversation so far); `None` outside a
    /// session or when the session was deleted.
    ///
    /// # Errors
    /// A store error.
    pub async fn session_state(&self) -> Result<Option<Value>> {
        let Some(id) = &self.shared.session_id else {
            return Ok(None);
        };
        Ok(self.shared.store.get_session(id).await?.map(|s| s.state))
    }

    /// Replaces the state of the run's session (no-op outside a session). Runs of one session
    /// execute one at a time, so this is not racing another run of it.
    ///
    /// # Errors
    /// A store error, or [`Error::Store`] with `NotFound` if the session was deleted.
    pub async fn set_session_state(&self, state: Value) -> Result<()> {
        match &self.shared.session_id {
            Some(id) => {
                let shared = &self.shared;
                put_session_state(&*shared.store, &shared.sessions, id, state).await?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Adds model token usage to the run's total (reported in `chain-completed` and the record).
    pub fn add_usage(&self, usage: &Usage) {
        self.shared
            .usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(usage);
    }

    /// Resolves when the run is being cancelled or shut down; long steps may `select!` on it.
    pub async fn cancelled(&self) {
        self.shared.cancel.cancelled().await;
    }
}

/// Replaces the state of session `id`, under its lock; answers the state it replaced.
pub(crate) async fn put_session_state(
    store: &dyn sluice_store::Store,
    sessions: &crate::sessions::SessionLocks,
    id: &str,
    state: Value,
) -> Result<Value> {
    let _locked = sessions.lock(id).await;
    let mut session = store
        .get_session(id)
        .await?
        .ok_or_else(|| Error::Store(sluice_store::Error::session_not_found(id)))?;
    let previous = std::mem::replace(&mut session.state, state);
    session.updated_at = Timestamp::now();
    store.put_session(&session).await?;
    Ok(previous)
}
