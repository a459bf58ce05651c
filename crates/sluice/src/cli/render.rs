//! The human view of a run's events: model text inline as it streams, steps and tool calls as
//! indented lines with durations, progress bars, prompts, and a final status line.
//!
//! On a terminal, colours are used and "transient" lines (progress bars, a counter of repeated
//! workflow events) are redrawn in place; elsewhere every line is printed once, plainly.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Write};

use serde_json::Value;
use sluice_client::{Event, Timestamp, Usage, kind};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `chain-completed`.
    Completed,
    /// `chain-error`.
    Failed,
    /// `chain-cancelled`.
    Cancelled,
}

impl Outcome {
    /// Of a terminal event type.
    pub fn of_type(t: &str) -> Option<Self> {
        match t {
            kind::CHAIN_COMPLETED => Some(Self::Completed),
            kind::CHAIN_ERROR => Some(Self::Failed),
            kind::CHAIN_CANCELLED => Some(Self::Cancelled),
            _ => None,
        }
    }

    /// The process exit code: 0, 1 or 130.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Completed => super::EXIT_OK,
            Self::Failed => super::EXIT_FAILED,
            Self::Cancelled => super::EXIT_CANCELLED,
        }
    }
}

/// A client tool the run asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolAsk {
    /// Call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Its arguments.
    pub arguments: Value,
}

/// What the run waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// `input-requested`.
    Input,
    /// `tools-requested`.
    Tools(Vec<ToolAsk>),
}

/// What an event means for the follow loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// The run may now wait for an answer.
    Wait(Wait),
    /// The run ended.
    End(Outcome),
}

/// ANSI colours, or none.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    color: bool,
}

impl Style {
    /// Colours on or off.
    pub fn new(color: bool) -> Self {
        Self { color }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Dimmed.
    pub fn dim(self, t: &str) -> String {
        self.paint("2", t)
    }
    /// Bold.
    pub fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }
    /// Green.
    pub fn green(self, t: &str) -> String {
        self.paint("32", t)
    }
    /// Red.
    pub fn red(self, t: &str) -> String {
        self.paint("31", t)
    }
    /// Yellow.
    pub fn yellow(self, t: &str) -> String {
        self.paint("33", t)
    }
    /// Cyan.
    pub fn cyan(self, t: &str) -> String {
        self.paint("36", t)
    }

    /// A run status, coloured by meaning.
    pub fn status(self, s: &str) -> String {
        match s {
            "completed" => self.green(s),
            "failed" => self.red(s),
            "cancelled" | "waiting" => self.yellow(s),
            "running" => self.cyan(s),
            _ => s.to_owned(),
        }
    }
}

/// Where the cursor is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    /// At the start of a line.
    LineStart,
    /// After streamed model text (or a prompt cue) without a newline.
    MidText { reasoning: bool },
    /// On a transient line with this key, to be redrawn or kept.
    Transient(String),
}

/// Renders events for a person.
pub struct Renderer<W: Write> {
    out: W,
    style: Style,
    /// Whether transient lines are redrawn in place (a terminal).
    live: bool,
    cursor: Cursor,
    started: Option<Timestamp>,
    steps: HashMap<u32, String>,
    usage: Usage,
    streamed_text: bool,
    /// Consecutive workflow events of one type: (type, count).
    repeat: Option<(String, u64)>,
    /// Last progress shown per event type, in percent (plain output prints each 10 %).
    progress: HashMap<String, u32>,
    /// The terminal's width, when known: a line redrawn in place is cut to fit it.
    columns: Option<usize>,
}

impl<W: Write> Renderer<W> {
    /// A renderer writing to `out`; `live` redraws transient lines in place (a terminal).
    pub fn new(out: W, style: Style, live: bool) -> Self {
        Self {
            out,
            style,
            live,
            cursor: Cursor::LineStart,
            started: None,
            steps: HashMap::new(),
            usage: Usage::default(),
            streamed_text: false,
            repeat: None,
            progress: HashMap::new(),
            columns: None,
        }
    }

