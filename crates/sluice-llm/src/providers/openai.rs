//! OpenAI-compatible Chat Completions (`POST {base_url}/chat/completions`), streaming.
//!
//! The request asks for `stream: true` and `stream_options: {include_usage: true}`; the answer is
//! a stream of `data: {chat.completion.chunk}` events ending with `data: [DONE]`. Text comes in
//! `delta.content`, reasoning in `delta.reasoning_content` (vLLM, DeepSeek, llama.cpp) or
//! `delta.reasoning` (Ollama, OpenRouter), tool calls as index-keyed fragments in
//! `delta.tool_calls`, usage in a final chunk with no choices. An `error` object in the stream
//! ends the call with [`Error::Provider`].

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sluice_protocol::payload::FinishReason;

use super::{Flow, error_text, merge_extra, parse_json};
use crate::assemble::Assembler;
use crate::message::arguments_text;
use crate::sse::SseEvent;
use crate::{ChatRequest, Error, Message, Result};

/// The base URL of the OpenAI API; the request goes to `{base_url}/chat/completions`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The path appended to the base URL.
pub const PATH: &str = "/chat/completions";

/// Maps an OpenAI `finish_reason` to the protocol's.
pub fn map_finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" | "eos" | "end_turn" => FinishReason::Stop,
        "length" | "max_tokens" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        "error" => FinishReason::Error,
        _ => FinishReason::Other,
    }
}

