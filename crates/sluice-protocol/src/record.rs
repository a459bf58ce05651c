//! Run and session records, and token usage.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Timestamp;
use crate::payload::ErrorInfo;

/// The state of a run: `queued → running ⇄ waiting → completed | failed | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, not started (admission control).
    Queued,
    /// A task is executing it.
    Running,
    /// Paused for client tool results or human input; holds no task.
    Waiting,
    /// Ended with a result.
    Completed,
    /// Ended with an error.
    Failed,
    /// Ended by a cancel request.
    Cancelled,
}

impl RunStatus {
    /// Whether the run has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "waiting" => Self::Waiting,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Model token usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Sum of both.
    pub total_tokens: u64,
    /// Reasoning tokens, where the provider reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// Prompt tokens served from cache, where reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
}

impl Usage {
    /// Adds `other` into `self`. The counts come from providers, so the sums saturate rather
    /// than wrap.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
        };
        self.reasoning_tokens = sum(self.reasoning_tokens, other.reasoning_tokens);
        self.cached_input_tokens = sum(self.cached_input_tokens, other.cached_input_tokens);
    }
}

/// A run as `GET /v1/runs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunRecord {
    /// Run id (`run_…`, time-ordered).
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// Session, if the run belongs to one.
    pub session_id: Option<String>,
    /// Current state.
    pub status: RunStatus,
    /// When it was accepted.
    #[schemars(schema_with = "timestamp_schema")]
    pub created_at: Timestamp,
    /// When a task first started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timestamp_schema")]
    pub started_at: Option<Timestamp>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timestamp_schema")]
    pub finished_at: Option<Timestamp>,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, once failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ErrorInfoSchema>")]
    pub error: Option<ErrorInfo>,
    /// Model usage so far.
    pub usage: Usage,
    /// Seq of the last event in its log (0 before any).
    pub last_seq: u64,
    /// The run's input.
    #[serde(default)]
    pub input: Value,
    /// Client-supplied metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Label of the API key that created it (never the key itself). Never sent to clients, so
    /// not in the published schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub owner: Option<String>,
    /// The `Idempotency-Key` the run was created with, so the key still answers this run after
    /// a restart. Never sent to clients, so not in the published schema. Records written
    /// before this field existed read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub idempotency: Option<IdempotencyKey>,
}

/// The `Idempotency-Key` of a create request and the fingerprint of its body (the server's
/// stable hash of the body as canonical JSON), kept in the run's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyKey {
    /// The header's value.
    pub key: String,
    /// The fingerprint of the request body: the same key with another body is refused.
    pub fingerprint: u64,
}

impl RunRecord {
    /// A fresh record in state `queued`.
    pub fn new(id: impl Into<String>, workflow: impl Into<String>, input: Value) -> Self {
        Self {
            id: id.into(),
            workflow: workflow.into(),
            session_id: None,
            status: RunStatus::Queued,
            created_at: Timestamp::now(),
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            usage: Usage::default(),
            last_seq: 0,
            input,
            metadata: None,
            owner: None,
            idempotency: None,
        }
    }
}

/// A session: a group of runs sharing state (for agents, the conversation so far).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionRecord {
    /// Session id (`ses_…`).
    pub id: String,
    /// When it was created.
    #[schemars(schema_with = "timestamp_schema")]
    pub created_at: Timestamp,
    /// When its state last changed.
    #[schemars(schema_with = "timestamp_schema")]
    pub updated_at: Timestamp,
    /// Shared state carried from run to run.
    #[serde(default)]
    pub state: Value,
    /// The newest run of this session that has not ended (`queued`, `running` or `waiting`),
    /// if any: runs queued behind the running one (`?if_busy=enqueue`) count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<String>,
    /// Label of the API key that created it. Never sent to clients, so not in the published
    /// schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub owner: Option<String>,
}

/// The JSON Schema of a [`Timestamp`]: an RFC 3339 UTC string with microseconds.
pub fn timestamp_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339 UTC with microseconds, e.g. 2026-11-22T05:00:00.123456Z"
    })
}

/// The schema of [`ErrorInfo`] (whose type lives in `payload.rs`): the same serde shape,
/// described for the published schema only. A test keeps the two in step.
#[derive(JsonSchema)]
#[schemars(rename = "ErrorInfo")]
#[allow(dead_code)]
struct ErrorInfoSchema {
    /// Machine-readable reason.
    code: ErrorCodeSchema,
    /// Human-readable message.
    message: String,
    /// Extra structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    details: Option<Value>,
}

