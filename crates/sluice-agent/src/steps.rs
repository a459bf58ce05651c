//! The agent's steps and the events routed between them.
//!
//! ```text
//! start ──model-turn──▶ model ──run-tools──▶ tools ──model-turn──▶ model …
//!                         │                    │ (client tools: tools-requested, waiting)
//!                         └──stop              └──▶ … tool-results ──▶ client-results ──model-turn──▶ model
//! ```
//!
//! Everything a run needs to continue lives in the run's state (checkpointed at every step
//! boundary): the conversation, the number of model calls, and the tool calls waiting for
//! client results. Steps change the state only at their end, so a step that runs again after a
//! crash starts from the same state.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sluice_engine::protocol_payload::{
    ErrorCode, FinishReason, ProviderStarted, ToolCall, ToolCompleted, Tools,
};
use sluice_engine::{Context, Emit, StartEvent, StepError, ToolResultsEvent, WorkflowEvent};
use sluice_llm::{ChatChunk, Message, Usage};
use sluice_protocol::kind;

use crate::{Agent, Tool, http, input};

/// Routed to `model`: call the model with the conversation so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ModelTurn {}

impl WorkflowEvent for ModelTurn {
    const NAME: &'static str = "model-turn";
}

/// Routed to `tools`: the tool calls of the last assistant message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunTools {
    pub calls: Vec<ToolCall>,
}

impl WorkflowEvent for RunTools {
    const NAME: &'static str = "run-tools";
}

/// State key: the conversation (`Vec<Message>`, without the system prompt).
pub(crate) const MESSAGES: &str = "messages";
/// State key: model calls made so far (`u32`).
pub(crate) const MODEL_CALLS: &str = "model_calls";
/// State key: tool calls waiting for client results ([`Pending`]), or null.
pub(crate) const PENDING: &str = "pending_tools";

/// The result of one tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ToolOutcome {
    pub id: String,
    pub name: String,
    pub output: Value,
    pub is_error: bool,
}

impl ToolOutcome {
    fn message(&self) -> Message {
        let content = match &self.output {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        Message::Tool {
            tool_call_id: self.id.clone(),
            name: Some(self.name.clone()),
            content,
            is_error: self.is_error,
        }
    }
}

/// Tool calls of one assistant message while the run waits for client results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pending {
    /// Every call of the message, in order.
    pub calls: Vec<ToolCall>,
    /// Per call, its result when known (server-side and rejected calls); `None` for the calls
    /// the client runs.
    pub results: Vec<Option<ToolOutcome>>,
    /// When the client was asked (Unix milliseconds).
    pub requested_at_ms: u64,
}

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ProviderCompleted<'a> {
    finish_reason: FinishReason,
    usage: &'a Usage,
    message: &'a Message,
    latency_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn messages(ctx: &Context) -> Result<Vec<Message>, StepError> {
    Ok(ctx.get::<Vec<Message>>(MESSAGES)?.unwrap_or_default())
}

/// `start` (accepts the run's input): appends the input's messages to the session's
/// conversation (or to an empty one), and asks for a model turn.
pub(crate) async fn start(ctx: Context, start: StartEvent) -> Result<Emit, StepError> {
    let new = input::parse(&start.0)
        .map_err(|e| StepError::new(e).code(ErrorCode::InvalidInput).no_retry())?;
    let mut messages = match ctx.session_state().await? {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(state)) => match state.get(MESSAGES) {
            None | Some(Value::Null) => Vec::new(),
            Some(history) => serde_json::from_value(history.clone()).map_err(|e| {
                StepError::new(format!(
                    "the session's state.messages is not a conversation: {e}"
                ))
                .code(ErrorCode::InvalidInput)
                .no_retry()
            })?,
        },
        Some(_) => {
            return Err(StepError::new(
                "the session's state must be an object to hold the conversation",
            )
            .code(ErrorCode::InvalidInput)
            .no_retry());
        }
    };
    messages.extend(new);
    ctx.set(MESSAGES, &messages)?;
    ctx.set(MODEL_CALLS, 0u32)?;
    Ok(ModelTurn {}.into())
}

