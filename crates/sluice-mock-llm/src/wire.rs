//! The emitter: turns a turn's steps into the bytes of either wire format, with pacing.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use sluice_protocol::Usage;
use sluice_protocol::payload::FinishReason;
use tokio::time::Instant;

use crate::WireFormat;
use crate::script::{Options, Step, ToolCallSpec, Turn};
use crate::server::Shared;

/// A piece of the body, and the pause before it.
struct Frame {
    pause: Duration,
    bytes: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
}

struct PacedState {
    left: usize,
    sent: u32,
    interval: Duration,
    start: Instant,
    text: String,
}

/// Writes one streamed answer. Its `Drop` counts the stream as completed, or as closed by the
/// client when it is dropped before its end.
pub(crate) struct Emitter {
    shared: Arc<Shared>,
    format: WireFormat,
    turn: Arc<Turn>,
    pos: usize,
    options: Options,
    model: String,
    msg_id: String,
    include_usage: bool,
    usage: Option<Usage>,
    out: VecDeque<Frame>,
    /// Anthropic: the open content block and the next block index.
    open_block: Option<(u32, Block)>,
    next_block: u32,
    /// OpenAI: the next tool-call index.
    next_tool: u32,
    paced: Option<PacedState>,
    ending: bool,
    /// Reached its end.
    finished: bool,
    /// Aborted on purpose by [`Step::CloseConnection`].
    aborted: bool,
}

impl Emitter {
    pub(crate) fn new(
        shared: Arc<Shared>,
        format: WireFormat,
        turn: Arc<Turn>,
        pos: usize,
        model: String,
        request_number: usize,
        include_usage: bool,
    ) -> Self {
        let options = shared.options.clone();
        let usage = turn.steps.iter().rev().find_map(|s| match s {
            Step::Usage(u) => Some(*u),
            _ => None,
        });
        shared.active.fetch_add(1, Ordering::SeqCst);
        let active = shared.active.load(Ordering::SeqCst);
        shared.max_active.fetch_max(active, Ordering::SeqCst);
        let mut emitter = Self {
            shared,
            format,
            turn,
            pos,
            options,
            model,
            msg_id: format!("mock_{request_number}"),
            include_usage,
            usage,
            out: VecDeque::new(),
            open_block: None,
            next_block: 0,
            next_tool: 0,
            paced: None,
            ending: false,
            finished: false,
            aborted: false,
        };
        emitter.prelude();
        emitter
    }

