//! Typed `data` of every reserved event type.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Usage;

/// `chain-started`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainStarted {
    /// Workflow name.
    pub workflow: String,
    /// The run's input.
    pub input: Value,
    /// The session the run belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// `chain-completed` (terminal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainCompleted {
    /// The workflow's result.
    pub result: Value,
    /// Total model usage of the run.
    pub usage: Usage,
    /// Wall time from start to completion.
    pub duration_ms: u64,
}

/// Why a run failed: the `code` values of `chain-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
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

impl ErrorCode {
    /// The wire name (`failed`, `timeout`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::ProviderError => "provider_error",
            Self::RateLimited => "rate_limited",
            Self::Interrupted => "interrupted",
            Self::InvalidInput => "invalid_input",
            Self::ToolError => "tool_error",
            Self::MaxSteps => "max_steps",
        }
    }
}

/// The error of a failed run: in `chain-error` and in the run record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// Extra structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// `chain-error` (terminal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainError {
    /// What went wrong.
    pub error: ErrorInfo,
    /// Model usage up to the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `chain-cancelled` (terminal).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChainCancelled {
    /// Why, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `chain-resumed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainResumed {
    /// The last step instance number started before the pause or restart.
    pub from_step: u32,
}

/// `step-started`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStarted {
    /// Step name.
    pub name: String,
}

/// `step-completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCompleted {
    /// Step name.
    pub name: String,
    /// Wall time of the step instance, retries included.
    pub duration_ms: u64,
}

/// `provider-started`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderStarted {
    /// Provider name from config.
    pub provider: String,
    /// Model name.
    pub model: String,
}

/// `text-delta` and `reasoning-delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextDelta {
    /// The tokens.
    pub text: String,
}

/// `tool-call-delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which tool call of the message this fragment belongs to.
    pub index: u32,
    /// The call id, on the first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The tool name, on the first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A fragment of the arguments' JSON text.
    pub arguments: String,
}

/// Why a model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end.
    Stop,
    /// Token limit.
    Length,
    /// It called tools.
    ToolCalls,
    /// Filtered.
    ContentFilter,
    /// It failed.
    Error,
    /// Anything else the provider said.
    Other,
}

/// `provider-completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderCompleted {
    /// Why the model stopped.
    pub finish_reason: FinishReason,
    /// Tokens of this call.
    pub usage: Usage,
    /// The assistant message produced.
    pub message: Value,
    /// Time from request to the last byte.
    pub latency_ms: u64,
}

/// A tool call: in `tools-started` and `tools-requested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Arguments: the parsed JSON when the model sent valid JSON that is not a string and nests
    /// at most [`json::MAX_DEPTH`](crate::json::MAX_DEPTH) levels; otherwise a string holding
    /// the text exactly as the model sent it.
    pub arguments: Value,
}

/// `tools-started` and `tools-requested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tools {
    /// The calls.
    pub tools: Vec<ToolCall>,
}

/// `tool-completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCompleted {
    /// Call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// What the tool returned.
    pub output: Value,
    /// Whether `output` describes a failure.
    pub is_error: bool,
    /// Wall time of the call.
    pub duration_ms: u64,
}

/// `input-requested`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InputRequested {
    /// What to ask the person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// JSON Schema of the expected answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
}

/// One client tool result in a `tool-results` inbound event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolResult {
    /// The call id from `tools-requested`.
    pub id: String,
    /// The tool's output.
    pub output: Value,
    /// Whether `output` describes a failure.
    #[serde(default)]
    pub is_error: bool,
}

/// `data` of the inbound `tool-results` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolResults {
    /// One per requested call.
    pub results: Vec<ToolResult>,
}
