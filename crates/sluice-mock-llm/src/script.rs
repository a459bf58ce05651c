//! What the server answers: a [`Script`] of [`Turn`]s, each a list of [`Step`]s.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::Usage;
use sluice_protocol::payload::FinishReason;

use crate::RecordedRequest;

/// One tool call of [`Step::ParallelToolCalls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallSpec {
    /// Call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// The arguments' JSON text, sent in fragments.
    pub arguments: String,
}

impl ToolCallSpec {
    /// A call.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }
}

/// One thing the server does while answering a request.
///
/// Leading [`Step::Delay`]s delay the response head; an [`Step::HttpError`] first (after those
/// delays) is the whole answer. Any other step starts the event stream (OpenAI: a role chunk;
/// Anthropic: `message_start`). A turn that ends without [`Step::Finish`] ends the body there
/// (a truncated stream).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Output text, sent as one delta.
    Text(String),
    /// Reasoning text: OpenAI `delta.reasoning_content`; Anthropic a `thinking` block.
    Reasoning(String),
    /// A tool call; its arguments are sent in fragments of the script's split size.
    ToolCall {
        /// Call id.
        id: String,
        /// Tool name.
        name: String,
        /// The arguments' JSON text.
        arguments: String,
    },
    /// Several tool calls. OpenAI: their fragments interleaved round-robin (index 0, 1, 0, 1…);
    /// Anthropic: one `tool_use` block after the other, as Anthropic streams them.
    ParallelToolCalls(Vec<ToolCallSpec>),
    /// The usage reported when the turn finishes (OpenAI: a final chunk with no choices, if the
    /// request asked `stream_options.include_usage`; Anthropic: `message_start` and
    /// `message_delta`). `total_tokens` 0 means input + output.
    Usage(Usage),
    /// Ends the turn with this reason, normally: `[DONE]` or `message_stop`.
    Finish(FinishReason),
    /// Answers with this HTTP status and body (and `Retry-After`), instead of a stream. Only as
    /// the first step (after leading delays); later, it is sent as a mid-stream error.
    HttpError {
        /// Status code.
        status: u16,
        /// Response body.
        body: String,
        /// Sent as `Retry-After` in whole seconds (rounded up), plus `retry-after-ms` when not
        /// a whole number of seconds.
        retry_after: Option<Duration>,
    },
    /// An error payload in the stream, then the end of the body.
    MidStreamError(String),
    /// Nothing sent for this long (the connection stays open).
    Stall(Duration),
    /// A pause before the next step (at the start: before the response head).
    Delay(Duration),
    /// This raw text, then a blank line, written as it is.
    Malformed(String),
    /// A keep-alive: `: ping` (OpenAI) or a `ping` event (Anthropic).
    Ping,
    /// Aborts the connection without ending the body (after what was written is flushed).
    CloseConnection,
    /// `count` text deltas of `text`, at `per_second` (the first at once), on a fixed schedule.
    /// Every `{t}` in `text` is replaced by the time the delta is written, in Unix nanoseconds
    /// (so a client on the same machine can measure what happened to the token since).
    Paced {
        /// How many deltas.
        count: usize,
        /// Rate, deltas per second.
        per_second: f64,
        /// The text of each delta.
        text: String,
    },
}

/// The answer to one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Turn {
    /// What to do, in order.
    pub steps: Vec<Step>,
}

impl Turn {
    /// A turn of these steps.
    pub fn new(steps: Vec<Step>) -> Self {
        Self { steps }
    }

    /// Adds a step.
    pub fn then(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// `text` in deltas of at most 4 characters, usage 10 in / 5 out, finish `stop`.
    pub fn text(text: &str) -> Self {
        let chars: Vec<char> = text.chars().collect();
        let mut steps: Vec<Step> = chars
            .chunks(4)
            .map(|piece| Step::Text(piece.iter().collect()))
            .collect();
        steps.push(Step::Usage(usage(10, 5)));
        steps.push(Step::Finish(FinishReason::Stop));
        Self { steps }
    }

    /// One tool call, usage 10 in / 5 out, finish `tool_calls`.
    pub fn tool_call(id: &str, name: &str, arguments: &str) -> Self {
        Self::new(vec![
            Step::ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: arguments.into(),
            },
            Step::Usage(usage(10, 5)),
            Step::Finish(FinishReason::ToolCalls),
        ])
    }

    /// An HTTP error answer.
    pub fn http_error(status: u16, body: &str, retry_after: Option<Duration>) -> Self {
        Self::new(vec![Step::HttpError {
            status,
            body: body.into(),
            retry_after,
        }])
    }

    /// `count` deltas of `"tok "` at `per_second`, usage 10 in / `count` out, finish `stop`.
    pub fn paced(count: usize, per_second: f64) -> Self {
        Self::paced_text(count, per_second, "tok ")
    }