    /// The writer.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }

    /// The style in use.
    pub fn style(&self) -> Style {
        self.style
    }

    /// Renders one event.
    ///
    /// # Errors
    /// Errors writing the output.
    pub fn event(&mut self, ev: &Event) -> io::Result<Next> {
        let s = self.style;
        let d = &ev.data;
        if !matches!(
            ev.event_type.as_str(),
            kind::TEXT_DELTA | kind::REASONING_DELTA | kind::TOOL_CALL_DELTA
        ) && Outcome::of_type(&ev.event_type).is_none()
            && kind::is_reserved(&ev.event_type)
        {
            self.repeat = None;
        }
        let next = match ev.event_type.as_str() {
            kind::CHAIN_STARTED => {
                self.started = Some(ev.ts);
                let wf = str_of(d, "workflow").unwrap_or("run");
                let mut text = format!("{} {}", s.bold(&format!("▶ {wf}")), s.dim(&ev.run_id));
                if let Some(session) = str_of(d, "session_id") {
                    text.push_str(&s.dim(&format!(" (session {session})")));
                }
                self.line(&text)?;
                Next::Continue
            }
            kind::CHAIN_RESUMED => {
                if self.started.is_none() {
                    self.started = Some(ev.ts);
                }
                self.line(&s.dim("  ↻ resumed"))?;
                Next::Continue
            }
            kind::STEP_STARTED => {
                let name = str_of(d, "name").unwrap_or("step").to_owned();
                self.line(&format!("  {} {name}", s.cyan("▸")))?;
                if let Some(step) = ev.step {
                    self.steps.insert(step, name);
                }
                Next::Continue
            }
            kind::STEP_COMPLETED => {
                let name = str_of(d, "name")
                    .map(str::to_owned)
                    .or_else(|| ev.step.and_then(|st| self.steps.get(&st).cloned()))
                    .unwrap_or_else(|| "step".into());
                let took = d
                    .get("duration_ms")
                    .and_then(Value::as_u64)
                    .map(|ms| format!(" {}", s.dim(&fmt_ms(ms))))
                    .unwrap_or_default();
                self.line(&format!("  {} {name}{took}", s.green("✓")))?;
                Next::Continue
            }
            kind::PROVIDER_STARTED => {
                let model = str_of(d, "model").unwrap_or("model");
                let provider = str_of(d, "provider").unwrap_or("provider");
                self.line(&s.dim(&format!("  ◆ {model} ({provider})")))?;
                Next::Continue
            }
            kind::TEXT_DELTA | kind::REASONING_DELTA => {
                let reasoning = ev.event_type == kind::REASONING_DELTA;
                if let Some(text) = str_of(d, "text") {
                    self.text(text, reasoning)?;
                }
                Next::Continue
            }
            // Fragments: the complete calls are shown by tools-started / tools-requested.
            kind::TOOL_CALL_DELTA => Next::Continue,
            kind::PROVIDER_COMPLETED => {
                let u: Usage = d
                    .get("usage")
                    .and_then(|u| serde_json::from_value(u.clone()).ok())
                    .unwrap_or_default();
                self.usage.add(&u);
                let mut parts = Vec::new();
                if let Some(r) = str_of(d, "finish_reason") {
                    parts.push(r.to_owned());
                }
                parts.push(format!(
                    "{} in / {} out tokens",
                    u.input_tokens, u.output_tokens
                ));
                if let Some(ms) = d.get("latency_ms").and_then(Value::as_u64) {
                    parts.push(fmt_ms(ms));
                }
                self.line(&s.dim(&format!("  · {}", parts.join(" · "))))?;
                Next::Continue
            }
            kind::TOOLS_STARTED => {
                for t in tools_of(d) {
                    let args = short_json(&t.arguments, 80);
                    self.line(&format!("    {} {}({args})", s.cyan("⚙"), t.name))?;
                }
                Next::Continue
            }
            kind::TOOL_COMPLETED => {
                let name = str_of(d, "name").unwrap_or("tool");
                let failed = d.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                let mark = if failed { s.red("✗") } else { s.green("✓") };
                let took = d
                    .get("duration_ms")
                    .and_then(Value::as_u64)
                    .map(|ms| format!(" {}", s.dim(&fmt_ms(ms))))
                    .unwrap_or_default();
                let output = d
                    .get("output")
                    .map(|o| short_json(o, 80))
                    .unwrap_or_default();
                self.line(&format!("    {mark} {name}{took} → {output}"))?;
                Next::Continue
            }
            kind::TOOLS_REQUESTED => {
                let tools = tools_of(d);
                let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                self.line(&format!(
                    "  {} the run asks for client tools: {}",
                    s.yellow("?"),
                    names.join(", ")
                ))?;
                Next::Wait(Wait::Tools(tools))
            }
            kind::INPUT_REQUESTED => {
                let prompt = str_of(d, "prompt").unwrap_or("The run waits for input.");
                self.line(&format!("  {} {}", s.yellow("?"), s.bold(prompt)))?;
                if let Some(schema) = d.get("schema").filter(|v| !v.is_null()) {
                    self.line(&s.dim(&format!("    schema: {}", short_json(schema, 100))))?;
                }
                Next::Wait(Wait::Input)
            }
            kind::CHAIN_COMPLETED => {
                let took = d.get("duration_ms").and_then(Value::as_u64);
                let usage = usage_in(d).unwrap_or(self.usage);
                let mut text = format!(
                    "{}{} · {}",
                    s.green("✓ completed"),
                    self.took(ev, took, " in"),
                    fmt_usage(&usage)
                );
                if !self.streamed_text
                    && let Some(result) = d.get("result").filter(|v| !v.is_null())
                {
                    text.push_str(&format!(" · result: {}", short_json(result, 200)));
                }
                self.line(&text)?;
                Next::End(Outcome::Completed)
            }
            kind::CHAIN_ERROR => {
                let usage = usage_in(d).unwrap_or(self.usage);
                let err = d.get("error").unwrap_or(&Value::Null);
                let code = str_of(err, "code").unwrap_or("failed");
                let message = str_of(err, "message").unwrap_or("");
                self.line(&format!(
                    "{}{}: {code}: {message} · {}",
                    s.red("✗ failed"),
                    self.took(ev, None, " after"),
                    fmt_usage(&usage)
                ))?;
                Next::End(Outcome::Failed)
            }
            kind::CHAIN_CANCELLED => {
                let reason = str_of(d, "reason")
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                self.line(&format!(
                    "{}{reason}{} · {}",
                    s.yellow("■ cancelled"),
                    self.took(ev, None, " after"),
                    fmt_usage(&self.usage)
                ))?;
                Next::End(Outcome::Cancelled)
            }
            other => {
                self.custom(other, d)?;
                Next::Continue
            }
        };
        self.out.flush()?;
        Ok(next)
    }

