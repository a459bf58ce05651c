use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sluice_protocol::{Timestamp, Usage, kind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{AnyEvent, WorkflowEvent, valid_name};
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
    },
    Send {
        event: AnyEvent,
    },
    Done {
        step: u32,
        outcome: Result<Emit, Failure>,
        duration: Duration,
    },
}

/// A step's final failure.
pub(crate) struct Failure {
    pub error: StepError,
    pub panicked: bool,
}

/// State of a run shared by its driver and its step instances.
pub(crate) struct RunShared {
    pub run_id: String,
    pub tx: mpsc::Sender<Msg>,
    pub state: Mutex<Map<String, Value>>,
    pub collected: Mutex<HashMap<String, Vec<AnyEvent>>>,
    pub cancel: CancellationToken,
    pub usage: Mutex<Usage>,
    pub store: std::sync::Arc<dyn sluice_store::Store>,
    pub session_id: Option<String>,
}

impl RunShared {
    pub fn state(&self) -> MutexGuard<'_, Map<String, Value>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn collected(&self) -> MutexGuard<'_, HashMap<String, Vec<AnyEvent>>> {
        self.collected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a step instance gets besides its event: the run's shared state, its event stream, and
/// routing.
///
/// Cheap to clone; a clone moved into a spawned task keeps writing to the same step instance.
#[derive(Clone)]
pub struct Context {
    shared: Arc<RunShared>,
    step: u32,
    step_name: Arc<str>,
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
    pub(crate) fn new(shared: Arc<RunShared>, step: u32, step_name: Arc<str>) -> Self {
        Self {
            shared,
            step,
            step_name,
        }
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
    /// `event_type` is the workflow's own kebab-case name or a step-level reserved type
    /// (`text-delta`, `tool-call-delta`, `provider-started`, …).
    ///
    /// # Errors
    /// [`Error::InvalidEventType`] for a malformed or run-level type, [`Error::Codec`] if `data`
    /// does not serialise, [`Error::RunEnded`] once the run is over.
    pub async fn write_event_to_stream(
        &self,
        event_type: impl Into<Cow<'static, str>>,
        data: &impl Serialize,
    ) -> Result<()> {
        let event_type = event_type.into();
        let allowed = STEP_LEVEL.contains(&event_type.as_ref())
            || (valid_name(&event_type) && !kind::is_reserved(&event_type));
        if !allowed {
            return Err(Error::InvalidEventType(event_type.into_owned()));
        }
        let data = encode_data(data)?;
        let msg = Msg::Stream {
            step: Some(self.step),
            event_type,
            data,
            ts: Timestamp::now(),
        };
        self.shared.tx.send(msg).await.map_err(|_| Error::RunEnded)
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
    /// [`Error::Codec`] if it does not serialise, [`Error::RunEnded`] once the run is over.
    pub async fn send_event<E: WorkflowEvent>(&self, event: E) -> Result<()> {
        let event = AnyEvent::new(&event)?;
        self.shared
            .tx
            .send(Msg::Send { event })
            .await
            .map_err(|_| Error::RunEnded)
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
    pub fn collect_events(&self, event: AnyEvent, expected: &[&str]) -> Option<Vec<AnyEvent>> {
        let mut all = self.shared.collected();
        let buf = all.entry(self.step_name.to_string()).or_default();
        buf.push(event);
        let mut picked: Vec<usize> = Vec::with_capacity(expected.len());
        for want in expected {
            let found = buf
                .iter()
                .enumerate()
                .position(|(i, e)| e.name == *want && !picked.contains(&i))?;
            picked.push(found);
        }
        let out: Vec<AnyEvent> = picked.iter().map(|&i| buf[i].clone()).collect();
        let mut index = 0;
        buf.retain(|_| {
            let keep = !picked.contains(&index);
            index += 1;
            keep
        });
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
        let Some(id) = &self.shared.session_id else {
            return Ok(());
        };
        let store = &self.shared.store;
        let mut session = store
            .get_session(id)
            .await?
            .ok_or_else(|| Error::Store(sluice_store::Error::session_not_found(id)))?;
        session.state = state;
        session.updated_at = Timestamp::now();
        store.put_session(&session).await?;
        Ok(())
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
