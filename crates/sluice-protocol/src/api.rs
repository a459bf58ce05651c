//! HTTP request and response bodies and the error shape.
//!
//! Every type here derives [`JsonSchema`]: the server's `/openapi.json` is generated from these
//! definitions, so the published schemas are the serde shapes the server actually reads and
//! writes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::RunRecord;

/// The body of every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "Error")]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// Machine-readable code: `invalid_request` (400), `unauthorized` (401), `run_not_found`,
    /// `workflow_not_found`, `session_not_found`, `not_found` (404), `method_not_allowed`
    /// (405), `request_timeout` (408), `conflict` (409), `too_large` (413),
    /// `unsupported_media_type` (415), `invalid_input`, `idempotency_key_reused` (422),
    /// `queue_full` (429), `shutting_down`, `overloaded` (503), `internal` (500).
    pub code: String,
    /// Human-readable message; for 422, it names the field path.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

/// `POST /v1/workflows/{name}/runs` body.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// The workflow's input.
    #[serde(default)]
    pub input: Value,
    /// Continue this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Free-form metadata stored with the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// `POST /v1/runs/{id}/events` body (and a WebSocket client frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendEvent {
    /// `tool-results`, `input`, or a type the workflow accepts.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload.
    #[serde(default)]
    pub data: Value,
}

/// An entry of `GET /v1/workflows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowInfo {
    /// Name used in URLs.
    pub name: String,
    /// `rust`, `agent`, `ticker`, `ask-human`…
    pub kind: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its input.
    pub input_schema: Value,
}

/// `GET /v1/runs` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunList {
    /// Newest first.
    pub runs: Vec<RunRecord>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `POST /v1/sessions` body (optional).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The session's initial shared state (default `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Value>,
}

/// `POST /v1/runs/{id}/cancel` body (optional).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRun {
    /// Why; carried in `chain-cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to an event sent into a run (`POST /v1/runs/{id}/events`, or a WebSocket
/// client frame): `{"accepted": true}` once the event is durable in the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Accepted {
    /// Always `true`.
    pub accepted: bool,
}

/// `GET /healthz` and `GET /readyz`: `{"status": "ok"}` / `{"status": "ready"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
}

/// The schema of the event envelope every transport carries (the type used in code is
/// [`Event`](crate::Event), whose log form is [`RawEvent`](crate::RawEvent)); it exists to
/// publish that shape in `/openapi.json`. A test keeps it in step with `Event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    rename = "Event",
    description = "The event envelope: one entry of a run's append-only log, as every transport carries it."
)]
pub struct EventEnvelope {
    /// Position in the run's log, from 1, without gaps.
    pub seq: u64,
    /// The run this event belongs to.
    pub run_id: String,
    /// Event type: a reserved type (`chain-started`, `text-delta`, …) or a workflow's own
    /// name matching `[a-z][a-z0-9._-]{0,63}`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the event was created (RFC 3339 UTC with microseconds).
    #[schemars(schema_with = "crate::record::timestamp_schema")]
    pub ts: String,
    /// The step instance (1-based, unique within the run); absent for run-level events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// The event's payload.
    #[serde(default)]
    pub data: Value,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_envelope_schema_has_the_fields_of_event() {
        let ev = crate::Event {
            seq: 7,
            run_id: "run_1".into(),
            event_type: "text-delta".into(),
            ts: crate::Timestamp::from_micros(0),
            step: Some(2),
            data: serde_json::json!({"text": "Hel"}),
        };
        let real = serde_json::to_value(&ev).unwrap();
        let mirror: EventEnvelope = serde_json::from_value(real.clone()).unwrap();
        assert_eq!(serde_json::to_value(&mirror).unwrap(), real);
        let schema = serde_json::to_value(schemars::schema_for!(EventEnvelope)).unwrap();
        let props = schema["properties"].as_object().unwrap();
        let keys: Vec<&String> = real.as_object().unwrap().keys().collect();
        assert_eq!(props.keys().collect::<Vec<_>>(), keys);
    }
}
