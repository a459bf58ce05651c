//! The reserved event types of the protocol.
//!
//! A workflow's own events use any other name matching `[a-z][a-z0-9._-]{0,63}`
//! (see [`crate::validate_custom_name`]).

/// `{workflow, input, session_id?}`: the run started.
pub const CHAIN_STARTED: &str = "chain-started";
/// `{result, usage, duration_ms}`: terminal, the run completed.
pub const CHAIN_COMPLETED: &str = "chain-completed";
/// `{error: {code, message, details?}, usage?}`: terminal, the run failed.
pub const CHAIN_ERROR: &str = "chain-error";
/// `{reason?}`: terminal, the run was cancelled.
pub const CHAIN_CANCELLED: &str = "chain-cancelled";
/// `{from_step}`: the run continues after a restart or a pause.
pub const CHAIN_RESUMED: &str = "chain-resumed";
/// `{name}`: a step instance started.
pub const STEP_STARTED: &str = "step-started";
/// `{name, duration_ms}`: a step instance finished.
pub const STEP_COMPLETED: &str = "step-completed";
/// `{provider, model}`: a model call started.
pub const PROVIDER_STARTED: &str = "provider-started";
/// `{text}`: model output tokens.
pub const TEXT_DELTA: &str = "text-delta";
/// `{text}`: model reasoning tokens.
pub const REASONING_DELTA: &str = "reasoning-delta";
/// `{index, id?, name?, arguments}`: a fragment of a tool call.
pub const TOOL_CALL_DELTA: &str = "tool-call-delta";
/// `{finish_reason, usage, message, latency_ms}`: a model call finished.
pub const PROVIDER_COMPLETED: &str = "provider-completed";
/// `{tools}`: server-side tools started.
pub const TOOLS_STARTED: &str = "tools-started";
/// `{id, name, output, is_error, duration_ms}`: a server-side tool finished.
pub const TOOL_COMPLETED: &str = "tool-completed";
/// `{tools}`: client-side tools requested; the run goes `waiting`.
pub const TOOLS_REQUESTED: &str = "tools-requested";
/// `{prompt?, schema?}`: human input requested; the run goes `waiting`.
pub const INPUT_REQUESTED: &str = "input-requested";

/// Every reserved type, in the protocol's order.
pub const RESERVED: [&str; 16] = [
    CHAIN_STARTED,
    CHAIN_COMPLETED,
    CHAIN_ERROR,
    CHAIN_CANCELLED,
    CHAIN_RESUMED,
    STEP_STARTED,
    STEP_COMPLETED,
    PROVIDER_STARTED,
    TEXT_DELTA,
    REASONING_DELTA,
    TOOL_CALL_DELTA,
    PROVIDER_COMPLETED,
    TOOLS_STARTED,
    TOOL_COMPLETED,
    TOOLS_REQUESTED,
    INPUT_REQUESTED,
];

/// Inbound event type carrying client tool results (`POST /v1/runs/{id}/events`).
pub const TOOL_RESULTS: &str = "tool-results";
/// Inbound event type carrying human input (`POST /v1/runs/{id}/events`).
pub const INPUT: &str = "input";

/// Whether `t` is one of the three terminal types.
pub fn is_terminal(t: &str) -> bool {
    matches!(t, CHAIN_COMPLETED | CHAIN_ERROR | CHAIN_CANCELLED)
}

/// Whether `t` is a reserved type.
pub fn is_reserved(t: &str) -> bool {
    RESERVED.contains(&t)
}
