use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use sluice_protocol::kind;
use sluice_protocol::payload::{InputRequested, ToolCall, Tools};

use crate::event::{AnyEvent, InputEvent, StopEvent, ToolResultsEvent, WorkflowEvent};
use crate::{Context, StepError};

pub(crate) type Handler =
    Arc<dyn Fn(Context, AnyEvent) -> BoxFuture<'static, Result<Emit, StepError>> + Send + Sync>;

/// How a failing step is retried.
///
/// Attempt `k` (from 1) that fails waits `initial_backoff * multiplier^(k-1)` (capped at
/// `max_backoff`, with ±25% jitter) before attempt `k + 1`. Panics are never retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Growth of the wait per attempt.
    pub multiplier: f64,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

impl RetryPolicy {
    /// One attempt only.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(10),
        }
    }

    /// `max_attempts` attempts with exponential backoff from `initial_backoff`.
    pub fn exponential(max_attempts: u32, initial_backoff: Duration) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            initial_backoff,
            ..Self::none()
        }
    }

    /// The wait after failed attempt `attempt` (1-based), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs =
            (self.initial_backoff.as_secs_f64() * factor).min(self.max_backoff.as_secs_f64());
        // Huge or odd settings (a `max_backoff` near `Duration::MAX`) saturate, never panic.
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(self.max_backoff)
    }
}

/// A request that pauses the run until an event of type `reply` is sent in from outside.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WaitRequest {
    pub stream_type: &'static str,
    pub data: Value,
    pub reply: &'static str,
}

/// What a step produces: events to route to other steps (or a [`StopEvent`]), and requests for
/// outside input that pause the run.
///
/// ```
/// # use serde::{Serialize, Deserialize};
/// # #[derive(Serialize, Deserialize)] struct Draft { text: String }
/// # impl sluice_engine::WorkflowEvent for Draft { const NAME: &'static str = "draft"; }
/// use sluice_engine::Emit;
/// let one: Emit = Draft { text: "hi".into() }.into();
/// let two = Emit::none().and(Draft { text: "a".into() }).and(Draft { text: "b".into() });
/// let done = Emit::stop(serde_json::json!({"answer": 42}));
/// # let _ = (one, two, done);
/// ```
#[derive(Debug, Default)]
pub struct Emit {
    pub(crate) events: Vec<AnyEvent>,
    pub(crate) waits: Vec<WaitRequest>,
    pub(crate) error: Option<String>,
    pub(crate) session_state: Option<Value>,
}

impl Emit {
    /// Nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// One event.
    pub fn event<E: WorkflowEvent>(event: E) -> Self {
        Self::none().and(event)
    }

    /// Adds an event.
    pub fn and<E: WorkflowEvent>(mut self, event: E) -> Self {
        match AnyEvent::new(&event) {
            Ok(e) => self.events.push(e),
            Err(e) => {
                self.error = Some(format!("event {:?} could not be serialised: {e}", E::NAME))
            }
        }
        self
    }

    /// Adds an already-routed event.
    pub fn and_any(mut self, event: AnyEvent) -> Self {
        self.events.push(event);
        self
    }

    /// Ends the run with `result` (serialised to JSON).
    pub fn stop(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(v) => Self::event(StopEvent(v)),
            Err(e) => Self {
                error: Some(format!("result could not be serialised: {e}")),
                ..Self::none()
            },
        }
    }

    /// With [`Emit::stop`]: the session's new state, written when the run completes — after
    /// its last step, before its terminal event is visible (so the next run of the session
    /// reads it), and only if it does complete: a run cancelled, timed out or failed before the
    /// driver takes the stop leaves the session as it was. (Writing it from the step with
    /// [`Context::set_session_state`](crate::Context::set_session_state) would change the
    /// session even then.) Ignored for a run outside a session, or without a stop.
    pub fn with_session_state(mut self, state: impl Serialize) -> Self {
        match serde_json::to_value(state) {
            Ok(v) => self.session_state = Some(v),
            Err(e) => self.error = Some(format!("session state could not be serialised: {e}")),
        }
        self
    }

    /// Pauses the run for human input: emits `input-requested`; the run goes `waiting` until an
    /// `input` event arrives, which is routed as an [`InputEvent`].
    pub fn request_input(mut self, request: InputRequested) -> Self {
        self.push_wait(kind::INPUT_REQUESTED, &request, InputEvent::NAME);
        self
    }

    /// Pauses the run for client-side tools: emits `tools-requested`; the run goes `waiting`
    /// until a `tool-results` event arrives, routed as a [`ToolResultsEvent`].
    pub fn request_tools(mut self, tools: Vec<ToolCall>) -> Self {
        self.push_wait(
            kind::TOOLS_REQUESTED,
            &Tools { tools },
            ToolResultsEvent::NAME,
        );
        self
    }

    fn push_wait(&mut self, stream_type: &'static str, data: &impl Serialize, reply: &'static str) {
        match serde_json::to_value(data) {
            Ok(data) => self.waits.push(WaitRequest {
                stream_type,
                data,
                reply,
            }),
            Err(e) => self.error = Some(format!("{stream_type} could not be serialised: {e}")),
        }
    }
}

