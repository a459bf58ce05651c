//! Run and session records, and token usage.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Timestamp;
use crate::payload::ErrorInfo;

/// The state of a run: `queued → running ⇄ waiting → completed | failed | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.total_tokens += other.total_tokens;
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.reasoning_tokens = sum(self.reasoning_tokens, other.reasoning_tokens);
        self.cached_input_tokens = sum(self.cached_input_tokens, other.cached_input_tokens);
    }
}

/// A run as `GET /v1/runs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub created_at: Timestamp,
    /// When a task first started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, once failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Label of the API key that created it (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
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
        }
    }
}

/// A session: a group of runs sharing state (for agents, the conversation so far).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id (`ses_…`).
    pub id: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// When its state last changed.
    pub updated_at: Timestamp,
    /// Shared state carried from run to run.
    #[serde(default)]
    pub state: Value,
    /// The run of this session currently active, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<String>,
    /// Label of the API key that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}
