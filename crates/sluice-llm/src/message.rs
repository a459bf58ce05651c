//! The provider-neutral chat model: [`ChatRequest`], [`Message`], [`ToolSpec`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use sluice_protocol::payload::ToolCall;

/// One message of a conversation.
///
/// Serialises as `{"role": "...", ...}`, the shape of `provider-completed`'s `message` and of
/// the agent's result, so conversations can be persisted and sent back as they are.
///
/// ```
/// use sluice_llm::Message;
/// let m = Message::assistant("Hi!");
/// assert_eq!(serde_json::to_value(&m).unwrap(), serde_json::json!({"role": "assistant", "content": "Hi!"}));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    /// Instructions for the model. Anthropic gets all system messages joined into its `system`
    /// field.
    System {
        /// The instructions.
        content: String,
    },
    /// What the user said.
    User {
        /// The text.
        content: String,
    },
    /// What the model answered.
    Assistant {
        /// The text (may be empty when the model only called tools).
        #[serde(default)]
        content: String,
        /// The tools it called, in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
        /// Its visible reasoning, where the model streams it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reasoning: Option<String>,
        /// Anthropic's signature of the reasoning; with it, the reasoning is sent back as a
        /// `thinking` block (required when extended thinking and tools are combined).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reasoning_signature: Option<String>,
    },
    /// The result of one tool call, answering an assistant message's `tool_calls`.
    Tool {
        /// The id of the call answered.
        tool_call_id: String,
        /// The tool's name, where known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The output, as text (JSON output is sent as its JSON text).
        content: String,
        /// Whether `content` describes a failure.
        #[serde(default, skip_serializing_if = "is_false")]
        is_error: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::System {
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::User {
            content: content.into(),
        }
    }

    /// An assistant message with text only.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::Assistant {
            content: content.into(),
            tool_calls: Vec::new(),
            reasoning: None,
            reasoning_signature: None,
        }
    }

    /// A successful tool result.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self::Tool {
            tool_call_id: tool_call_id.into(),
            name: None,
            content: content.into(),
            is_error: false,
        }
    }

    /// A failed tool result: the model sees `content` as the error.
    pub fn tool_error(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self::Tool {
            tool_call_id: tool_call_id.into(),
            name: None,
            content: content.into(),
            is_error: true,
        }
    }

    /// The wire role: `system`, `user`, `assistant` or `tool`.
    pub fn role(&self) -> &'static str {
        match self {
            Self::System { .. } => "system",
            Self::User { .. } => "user",
            Self::Assistant { .. } => "assistant",
            Self::Tool { .. } => "tool",
        }
    }

    /// The text content.
    pub fn text(&self) -> &str {
        match self {
            Self::System { content }
            | Self::User { content }
            | Self::Assistant { content, .. }
            | Self::Tool { content, .. } => content,
        }
    }

    /// The tool calls of an assistant message (empty for other roles).
    pub fn tool_calls(&self) -> &[ToolCall] {
        match self {
            Self::Assistant { tool_calls, .. } => tool_calls,
            _ => &[],
        }
    }

    /// The reasoning of an assistant message.
    pub fn reasoning(&self) -> Option<&str> {
        match self {
            Self::Assistant { reasoning, .. } => reasoning.as_deref(),
            _ => None,
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Its name (`[a-zA-Z0-9_-]{1,64}` for the major providers).
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments (an object schema).
    pub parameters: Value,
}

impl ToolSpec {
    /// A tool with a name, a description and a JSON Schema of its arguments.
    pub fn new(name: impl Into<String>, description: impl Into<String>, parameters: Value) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            parameters,
        }
    }
}

/// One model call.
///
/// ```
/// use sluice_llm::{ChatRequest, Message};
/// let request = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hello")])
///     .with_max_tokens(256)
///     .with_temperature(0.2);
/// assert_eq!(request.max_tokens, Some(256));
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model name, as the provider knows it.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// The tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The most tokens to generate. Sent as `max_tokens` to both APIs; Anthropic requires it, so
    /// [`DEFAULT_MAX_TOKENS`](crate::providers::anthropic::DEFAULT_MAX_TOKENS) is sent
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Provider-specific body fields, merged into the request body last (they override):
    /// e.g. `reasoning_effort` or `max_completion_tokens` for OpenAI, `thinking` for Anthropic.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// A request for `model` with `messages`, no tools and the provider's defaults.
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            ..Self::default()
        }
    }

    /// Sets the tools.
    pub fn with_tools(mut self, tools: Vec<ToolSpec>) -> Self {
        self.tools = tools;
        self
    }

    /// Sets the temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets the token limit.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Adds a provider-specific body field.
    pub fn with_extra(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }
}

/// Parses assembled tool-call argument text: `{}` when empty, the JSON value when valid (and
/// nested at most [`json::MAX_DEPTH`](sluice_protocol::json::MAX_DEPTH) levels), otherwise the
/// raw text as a JSON string. So a string value always holds the text as the model sent it:
/// invalid JSON, JSON nested too deeply, or a JSON string literal (quotes included) — never
/// the contents of a string the model sent.
pub(crate) fn parse_arguments(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return Value::Object(Map::new());
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(value)
            if !value.is_string()
                && sluice_protocol::json::depth(&value) <= sluice_protocol::json::MAX_DEPTH =>
        {
            value
        }
        _ => Value::String(raw.to_owned()),
    }
}

/// The argument text of a tool call as sent back to a provider: a string value is sent as its
/// raw text (see [`parse_arguments`]), anything else as its JSON text.
pub(crate) fn arguments_text(arguments: &Value) -> String {
    match arguments {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_round_trip() {
        let messages = vec![
            Message::system("be brief"),
            Message::user("hi"),
            Message::Assistant {
                content: String::new(),
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "f".into(),
                    arguments: json!({"a": 1}),
                }],
                reasoning: Some("hmm".into()),
                reasoning_signature: None,
            },
            Message::tool_error("c1", "boom"),
        ];
        let value = serde_json::to_value(&messages).unwrap();
        assert_eq!(
            value[3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "boom", "is_error": true})
        );
        assert_eq!(value[2]["tool_calls"][0]["arguments"], json!({"a": 1}));
        let back: Vec<Message> = serde_json::from_value(value).unwrap();
        assert_eq!(back, messages);
        assert_eq!(back[2].tool_calls().len(), 1);
        assert_eq!(back[2].reasoning(), Some("hmm"));
        assert_eq!(back[1].role(), "user");
    }

    #[test]
    fn arguments_parse_and_print() {
        assert_eq!(parse_arguments(""), json!({}));
        assert_eq!(parse_arguments("{\"a\":1}"), json!({"a": 1}));
        assert_eq!(parse_arguments("{\"a\":"), json!("{\"a\":"));
        assert_eq!(arguments_text(&json!("{\"a\":")), "{\"a\":");
        assert_eq!(arguments_text(&json!({"a": 1})), "{\"a\":1}");
        // A JSON string literal stays the text as sent, quotes included, and goes back so.
        let double = r#""{\"city\":\"Rome\"}""#;
        assert_eq!(parse_arguments(double), json!(double));
        assert_eq!(arguments_text(&parse_arguments(double)), double);
        // Nested past the limit: kept as text, not as a value records could not hold.
        let limit = sluice_protocol::json::MAX_DEPTH;
        let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        assert!(parse_arguments(&deep(limit)).is_array());
        assert_eq!(parse_arguments(&deep(limit + 1)), json!(deep(limit + 1)));
    }
}
