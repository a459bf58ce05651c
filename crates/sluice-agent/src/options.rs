//! [`AgentOptions`] and [`Tool`]: what an agent is made of.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_llm::{Provider, ToolSpec};

/// Default time limit of one HTTP tool call.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Default size limit of an HTTP tool's response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Default limit of one HTTP tool's calls in flight at once, across all runs of an agent.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 64;

/// Default number of model calls a run may make.
pub const DEFAULT_MAX_STEPS: u32 = 8;

/// A tool the model may call.
///
/// ```
/// use std::time::Duration;
/// use sluice_agent::Tool;
/// let weather = Tool::http("get_weather", "http://127.0.0.1:9000/weather")
///     .with_description("Current weather for a city")
///     .with_parameters(serde_json::json!({
///         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]
///     }))
///     .with_timeout(Duration::from_secs(5));
/// let confirm = Tool::client("confirm").with_description("Ask the user to confirm an action");
/// assert_eq!(weather.name(), "get_weather");
/// assert!(confirm.is_client());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Tool {
    /// A server-side tool: the agent POSTs the call's arguments as JSON to `url` and gives the
    /// response body to the model (its JSON when it parses, else its text). Only URLs listed
    /// in the configuration are ever called, and redirects are not followed, so a prompt cannot
    /// point the server elsewhere.
    Http {
        /// The name the model calls it by (`^[a-zA-Z0-9_-]{1,64}$`).
        name: String,
        /// What it does, for the model.
        description: String,
        /// JSON Schema of its arguments.
        parameters: Value,
        /// Where the arguments are POSTed (`http://` or `https://`).
        url: String,
        /// Time limit of one call: the wait for a slot (see `max_concurrent_calls`), the
        /// request and the response.
        timeout: Duration,
        /// Largest response body accepted; a bigger one is an error result. (Of a non-2xx
        /// answer, at most this much, and at most 2 KiB, is shown to the model.)
        max_response_bytes: usize,
        /// Calls of this tool in flight at once, across all runs of the agent; more wait for a
        /// slot, and the wait counts against `timeout`.
        max_concurrent_calls: usize,
    },
    /// A client-side tool: the run pauses with `tools-requested` (status `waiting`) until the
    /// client sends `tool-results`.
    Client {
        /// The name the model calls it by (`^[a-zA-Z0-9_-]{1,64}$`).
        name: String,
        /// What it does, for the model.
        description: String,
        /// JSON Schema of its arguments.
        parameters: Value,
    },
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

impl Tool {
    /// A server-side HTTP tool with an empty description, an object schema without properties,
    /// the default timeout ([`DEFAULT_TOOL_TIMEOUT`]), size limit
    /// ([`DEFAULT_MAX_RESPONSE_BYTES`]) and concurrency limit
    /// ([`DEFAULT_MAX_CONCURRENT_CALLS`]).
    pub fn http(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self::Http {
            name: name.into(),
            description: String::new(),
            parameters: empty_object_schema(),
            url: url.into(),
            timeout: DEFAULT_TOOL_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
        }
    }

    /// A client-side tool with an empty description and an object schema without properties.
    pub fn client(name: impl Into<String>) -> Self {
        Self::Client {
            name: name.into(),
            description: String::new(),
            parameters: empty_object_schema(),
        }
    }

    /// Sets the description.
    pub fn with_description(mut self, text: impl Into<String>) -> Self {
        match &mut self {
            Self::Http { description, .. } | Self::Client { description, .. } => {
                *description = text.into();
            }
        }
        self
    }

    /// Sets the JSON Schema of the arguments.
    pub fn with_parameters(mut self, schema: Value) -> Self {
        match &mut self {
            Self::Http { parameters, .. } | Self::Client { parameters, .. } => *parameters = schema,
        }
        self
    }