/// The schema of [`ErrorCode`](crate::payload::ErrorCode): the `code` of `chain-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "ErrorCode")]
#[allow(dead_code)]
enum ErrorCodeSchema {
    /// A step failed (error or panic) after its retries.
    Failed,
    /// The run or a step exceeded its time limit.
    Timeout,
    /// The model provider failed.
    ProviderError,
    /// The model provider rate-limited the run beyond its retries.
    RateLimited,
    /// The server stopped while the run was active and it could not be resumed.
    Interrupted,
    /// The run's input was not acceptable to the workflow.
    InvalidInput,
    /// A tool failed in a way the run cannot continue from.
    ToolError,
    /// The run used up its step budget.
    MaxSteps,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::payload::ErrorCode;

    /// Exhaustive both ways: a new `ErrorCode` variant fails to compile here until the schema
    /// mirror has it too.
    fn mirror(code: ErrorCode) -> ErrorCodeSchema {
        match code {
            ErrorCode::Failed => ErrorCodeSchema::Failed,
            ErrorCode::Timeout => ErrorCodeSchema::Timeout,
            ErrorCode::ProviderError => ErrorCodeSchema::ProviderError,
            ErrorCode::RateLimited => ErrorCodeSchema::RateLimited,
            ErrorCode::Interrupted => ErrorCodeSchema::Interrupted,
            ErrorCode::InvalidInput => ErrorCodeSchema::InvalidInput,
            ErrorCode::ToolError => ErrorCodeSchema::ToolError,
            ErrorCode::MaxSteps => ErrorCodeSchema::MaxSteps,
        }
    }

    #[test]
    fn usage_sums_saturate() {
        let mut total = Usage {
            input_tokens: u64::MAX - 1,
            output_tokens: 1,
            total_tokens: u64::MAX,
            reasoning_tokens: Some(u64::MAX),
            cached_input_tokens: None,
        };
        total.add(&Usage {
            input_tokens: 5,
            output_tokens: 2,
            total_tokens: 7,
            reasoning_tokens: Some(1),
            cached_input_tokens: Some(3),
        });
        assert_eq!(total.input_tokens, u64::MAX);
        assert_eq!(total.output_tokens, 3);
        assert_eq!(total.total_tokens, u64::MAX);
        assert_eq!(total.reasoning_tokens, Some(u64::MAX));
        assert_eq!(total.cached_input_tokens, Some(3));
    }

    #[test]
    fn the_idempotency_key_is_kept_and_optional() {
        let mut rec = RunRecord::new("run_1", "wf", Value::Null);
        let plain = serde_json::to_value(&rec).unwrap();
        assert!(plain.get("idempotency").is_none(), "{plain}");
        // A record written before the field existed.
        let old: RunRecord = serde_json::from_value(plain).unwrap();
        assert_eq!(old.idempotency, None);
        rec.idempotency = Some(IdempotencyKey {
            key: "k".into(),
            fingerprint: u64::MAX,
        });
        let text = serde_json::to_string(&rec).unwrap();
        let back: RunRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rec);
        let schema = serde_json::to_value(schemars::schema_for!(RunRecord)).unwrap();
        assert!(schema["properties"].get("idempotency").is_none());
    }

    #[test]
    fn error_info_schema_matches_the_serde_shape() {
        let all = [
            ErrorCode::Failed,
            ErrorCode::Timeout,
            ErrorCode::ProviderError,
            ErrorCode::RateLimited,
            ErrorCode::Interrupted,
            ErrorCode::InvalidInput,
            ErrorCode::ToolError,
            ErrorCode::MaxSteps,
        ];
        let schema = schemars::schema_for!(ErrorInfoSchema);
        let json = serde_json::to_value(&schema).unwrap();
        let codes = &json["$defs"]["ErrorCode"];
        let listed: Vec<String> = codes["oneOf"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|c| c["const"].as_str().unwrap().to_owned())
                    .collect()
            })
            .or_else(|| {
                codes["enum"]
                    .as_array()
                    .map(|v| v.iter().map(|c| c.as_str().unwrap().to_owned()).collect())
            })
            .unwrap();
        assert_eq!(listed.len(), all.len(), "{codes}");
        for code in all {
            assert_eq!(
                serde_json::to_value(mirror(code)).unwrap(),
                serde_json::to_value(code).unwrap()
            );
            assert!(listed.iter().any(|c| c == code.as_str()), "{code:?}");
        }
        let info = ErrorInfo {
            code: ErrorCode::Timeout,
            message: "m".into(),
            details: Some(serde_json::json!({"a": 1})),
        };
        let v = serde_json::to_value(&info).unwrap();
        let props = json["properties"].as_object().unwrap();
        for key in v.as_object().unwrap().keys() {
            assert!(props.contains_key(key), "{key} in the schema");
        }
        assert_eq!(props.len(), v.as_object().unwrap().len());
    }
}
