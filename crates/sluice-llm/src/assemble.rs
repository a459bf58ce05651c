//! The assembler: turns wire deltas into [`ChatChunk`]s and builds the final message.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use sluice_protocol::Usage;
use sluice_protocol::payload::FinishReason;

use crate::error::MAX_TOOL_CALLS;
use crate::message::{ToolCall, parse_arguments};
use crate::{ChatChunk, Error, Message, Result};

#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// Collects what a wire parser reports, queues the chunks to yield, and assembles the message.
///
/// It holds the whole answer until the end, so it enforces the answer's limits: at most
/// `max_output` bytes of text, reasoning, signature and tool-call arguments together, and at
/// most [`MAX_TOOL_CALLS`] calls. A report past either is an [`Error::TooLarge`].
#[derive(Debug)]
pub(crate) struct Assembler {
    pending: VecDeque<ChatChunk>,
    /// Chunks queued so far, in all (the output timeout watches it move).
    outputs: u64,
    /// Bytes of output held, and the most allowed.
    bytes: usize,
    max_output: usize,
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
    /// An empty assembler allowing `max_output` bytes of output.
    pub fn new(max_output: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            outputs: 0,
            bytes: 0,
            max_output,
            text: String::new(),
            reasoning: String::new(),
            signature: None,
            calls: BTreeMap::new(),
            finish_reason: None,
            usage: Usage::default(),
        }
    }

    /// The next chunk to yield.
    pub fn pop(&mut self) -> Option<ChatChunk> {
        self.pending.pop_front()
    }

    /// Whether any chunk was produced: from then on the call is committed and never retried.
    pub fn committed(&self) -> bool {
        self.outputs > 0
    }

    /// How many chunks were produced so far.
    pub fn outputs(&self) -> u64 {
        self.outputs
    }

    /// Counts `len` more bytes of output against the limit.
    fn take(&mut self, len: usize) -> Result<()> {
        self.bytes = self.bytes.saturating_add(len);
        if self.bytes > self.max_output {
            return Err(Error::TooLarge(format!(
                "more than {} bytes of output (the provider's max_output)",
                self.max_output
            )));
        }
        Ok(())
    }

    /// Output text.
    pub fn text(&mut self, text: &str) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        self.take(text.len())?;
        self.text.push_str(text);
        self.push(ChatChunk::TextDelta(text.to_owned()));
        Ok(())
    }

    /// Reasoning text.
    pub fn reasoning(&mut self, text: &str) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        self.take(text.len())?;
        self.reasoning.push_str(text);
        self.push(ChatChunk::ReasoningDelta(text.to_owned()));
        Ok(())
    }

    /// Anthropic's signature of the reasoning.
    pub fn signature(&mut self, signature: &str) -> Result<()> {
        self.take(signature.len())?;
        self.signature
            .get_or_insert_with(String::new)
            .push_str(signature);
        Ok(())
    }

    /// A tool-call fragment. The id and name are kept from their first appearance; repeats
    /// (some servers send them on every fragment) are not passed on.
    pub fn tool_call(
        &mut self,
        index: u32,
        id: Option<&str>,
        name: Option<&str>,
        arguments: &str,
    ) -> Result<()> {
        if !self.calls.contains_key(&index) && self.calls.len() >= MAX_TOOL_CALLS {
            return Err(Error::TooLarge(format!(
                "more than {MAX_TOOL_CALLS} tool calls"
            )));
        }
        let known = self.calls.get(&index);
        let id = id.filter(|id| !id.is_empty() && known.is_none_or(|c| c.id.is_empty()));
        let name = name.filter(|name| !name.is_empty() && known.is_none_or(|c| c.name.is_empty()));
        self.take(arguments.len() + id.map_or(0, str::len) + name.map_or(0, str::len))?;
        let call = self.calls.entry(index).or_default();
        if let Some(id) = id {
            call.id = id.to_owned();
        }
        if let Some(name) = name {
            call.name = name.to_owned();
        }
        call.arguments.push_str(arguments);
        if id.is_none() && name.is_none() && arguments.is_empty() {
            return Ok(());
        }
        let chunk = ChatChunk::ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            arguments: arguments.to_owned(),
        };
        self.push(chunk);
        Ok(())
    }

    fn push(&mut self, chunk: ChatChunk) {
        self.outputs += 1;
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
            usage.total_tokens = usage.input_tokens.saturating_add(usage.output_tokens);
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
        let mut asm = Assembler::new(1 << 20);
        assert!(!asm.committed());
        asm.text("").unwrap();
        assert!(!asm.committed());
        asm.tool_call(1, Some("b"), Some("g"), "").unwrap();
        asm.tool_call(0, Some("a"), Some("f"), "{\"x\"").unwrap();
        asm.tool_call(1, Some("b"), None, "{}").unwrap();
        asm.tool_call(0, None, None, ":1}").unwrap();
        asm.tool_call(0, None, None, "").unwrap();
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

    #[test]
    fn output_past_the_limits_is_refused() {
        let mut asm = Assembler::new(10);
        asm.text("12345").unwrap();
        asm.reasoning("678").unwrap();
        // Repeated ids and names are not kept, so they do not count.
        asm.tool_call(0, Some("a"), Some("f"), "").unwrap();
        asm.tool_call(0, Some("a"), Some("f"), "").unwrap();
        let err = asm.text("xy").unwrap_err();
        assert!(
            matches!(&err, Error::TooLarge(m) if m.contains("10 bytes")),
            "{err}"
        );
        let err = Assembler::new(10).signature(&"s".repeat(11)).unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{err}");

        let mut asm = Assembler::new(1 << 20);
        for index in 0..MAX_TOOL_CALLS {
            let index = u32::try_from(index).unwrap();
            asm.tool_call(index, Some("id"), Some("f"), "{}").unwrap();
        }
        // More fragments of a known call are fine; a new call is not.
        asm.tool_call(0, None, None, " ").unwrap();
        let err = asm.tool_call(u32::MAX, None, None, "{}").unwrap_err();
        assert!(
            matches!(&err, Error::TooLarge(m) if m.contains("tool calls")),
            "{err}"
        );
    }

    #[test]
    fn usage_totals_saturate() {
        let mut asm = Assembler::new(16);
        asm.usage.input_tokens = u64::MAX;
        asm.usage.output_tokens = 2;
        let ChatChunk::Finished { usage, .. } = asm.finish(Duration::ZERO) else {
            unreachable!()
        };
        assert_eq!(usage.total_tokens, u64::MAX);
    }
}