/// `model` (accepts `model-turn`): streams one model call into the run's log, then asks for
/// the tools it called, or ends the run with its answer.
///
/// Cancellation: the engine drops this future when the run is cancelled or the server shuts
/// down; dropping the `ChatStream` closes the upstream request.
pub(crate) async fn model(
    agent: Arc<Agent>,
    ctx: Context,
    _: ModelTurn,
) -> Result<Emit, StepError> {
    let calls: u32 = ctx.get(MODEL_CALLS)?.unwrap_or(0);
    if calls >= agent.max_steps {
        return Err(StepError::new(format!(
            "the agent reached its limit of {} model calls (max_steps)",
            agent.max_steps
        ))
        .code(ErrorCode::MaxSteps)
        .no_retry());
    }
    let mut conversation = messages(&ctx)?;
    let request = agent.request(&conversation);
    ctx.write_event_to_stream(
        kind::PROVIDER_STARTED,
        &ProviderStarted {
            provider: agent.provider.name().to_owned(),
            model: agent.model.clone(),
        },
    )
    .await?;
    let mut stream = agent.provider.stream_chat(&request);
    let (finish_reason, usage, message, latency) = loop {
        match stream.next().await {
            None => {
                return Err(StepError::new(format!(
                    "provider {}: the stream ended without a result",
                    agent.provider.name()
                ))
                .code(ErrorCode::ProviderError)
                .no_retry());
            }
            Some(Err(e)) => return Err(agent.provider_error(&e)),
            Some(Ok(ChatChunk::TextDelta(text))) => {
                ctx.write_event_to_stream(kind::TEXT_DELTA, &Text { text: &text })
                    .await?;
            }
            Some(Ok(ChatChunk::ReasoningDelta(text))) => {
                ctx.write_event_to_stream(kind::REASONING_DELTA, &Text { text: &text })
                    .await?;
            }
            Some(Ok(ChatChunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            })) => {
                let delta = ToolCallDelta {
                    index,
                    id: id.as_deref(),
                    name: name.as_deref(),
                    arguments: &arguments,
                };
                ctx.write_event_to_stream(kind::TOOL_CALL_DELTA, &delta)
                    .await?;
            }
            Some(Ok(ChatChunk::Finished {
                finish_reason,
                usage,
                message,
                latency,
            })) => break (finish_reason, usage, message, latency),
        }
    };
    let mut message = message;
    // Numbered by the answer's place in the conversation: unique across the session's runs.
    unique_call_ids(&mut message, conversation.len());
    drop(stream);
    ctx.add_usage(&usage);
    ctx.write_event_to_stream(
        kind::PROVIDER_COMPLETED,
        &ProviderCompleted {
            finish_reason,
            usage: &usage,
            message: &message,
            latency_ms: latency.as_millis() as u64,
        },
    )
    .await?;
    ctx.set(MODEL_CALLS, calls + 1)?;
    let tool_calls = message.tool_calls().to_vec();
    let text = message.text().to_owned();
    conversation.push(message);
    ctx.set(MESSAGES, &conversation)?;
    if !tool_calls.is_empty() {
        return Ok(RunTools { calls: tool_calls }.into());
    }
    let done = Emit::stop(json!({"message": {"role": "assistant", "content": text}}));
    Ok(match session_state(&ctx, &conversation).await? {
        Some(state) => done.with_session_state(state),
        None => done,
    })
}

