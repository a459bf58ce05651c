//! The assembler: turns wire deltas into [`ChatChunk`]s and builds the final message.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use sluice_protocol::Usage;
use sluice_protocol::payload::FinishReason;

use crate::message::{ToolCall, parse_arguments};
use crate::{ChatChunk, Message};

#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// Collects what a wire parser reports, queues the chunks to yield, and assembles the message.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    pending: VecDeque<ChatChunk>,
    produced: bool,
    text: String,
    reasoning: String,
    signature: Option<String>,
    calls: BTreeMap<u32, PartialCall>,
    /// Why the model stopped, once the wire said so.
    pub finish_reason: Option<FinishReason>,
    /// Usage so far.
    pub usage: Usage,
}

impl Assembler {
    /// The next chunk to yield.
    pub fn pop(&mut self) -> Option<ChatChunk> {
        self.pending.pop_front()
    }

    /// Whether any chunk was produced: from then on the call is committed and never retried.
    pub fn committed(&self) -> bool {
        self.produced
    }

    /// Output text.
    pub fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.text.push_str(text);
        self.push(ChatChunk::TextDelta(text.to_owned()));
    }

    /// Reasoning text.
    pub fn reasoning(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.reasoning.push_str(text);
        self.push(ChatChunk::ReasoningDelta(text.to_owned()));
    }

    /// Anthropic's signature of the reasoning.
    pub fn signature(&mut self, signature: &str) {
        self.signature
            .get_or_insert_with(String::new)
            .push_str(signature);
    }

    /// A tool-call fragment. The id and name are kept from their first appearance; repeats
    /// (some servers send them on every fragment) are not passed on.
    pub fn tool_call(&mut self, index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) {
        let call = self.calls.entry(index).or_default();
        let id = id.filter(|id| !id.is_empty() && call.id.is_empty());
        let name = name.filter(|name| !name.is_empty() && call.name.is_empty());
        if let Some(id) = id {
            call.id = id.to_owned();
        }
        if let Some(name) = name {
            call.name = name.to_owned();
        }
        call.arguments.push_str(arguments);
        if id.is_none() && name.is_none() && arguments.is_empty() {
            return;
        }
        let chunk = ChatChunk::ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            arguments: arguments.to_owned(),
        };
        self.push(chunk);
    }

    fn push(&mut self, chunk: ChatChunk) {
        self.produced = true;
        self.pending.push_back(chunk);
    }

    /// The final chunk. Without a finish reason from the wire, `tool_calls` if the model called
    /// tools, else `other`.
    pub fn finish(&mut self, latency: Duration) -> ChatChunk {
        let tool_calls: Vec<ToolCall> = std::mem::take(&mut self.calls)
            .into_values()
            .map(|call| ToolCall {
                id: call.id,
                name: call.name,
                arguments: parse_arguments(&call.arguments),
            })
            .collect();
        let finish_reason = self.finish_reason.unwrap_or(if tool_calls.is_empty() {
            FinishReason::Other
        } else {
            FinishReason::ToolCalls
        });
        let reasoning = std::mem::take(&mut self.reasoning);
        let message = Message::Assistant {
            content: std::mem::take(&mut self.text),
            tool_calls,
            reasoning: (!reasoning.is_empty()).then_some(reasoning),
            reasoning_signature: self.signature.take(),
        };
        let mut usage = self.usage;
        if usage.total_tokens == 0 {
            usage.total_tokens = usage.input_tokens + usage.output_tokens;
        }
        ChatChunk::Finished {
            finish_reason,
            usage,
            message,
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn assembles_interleaved_calls() {
        let mut asm = Assembler::default();
        assert!(!asm.committed());
        asm.text("");
        assert!(!asm.committed());
        asm.tool_call(1, Some("b"), Some("g"), "");
        asm.tool_call(0, Some("a"), Some("f"), "{\"x\"");
        asm.tool_call(1, Some("b"), None, "{}");
        asm.tool_call(0, None, None, ":1}");
        asm.tool_call(0, None, None, "");
        assert!(asm.committed());
        let chunks: Vec<_> = std::iter::from_fn(|| asm.pop()).collect();
        assert_eq!(chunks.len(), 4);
        assert_eq!(
            chunks[2],
            ChatChunk::ToolCallDelta {
                index: 1,
                id: None,
                name: None,
                arguments: "{}".into()
            }
        );
        let ChatChunk::Finished {
            finish_reason,
            message,
            ..
        } = asm.finish(Duration::ZERO)
        else {
            unreachable!()
        };
        assert_eq!(finish_reason, FinishReason::ToolCalls);
        assert_eq!(message.tool_calls()[0].arguments, json!({"x": 1}));
        assert_eq!(message.tool_calls()[0].name, "f");
        assert_eq!(message.tool_calls()[1].id, "b");
    }
}
