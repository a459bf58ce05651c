//! Sluice's built-in streaming agent (`kind = "agent"`).
//!
//! [`agent`] builds an ordinary engine [`Workflow`] out of four steps that route events to
//! each other, so a run of it is checkpointed, paused, resumed and cancelled like any other:
//!
//! - `start` (the run's input, `{"message": "…"}` or `{"messages": [{"role", "content"}…]}`):
//!   loads the session's conversation (`{"messages": […]}` in the session state) when the run
//!   belongs to one, appends the input's messages, and asks for a model turn.
//! - `model`: one model call, streamed into the log as `provider-started`, `text-delta`,
//!   `reasoning-delta`, `tool-call-delta` and `provider-completed` (usage, latency, the
//!   assembled message). A message with tool calls goes to `tools`; one without ends the run
//!   with `{"message": {"role": "assistant", "content": "…"}}` (saving the conversation to the
//!   session). More than [`AgentOptions::max_steps`] model calls end the run with
//!   `chain-error` `max_steps`; provider failures with `provider_error` or `rate_limited`
//!   (the provider has already retried what could be retried, before the first token).
//! - `tools`: server-side HTTP tools run concurrently (`tools-started`, then one
//!   `tool-completed` per call as each finishes), each tool within its `max_concurrent_calls`
//!   across all runs of the agent; unknown tools, unparsable arguments, timeouts and non-2xx
//!   answers (3xx included: redirects are not followed) become error results the model reads.
//!   If the model called client-side tools, the run pauses with `tools-requested` (status
//!   `waiting`: no task, no slot, durable across restarts); otherwise the results go back to
//!   `model`.
//! - `client-results` (the `tool-results` event sent into the waiting run): matches results
//!   to the requested calls and goes back to `model`.
//!
//! The run's state holds everything (conversation, model-call count, calls waiting for the
//! client), so nothing lives in memory across a pause or a restart. A `model` step cut by a
//! crash runs again after the restart and asks the model again: its partial deltas stay in the
//! log before `chain-resumed`, superseded by the re-run's.
//!
//! Layout: `options.rs` ([`AgentOptions`], [`Tool`]), `input.rs` (input validation),
//! `steps.rs` (the steps and their events), `http.rs` (HTTP tool calls).
//!
//! ```
//! use sluice_agent::{AgentOptions, agent};
//! use sluice_engine::{Engine, StartRun};
//! use sluice_llm::{Provider, ProviderConfig, ProviderKind};
//! use sluice_mock_llm::{MockServer, Script, Turn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mock = MockServer::start(Script::new().turn(Turn::text("Hello!"))).await?;
//! let provider = Provider::new(ProviderConfig::new("mock", ProviderKind::OpenAi, mock.base_url()))?;
//! let assistant = agent("assistant", AgentOptions::new(provider, "any-model"))?;
//! let store = std::sync::Arc::new(sluice_store_memory::MemoryStore::new());
//! let engine = Engine::new(store, [assistant])?;
//! let run = engine
//!     .start("assistant", StartRun { input: serde_json::json!({"message": "Hi"}), ..Default::default() })
//!     .await?;
//! let record = run.wait().await?;
//! assert_eq!(
//!     record.result,
//!     Some(serde_json::json!({"message": {"role": "assistant", "content": "Hello!"}}))
//! );
//! # Ok(()) }
//! ```

mod http;
mod input;
mod options;
mod steps;

use std::sync::Arc;

use serde_json::json;
use sluice_engine::{Error, Result, StartEvent, Step, StepError, StopEvent, Workflow};
use sluice_llm::{ChatRequest, Message, Provider, ToolSpec};
use tokio::sync::Semaphore;

pub use options::{
    AgentOptions, DEFAULT_MAX_CONCURRENT_CALLS, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_STEPS,
    DEFAULT_TOOL_TIMEOUT, Tool, valid_tool_name,
};

use steps::{ModelTurn, RunTools};

/// The workflow kind agents are listed with.
pub const KIND: &str = "agent";

