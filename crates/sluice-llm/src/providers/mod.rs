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
use crate::{BODY_EXCERPT_LIMIT, Error, Result};

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

/// The most of a provider's text an error is built with, in bytes: the kept excerpt
/// ([`BODY_EXCERPT_LIMIT`]) and room for an API key that starts inside it, so that the key can be
/// removed whole before the text is cut to the excerpt (see `Inner::scrub`).
pub(crate) const RAW_EXCERPT_LIMIT: usize = BODY_EXCERPT_LIMIT + 1024;

/// Error payloads larger than this are not parsed (a `serde_json::Value` costs tens of times
/// its text): their message is the start of their text.
const MAX_PARSED_ERROR: usize = 64 << 10;

/// The message of an error payload given as JSON text, `{"error": …}` or the error itself:
/// see [`error_message`]. Text that is not JSON, or too large to parse, is its own message.
/// At most [`RAW_EXCERPT_LIMIT`] bytes.
pub(crate) fn error_text(raw: &str) -> String {
    let raw = raw.trim();
    let parsed = (raw.len() <= MAX_PARSED_ERROR)
        .then(|| serde_json::from_str::<Value>(raw).ok())
        .flatten();
    let message = match parsed {
        Some(value) => error_message(value.get("error").unwrap_or(&value)),
        None => raw.to_owned(),
    };
    truncate(message, RAW_EXCERPT_LIMIT)
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    let len = excerpt(&s, max).len();
    s.truncate(len);
    s
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

    #[test]
    fn error_texts_are_bounded() {
        assert_eq!(
            error_text(r#"{"error": {"type": "server_error", "message": "boom"}}"#),
            "server_error: boom"
        );
        assert_eq!(error_text(r#" {"message": "bad"} "#), "bad");
        assert_eq!(error_text("not json"), "not json");
        let long = format!(r#"{{"error": {{"message": "{}"}}}}"#, "é".repeat(100_000));
        let text = error_text(&long);
        assert!(text.len() <= RAW_EXCERPT_LIMIT && text.len() > RAW_EXCERPT_LIMIT - 4);
        assert!(
            text.starts_with("{\"error\""),
            "too large to parse: kept as text"
        );
        let small = format!(r#"{{"error": {{"message": "{}"}}}}"#, "x".repeat(10_000));
        assert_eq!(error_text(&small), "x".repeat(RAW_EXCERPT_LIMIT));
    }
}
