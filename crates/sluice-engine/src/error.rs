use std::fmt;
use std::time::Duration;

use sluice_protocol::RunStatus;
use sluice_protocol::payload::ErrorCode;

/// What the engine reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A workflow definition is inconsistent; the message names the step and event type.
    #[error("invalid workflow {workflow:?}: {message}")]
    InvalidWorkflow {
        /// The workflow.
        workflow: String,
        /// What is wrong.
        message: String,
    },
    /// No workflow of that name is deployed.
    #[error("unknown workflow {0:?}")]
    UnknownWorkflow(String),
    /// No run of that id.
    #[error("unknown run {0:?}")]
    UnknownRun(String),
    /// The run's input does not fit the workflow; the message names the field.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The run has ended; nothing more can be sent to it.
    #[error("run {run_id:?} is already {status}")]
    RunFinished {
        /// The run.
        run_id: String,
        /// Its final state.
        status: &'static str,
    },
    /// The run is not waiting for an event of this type.
    #[error("run {run_id:?} is not waiting for {event_type:?}{}", expecting(.waiting_for))]
    NotWaiting {
        /// The run.
        run_id: String,
        /// The type sent.
        event_type: String,
        /// The types the run waits for now.
        waiting_for: Vec<String>,
    },
    /// The workflow's queue is full.
    #[error("workflow {workflow:?} is at capacity; retry after {}s", retry_after.as_secs())]
    QueueFull {
        /// The workflow.
        workflow: String,
        /// When a retry is likely to be admitted.
        retry_after: Duration,
    },
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// An event payload does not decode as the step's type.
    #[error("event {got:?} is not a {expected:?}")]
    WrongEvent {
        /// The type the step takes.
        expected: &'static str,
        /// The event's name.
        got: String,
    },
    /// A step tried to write an event type it may not write.
    #[error(
        "a step may not write event type {0:?}: write a step-level reserved type, or one of the workflow's own declared with WorkflowBuilder::stream_event"
    )]
    InvalidEventType(String),
    /// The run has ended or is being stopped; the step should return.
    #[error("the run has ended")]
    RunEnded,
    /// A [`Context`](crate::Context) kept after its step instance completed (e.g. moved into a
    /// spawned task) tried to write or send an event; it would land outside its step.
    #[error(
        "step {name:?} (instance {step}) has completed: a Context kept after its step returned may not write or send events"
    )]
    StepCompleted {
        /// The step instance.
        step: u32,
        /// The step's name.
        name: String,
    },
    /// Serialising or deserialising an event, state or checkpoint failed.
    #[error("encoding failed")]
    Codec(#[from] serde_json::Error),
    /// The store failed.
    #[error("store failed")]
    Store(#[from] sluice_store::Error),
}

fn expecting(types: &[String]) -> String {
    if types.is_empty() {
        String::new()
    } else {
        format!(" (it waits for {})", types.join(", "))
    }
}

impl Error {
    pub(crate) fn finished(run_id: &str, status: RunStatus) -> Self {
        Self::RunFinished {
            run_id: run_id.to_owned(),
            status: status.as_str(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a step failed. Any error converts into it with `?`; a step may also build one to choose
/// the run's error code or to stop retries.
///
/// ```
/// use sluice_engine::StepError;
/// use sluice_protocol::payload::ErrorCode;
/// let e = StepError::new("quota exhausted").code(ErrorCode::RateLimited).no_retry();
/// assert_eq!(e.to_string(), "quota exhausted");
/// ```
#[derive(Debug, Clone)]
pub struct StepError {
    pub(crate) message: String,
    pub(crate) code: ErrorCode,
    pub(crate) retryable: bool,
    pub(crate) details: Option<serde_json::Value>,
}

impl StepError {
    /// A retryable failure with code `failed`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: ErrorCode::Failed,
            retryable: true,
            details: None,
        }
    }

    /// Sets the `chain-error` code the run ends with if this failure is final.
    pub fn code(mut self, code: ErrorCode) -> Self {
        self.code = code;
        self
    }

    /// Marks the failure as not worth retrying.
    pub fn no_retry(mut self) -> Self {
        self.retryable = false;
        self
    }

    /// Attaches structured detail to the run's error.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error code.
    pub fn error_code(&self) -> ErrorCode {
        self.code
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for StepError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::new(message)
    }
}
