//! Anthropic Messages (`POST {base_url}/messages`), streaming.
//!
//! The stream is a sequence of named events: `message_start` (input usage), per content block
//! `content_block_start` (`text`, `thinking` or `tool_use`), `content_block_delta` (`text_delta`,
//! `thinking_delta`, `signature_delta`, `input_json_delta`), `content_block_stop`, then
//! `message_delta` (stop reason, output usage) and `message_stop`; `ping` anywhere; `error`
//! ends the call with [`Error::Provider`].
//!
//! Usage: `input_tokens` counts the whole prompt (Anthropic's uncached input plus cache reads
//! and cache writes), `cached_input_tokens` the cache reads.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sluice_protocol::payload::FinishReason;

use super::{Flow, error_text, merge_extra, parse_json};
use crate::assemble::Assembler;
use crate::sse::SseEvent;
use crate::{ChatRequest, Error, Message, Result};

/// The base URL of the Anthropic API; the request goes to `{base_url}/messages`.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";

/// The path appended to the base URL.
pub const PATH: &str = "/messages";

/// The `anthropic-version` header sent.
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` sent when the request has none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Maps an Anthropic `stop_reason` to the protocol's finish reason.
pub fn map_stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

/// The JSON body of a streaming Messages request.
///
/// System messages are joined into `system`; tool results become `tool_result` blocks of a user
/// turn; consecutive turns of the same role are merged.
///
/// ```
/// use sluice_llm::{ChatRequest, Message};
/// let body = sluice_llm::providers::anthropic::request_body(&ChatRequest::new(
///     "claude-sonnet-4-5", vec![Message::system("Be brief."), Message::user("Hi")]));
/// assert_eq!(body["system"], "Be brief.");
/// assert_eq!(body["max_tokens"], 4096);
/// assert_eq!(body["messages"][0]["role"], "user");
/// ```
pub fn request_body(request: &ChatRequest) -> Value {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for message in &request.messages {
        let (role, blocks) = match message {
            Message::System { content } => {
                system.push(content.as_str());
                continue;
            }
            Message::User { content } => ("user", vec![json!({"type": "text", "text": content})]),
            Message::Assistant {
                content,
                tool_calls,
                reasoning,
                reasoning_signature,
            } => {
                let mut blocks = Vec::new();
                if let (Some(thinking), Some(signature)) = (reasoning, reasoning_signature) {
                    blocks.push(
                        json!({"type": "thinking", "thinking": thinking, "signature": signature}),
                    );
                }
                if !content.is_empty() {
                    blocks.push(json!({"type": "text", "text": content}));
                }
                for call in tool_calls {
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": tool_input(&call.arguments),
                    }));
                }
                if blocks.is_empty() {
                    continue;
                }
                ("assistant", blocks)
            }
            Message::Tool {
                tool_call_id,
                content,
                is_error,
                ..
            } => {
                let mut block = json!({
                    "type": "tool_result",
                    "tool_use_id": tool_call_id,
                    "content": content,
                });
                if *is_error {
                    block["is_error"] = Value::Bool(true);
                }
                ("user", vec![block])
            }
        };
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, blocks)| {
            // A lone text block is sent in the compact string form.
            let content = match blocks.as_slice() {
                [block] if block["type"] == "text" => block["text"].clone(),
                _ => Value::Array(blocks),
            };
            json!({"role": role, "content": content})
        })
        .collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": messages,
        "stream": true,
    });
    if let Value::Object(map) = &mut body {
        if !system.is_empty() {
            map.insert("system".into(), Value::String(system.join("\n\n")));
        }
        if !request.tools.is_empty() {
            let tools: Vec<Value> = request
                .tools
                .iter()
                .map(|tool| {
                    json!({
                        "name": tool.name,
                        "description": tool.description,
                        "input_schema": tool.parameters,
                    })
                })
                .collect();
            map.insert("tools".into(), Value::Array(tools));
        }
        if let Some(t) = request.temperature {
            map.insert("temperature".into(), json!(t));
        }
        if let Some(p) = request.top_p {
            map.insert("top_p".into(), json!(p));
        }
        if !request.stop.is_empty() {
            map.insert("stop_sequences".into(), json!(request.stop));
        }
    }
    merge_extra(&mut body, &request.extra);
    body
}