    /// The next piece of the body; `None` at its end.
    pub(crate) async fn next_frame(&mut self) -> Option<Result<Bytes, io::Error>> {
        loop {
            if let Some(frame) = self.out.pop_front() {
                if !frame.pause.is_zero() {
                    tokio::time::sleep(frame.pause).await;
                }
                return Some(Ok(frame.bytes));
            }
            if self.ending {
                self.finished = true;
                return None;
            }
            if let Some(paced) = &mut self.paced {
                if paced.left == 0 {
                    self.paced = None;
                    continue;
                }
                let due = paced.start + paced.interval * paced.sent;
                tokio::time::sleep_until(due).await;
                paced.left -= 1;
                paced.sent += 1;
                let text = if paced.text.contains("{t}") {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos());
                    paced.text.replace("{t}", &now.to_string())
                } else {
                    paced.text.clone()
                };
                self.text(&text);
                continue;
            }
            let Some(step) = self.turn.steps.get(self.pos).cloned() else {
                self.ending = true;
                continue;
            };
            self.pos += 1;
            match step {
                Step::Text(text) => self.text(&text),
                Step::Reasoning(text) => self.reasoning(&text),
                Step::ToolCall {
                    id,
                    name,
                    arguments,
                } => self.tool_calls(&[ToolCallSpec {
                    id,
                    name,
                    arguments,
                }]),
                Step::ParallelToolCalls(calls) => self.tool_calls(&calls),
                Step::Usage(_) => {}
                Step::Finish(reason) => self.finish(reason),
                Step::HttpError { body, .. } => self.error(&body),
                Step::MidStreamError(message) => self.error(&message),
                Step::Stall(pause) | Step::Delay(pause) => tokio::time::sleep(pause).await,
                Step::Malformed(raw) => self.raw(format!("{raw}\n\n")),
                Step::Ping => match self.format {
                    WireFormat::OpenAi => self.raw(": ping\n\n".into()),
                    WireFormat::Anthropic => self.event("ping", json!({"type": "ping"})),
                },
                Step::CloseConnection => {
                    // Returning `Pending` once lets the server flush what was written before.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.aborted = true;
                    self.shared.server_closes.fetch_add(1, Ordering::SeqCst);
                    return Some(Err(io::Error::other("the script closes the connection")));
                }
                Step::Paced {
                    count,
                    per_second,
                    text,
                } => {
                    let interval = if per_second > 0.0 && per_second.is_finite() {
                        Duration::from_secs_f64(1.0 / per_second)
                    } else {
                        Duration::ZERO
                    };
                    self.paced = Some(PacedState {
                        left: count,
                        sent: 0,
                        interval,
                        start: Instant::now(),
                        text,
                    });
                }
            }
        }
    }

    /// Queues `bytes` as one event, split per the write size.
    fn raw(&mut self, text: String) {
        let bytes = Bytes::from(text);
        match self.options.write_size {
            Some(size) if size < bytes.len() => {
                let mut start = 0;
                while start < bytes.len() {
                    let end = (start + size).min(bytes.len());
                    let pause = if start == 0 {
                        self.options.pacing
                    } else {
                        Duration::from_millis(2)
                    };
                    self.out.push_back(Frame {
                        pause,
                        bytes: bytes.slice(start..end),
                    });
                    start = end;
                }
            }
            _ => self.out.push_back(Frame {
                pause: self.options.pacing,
                bytes,
            }),
        }
    }

    fn data(&mut self, value: Value) {
        self.raw(format!("data: {value}\n\n"));
    }

    fn event(&mut self, name: &str, value: Value) {
        self.raw(format!("event: {name}\ndata: {value}\n\n"));
    }

    fn openai_chunk(&self, choices: Value) -> Value {
        json!({
            "id": format!("chatcmpl-{}", self.msg_id),
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": choices,
        })
    }

    fn openai_delta(&mut self, delta: Value) {
        let chunk = self.openai_chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]));
        self.data(chunk);
    }

    fn prelude(&mut self) {
        match self.format {
            WireFormat::OpenAi => {
                self.openai_delta(json!({"role": "assistant", "content": ""}));
            }
            WireFormat::Anthropic => {
                let usage = self.usage.unwrap_or_default();
                let cached = usage.cached_input_tokens.unwrap_or(0);
                let mut wire_usage = json!({
                    "input_tokens": usage.input_tokens.saturating_sub(cached),
                    "output_tokens": 1,
                });
                if let Some(cached) = usage.cached_input_tokens {
                    wire_usage["cache_read_input_tokens"] = json!(cached);
                }
                let message = json!({
                    "type": "message_start",
                    "message": {
                        "id": format!("msg_{}", self.msg_id),
                        "type": "message",
                        "role": "assistant",
                        "model": self.model,
                        "content": [],
                        "stop_reason": null,
                        "stop_sequence": null,
                        "usage": wire_usage,
                    }
                });
                self.event("message_start", message);
            }
        }
    }

    /// Anthropic: makes sure a block of `kind` is open, closing another one.
    fn ensure_block(&mut self, kind: Block) -> u32 {
        if let Some((index, open)) = self.open_block {
            if open == kind {
                return index;
            }
            self.close_block();
        }
        let index = self.next_block;
        self.next_block += 1;
        let block = match kind {
            Block::Text => json!({"type": "text", "text": ""}),
            Block::Thinking => json!({"type": "thinking", "thinking": ""}),
        };
        self.event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        self.open_block = Some((index, kind));
        index
    }

    fn close_block(&mut self) {
        if let Some((index, kind)) = self.open_block.take() {
            if kind == Block::Thinking {
                self.event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": "mock-signature"}}),
                );
            }
            self.event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    fn text(&mut self, text: &str) {
        match self.format {
            WireFormat::OpenAi => self.openai_delta(json!({"content": text})),
            WireFormat::Anthropic => {
                let index = self.ensure_block(Block::Text);
                self.event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "text_delta", "text": text}}),
                );
            }
        }
    }

    fn reasoning(&mut self, text: &str) {
        match self.format {
            WireFormat::OpenAi => self.openai_delta(json!({"reasoning_content": text})),
            WireFormat::Anthropic => {
                let index = self.ensure_block(Block::Thinking);
                self.event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "thinking_delta", "thinking": text}}),
                );
            }
        }
    }

    fn fragments(&self, arguments: &str) -> Vec<String> {
        let chars: Vec<char> = arguments.chars().collect();
        chars
            .chunks(self.options.tool_call_split)
            .map(|c| c.iter().collect())
            .collect()
    }

    fn tool_calls(&mut self, calls: &[ToolCallSpec]) {
        match self.format {
            WireFormat::OpenAi => {
                let first_index = self.next_tool;
                self.next_tool += u32::try_from(calls.len()).unwrap_or(0);
                let fragments: Vec<Vec<String>> =
                    calls.iter().map(|c| self.fragments(&c.arguments)).collect();
                let rounds = fragments.iter().map(Vec::len).max().unwrap_or(0);
                for (i, call) in calls.iter().enumerate() {
                    let index = first_index + u32::try_from(i).unwrap_or(0);
                    self.openai_delta(json!({"tool_calls": [{
                        "index": index, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }]}));
                }
                for round in 0..rounds {
                    for (i, pieces) in fragments.iter().enumerate() {
                        if let Some(piece) = pieces.get(round) {
                            let index = first_index + u32::try_from(i).unwrap_or(0);
                            self.openai_delta(json!({"tool_calls": [{
                                "index": index, "function": {"arguments": piece},
                            }]}));
                        }
                    }
                }
            }
            WireFormat::Anthropic => {
                for call in calls {
                    self.close_block();
                    let index = self.next_block;
                    self.next_block += 1;
                    self.event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                               "content_block": {"type": "tool_use", "id": call.id,
                                                 "name": call.name, "input": {}}}),
                    );
                    for piece in self.fragments(&call.arguments) {
                        self.event(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "input_json_delta", "partial_json": piece}}),
                        );
                    }
                    self.event(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": index}),
                    );
                }
            }
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        let usage = self.usage.map(|mut u| {
            if u.total_tokens == 0 {
                u.total_tokens = u.input_tokens.saturating_add(u.output_tokens);
            }
            u
        });
        match self.format {
            WireFormat::OpenAi => {
                let wire = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::ToolCalls => "tool_calls",
                    FinishReason::ContentFilter => "content_filter",
                    FinishReason::Error => "error",
                    FinishReason::Other => "other",
                };
                let chunk =
                    self.openai_chunk(json!([{"index": 0, "delta": {}, "finish_reason": wire}]));
                self.data(chunk);
                if let Some(u) = usage.filter(|_| self.include_usage) {
                    let mut wire_usage = json!({
                        "prompt_tokens": u.input_tokens,
                        "completion_tokens": u.output_tokens,
                        "total_tokens": u.total_tokens,
                    });
                    if let Some(cached) = u.cached_input_tokens {
                        wire_usage["prompt_tokens_details"] = json!({"cached_tokens": cached});
                    }
                    if let Some(reasoning) = u.reasoning_tokens {
                        wire_usage["completion_tokens_details"] =
                            json!({"reasoning_tokens": reasoning});
                    }
                    let mut chunk = self.openai_chunk(json!([]));
                    chunk["usage"] = wire_usage;
                    self.data(chunk);
                }
                self.raw("data: [DONE]\n\n".into());
            }
            WireFormat::Anthropic => {
                self.close_block();
                let wire = match reason {
                    FinishReason::Stop => "end_turn",
                    FinishReason::Length => "max_tokens",
                    FinishReason::ToolCalls => "tool_use",
                    FinishReason::ContentFilter => "refusal",
                    FinishReason::Error | FinishReason::Other => "pause_turn",
                };
                let output = usage.map_or(0, |u| u.output_tokens);
                self.event(
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": wire, "stop_sequence": null},
                           "usage": {"output_tokens": output}}),
                );
                self.event("message_stop", json!({"type": "message_stop"}));
            }
        }
        self.ending = true;
    }

    fn error(&mut self, message: &str) {
        match self.format {
            WireFormat::OpenAi => self.data(json!({"error": {
                "message": message, "type": "server_error", "param": null, "code": null,
            }})),
            WireFormat::Anthropic => self.event(
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": message}}),
            ),
        }
        self.ending = true;
    }
}

impl Drop for Emitter {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        if self.finished {
            self.shared.completed.fetch_add(1, Ordering::SeqCst);
        } else if !self.aborted {
            self.shared
                .client_disconnects
                .fetch_add(1, Ordering::SeqCst);
        }
        self.shared.notify.notify_waiters();
    }
}