    /// " in 1.2 s" from the event's own duration or the time since `chain-started`.
    fn took(&self, ev: &Event, own_ms: Option<u64>, word: &str) -> String {
        own_ms
            .or_else(|| self.started.map(|t0| ev.ts.millis_since(t0)))
            .map(|ms| format!("{word} {}", fmt_ms(ms)))
            .unwrap_or_default()
    }

    /// A workflow's own event: a progress bar for `{i, of}` / `{pct}`, else a line (on a
    /// terminal, consecutive events of one type share one line with a counter).
    fn custom(&mut self, t: &str, d: &Value) -> io::Result<()> {
        let s = self.style;
        if let Some((frac, counts)) = progress_of(d) {
            self.repeat = None;
            let pct = (frac * 100.0).round() as u32;
            let shown = self.progress.get(t).copied();
            let counts = counts.map(|(a, b)| format!(" {a}/{b}")).unwrap_or_default();
            let text = format!("  {} {:>3}%{counts} {}", bar(frac, 24), pct, s.dim(t));
            if self.live {
                self.transient(&format!("progress:{t}"), &text)?;
                if pct >= 100 {
                    self.line_end()?;
                }
            } else if shown.is_none_or(|p| pct / 10 > p / 10 || (pct >= 100 && p < 100)) {
                self.line(&text)?;
            }
            self.progress.insert(t.to_owned(), pct);
            return Ok(());
        }
        let count = match &mut self.repeat {
            Some((rt, n)) if rt == t => {
                *n += 1;
                *n
            }
            _ => {
                self.repeat = Some((t.to_owned(), 1));
                1
            }
        };
        let data = short_json(d, 100);
        if self.live {
            let times = if count > 1 {
                format!(" ×{count}")
            } else {
                String::new()
            };
            self.transient(
                &format!("event:{t}"),
                &format!("  {} {t}{times} {}", s.dim("·"), s.dim(&data)),
            )
        } else {
            self.line(&format!("  · {t} {data}"))
        }
    }