/// The JSON body of a streaming Chat Completions request.
///
/// ```
/// use sluice_llm::{ChatRequest, Message};
/// let body = sluice_llm::providers::openai::request_body(
///     &ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]));
/// assert_eq!(body["stream"], true);
/// assert_eq!(body["stream_options"]["include_usage"], true);
/// assert_eq!(body["messages"][0]["content"], "Hi");
/// ```
pub fn request_body(request: &ChatRequest) -> Value {
    let messages: Vec<Value> = request.messages.iter().map(message_json).collect();
    let mut body = json!({
        "model": request.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Value::Object(map) = &mut body {
        if !request.tools.is_empty() {
            let tools: Vec<Value> = request
                .tools
                .iter()
                .map(|tool| {
                    json!({
                        "type": "function",
                        "function": {
                            "name": tool.name,
                            "description": tool.description,
                            "parameters": tool.parameters,
                        }
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
        if let Some(n) = request.max_tokens {
            map.insert("max_tokens".into(), json!(n));
        }
        if !request.stop.is_empty() {
            map.insert("stop".into(), json!(request.stop));
        }
    }
    merge_extra(&mut body, &request.extra);
    body
}

fn message_json(message: &Message) -> Value {
    match message {
        Message::System { content } => json!({"role": "system", "content": content}),
        Message::User { content } => json!({"role": "user", "content": content}),
        Message::Assistant {
            content,
            tool_calls,
            ..
        } => {
            if tool_calls.is_empty() {
                return json!({"role": "assistant", "content": content});
            }
            let calls: Vec<Value> = tool_calls
                .iter()
                .map(|call| {
                    json!({
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": arguments_text(&call.arguments)},
                    })
                })
                .collect();
            let content = if content.is_empty() {
                Value::Null
            } else {
                Value::String(content.clone())
            };
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        }
        Message::Tool {
            tool_call_id,
            content,
            ..
        } => json!({"role": "tool", "tool_call_id": tool_call_id, "content": content}),
    }
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Kept as text: parsed only when small (see [`error_text`]).
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// The stream state of one OpenAI-compatible response.
#[derive(Debug, Default)]
pub(crate) struct StreamParser {
    saw_chunk: bool,
}

impl StreamParser {
    pub(crate) fn on_event(&mut self, event: &SseEvent, asm: &mut Assembler) -> Result<Flow> {
        let data = event.data.trim();
        if event.event.as_deref() == Some("error") {
            return Err(Error::Provider {
                message: error_text(data),
            });
        }
        if data == "[DONE]" {
            return Ok(Flow::Done);
        }
        if data.is_empty() {
            return Ok(Flow::Continue);
        }
        let chunk: Chunk = parse_json(data)?;
        if let Some(error) = chunk.error.filter(|e| e.get() != "null") {
            return Err(Error::Provider {
                message: error_text(error.get()),
            });
        }
        self.saw_chunk = true;
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index != 0 {
                continue;
            }
            let delta = choice.delta.unwrap_or_default();
            if let Some(text) = delta.reasoning_content.or(delta.reasoning) {
                asm.reasoning(&text)?;
            }
            if let Some(text) = delta.content {
                asm.text(&text)?;
            }
            for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
                let index = call
                    .index
                    .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX));
                let (name, arguments) = match call.function {
                    Some(f) => (f.name, f.arguments.unwrap_or_default()),
                    None => (None, String::new()),
                };
                asm.tool_call(index, call.id.as_deref(), name.as_deref(), &arguments)?;
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                asm.finish_reason = Some(map_finish_reason(&reason));
            }
        }
        if let Some(usage) = chunk.usage {
            asm.usage.input_tokens = usage.prompt_tokens;
            asm.usage.output_tokens = usage.completion_tokens;
            asm.usage.total_tokens = usage
                .total_tokens
                .unwrap_or(usage.prompt_tokens.saturating_add(usage.completion_tokens));
            asm.usage.cached_input_tokens =
                usage.prompt_tokens_details.and_then(|d| d.cached_tokens);
            asm.usage.reasoning_tokens = usage
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens);
        }
        Ok(Flow::Continue)
    }

    /// The body ended: complete if the model said why it stopped (some servers omit `[DONE]`).
    pub(crate) fn on_eof(&mut self, asm: &mut Assembler) -> Result<Flow> {
        if asm.finish_reason.is_some() {
            Ok(Flow::Done)
        } else if self.saw_chunk {
            Err(Error::Protocol(
                "stream ended before a finish reason or [DONE]".into(),
            ))
        } else {
            Err(Error::Protocol("stream ended without any chunk".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use sluice_protocol::Usage;

    use super::*;
    use crate::sse::SseDecoder;
    use crate::{ChatChunk, ToolSpec};

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
        while let Some(c) = asm.pop() {
            out.push(c);
        }
        (out, result)
    }

    #[test]
    fn body_has_tools_and_history() {
        let request = ChatRequest::new(
            "m",
            vec![
                Message::system("s"),
                Message::Assistant {
                    content: String::new(),
                    tool_calls: vec![crate::ToolCall {
                        id: "c1".into(),
                        name: "f".into(),
                        arguments: json!({"a": 1}),
                    }],
                    reasoning: Some("r".into()),
                    reasoning_signature: None,
                },
                Message::tool_result("c1", "ok"),
            ],
        )
        .with_tools(vec![ToolSpec::new(
            "f",
            "does f",
            json!({"type": "object"}),
        )])
        .with_max_tokens(5)
        .with_extra("max_tokens", json!(7));
        let body = request_body(&request);
        assert_eq!(body["tools"][0]["function"]["name"], "f");
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(
            body["messages"][1]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(
            body["messages"][2],
            json!({"role": "tool", "tool_call_id": "c1", "content": "ok"})
        );
        assert_eq!(body["max_tokens"], 7);
    }

    #[test]
    fn parses_text_reasoning_tools_usage() {
        let body = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"think\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"b\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"x\\\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
            "data: [DONE]\n\n",
        );
        let (chunks, result) = run(body);
        result.unwrap();
        assert_eq!(chunks[0], ChatChunk::ReasoningDelta("think".into()));
        assert_eq!(chunks[1], ChatChunk::TextDelta("Hel".into()));
        let Some(ChatChunk::Finished {
            finish_reason,
            usage,
            message,
            ..
        }) = chunks.last()
        else {
            panic!("no finish: {chunks:?}")
        };
        assert_eq!(*finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            *usage,
            Usage {
                input_tokens: 10,
                output_tokens: 5,
                total_tokens: 15,
                reasoning_tokens: Some(2),
                cached_input_tokens: Some(4)
            }
        );
        assert_eq!(message.text(), "Hel");
        assert_eq!(message.tool_calls()[0].arguments, json!({"x": 1}));
        assert_eq!(message.tool_calls()[1].arguments, json!({}));
    }

    #[test]
    fn errors_and_truncation() {
        let (_, result) = run(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
        );
        assert!(
            matches!(result, Err(Error::Provider { message }) if message == "server_error: overloaded")
        );
        let (_, result) = run("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        assert!(matches!(result, Err(Error::Protocol(_))));
        let (_, result) = run("data: {not json\n\n");
        assert!(matches!(result, Err(Error::Protocol(_))));
        let (_, result) = run("data: {\"choices\":\"x\"}\n\n");
        assert!(matches!(result, Err(Error::Protocol(_))));
        let (_, result) = run("event: error\ndata: {\"error\":{\"message\":\"bad\"}}\n\n");
        assert!(matches!(result, Err(Error::Provider { message }) if message == "bad"));
        // EOF after a finish reason without [DONE] is complete.
        let (chunks, result) = run(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"length\"}]}\n\n",
        );
        result.unwrap();
        assert!(matches!(
            chunks.last(),
            Some(ChatChunk::Finished {
                finish_reason: FinishReason::Length,
                ..
            })
        ));
    }

    #[test]
    fn usage_near_the_maximum_saturates() {
        let max = u64::MAX;
        let body = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}},\"finish_reason\":\"stop\"}}]}}\n\n\
             data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{max},\"completion_tokens\":9}}}}\n\n\
             data: [DONE]\n\n"
        );
        let (chunks, result) = run(&body);
        result.unwrap();
        let Some(ChatChunk::Finished { usage, .. }) = chunks.last() else {
            panic!("{chunks:?}")
        };
        assert_eq!((usage.input_tokens, usage.total_tokens), (max, max));
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(map_finish_reason("stop"), FinishReason::Stop);
        assert_eq!(map_finish_reason("length"), FinishReason::Length);
        assert_eq!(map_finish_reason("tool_calls"), FinishReason::ToolCalls);
        assert_eq!(map_finish_reason("function_call"), FinishReason::ToolCalls);
        assert_eq!(
            map_finish_reason("content_filter"),
            FinishReason::ContentFilter
        );
        assert_eq!(map_finish_reason("weird"), FinishReason::Other);
    }
}