impl<E: WorkflowEvent> From<E> for Emit {
    fn from(event: E) -> Self {
        Self::event(event)
    }
}

/// One step of a workflow: an async function from an accepted event to an [`Emit`].
///
/// ```
/// use sluice_engine::{Context, Emit, StartEvent, Step, StopEvent};
/// let echo = Step::new("echo", |_ctx: Context, start: StartEvent| async move {
///     Ok(Emit::stop(start.0))
/// })
/// .emits::<StopEvent>();
/// # let _ = echo;
/// ```
#[derive(Clone)]
pub struct Step {
    pub(crate) name: String,
    pub(crate) accepts: Vec<String>,
    pub(crate) emits: Vec<String>,
    pub(crate) num_workers: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) handler: Handler,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("accepts", &self.accepts)
            .field("emits", &self.emits)
            .field("num_workers", &self.num_workers)
            .finish_non_exhaustive()
    }
}

impl Step {
    /// A step taking events of type `E`.
    pub fn new<E, F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        E: WorkflowEvent,
        F: Fn(Context, E) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Emit, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |ctx, ev: AnyEvent| {
            let f = f.clone();
            Box::pin(async move {
                let typed = ev.decode::<E>().map_err(|e| {
                    StepError::new(format!("bad {:?} event: {e}", E::NAME)).no_retry()
                })?;
                f(ctx, typed).await
            })
        });
        Self::with_handler(name.into(), vec![E::NAME.to_owned()], handler)
    }

    /// A step taking events of several types, as [`AnyEvent`]s (use with
    /// [`Context::collect_events`] to join branches of different types).
    pub fn any<F, Fut>(name: impl Into<String>, accepts: &[&str], f: F) -> Self
    where
        F: Fn(Context, AnyEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Emit, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        // `f` is called inside the future, so code it runs before its own `async` block is
        // polled (and may panic) like the rest of the step.
        let handler: Handler = Arc::new(move |ctx, ev| {
            let f = f.clone();
            Box::pin(async move { f(ctx, ev).await })
        });
        Self::with_handler(
            name.into(),
            accepts.iter().map(|s| (*s).to_owned()).collect(),
            handler,
        )
    }

    fn with_handler(name: String, accepts: Vec<String>, handler: Handler) -> Self {
        Self {
            name,
            accepts,
            emits: Vec::new(),
            num_workers: 1,
            retry: RetryPolicy::none(),
            timeout: None,
            handler,
        }
    }

    /// Declares that the step may emit `E` (checked when the workflow is built).
    pub fn emits<E: WorkflowEvent>(self) -> Self {
        self.emits_name(E::NAME)
    }

    /// Declares an emitted event by name.
    pub fn emits_name(mut self, name: &str) -> Self {
        if !self.emits.iter().any(|e| e == name) {
            self.emits.push(name.to_owned());
        }
        self
    }

    /// Declares that the step may pause for human input ([`Emit::request_input`]).
    pub fn requests_input(self) -> Self {
        self.emits::<InputEvent>()
    }

    /// Declares that the step may pause for client tools ([`Emit::request_tools`]).
    pub fn requests_tools(self) -> Self {
        self.emits::<ToolResultsEvent>()
    }

    /// How many instances of this step may run at once (default 1; at least 1).
    pub fn num_workers(mut self, n: usize) -> Self {
        self.num_workers = n.max(1);
        self
    }

    /// Retry policy for failures (default: no retry).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Time limit of one attempt; exceeding it is a failure with code `timeout` (retried like any
    /// failure).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_never_panics() {
        let p = RetryPolicy::exponential(5, Duration::from_millis(100));
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(60), Duration::from_secs(10));
        let huge = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::MAX,
            multiplier: f64::MAX,
            max_backoff: Duration::MAX,
        };
        assert_eq!(huge.backoff(1), Duration::MAX);
        assert_eq!(huge.backoff(u32::MAX), Duration::MAX);
        let odd = RetryPolicy {
            multiplier: f64::NAN,
            initial_backoff: Duration::ZERO,
            ..huge
        };
        assert_eq!(odd.backoff(7), Duration::ZERO);
    }
}