/// Gives each tool call of an answer an id of its own: one with no id (some OpenAI-compatible
/// servers send none) or repeating an earlier one of the answer becomes
/// `call_{turn}_{index}` (`turn`: the answer's place in the conversation), so that each result
/// finds its call, and the provider is sent ids it can match.
fn unique_call_ids(message: &mut Message, turn: usize) {
    let Message::Assistant { tool_calls, .. } = message else {
        return;
    };
    let mut seen = std::collections::HashSet::new();
    for (index, call) in tool_calls.iter_mut().enumerate() {
        if !call.id.is_empty() && seen.insert(call.id.clone()) {
            continue;
        }
        let mut id = format!("call_{turn}_{index}");
        let mut n = 0;
        while seen.contains(&id) {
            n += 1;
            id = format!("call_{turn}_{index}_{n}");
        }
        seen.insert(id.clone());
        call.id = id;
    }
}

/// Stores the conversation in the session's state (`{"messages": […]}`, other keys kept).
async fn session_state(
    ctx: &Context,
    conversation: &[Message],
) -> Result<Option<Value>, StepError> {
    if ctx.session_id().is_none() {
        return Ok(None);
    }
    let mut state = match ctx.session_state().await? {
        Some(Value::Object(state)) => state,
        _ => Map::new(),
    };
    state.insert(MESSAGES.to_owned(), serde_json::to_value(conversation)?);
    Ok(Some(Value::Object(state)))
}

/// What to do for one tool call.
enum Job<'a> {
    /// Answer with this error at once.
    Reject(String),
    /// POST to an HTTP tool, once one of its slots is free.
    Http {
        url: &'a str,
        timeout: std::time::Duration,
        max_response_bytes: usize,
        slots: &'a tokio::sync::Semaphore,
    },
}

/// `tools` (accepts `run-tools`): runs the server-side calls concurrently (`tools-started`, one
/// `tool-completed` each as it finishes), each HTTP tool within its `max_concurrent_calls`
/// across all runs; unknown tools and unparsable arguments become error results. Then asks the
/// client for its tools (the run waits) or asks for the next model turn.
/// What a JSON value is, for a message: "a string", "an array", …
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

