use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// A typed event routed between steps.
///
/// `NAME` is its stable kebab-case name (`[a-z][a-z0-9._-]{0,63}`), used for routing, in
/// checkpoints and, for events sent in from outside, on the wire.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Draft { text: String }
/// impl sluice_engine::WorkflowEvent for Draft { const NAME: &'static str = "draft"; }
/// ```
pub trait WorkflowEvent: Serialize + DeserializeOwned + Send + 'static {
    /// Routing name.
    const NAME: &'static str;
}

/// An event in its routed form: a name and a JSON payload. Steps receive typed events; the
/// engine routes, queues and checkpoints `AnyEvent`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnyEvent {
    /// The event's routing name.
    pub name: String,
    /// Its serialised payload.
    pub data: Value,
}

impl AnyEvent {
    /// Serialises a typed event.
    ///
    /// # Errors
    /// [`Error::Codec`] when the event cannot be serialised.
    pub fn new<E: WorkflowEvent>(event: &E) -> Result<Self> {
        Ok(Self {
            name: E::NAME.to_owned(),
            data: serde_json::to_value(event)?,
        })
    }

    /// Decodes the payload as `E`.
    ///
    /// # Errors
    /// [`Error::Codec`] when the payload does not fit `E`, [`Error::WrongEvent`] when the name
    /// is not `E::NAME`.
    pub fn decode<E: WorkflowEvent>(&self) -> Result<E> {
        if self.name != E::NAME {
            return Err(Error::WrongEvent {
                expected: E::NAME,
                got: self.name.clone(),
            });
        }
        Ok(serde_json::from_value(self.data.clone())?)
    }

    /// Whether this is an `E`.
    pub fn is<E: WorkflowEvent>(&self) -> bool {
        self.name == E::NAME
    }
}

/// The event a run starts with: the run's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StartEvent(pub Value);

impl WorkflowEvent for StartEvent {
    const NAME: &'static str = "start";
}

/// The event that ends a run with a result (`chain-completed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StopEvent(pub Value);

impl WorkflowEvent for StopEvent {
    const NAME: &'static str = "stop";
}

/// Human input sent into a waiting run (`{"type":"input","data":…}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InputEvent(pub Value);

impl WorkflowEvent for InputEvent {
    const NAME: &'static str = sluice_protocol::kind::INPUT;
}

/// Client tool results sent into a waiting run (`{"type":"tool-results","data":{"results":[…]}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ToolResultsEvent(pub sluice_protocol::payload::ToolResults);

impl WorkflowEvent for ToolResultsEvent {
    const NAME: &'static str = sluice_protocol::kind::TOOL_RESULTS;
}

/// Whether `name` is a valid routing name: `[a-z][a-z0-9._-]{0,63}`.
pub(crate) fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b[1..].iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}
