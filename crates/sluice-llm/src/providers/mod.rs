//! The wire formats: one module per provider API (request body, stream parser, finish reasons).
//!
//! - [`openai`]: OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama, llama.cpp server,
//!   LM Studio…).
//! - [`anthropic`]: Anthropic Messages.

pub mod anthropic;
pub mod openai;

use serde_json::Value;

use crate::assemble::Assembler;
use crate::sse::SseEvent;
use crate::{Error, Result};

/// What a parser says after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Keep reading.
    Continue,
    /// The response is complete.
    Done,
}

/// A stream parser of either wire format.
#[derive(Debug)]
pub(crate) enum Parser {
    OpenAi(openai::StreamParser),
    Anthropic(anthropic::StreamParser),
}

impl Parser {
    /// A parser in its initial state for `kind`.
    pub fn new(kind: crate::ProviderKind) -> Self {
        match kind {
            crate::ProviderKind::OpenAi => Self::OpenAi(openai::StreamParser::default()),
            crate::ProviderKind::Anthropic => Self::Anthropic(anthropic::StreamParser::default()),
        }
    }

    /// Handles one event.
    pub fn on_event(&mut self, event: &SseEvent, asm: &mut Assembler) -> Result<Flow> {
        match self {
            Self::OpenAi(p) => p.on_event(event, asm),
            Self::Anthropic(p) => p.on_event(event, asm),
        }
    }

    /// Handles the end of the body.
    pub fn on_eof(&mut self, asm: &mut Assembler) -> Result<Flow> {
        match self {
            Self::OpenAi(p) => p.on_eof(asm),
            Self::Anthropic(p) => p.on_eof(asm),
        }
    }
}

/// Parses an event's JSON data.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(data: &str) -> Result<T> {
    serde_json::from_str(data).map_err(|e| {
        Error::Protocol(format!(
            "invalid JSON in event ({e}): {}",
            excerpt(data, 200)
        ))
    })
}

/// The message of a provider error payload: `{"message": …, "type": …}`, a bare string, or
/// anything else as JSON text.
pub(crate) fn error_message(error: &Value) -> String {
    match error {
        Value::String(s) => s.clone(),
        Value::Object(map) => {
            let message = map.get("message").and_then(Value::as_str);
            let kind = map
                .get("type")
                .and_then(Value::as_str)
                .or_else(|| map.get("code").and_then(Value::as_str));
            match (kind, message) {
                (Some(kind), Some(message)) => format!("{kind}: {message}"),
                (None, Some(message)) => message.to_owned(),
                _ => error.to_string(),
            }
        }
        other => other.to_string(),
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
pub(crate) fn excerpt(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Merges `extra` into the object `body`, overriding.
pub(crate) fn merge_extra(body: &mut Value, extra: &serde_json::Map<String, Value>) {
    if let Value::Object(map) = body {
        for (key, value) in extra {
            map.insert(key.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn error_messages_and_excerpts() {
        assert_eq!(
            error_message(&json!({"type": "overloaded_error", "message": "Overloaded"})),
            "overloaded_error: Overloaded"
        );
        assert_eq!(error_message(&json!({"message": "bad"})), "bad");
        assert_eq!(error_message(&json!("plain")), "plain");
        assert_eq!(excerpt("héllo", 2), "h");
        assert_eq!(excerpt("hé", 10), "hé");
    }
}
