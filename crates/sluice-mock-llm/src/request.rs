//! [`RecordedRequest`]: what the server received.

use serde_json::Value;

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
}

/// One request the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// The API it came in on.
    pub format: WireFormat,
    /// The request path.
    pub path: String,
    /// Its headers, names lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Its JSON body.
    pub body: Value,
}

impl RecordedRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `model` field.
    pub fn model(&self) -> Option<&str> {
        self.body["model"].as_str()
    }

    /// The `messages` array.
    pub fn messages(&self) -> &[Value] {
        self.body["messages"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The `tools` array.
    pub fn tools(&self) -> &[Value] {
        self.body["tools"].as_array().map_or(&[], Vec::as_slice)
    }

    /// How many assistant messages the history holds: the step of the conversation.
    pub fn assistant_turns(&self) -> usize {
        self.messages()
            .iter()
            .filter(|m| m["role"] == "assistant")
            .count()
    }

    /// The text of the last message: its string content, or its text blocks joined.
    pub fn last_message_text(&self) -> Option<String> {
        let content = &self.messages().last()?["content"];
        match content {
            Value::String(s) => Some(s.clone()),
            Value::Array(blocks) => Some(
                blocks
                    .iter()
                    .filter_map(|b| b["text"].as_str().or_else(|| b["content"].as_str()))
                    .collect::<Vec<_>>()
                    .join(""),
            ),
            _ => None,
        }
    }

    /// Whether the request asked for streamed usage (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.body["stream_options"]["include_usage"] == true
    }
}