    /// Sets the time limit of an HTTP tool (no effect on a client tool).
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        if let Self::Http { timeout, .. } = &mut self {
            *timeout = limit;
        }
        self
    }

    /// Sets the response size limit of an HTTP tool (no effect on a client tool).
    pub fn with_max_response_bytes(mut self, limit: usize) -> Self {
        if let Self::Http {
            max_response_bytes, ..
        } = &mut self
        {
            *max_response_bytes = limit;
        }
        self
    }

    /// Sets how many calls of an HTTP tool may be in flight at once, across all runs of the
    /// agent (no effect on a client tool).
    pub fn with_max_concurrent_calls(mut self, limit: usize) -> Self {
        if let Self::Http {
            max_concurrent_calls,
            ..
        } = &mut self
        {
            *max_concurrent_calls = limit;
        }
        self
    }

    /// The name the model calls it by.
    pub fn name(&self) -> &str {
        match self {
            Self::Http { name, .. } | Self::Client { name, .. } => name,
        }
    }

    /// Whether the client runs it (the run pauses for it).
    pub fn is_client(&self) -> bool {
        matches!(self, Self::Client { .. })
    }

    /// What the model is told about it.
    pub fn spec(&self) -> ToolSpec {
        match self {
            Self::Http {
                name,
                description,
                parameters,
                ..
            }
            | Self::Client {
                name,
                description,
                parameters,
            } => ToolSpec::new(name.clone(), description.clone(), parameters.clone()),
        }
    }
}

/// Whether `name` is a valid tool name: `^[a-zA-Z0-9_-]{1,64}$` (what the major providers
/// accept).
pub fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// How an agent is made: its model, prompt, tools and limits.
///
/// ```
/// use sluice_agent::{AgentOptions, Tool};
/// use sluice_llm::{Provider, ProviderConfig, ProviderKind};
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let provider = Provider::new(ProviderConfig::new("local", ProviderKind::OpenAi, "http://127.0.0.1:11434/v1"))?;
/// let options = AgentOptions::new(provider, "qwen3:8b")
///     .with_system("You are a helpful assistant.")
///     .with_max_steps(4)
///     .with_tool(Tool::client("confirm"));
/// assert_eq!(options.max_steps, 4);
/// # Ok(()) }
/// # demo().unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The model provider (shared: its connection pool and concurrency limit serve every run).
    pub provider: Provider,
    /// The model name, as the provider knows it.
    pub model: String,
    /// The system prompt, sent first on every model call (not stored in the conversation).
    pub system: Option<String>,
    /// Model calls a run may make; one more ends the run with `chain-error` `max_steps`.
    /// Default [`DEFAULT_MAX_STEPS`].
    pub max_steps: u32,
    /// The tools the model may call.
    pub tools: Vec<Tool>,
    /// Sampling temperature (provider default when `None`).
    pub temperature: Option<f32>,
    /// Output token limit of one model call (provider default when `None`).
    pub max_tokens: Option<u32>,
    /// Shown by `GET /v1/workflows`.
    pub description: String,
}

impl AgentOptions {
    /// An agent of `model` on `provider`, with no system prompt, no tools and the defaults.
    pub fn new(provider: Provider, model: impl Into<String>) -> Self {
        Self {
            provider,
            model: model.into(),
            system: None,
            max_steps: DEFAULT_MAX_STEPS,
            tools: Vec::new(),
            temperature: None,
            max_tokens: None,
            description: String::new(),
        }
    }

    /// Sets the system prompt.
    pub fn with_system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }

    /// Sets the limit of model calls per run (at least 1).
    pub fn with_max_steps(mut self, n: u32) -> Self {
        self.max_steps = n.max(1);
        self
    }

    /// Adds a tool.
    pub fn with_tool(mut self, tool: Tool) -> Self {
        self.tools.push(tool);
        self
    }

    /// Sets the temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets the output token limit.
    pub fn with_max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sets the description.
    pub fn with_description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert!(valid_tool_name("get_weather-2"));
        assert!(!valid_tool_name(""));
        assert!(!valid_tool_name("a b"));
        assert!(!valid_tool_name("é"));
        assert!(!valid_tool_name(&"a".repeat(65)));
        assert!(valid_tool_name(&"a".repeat(64)));
    }

    #[test]
    fn builders() {
        let t = Tool::http("t", "http://x")
            .with_timeout(Duration::from_secs(1))
            .with_max_response_bytes(10)
            .with_max_concurrent_calls(3);
        assert!(
            matches!(t, Tool::Http { timeout, max_response_bytes: 10, max_concurrent_calls: 3, .. } if timeout == Duration::from_secs(1))
        );
        let c = Tool::client("c")
            .with_timeout(Duration::from_secs(1))
            .with_max_concurrent_calls(3);
        assert_eq!(c, Tool::client("c"));
        assert_eq!(c.spec().parameters, empty_object_schema());
    }
}