    /// Like [`paced`](Turn::paced), each delta `text` (see [`Step::Paced`] for `{t}`).
    pub fn paced_text(count: usize, per_second: f64, text: &str) -> Self {
        Self::new(vec![
            Step::Paced {
                count,
                per_second,
                text: text.into(),
            },
            Step::Usage(usage(10, count as u64)),
            Step::Finish(FinishReason::Stop),
        ])
    }
}

fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        reasoning_tokens: None,
        cached_input_tokens: None,
    }
}

/// A predicate on a request.
pub type Predicate = Arc<dyn Fn(&RecordedRequest) -> bool + Send + Sync>;

/// How the server picks the turn for each request, and how it writes.
///
/// For each request, in this order: the first rule whose predicate matches (rules are reused);
/// else the next turn of the in-order queue (each used once, across all conversations, so a
/// retried request gets the next turn); else the fallback turn; else a 500 answer saying the
/// script is exhausted.
///
/// ```
/// use sluice_mock_llm::{Script, Step, Turn};
/// use std::time::Duration;
/// let script = Script::new()
///     // First request: rate limited; the retry gets the answer.
///     .turn(Turn::http_error(429, "{\"error\":{\"message\":\"slow down\"}}", Some(Duration::from_secs(1))))
///     .turn(Turn::text("Hello"))
///     // Per conversation: the answer to the request with one assistant message so far.
///     .at_step(1, Turn::text("Done"))
///     .tool_call_split(3);
/// # let _ = script;
/// ```
#[derive(Clone)]
pub struct Script {
    pub(crate) rules: Vec<(Predicate, Arc<Turn>)>,
    pub(crate) queue: Vec<Arc<Turn>>,
    pub(crate) fallback: Option<Arc<Turn>>,
    pub(crate) options: Options,
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub tool_call_split: usize,
    pub write_size: Option<usize>,
    pub pacing: Duration,
    pub record: bool,
    pub api_key: Option<String>,
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("rules", &self.rules.len())
            .field("queue", &self.queue)
            .field("fallback", &self.fallback)
            .field("options", &self.options)
            .finish()
    }
}

impl Script {
    /// An empty script: every request gets a 500 until turns are added.
    pub fn new() -> Self {
        Self {
            rules: Vec::new(),
            queue: Vec::new(),
            fallback: None,
            options: Options {
                tool_call_split: 3,
                write_size: None,
                pacing: Duration::ZERO,
                record: true,
                api_key: None,
            },
        }
    }

    /// For benchmarks: every request gets `count` deltas at `per_second`.
    pub fn paced(count: usize, per_second: f64) -> Self {
        Self::new().fallback(Turn::paced(count, per_second))
    }

    /// Like [`paced`](Script::paced), each delta's text being `t<unix-ns> ` (the time it was
    /// written), for measuring the latency a server adds to each token.
    pub fn paced_stamped(count: usize, per_second: f64) -> Self {
        Self::new().fallback(Turn::paced_text(count, per_second, "t{t} "))
    }

    /// Appends a turn to the in-order queue.
    pub fn turn(mut self, turn: Turn) -> Self {
        self.queue.push(Arc::new(turn));
        self
    }

    /// Answers every request matching `predicate` with `turn` (checked before the queue).
    pub fn when(
        mut self,
        predicate: impl Fn(&RecordedRequest) -> bool + Send + Sync + 'static,
        turn: Turn,
    ) -> Self {
        self.rules.push((Arc::new(predicate), Arc::new(turn)));
        self
    }

    /// Per conversation: answers requests whose history holds `step` assistant messages (0 =
    /// the first call of a conversation, 1 = the call after the first answer…) with `turn`.
    pub fn at_step(self, step: usize, turn: Turn) -> Self {
        self.when(move |request| request.assistant_turns() == step, turn)
    }

    /// Answers requests nothing else matched with `turn`.
    pub fn fallback(mut self, turn: Turn) -> Self {
        self.fallback = Some(Arc::new(turn));
        self
    }

    /// Tool-call arguments are sent in fragments of this many characters (default 3, at least 1).
    pub fn tool_call_split(mut self, chars: usize) -> Self {
        self.options.tool_call_split = chars.max(1);
        self
    }

    /// Writes every event in pieces of this many bytes, each flushed on its own, so lines and
    /// UTF-8 sequences are split across reads (default: one write per event).
    pub fn write_size(mut self, bytes: usize) -> Self {
        self.options.write_size = Some(bytes.max(1));
        self
    }

    /// A pause before every event (default none).
    pub fn pacing(mut self, pause: Duration) -> Self {
        self.options.pacing = pause;
        self
    }

    /// Whether to keep the requests received (default true; turn off for long benchmarks:
    /// they are still counted).
    pub fn record(mut self, record: bool) -> Self {
        self.options.record = record;
        self
    }

    /// Requires this API key (`Authorization: Bearer` for OpenAI, `x-api-key` for Anthropic);
    /// requests without it get a 401.
    pub fn require_api_key(mut self, key: impl Into<String>) -> Self {
        self.options.api_key = Some(key.into());
        self
    }
}