pub(crate) async fn tools(
    agent: Arc<Agent>,
    ctx: Context,
    run: RunTools,
) -> Result<Emit, StepError> {
    let mut results: Vec<Option<ToolOutcome>> = vec![None; run.calls.len()];
    let mut server: Vec<(usize, Job<'_>)> = Vec::new();
    let mut client: Vec<ToolCall> = Vec::new();
    for (i, call) in run.calls.iter().enumerate() {
        let job = match agent.tool(&call.name) {
            None => Job::Reject(format!(
                "unknown tool {:?}; the tools are: {}",
                call.name,
                agent.tool_names()
            )),
            Some(_) if call.arguments.is_string() => {
                // The text as the model sent it (see `ToolCall::arguments`).
                let raw = call.arguments.as_str().unwrap_or_default();
                Job::Reject(match serde_json::from_str::<serde_json::Value>(raw) {
                    Ok(v) if !v.is_object() => format!(
                        "the arguments must be a JSON object, got {}: {raw}",
                        json_kind(&v)
                    ),
                    // An object, kept as text: nested too deep.
                    Ok(_) => format!(
                        "the arguments must be a JSON object nested at most {} levels deep, got {raw}",
                        sluice_protocol::json::MAX_DEPTH
                    ),
                    Err(_) if serde_json::from_str::<serde::de::IgnoredAny>(raw).is_ok() => {
                        format!(
                            "the arguments must be a JSON object nested at most {} levels deep, got {raw}",
                            sluice_protocol::json::MAX_DEPTH
                        )
                    }
                    Err(_) => format!("the arguments are not valid JSON: {raw}"),
                })
            }
            Some(_) if !call.arguments.is_object() => Job::Reject(format!(
                "the arguments must be a JSON object, got {}",
                call.arguments
            )),
            Some(Tool::Client { .. }) => {
                client.push(call.clone());
                continue;
            }
            Some(Tool::Http {
                url,
                timeout,
                max_response_bytes,
                ..
            }) => match agent.slots(&call.name) {
                Some(slots) => Job::Http {
                    url,
                    timeout: *timeout,
                    max_response_bytes: *max_response_bytes,
                    slots,
                },
                None => Job::Reject(format!("the tool {:?} is not available", call.name)),
            },
        };
        server.push((i, job));
    }
    if !server.is_empty() {
        let started = Tools {
            tools: server.iter().map(|(i, _)| run.calls[*i].clone()).collect(),
        };
        ctx.write_event_to_stream(kind::TOOLS_STARTED, &started)
            .await?;
        let http = &agent.http;
        let mut running: FuturesUnordered<_> = server
            .into_iter()
            .map(|(i, job)| {
                let arguments = &run.calls[i].arguments;
                async move {
                    let t0 = Instant::now();
                    let (output, is_error) = match job {
                        Job::Reject(message) => (Value::String(message), true),
                        Job::Http {
                            url,
                            timeout,
                            max_response_bytes,
                            slots,
                        } => {
                            let call = http::Call {
                                url,
                                timeout,
                                max_response_bytes,
                            };
                            http::call(http, &call, slots, arguments).await
                        }
                    };
                    (i, output, is_error, t0.elapsed())
                }
            })
            .collect();
        while let Some((i, output, is_error, took)) = running.next().await {
            let call = &run.calls[i];
            let outcome = ToolOutcome {
                id: call.id.clone(),
                name: call.name.clone(),
                output,
                is_error,
            };
            ctx.write_event_to_stream(
                kind::TOOL_COMPLETED,
                &ToolCompleted {
                    id: outcome.id.clone(),
                    name: outcome.name.clone(),
                    output: outcome.output.clone(),
                    is_error,
                    duration_ms: took.as_millis() as u64,
                },
            )
            .await?;
            results[i] = Some(outcome);
        }
    }
    if client.is_empty() {
        let mut conversation = messages(&ctx)?;
        conversation.extend(results.iter().flatten().map(ToolOutcome::message));
        ctx.set(MESSAGES, &conversation)?;
        return Ok(ModelTurn {}.into());
    }
    ctx.set(
        PENDING,
        Pending {
            calls: run.calls,
            results,
            requested_at_ms: unix_ms(),
        },
    )?;
    Ok(Emit::none().request_tools(client))
}

/// `client-results` (accepts `tool-results`): matches the client's results to the calls it
/// was asked for (a call without a result gets the error result "no result supplied"; results
/// for other ids are ignored), writes one `tool-completed` per client call, appends every
/// result to the conversation in the order of the calls, and asks for the next model turn.
pub(crate) async fn client_results(
    ctx: Context,
    results: ToolResultsEvent,
) -> Result<Emit, StepError> {
    let Some(mut pending) = ctx.get::<Option<Pending>>(PENDING)?.flatten() else {
        return Err(
            StepError::new("tool results arrived, but no tool call is waiting for them").no_retry(),
        );
    };
    let took = unix_ms().saturating_sub(pending.requested_at_ms);
    for (slot, call) in pending.results.iter_mut().zip(&pending.calls) {
        if slot.is_some() {
            continue;
        }
        let outcome = match results.0.results.iter().find(|r| r.id == call.id) {
            Some(r) => ToolOutcome {
                id: call.id.clone(),
                name: call.name.clone(),
                output: r.output.clone(),
                is_error: r.is_error,
            },
            None => ToolOutcome {
                id: call.id.clone(),
                name: call.name.clone(),
                output: Value::String("no result supplied".into()),
                is_error: true,
            },
        };
        ctx.write_event_to_stream(
            kind::TOOL_COMPLETED,
            &ToolCompleted {
                id: outcome.id.clone(),
                name: outcome.name.clone(),
                output: outcome.output.clone(),
                is_error: outcome.is_error,
                duration_ms: took,
            },
        )
        .await?;
        *slot = Some(outcome);
    }
    let mut conversation = messages(&ctx)?;
    conversation.extend(pending.results.iter().flatten().map(ToolOutcome::message));
    ctx.set(MESSAGES, &conversation)?;
    ctx.set(PENDING, Value::Null)?;
    Ok(ModelTurn {}.into())
}