/// `tool_use.input` must be an object: arguments that are one go as they are; raw text that
/// parses to one is parsed; anything else becomes `{}`.
fn tool_input(arguments: &Value) -> Value {
    match arguments {
        Value::Object(_) => arguments.clone(),
        Value::String(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(value @ Value::Object(_)) => value,
            _ => Value::Object(Map::new()),
        },
        _ => Value::Object(Map::new()),
    }
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    content_block: Option<Block>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Kept as text: parsed only when small (see [`error_text`]).
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

/// A `content_block_start`'s block. Typed, so that fields of no use are skipped rather than
/// built into a `serde_json::Value`.
#[derive(Debug, Default, Deserialize)]
struct Block {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    thinking: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    /// A `tool_use` block's input, as its JSON text.
    #[serde(default)]
    input: Option<Box<RawValue>>,
}

/// A `content_block_delta`'s or `message_delta`'s delta.
#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    thinking: String,
    #[serde(default)]
    signature: String,
    #[serde(default)]
    partial_json: String,
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Whether `raw` is a JSON object with at least one member.
fn non_empty_object(raw: &RawValue) -> bool {
    raw.get()
        .trim()
        .strip_prefix('{')
        .and_then(|inner| inner.strip_suffix('}'))
        .is_some_and(|inner| !inner.trim().is_empty())
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

/// The stream state of one Messages response.
#[derive(Debug, Default)]
pub(crate) struct StreamParser {
    /// Content block index → tool-call index, for `tool_use` blocks.
    tool_blocks: HashMap<u32, u32>,
    uncached_input: u64,
    cache_read: Option<u64>,
    cache_write: u64,
    output: u64,
    started: bool,
}

impl StreamParser {
    pub(crate) fn on_event(&mut self, event: &SseEvent, asm: &mut Assembler) -> Result<Flow> {
        let parsed: Event = parse_json(&event.data)?;
        let kind = parsed
            .kind
            .as_deref()
            .or(event.event.as_deref())
            .unwrap_or_default();
        match kind {
            "message_start" => {
                self.started = true;
                if let Some(usage) = parsed.message.and_then(|m| m.usage) {
                    self.add_usage(&usage, asm);
                }
            }
            "content_block_start" => {
                let index = parsed.index.unwrap_or(0);
                let block = parsed.content_block.unwrap_or_default();
                match block.kind.as_str() {
                    "text" => asm.text(&block.text)?,
                    "thinking" => asm.reasoning(&block.thinking)?,
                    "tool_use" => {
                        let tool_index = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                        // Real streams start with `input: {}` and send the input in deltas;
                        // a non-empty input here is passed on as the first fragment.
                        let arguments = match &block.input {
                            Some(input) if non_empty_object(input) => input.get(),
                            _ => "",
                        };
                        asm.tool_call(tool_index, Some(&block.id), Some(&block.name), arguments)?;
                        self.tool_blocks.insert(index, tool_index);
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let index = parsed.index.unwrap_or(0);
                let delta = parsed.delta.unwrap_or_default();
                match delta.kind.as_str() {
                    "text_delta" => asm.text(&delta.text)?,
                    "thinking_delta" => asm.reasoning(&delta.thinking)?,
                    "signature_delta" => asm.signature(&delta.signature)?,
                    "input_json_delta" => {
                        let Some(tool_index) = self.tool_blocks.get(&index).copied() else {
                            return Err(Error::Protocol(format!(
                                "input_json_delta for block {index}, which is not a tool_use block"
                            )));
                        };
                        asm.tool_call(tool_index, None, None, &delta.partial_json)?;
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(reason) = parsed.delta.as_ref().and_then(|d| d.stop_reason.as_deref()) {
                    asm.finish_reason = Some(map_stop_reason(reason));
                }
                if let Some(usage) = parsed.usage {
                    self.add_usage(&usage, asm);
                }
            }
            "message_stop" => return Ok(Flow::Done),
            "error" => {
                let message = match &parsed.error {
                    Some(error) => error_text(error.get()),
                    None => "an error event with no error".to_owned(),
                };
                return Err(Error::Provider { message });
            }
            // `ping`, `content_block_stop` and event types added later.
            _ => {}
        }
        Ok(Flow::Continue)
    }

    /// Usage fields are cumulative: later values replace earlier ones.
    fn add_usage(&mut self, usage: &WireUsage, asm: &mut Assembler) {
        if let Some(n) = usage.input_tokens {
            self.uncached_input = n;
        }
        if let Some(n) = usage.cache_read_input_tokens {
            self.cache_read = Some(n);
        }
        if let Some(n) = usage.cache_creation_input_tokens {
            self.cache_write = n;
        }
        if let Some(n) = usage.output_tokens {
            self.output = n;
        }
        let input = self
            .uncached_input
            .saturating_add(self.cache_read.unwrap_or(0))
            .saturating_add(self.cache_write);
        asm.usage.input_tokens = input;
        asm.usage.output_tokens = self.output;
        asm.usage.total_tokens = input.saturating_add(self.output);
        asm.usage.cached_input_tokens = self.cache_read;
    }

    /// The body ended: complete only after `message_delta` gave a stop reason.
    pub(crate) fn on_eof(&mut self, asm: &mut Assembler) -> Result<Flow> {
        if asm.finish_reason.is_some() {
            Ok(Flow::Done)
        } else if self.started {
            Err(Error::Protocol("stream ended before message_stop".into()))
        } else {
            Err(Error::Protocol("stream ended without message_start".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_protocol::Usage;

    use super::*;
    use crate::sse::SseDecoder;
    use crate::{ChatChunk, ToolCall, ToolSpec};

    fn run(body: &str) -> (Vec<ChatChunk>, Result<()>) {
        let mut decoder = SseDecoder::default();
        let mut parser = StreamParser::default();
        let mut asm = Assembler::new(crate::DEFAULT_MAX_OUTPUT);
        let mut out = Vec::new();
        decoder.push(body.as_bytes());
        decoder.finish();
        let result = (|| {
            loop {
                let flow = match decoder.next_event()? {
                    Some(event) => parser.on_event(&event, &mut asm)?,
                    None => parser.on_eof(&mut asm)?,
                };
                while let Some(c) = asm.pop() {
                    out.push(c);
                }
                if flow == Flow::Done {
                    out.push(asm.finish(Duration::ZERO));
                    return Ok(());
                }
            }
        })();
        (out, result)
    }

    fn ev(name: &str, data: Value) -> String {
        format!("event: {name}\ndata: {data}\n\n")
    }

    #[test]
    fn body_merges_turns() {
        let request = ChatRequest::new(
            "claude",
            vec![
                Message::system("a"),
                Message::system("b"),
                Message::user("q"),
                Message::Assistant {
                    content: "calling".into(),
                    tool_calls: vec![
                        ToolCall {
                            id: "t1".into(),
                            name: "f".into(),
                            arguments: json!({"x": 1}),
                        },
                        ToolCall {
                            id: "t2".into(),
                            name: "g".into(),
                            arguments: json!("{broken"),
                        },
                    ],
                    reasoning: Some("hmm".into()),
                    reasoning_signature: Some("sig".into()),
                },
                Message::tool_result("t1", "1"),
                Message::tool_error("t2", "bad"),
            ],
        )
        .with_tools(vec![ToolSpec::new("f", "", json!({"type": "object"}))])
        .with_max_tokens(100);
        let body = request_body(&request);
        assert_eq!(body["system"], "a\n\nb");
        assert_eq!(body["max_tokens"], 100);
        assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0], json!({"role": "user", "content": "q"}));
        assert_eq!(messages[1]["content"][0]["type"], "thinking");
        assert_eq!(messages[1]["content"][2]["input"], json!({"x": 1}));
        assert_eq!(messages[1]["content"][3]["input"], json!({}));
        assert_eq!(messages[2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(messages[2]["content"][1]["is_error"], true);
    }

    #[test]
    fn parses_a_full_stream() {
        let mut body = String::new();
        body += &ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 7, "cache_read_input_tokens": 3, "output_tokens": 1}}}),
        );
        body += &ev("ping", json!({"type": "ping"}));
        body += &ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        );
        body += &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}),
        );
        body += &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
        );
        body += &ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        );
        body += &ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        );
        body += &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}}),
        );
        body += &ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
        );
        body += &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
        );
        body += &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "2}"}}),
        );
        body += &ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        );
        body += &ev("message_stop", json!({"type": "message_stop"}));
        let (chunks, result) = run(&body);
        result.unwrap();
        assert_eq!(chunks[0], ChatChunk::ReasoningDelta("hm".into()));
        assert_eq!(chunks[1], ChatChunk::TextDelta("Hi".into()));
        assert_eq!(
            chunks[2],
            ChatChunk::ToolCallDelta {
                index: 0,
                id: Some("toolu_1".into()),
                name: Some("f".into()),
                arguments: String::new()
            }
        );
        let Some(ChatChunk::Finished {
            finish_reason,
            usage,
            message,
            ..
        }) = chunks.last()
        else {
            panic!("{chunks:?}")
        };
        assert_eq!(*finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            *usage,
            Usage {
                input_tokens: 10,
                output_tokens: 9,
                total_tokens: 19,
                reasoning_tokens: None,
                cached_input_tokens: Some(3)
            }
        );
        assert_eq!(message.tool_calls()[0].arguments, json!({"a": 2}));
        assert_eq!(message.reasoning(), Some("hm"));
        let Message::Assistant {
            reasoning_signature,
            ..
        } = message
        else {
            panic!()
        };
        assert_eq!(reasoning_signature.as_deref(), Some("sig"));
    }

    #[test]
    fn errors() {
        let start = ev(
            "message_start",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 1}}}),
        );
        let (_, result) = run(&(start.clone()
            + &ev(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            )));
        assert!(
            matches!(result, Err(Error::Provider { message }) if message == "overloaded_error: Overloaded")
        );
        let (_, result) = run(&start);
        assert!(matches!(result, Err(Error::Protocol(_))));
        let (_, result) = run(&(start.clone()
            + &ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 5, "delta": {"type": "input_json_delta", "partial_json": "{"}}),
            )));
        assert!(matches!(result, Err(Error::Protocol(_))));
        let (_, result) = run("event: message_start\ndata: {oops\n\n");
        assert!(matches!(result, Err(Error::Protocol(_))));
    }

    #[test]
    fn usage_near_the_maximum_saturates() {
        let max = u64::MAX;
        let body = ev(
            "message_start",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": max, "cache_read_input_tokens": max, "output_tokens": 1}}}),
        ) + &ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": max}}),
        ) + &ev("message_stop", json!({"type": "message_stop"}));
        let (chunks, result) = run(&body);
        result.unwrap();
        let Some(ChatChunk::Finished { usage, .. }) = chunks.last() else {
            panic!("{chunks:?}")
        };
        assert_eq!(
            (usage.input_tokens, usage.output_tokens, usage.total_tokens),
            (max, max, max)
        );
    }

    #[test]
    fn a_tool_use_block_with_its_input_given_at_the_start() {
        let body = ev(
            "message_start",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 1}}}),
        ) + &ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {"city": "Paris"}}}),
        ) + &ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t2", "name": "g", "input": {}}}),
        ) + &ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"n\": 2}"}}),
        ) + &ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}}),
        ) + &ev("message_stop", json!({"type": "message_stop"}));
        let (chunks, result) = run(&body);
        result.unwrap();
        let Some(ChatChunk::Finished { message, .. }) = chunks.last() else {
            panic!("{chunks:?}")
        };
        let calls = message.tool_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].id.as_str(), calls[0].name.as_str()), ("t1", "f"));
        assert_eq!(calls[0].arguments, json!({"city": "Paris"}));
        assert_eq!(calls[1].arguments, json!({"n": 2}));
    }

    #[test]
    fn stop_reasons() {
        assert_eq!(map_stop_reason("end_turn"), FinishReason::Stop);
        assert_eq!(map_stop_reason("stop_sequence"), FinishReason::Stop);
        assert_eq!(map_stop_reason("max_tokens"), FinishReason::Length);
        assert_eq!(map_stop_reason("tool_use"), FinishReason::ToolCalls);
        assert_eq!(map_stop_reason("refusal"), FinishReason::ContentFilter);
        assert_eq!(map_stop_reason("pause_turn"), FinishReason::Other);
    }
}