/// What the steps share (one per workflow, so across all its runs): the definition, the HTTP
/// client of the tools and their concurrency limits.
#[derive(Debug)]
pub(crate) struct Agent {
    provider: Provider,
    model: String,
    system: Option<String>,
    max_steps: u32,
    tools: Vec<Tool>,
    specs: Vec<ToolSpec>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    http: reqwest::Client,
    /// Per HTTP tool (by name), its `max_concurrent_calls` slots.
    slots: std::collections::BTreeMap<String, Arc<Semaphore>>,
}

impl Agent {
    fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name() == name)
    }

    /// The slots of an HTTP tool.
    fn slots(&self, name: &str) -> Option<&Arc<Semaphore>> {
        self.slots.get(name)
    }

    fn tool_names(&self) -> String {
        if self.tools.is_empty() {
            return "(none)".into();
        }
        self.tools
            .iter()
            .map(Tool::name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn request(&self, conversation: &[Message]) -> ChatRequest {
        let mut messages = Vec::with_capacity(conversation.len() + 1);
        if let Some(system) = &self.system {
            messages.push(Message::system(system.clone()));
        }
        messages.extend_from_slice(conversation);
        let mut request =
            ChatRequest::new(self.model.clone(), messages).with_tools(self.specs.clone());
        request.temperature = self.temperature;
        request.max_tokens = self.max_tokens;
        request
    }

    /// A provider failure as the step's final error: `provider_error` or `rate_limited`, not
    /// retried (the provider retries before the first token itself). The message is the
    /// error's text and its sources'; none of them names the provider's URL (sluice-llm drops
    /// it), so a client reading the `chain-error` learns nothing of the internal endpoint.
    fn provider_error(&self, error: &sluice_llm::Error) -> StepError {
        let mut message = format!("provider {}: {error}", self.provider.name());
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        let mut details = json!({
            "provider": self.provider.name(),
            "kind": format!("{:?}", error.kind()),
        });
        if let Some(status) = error.status() {
            details["status"] = json!(status);
        }
        if let Some(id) = error.request_id() {
            details["request_id"] = json!(id);
        }
        if let Some(after) = error.retry_after() {
            details["retry_after_ms"] = json!(after.as_millis() as u64);
        }
        StepError::new(message)
            .code(error.code())
            .no_retry()
            .details(details)
    }
}

fn invalid(name: &str, message: String) -> Error {
    Error::InvalidWorkflow {
        workflow: name.to_owned(),
        message,
    }
}

/// Checks the options: a model name; tool names valid (`^[a-zA-Z0-9_-]{1,64}$`) and unique;
/// HTTP tools with an `http`/`https` URL, a timeout, a size limit and a concurrency limit.
fn validate(name: &str, options: &AgentOptions) -> Result<()> {
    if options.model.trim().is_empty() {
        return Err(invalid(name, "the agent needs a model name".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for tool in &options.tools {
        let tool_name = tool.name();
        if !valid_tool_name(tool_name) {
            return Err(invalid(
                name,
                format!("tool name {tool_name:?} must match ^[a-zA-Z0-9_-]{{1,64}}$"),
            ));
        }
        if !seen.insert(tool_name) {
            return Err(invalid(name, format!("two tools are named {tool_name:?}")));
        }
        if let Tool::Http {
            url,
            timeout,
            max_response_bytes,
            max_concurrent_calls,
            ..
        } = tool
        {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(invalid(
                        name,
                        format!("tool {tool_name:?}: url {url:?} is not an http(s) URL"),
                    ));
                }
            }
            if timeout.is_zero() {
                return Err(invalid(
                    name,
                    format!("tool {tool_name:?}: the timeout must be more than zero"),
                ));
            }
            if *max_response_bytes == 0 {
                return Err(invalid(
                    name,
                    format!("tool {tool_name:?}: max_response_bytes must be at least 1"),
                ));
            }
            if !(1..=Semaphore::MAX_PERMITS).contains(max_concurrent_calls) {
                return Err(invalid(
                    name,
                    format!(
                        "tool {tool_name:?}: max_concurrent_calls must be from 1 to {}",
                        Semaphore::MAX_PERMITS
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Builds the agent workflow `name` (kind `agent`).
///
/// Its step budget (the engine's `max_steps`) is derived from [`AgentOptions::max_steps`],
/// which counts model calls; deploy it under other limits with
/// [`Workflow::configure`](sluice_engine::Workflow::configure) but leave its `max_steps` alone.
///
/// # Errors
/// [`Error::InvalidWorkflow`] for a malformed workflow name, an empty model name, a tool name
/// that is malformed or taken twice, an HTTP tool URL that is not `http(s)`, a zero tool
/// timeout, size limit or concurrency limit, or an HTTP client that cannot be built.
pub fn agent(name: &str, options: AgentOptions) -> Result<Workflow> {
    validate(name, &options)?;
    let http = http::client()
        .map_err(|e| invalid(name, format!("cannot build the tools' HTTP client: {e}")))?;
    let max_steps = options.max_steps.max(1);
    let slots = options
        .tools
        .iter()
        .filter_map(|tool| match tool {
            Tool::Http {
                name,
                max_concurrent_calls,
                ..
            } => Some((
                name.clone(),
                Arc::new(Semaphore::new(*max_concurrent_calls)),
            )),
            Tool::Client { .. } => None,
        })
        .collect();
    let agent = Arc::new(Agent {
        specs: options.tools.iter().map(Tool::spec).collect(),
        provider: options.provider,
        model: options.model,
        system: options.system,
        max_steps,
        tools: options.tools,
        temperature: options.temperature,
        max_tokens: options.max_tokens,
        http,
        slots,
    });
    // Per model call: `model`, `tools`, `client-results`; plus `start` and the refused call.
    let budget = max_steps.saturating_mul(3).saturating_add(2);
    let (for_model, for_tools) = (agent.clone(), agent);
    Workflow::builder(name)
        .kind(KIND)
        .description(options.description)
        .input_schema(input::schema())
        .validate_input(|input| input::parse(input).map(|_| ()))
        .max_steps(budget)
        .step(Step::new("start", |ctx, ev: StartEvent| steps::start(ctx, ev)).emits::<ModelTurn>())
        .step(
            Step::new("model", move |ctx, ev: ModelTurn| {
                steps::model(for_model.clone(), ctx, ev)
            })
            .emits::<RunTools>()
            .emits::<StopEvent>(),
        )
        .step(
            Step::new("tools", move |ctx, ev: RunTools| {
                steps::tools(for_tools.clone(), ctx, ev)
            })
            .emits::<ModelTurn>()
            .requests_tools(),
        )
        .step(Step::new("client-results", steps::client_results).emits::<ModelTurn>())
        .build()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_llm::{ProviderConfig, ProviderKind};

    fn options() -> AgentOptions {
        let provider = Provider::new(ProviderConfig::new(
            "p",
            ProviderKind::OpenAi,
            "http://127.0.0.1:1/v1",
        ))
        .unwrap();
        AgentOptions::new(provider, "m")
    }

    #[test]
    fn builds_and_validates() {
        let wf = agent("assistant", options()).unwrap();
        assert_eq!(wf.kind(), "agent");
        assert!(wf.validate_input(&json!({"message": "hi"})).is_ok());
        assert!(wf.validate_input(&json!({"msg": "hi"})).is_err());
        let err = |o: AgentOptions| agent("a", o).unwrap_err().to_string();
        assert!(err(options().with_tool(Tool::client("bad name"))).contains("bad name"));
        assert!(
            err(options()
                .with_tool(Tool::client("x"))
                .with_tool(Tool::http("x", "http://h/")))
            .contains("two tools")
        );
        assert!(err(options().with_tool(Tool::http("x", "ftp://h/"))).contains("http(s)"));
        assert!(err(options().with_tool(Tool::http("x", "not a url"))).contains("http(s)"));
        assert!(
            err(options().with_tool(Tool::http("x", "http://h/").with_max_concurrent_calls(0)))
                .contains("max_concurrent_calls")
        );
        let mut no_model = options();
        no_model.model = " ".into();
        assert!(err(no_model).contains("model"));
        assert!(agent("Bad Name", options()).is_err());
    }
}