    /// Streamed model text, written as it comes.
    fn text(&mut self, text: &str, reasoning: bool) -> io::Result<()> {
        match &self.cursor {
            Cursor::MidText { reasoning: r } if *r == reasoning => {}
            Cursor::LineStart => {}
            _ => self.line_end()?,
        }
        if text.is_empty() {
            return Ok(());
        }
        let shown = if reasoning {
            self.style.dim(text)
        } else {
            self.streamed_text = true;
            text.to_owned()
        };
        self.out.write_all(shown.as_bytes())?;
        self.cursor = if text.ends_with('\n') {
            Cursor::LineStart
        } else {
            Cursor::MidText { reasoning }
        };
        Ok(())
    }

    /// Ends the current line, whatever is on it (a transient line is kept as it is).
    fn line_end(&mut self) -> io::Result<()> {
        if self.cursor != Cursor::LineStart {
            self.out.write_all(b"\n")?;
            self.cursor = Cursor::LineStart;
        }
        Ok(())
    }

    /// A whole line.
    pub fn line(&mut self, text: &str) -> io::Result<()> {
        self.line_end()?;
        self.out.write_all(text.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// The terminal is `columns` wide (`None`: unknown, lines are not cut).
    pub fn with_columns(mut self, columns: Option<usize>) -> Self {
        self.columns = columns;
        self
    }

    /// A line redrawn in place while the same `key` follows (terminals only). It is cut to
    /// the terminal's width: `\r\x1b[2K` clears one row, so a line that wrapped would leave
    /// its first rows behind at every redraw.
    fn transient(&mut self, key: &str, text: &str) -> io::Result<()> {
        match &self.cursor {
            Cursor::Transient(k) if k == key => self.out.write_all(b"\r\x1b[2K")?,
            _ => self.line_end()?,
        }
        let text = match self.columns {
            Some(cols) => fit(text, cols.saturating_sub(1).max(1)),
            None => Cow::Borrowed(text),
        };
        self.out.write_all(text.as_bytes())?;
        self.cursor = Cursor::Transient(key.to_owned());
        Ok(())
    }

    /// A prompt cue, the answer to be typed after it.
    pub fn cue(&mut self, text: &str) -> io::Result<()> {
        self.line_end()?;
        self.out.write_all(text.as_bytes())?;
        self.cursor = Cursor::MidText { reasoning: false };
        self.out.flush()
    }

    /// The person's answer was read. A terminal echoed it (and its newline) already; from a
    /// pipe, it is written after the cue, so the transcript reads `> yes`.
    ///
    /// # Errors
    /// Errors writing the output.
    pub fn answered(&mut self, echoed: bool, text: &str) -> io::Result<()> {
        if !echoed {
            self.out.write_all(text.as_bytes())?;
            self.out.write_all(b"\n")?;
            self.out.flush()?;
        }
        self.cursor = Cursor::LineStart;
        Ok(())
    }

    /// A note to the person (dimmed, indented).
    pub fn note(&mut self, text: &str) -> io::Result<()> {
        let t = self.style.dim(&format!("  {text}"));
        self.line(&t)
    }

    /// Ends any open line before the program exits.
    pub fn finish(&mut self) -> io::Result<()> {
        self.line_end()?;
        self.out.flush()
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn usage_in(d: &Value) -> Option<Usage> {
    d.get("usage")
        .filter(|u| !u.is_null())
        .and_then(|u| serde_json::from_value(u.clone()).ok())
}

fn tools_of(d: &Value) -> Vec<ToolAsk> {
    d.get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .map(|t| ToolAsk {
                    id: str_of(t, "id").unwrap_or_default().to_owned(),
                    name: str_of(t, "name").unwrap_or("tool").to_owned(),
                    arguments: t.get("arguments").cloned().unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `{pct}` (0 to 100) or `{i, of}` (`i` counted from 0, like the ticker's) as a fraction, with
/// the counts for the latter.
fn progress_of(d: &Value) -> Option<(f64, Option<(u64, u64)>)> {
    if let Some(p) = d.get("pct").and_then(Value::as_f64) {
        return Some(((p / 100.0).clamp(0.0, 1.0), None));
    }
    let i = d.get("i").and_then(Value::as_f64)?;
    let of = d.get("of").and_then(Value::as_f64)?;
    if of <= 0.0 || i < 0.0 {
        return None;
    }
    let done = (i + 1.0).min(of);
    Some((done / of, Some((done as u64, of as u64))))
}

fn bar(frac: f64, width: usize) -> String {
    let filled = ((frac * width as f64).round() as usize).min(width);
    format!("[{}{}]", "█".repeat(filled), "░".repeat(width - filled))
}

/// `850 ms`, `1.2 s`, `3m 07s`.
pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{}m {:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

fn fmt_usage(u: &Usage) -> String {
    if u.total_tokens == 0 && u.input_tokens == 0 && u.output_tokens == 0 {
        "usage: 0 tokens".into()
    } else {
        format!(
            "usage: {} tokens ({} in, {} out)",
            u.total_tokens
                .max(u.input_tokens.saturating_add(u.output_tokens)),
            u.input_tokens,
            u.output_tokens
        )
    }
}

/// Compact JSON cut to `max` characters.
pub fn short_json(v: &Value, max: usize) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    truncate(&text, max)
}

/// `text` cut to `cols` visible characters with an ellipsis, escape sequences (colours) kept
/// and not counted, and a reset after the cut when there were any.
fn fit(text: &str, cols: usize) -> Cow<'_, str> {
    // Visible characters, skipping `ESC [ … final-byte` sequences.
    let visible = |f: &mut dyn FnMut(usize, char, bool)| {
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\x1b' && chars.peek().is_some_and(|&(_, n)| n == '[') {
                f(i, c, false);
                for (j, n) in chars.by_ref() {
                    f(j, n, false);
                    if ('@'..='~').contains(&n) && n != '[' {
                        break;
                    }
                }
                continue;
            }
            f(i, c, true);
        }
    };
    let mut count = 0;
    visible(&mut |_, _, shown| count += usize::from(shown));
    if count <= cols {
        return Cow::Borrowed(text);
    }
    let (mut out, mut kept, mut styled) = (String::with_capacity(text.len()), 0, false);
    visible(&mut |_, c, shown| {
        if !shown {
            styled = true;
            out.push(c);
        } else if kept + 1 < cols {
            kept += 1;
            out.push(c);
        }
    });
    out.push('…');
    if styled {
        out.push_str("\x1b[0m");
    }
    Cow::Owned(out)
}

/// `text` cut to `max` characters with an ellipsis, on one line.
pub fn truncate(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn ev(seq: u64, t: &str, step: Option<u32>, ms: i64, data: Value) -> Event {
        Event {
            seq,
            run_id: "run_1".into(),
            event_type: t.into(),
            ts: Timestamp::from_micros(ms * 1000),
            step,
            data,
        }
    }

    fn render(live: bool, events: &[Event]) -> (String, Vec<Next>) {
        let mut r = Renderer::new(Vec::new(), Style::new(false), live);
        let nexts = events.iter().map(|e| r.event(e).unwrap()).collect();
        r.finish().unwrap();
        (String::from_utf8(r.into_inner()).unwrap(), nexts)
    }

    #[test]
    fn an_agent_run() {
        let events = [
            ev(
                1,
                "chain-started",
                None,
                0,
                json!({"workflow": "assistant", "input": {}}),
            ),
            ev(2, "step-started", Some(1), 1, json!({"name": "model"})),
            ev(
                3,
                "provider-started",
                Some(1),
                2,
                json!({"provider": "local", "model": "m"}),
            ),
            ev(4, "text-delta", Some(1), 3, json!({"text": "Hel"})),
            ev(5, "text-delta", Some(1), 4, json!({"text": "lo"})),
            ev(
                6,
                "tool-call-delta",
                Some(1),
                5,
                json!({"index": 0, "arguments": "{"}),
            ),
            ev(
                7,
                "provider-completed",
                Some(1),
                6,
                json!({"finish_reason": "tool_calls",
                "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
                "message": {}, "latency_ms": 40}),
            ),
            ev(
                8,
                "tools-started",
                Some(1),
                7,
                json!({"tools": [{"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}]}),
            ),
            ev(
                9,
                "tool-completed",
                Some(1),
                8,
                json!({"id": "c1", "name": "get_weather", "output": "sunny", "is_error": false, "duration_ms": 120}),
            ),
            ev(
                10,
                "step-completed",
                Some(1),
                9,
                json!({"name": "model", "duration_ms": 1500}),
            ),
            ev(
                11,
                "chain-completed",
                None,
                10,
                json!({"result": {"message": {}}, "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}, "duration_ms": 2500}),
            ),
        ];
        let (text, nexts) = render(false, &events);
        assert_eq!(
            text,
            "▶ assistant run_1\n  ▸ model\n  ◆ m (local)\nHello\n  · tool_calls · 10 in / 5 out tokens · 40 ms\n    ⚙ get_weather({\"city\":\"Paris\"})\n    ✓ get_weather 120 ms → sunny\n  ✓ model 1.5 s\n✓ completed in 2.5 s · usage: 15 tokens (10 in, 5 out)\n"
        );
        assert_eq!(nexts.last(), Some(&Next::End(Outcome::Completed)));
    }

    #[test]
    fn ticker_waits_and_failures() {
        let events = [
            ev(
                1,
                "chain-started",
                None,
                0,
                json!({"workflow": "ticker", "input": {"n": 2}}),
            ),
            ev(2, "step-started", Some(1), 0, json!({"name": "tick"})),
            ev(3, "tick", Some(1), 1, json!({"i": 0, "t": 1, "text": "ab"})),
            ev(4, "tick", Some(1), 2, json!({"i": 1, "t": 2, "text": "ab"})),
            ev(
                5,
                "input-requested",
                Some(1),
                3,
                json!({"prompt": "Go on?"}),
            ),
            ev(
                6,
                "chain-error",
                None,
                1203,
                json!({"error": {"code": "failed", "message": "boom"}}),
            ),
        ];
        let (text, nexts) = render(false, &events);
        assert_eq!(
            text,
            "▶ ticker run_1\n  ▸ tick\n  · tick {\"i\":0,\"t\":1,\"text\":\"ab\"}\n  · tick {\"i\":1,\"t\":2,\"text\":\"ab\"}\n  ? Go on?\n✗ failed after 1.2 s: failed: boom · usage: 0 tokens\n"
        );
        assert_eq!(nexts[4], Next::Wait(Wait::Input));
        assert_eq!(nexts[5], Next::End(Outcome::Failed));

        // On a terminal, repeated events share one line.
        let (live, _) = render(true, &events[..4]);
        assert!(live.contains("\r\x1b[2K  · tick ×2 "), "{live:?}");
    }

    #[test]
    fn a_line_redrawn_in_place_fits_the_terminal() {
        let mut events = vec![ev(1, "chain-started", None, 0, json!({"workflow": "w"}))];
        for i in 0..3u64 {
            let text = "abcdefghijklmnopqrstuvwxyz".repeat(4);
            events.push(ev(2 + i, "tick", Some(1), 1, json!({"i": i, "text": text})));
        }
        for color in [false, true] {
            let mut r = Renderer::new(Vec::new(), Style::new(color), true).with_columns(Some(40));
            for e in &events {
                r.event(e).unwrap();
            }
            let out = String::from_utf8(r.out).unwrap();
            let last = out.rsplit("\r\x1b[2K").next().unwrap();
            let plain = fit(last, usize::MAX)
                .replace("\x1b[2m", "")
                .replace("\x1b[0m", "");
            assert_eq!(plain.chars().count(), 39, "{last:?}");
            assert!(plain.starts_with("  · tick ×3 {"), "{plain:?}");
            assert!(plain.ends_with('…'), "{plain:?}");
            if color {
                assert!(last.ends_with("\x1b[0m"), "the colour is reset: {last:?}");
            }
        }
        // Short lines, and escape sequences, are left as they are.
        assert_eq!(fit("\x1b[2mab\x1b[0m", 2), "\x1b[2mab\x1b[0m");
        assert_eq!(fit("\x1b[2mabc\x1b[0m", 2), "\x1b[2ma\x1b[0m…\x1b[0m");
    }

    #[test]
    fn progress_bars() {
        let mut events = vec![ev(1, "chain-started", None, 0, json!({"workflow": "w"}))];
        for i in 0..20u64 {
            events.push(ev(2 + i, "download", Some(1), 1, json!({"i": i, "of": 20})));
        }
        events.push(ev(
            22,
            "chain-cancelled",
            None,
            5,
            json!({"reason": "stop"}),
        ));
        let (text, nexts) = render(false, &events);
        let bars: Vec<&str> = text.lines().filter(|l| l.contains('[')).collect();
        assert_eq!(bars.len(), 11, "the first, then each 10 %: {text}");
        assert!(bars[0].contains("   5% 1/20 download"), "{}", bars[0]);
        assert!(bars[1].contains("  10% 2/20 download"), "{}", bars[1]);
        assert!(bars[10].contains(&format!("[{}] 100% 20/20", "█".repeat(24))));
        assert!(
            text.ends_with("■ cancelled (stop) after 5 ms · usage: 0 tokens\n"),
            "{text}"
        );
        assert_eq!(nexts.last(), Some(&Next::End(Outcome::Cancelled)));
        assert_eq!(progress_of(&json!({"pct": 50})), Some((0.5, None)));
        assert_eq!(progress_of(&json!({"i": 1})), None);
    }

    #[test]
    fn a_prompt_and_its_answer() {
        let mut r = Renderer::new(Vec::new(), Style::new(false), false);
        r.event(&ev(
            1,
            "input-requested",
            Some(1),
            0,
            json!({"prompt": "Go?"}),
        ))
        .unwrap();
        r.cue("  > ").unwrap();
        // From a pipe the answer is written out; a terminal has echoed it already.
        r.answered(false, "yes").unwrap();
        r.note("↳ sent \"yes\"").unwrap();
        r.cue("  > ").unwrap();
        r.answered(true, "ignored").unwrap();
        r.note("done").unwrap();
        let text = String::from_utf8(r.into_inner()).unwrap();
        // (The terminal's echo, not in this buffer, ends the second cue's line.)
        assert_eq!(text, "  ? Go?\n  > yes\n  ↳ sent \"yes\"\n  >   done\n");
    }

    #[test]
    fn colours_only_when_asked() {
        let e = [ev(
            1,
            "chain-completed",
            None,
            0,
            json!({"result": 1, "usage": null, "duration_ms": 3}),
        )];
        let mut r = Renderer::new(Vec::new(), Style::new(true), true);
        r.event(&e[0]).unwrap();
        let text = String::from_utf8(r.into_inner()).unwrap();
        assert!(
            text.starts_with("\x1b[32m✓ completed\x1b[0m in 3 ms"),
            "{text:?}"
        );
        assert_eq!(fmt_ms(185_000), "3m 05s");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
