//! Following a run's stream for `run --follow` and `tail`: raw JSON lines, or the human view
//! with prompts answered from stdin; Ctrl-C and a closed stdout (cancelling the run with
//! `--cancel-on-exit`); the exit code of the run's outcome.
//!
//! Nothing in the loop blocks it: the checks whether the run waits, the sending of an answer
//! and the reading of stdin run beside the stream, so events and Ctrl-C are handled at once.

use std::future::Future;
use std::io::{self, BufRead, IsTerminal, Write};
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice_client::{
    Client, ErrorKind, EventStream, RawEvent, RunRecord, RunStatus, ToolResult, kind,
};
use tokio::sync::mpsc;

use super::interrupt::Interrupt;
use super::output::{self, say};
use super::render::{Next, Outcome, Renderer, Style, ToolAsk, Wait, short_json};
use super::{Ctx, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, terminal};

/// How to follow.
#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    /// Raw envelopes, one per line; no prompts.
    pub json: bool,
    /// Stopping early (Ctrl-C, stdout closed) cancels the run.
    pub cancel_on_exit: bool,
}

/// Why following stopped before the run ended.
enum Leave {
    /// Ctrl-C.
    Interrupted,
    /// Writing stdout failed (its reader went away, or another error).
    Output(io::Error),
    /// The stream broke for good (a gap, an event it cannot decode, the server gone for longer
    /// than the reconnect limits); the reason is reported, this is the exit code.
    Broken(u8),
}

/// Follows the stream to its end and answers the exit code.
pub async fn follow(
    ctx: &Ctx,
    stream: EventStream<RawEvent>,
    opts: FollowOptions,
    interrupt: &mut Interrupt,
) -> u8 {
    if opts.json {
        follow_json(ctx, stream, opts, interrupt).await
    } else {
        follow_human(ctx, stream, opts, interrupt).await
    }
}

async fn follow_json(
    ctx: &Ctx,
    mut stream: EventStream<RawEvent>,
    opts: FollowOptions,
    interrupt: &mut Interrupt,
) -> u8 {
    let run_id = stream.run_id().to_owned();
    let mut outcome = None;
    let mut lost = Lost::new();
    loop {
        tokio::select! {
            biased;
            () = interrupt.recv() => return leave(ctx, &run_id, opts, Leave::Interrupted, interrupt).await,
            () = lost.tick() => {
                // On stderr: stdout holds the envelopes and nothing else.
                if let Some(note) = lost.note(stream.reconnecting()) {
                    say!("{note}");
                }
            }
            item = stream.next() => match item {
                Some(Ok(raw)) => {
                    if let Some(note) = lost.note(false) {
                        say!("{note}");
                    }
                    let mut out = io::stdout().lock();
                    let written = out
                        .write_all(raw.json())
                        .and_then(|()| out.write_all(b"\n"))
                        .and_then(|()| out.flush());
                    drop(out);
                    if let Err(e) = written {
                        return leave(ctx, &run_id, opts, Leave::Output(e), interrupt).await;
                    }
                    if let Some(o) = Outcome::of_type(raw.event_type()) {
                        outcome = Some(o);
                    }
                }
                Some(Err(e)) => {
                    let code = ctx.refused(&e);
                    return leave(ctx, &run_id, opts, Leave::Broken(code), interrupt).await;
                }
                None => break,
            },
        }
    }
    match outcome {
        Some(o) => o.exit_code(),
        None => status_code(ctx, &run_id, None, interrupt).await,
    }
}

/// Whether the stream's connection is lost, checked once a second: a note when it is lost
/// (the stream reconnects by itself, for a while), and one when events come again.
struct Lost {
    every: tokio::time::Interval,
    noted: bool,
}

impl Lost {
    fn new() -> Self {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            every,
            noted: false,
        }
    }

    async fn tick(&mut self) {
        self.every.tick().await;
    }

    /// The note to show now that the stream is (or is not) `reconnecting`, if any.
    fn note(&mut self, reconnecting: bool) -> Option<String> {
        if reconnecting == self.noted {
            return None;
        }
        self.noted = reconnecting;
        Some(if reconnecting {
            "connection to the server lost: reconnecting…".to_owned()
        } else {
            "reconnected: nothing missed".to_owned()
        })
    }
}

/// A request seen in the stream, shown to the person once the run is known to wait for it.
struct Prompt {
    wait: Wait,
    answers: Vec<Value>,
}

impl Prompt {
    fn cue(&self, style: Style) -> String {
        match &self.wait {
            Wait::Input => format!("  {} ", style.yellow(">")),
            Wait::Tools(tools) => {
                let t = tools.get(self.answers.len());
                let name = t.map_or("tool", |t| t.name.as_str());
                let args = t.map(|t| short_json(&t.arguments, 60)).unwrap_or_default();
                format!("  {} output of {name}({args}): ", style.yellow(">"))
            }
        }
    }

    fn complete(&self) -> bool {
        match &self.wait {
            Wait::Input => !self.answers.is_empty(),
            Wait::Tools(tools) => self.answers.len() >= tools.len(),
        }
    }
}

type Check = Pin<Box<dyn Future<Output = sluice_client::Result<RunRecord>>>>;
type Sending = Pin<Box<dyn Future<Output = (Wait, sluice_client::Result<String>)>>>;

/// How long the end of a run waits for the reply to an answer still being sent.
const SEND_REPLY_WAIT: Duration = Duration::from_secs(5);

/// The note on how sending an answer went.
fn sent_note(run_id: &str, wait: &Wait, sent: sluice_client::Result<String>) -> String {
    match sent {
        Ok(shown) => format!("↳ sent {shown}"),
        Err(e) if e.kind() == ErrorKind::Conflict => "(the run has already ended)".to_owned(),
        Err(e) => format!(
            "could not send the answer: {e}. {}",
            answer_hint(run_id, wait)
        ),
    }
}

async fn follow_human(
    ctx: &Ctx,
    mut stream: EventStream<RawEvent>,
    opts: FollowOptions,
    interrupt: &mut Interrupt,
) -> u8 {
    let run_id = stream.run_id().to_owned();
    let (tty, color) = terminal();
    let style = Style::new(color);
    let columns = terminal_size::terminal_size()
        .filter(|_| tty)
        .map(|(w, _)| usize::from(w.0));
    let mut view = Renderer::new(io::stdout(), style, tty).with_columns(columns);
    let mut outcome = None;
    // A request awaiting confirmation that the run waits for it, and the check doing that.
    let mut pending: Option<Wait> = None;
    let mut check: Option<Check> = None;
    // The prompt shown, its answers being typed; then the answer being sent.
    let mut prompt: Option<Prompt> = None;
    let mut sending: Option<Sending> = None;
    let mut stdin: Option<mpsc::Receiver<Option<String>>> = None;
    let mut stdin_closed = false;
    let mut lost = Lost::new();
    loop {
        tokio::select! {
            biased;
            () = interrupt.recv() => {
                let _ = view.finish();
                return leave(ctx, &run_id, opts, Leave::Interrupted, interrupt).await;
            }
            () = lost.tick() => {
                if let Some(note) = lost.note(stream.reconnecting()) {
                    let _ = view.note(&note);
                }
            }
            item = stream.next() => {
                let raw = match item {
                    Some(Ok(raw)) => {
                        if let Some(note) = lost.note(false) {
                            let _ = view.note(&note);
                        }
                        raw
                    }
                    Some(Err(e)) => {
                        let _ = view.finish();
                        let code = ctx.refused(&e);
                        return leave(ctx, &run_id, opts, Leave::Broken(code), interrupt).await;
                    }
                    None => break,
                };
                let ev = match raw.parse() {
                    Ok(ev) => ev,
                    Err(e) => {
                        let _ = view.finish();
                        say!("cannot decode event {} of run {run_id}: {e}", raw.seq());
                        return leave(ctx, &run_id, opts, Leave::Broken(EXIT_USAGE), interrupt).await;
                    }
                };
                if ev.is_terminal()
                    && let Some(in_flight) = sending.take()
                {
                    // The answer's reply can come after the end of the run it ended: report it
                    // before the end.
                    let reply = tokio::select! {
                        biased;
                        () = interrupt.recv() => {
                            let _ = view.finish();
                            return EXIT_CANCELLED;
                        }
                        reply = tokio::time::timeout(SEND_REPLY_WAIT, in_flight) => reply,
                    };
                    if let Ok((wait, sent)) = reply {
                        let _ = view.note(&sent_note(&run_id, &wait, sent));
                    }
                }
                if ev.event_type == kind::CHAIN_RESUMED || ev.is_terminal() {
                    // Whatever was asked has been answered (or no longer matters).
                    pending = None;
                    check = None;
                    if prompt.take().is_some() && !ev.is_terminal() {
                        let _ = view.note("(answered elsewhere)");
                    }
                }
                match view.event(&ev) {
                    Ok(Next::Continue) => {}
                    Ok(Next::Wait(w)) => {
                        prompt = None;
                        if stdin_closed {
                            let _ = view.note(&answer_hint(&run_id, &w));
                        } else {
                            pending = Some(w);
                            check = Some(Box::pin(waiting(ctx.client.clone(), run_id.clone(), Duration::ZERO)));
                        }
                    }
                    Ok(Next::End(o)) => outcome = Some(o),
                    Err(e) => return leave(ctx, &run_id, opts, Leave::Output(e), interrupt).await,
                }
            }
            rec = ready(&mut check) => {
                check = None;
                match rec {
                    Ok(rec) if rec.status == RunStatus::Waiting && rec.last_seq <= stream.last_seq() => {
                        let Some(wait) = pending.take() else { continue };
                        if matches!(&wait, Wait::Tools(t) if t.is_empty()) {
                            continue;
                        }
                        if stdin.is_none() {
                            match stdin_lines() {
                                Ok(rx) => stdin = Some(rx),
                                Err(e) => {
                                    stdin_closed = true;
                                    let _ = view.note(&format!("cannot read stdin ({e}); {}", answer_hint(&run_id, &wait)));
                                    continue;
                                }
                            }
                        }
                        let p = Prompt { wait, answers: Vec::new() };
                        if let Err(e) = view.cue(&p.cue(style)) {
                            return leave(ctx, &run_id, opts, Leave::Output(e), interrupt).await;
                        }
                        prompt = Some(p);
                    }
                    // Waiting, but events up to its last are still on their way.
                    Ok(rec) if rec.status == RunStatus::Waiting => {
                        check = Some(Box::pin(waiting(ctx.client.clone(), run_id.clone(), Duration::from_millis(50))));
                    }
                    Ok(_) => pending = None,
                    Err(e) => {
                        if let Some(w) = pending.take() {
                            let _ = view.note(&format!("cannot tell whether the run waits ({e}); {}", answer_hint(&run_id, &w)));
                        }
                    }
                }
            }
            (wait, sent) = ready(&mut sending) => {
                sending = None;
                let _ = view.note(&sent_note(&run_id, &wait, sent));
            }
            line = recv(stdin.as_mut()) => {
                let Some(line) = line.flatten() else {
                    // End of input: stop prompting; the run keeps waiting on the server.
                    stdin = None;
                    stdin_closed = true;
                    if let Some(p) = prompt.take() {
                        let _ = view.note(&format!("stdin is closed; the run keeps waiting. {}", answer_hint(&run_id, &p.wait)));
                    }
                    continue;
                };
                let Some(p) = prompt.as_mut() else {
                    // Typed while nothing was asked: ignored.
                    continue;
                };
                if let Err(e) = view.answered(io::stdin().is_terminal(), &line) {
                    return leave(ctx, &run_id, opts, Leave::Output(e), interrupt).await;
                }
                p.answers.push(parse_answer(&line));
                if !p.complete() {
                    if let Err(e) = view.cue(&p.cue(style)) {
                        return leave(ctx, &run_id, opts, Leave::Output(e), interrupt).await;
                    }
                    continue;
                }
                if let Some(p) = prompt.take() {
                    sending = Some(Box::pin(answer(ctx.client.clone(), run_id.clone(), p)));
                }
            }
        }
    }
    let _ = view.finish();
    match outcome {
        Some(o) => o.exit_code(),
        None => status_code(ctx, &run_id, Some(&mut view), interrupt).await,
    }
}

/// The output of the future when there is one, or never.
async fn ready<T>(f: &mut Option<Pin<Box<dyn Future<Output = T>>>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The next stdin line (`Some(None)` at its end), or never when stdin is not being read.
async fn recv(rx: Option<&mut mpsc::Receiver<Option<String>>>) -> Option<Option<String>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The run's record once it waits or has ended, polling while it runs.
async fn waiting(
    client: Client,
    run_id: String,
    first_delay: Duration,
) -> sluice_client::Result<RunRecord> {
    let mut delay = first_delay;
    loop {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let rec = client.run(&run_id).await?;
        if rec.status == RunStatus::Waiting || rec.status.is_terminal() {
            return Ok(rec);
        }
        delay = (delay * 2).clamp(Duration::from_millis(20), Duration::from_millis(250));
    }
}

/// Reads stdin lines on a thread of its own (blocking reads cannot be cancelled; the thread
/// ends with the process).
fn stdin_lines() -> std::io::Result<mpsc::Receiver<Option<String>>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            loop {
                let mut line = String::new();
                let item = match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => None,
                    Ok(_) => Some(line.trim_end_matches(['\n', '\r']).to_owned()),
                };
                let end = item.is_none();
                if tx.blocking_send(item).is_err() || end {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// A typed answer: JSON when it parses, else the text as a string.
fn parse_answer(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|_| Value::String(line.to_owned()))
}

/// Sends a completed prompt's answer; retries briefly while the run settles into `waiting`.
/// Answers what was asked, and what was sent (for the note) or the error.
async fn answer(
    client: Client,
    run_id: String,
    p: Prompt,
) -> (Wait, sluice_client::Result<String>) {
    let sent = send_answer(&client, &run_id, &p).await;
    (p.wait, sent)
}

async fn send_answer(client: &Client, run_id: &str, p: &Prompt) -> sluice_client::Result<String> {
    let mut attempt = 0;
    loop {
        let sent = match &p.wait {
            Wait::Input => {
                let data = p.answers.first().cloned().unwrap_or(Value::Null);
                client.send_input(run_id, data).await
            }
            Wait::Tools(tools) => {
                let results = tools
                    .iter()
                    .zip(&p.answers)
                    .map(|(t, a): (&ToolAsk, &Value)| ToolResult {
                        id: t.id.clone(),
                        output: a.clone(),
                        is_error: false,
                    })
                    .collect();
                client.send_tool_results(run_id, results).await
            }
        };
        match sent {
            Err(e) if e.kind() == ErrorKind::Invalid && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
            Ok(()) => {
                return Ok(match &p.wait {
                    Wait::Input => p.answers.first().map(|a| a.to_string()).unwrap_or_default(),
                    Wait::Tools(_) => format!("{} tool result(s)", p.answers.len()),
                });
            }
        }
    }
}

fn answer_hint(run_id: &str, wait: &Wait) -> String {
    match wait {
        Wait::Input => format!("answer with: sluice send {run_id} input 'JSON'"),
        Wait::Tools(_) => format!(
            "answer with: sluice send {run_id} tool-results '{{\"results\": [{{\"id\": \"…\", \"output\": …}}]}}'"
        ),
    }
}

/// Stops following before the run ended; cancels the run with `--cancel-on-exit`. Exit 130
/// after Ctrl-C; after stdout closed, 0 quietly (its reader went away) or 2.
async fn leave(
    ctx: &Ctx,
    run_id: &str,
    opts: FollowOptions,
    why: Leave,
    interrupt: &mut Interrupt,
) -> u8 {
    let code = match &why {
        Leave::Interrupted => EXIT_CANCELLED,
        Leave::Output(e) => output::failed(e),
        Leave::Broken(code) => *code,
    };
    if opts.cancel_on_exit {
        if matches!(why, Leave::Interrupted) {
            say!("interrupted; cancelling run {run_id}");
        }
        cancel_run(ctx, run_id, interrupt).await;
    } else if matches!(why, Leave::Interrupted) {
        say!(
            "interrupted; run {run_id} continues on the server (follow: sluice tail {run_id}; stop: sluice cancel {run_id})"
        );
    }
    code
}

/// Cancels a run on the way out, reporting on stderr; gives up after 5 s or at another Ctrl-C.
pub async fn cancel_run(ctx: &Ctx, run_id: &str, interrupt: &mut Interrupt) {
    let cancel = tokio::time::timeout(Duration::from_secs(5), ctx.client.cancel(run_id));
    tokio::select! {
        biased;
        () = interrupt.recv() => say!("not waiting for the cancellation of run {run_id}; check it with: sluice runs"),
        answer = cancel => match answer {
            Ok(Ok(_)) => say!("cancelled run {run_id}"),
            Ok(Err(e)) if e.kind() == ErrorKind::Conflict => {
                say!("run {run_id} had already ended");
            }
            Ok(Err(e)) => say!("could not cancel run {run_id}: {e}"),
            Err(_) => say!("cancelling run {run_id} timed out; check it with: sluice runs"),
        },
    }
}

/// The stream ended without a terminal event (a cursor already at a finished run's end): the
/// exit code of the run's status.
/// Ctrl-C during the request ends the command at once (130).
async fn status_code(
    ctx: &Ctx,
    run_id: &str,
    view: Option<&mut Renderer<std::io::Stdout>>,
    interrupt: &mut Interrupt,
) -> u8 {
    let rec = tokio::select! {
        biased;
        () = interrupt.recv() => return EXIT_CANCELLED,
        rec = ctx.client.run(run_id) => match rec {
            Ok(r) => r,
            Err(e) => return ctx.refused(&e),
        },
    };
    if let Some(view) = view {
        let style = view.style();
        let _ = view.line(&format!(
            "run {run_id} is {} (no events after seq {})",
            style.status(rec.status.as_str()),
            rec.last_seq
        ));
    }
    match rec.status {
        RunStatus::Completed => EXIT_OK,
        RunStatus::Failed => EXIT_FAILED,
        RunStatus::Cancelled => EXIT_CANCELLED,
        other => {
            say!(
                "the event stream of run {run_id} ended while it is {}",
                other.as_str()
            );
            EXIT_USAGE
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn answers_and_prompts() {
        assert_eq!(parse_answer("yes"), json!("yes"));
        assert_eq!(parse_answer(" {\"ok\": true} "), json!({"ok": true}));
        assert_eq!(parse_answer("42"), json!(42));
        assert_eq!(parse_answer("\"quoted\""), json!("quoted"));
        assert_eq!(parse_answer(""), json!(""));
        let tools = Wait::Tools(vec![
            ToolAsk {
                id: "c1".into(),
                name: "confirm".into(),
                arguments: json!({"action": "deploy"}),
            },
            ToolAsk {
                id: "c2".into(),
                name: "pick".into(),
                arguments: json!({}),
            },
        ]);
        let mut p = Prompt {
            wait: tools,
            answers: Vec::new(),
        };
        let style = Style::new(false);
        assert_eq!(
            p.cue(style),
            "  > output of confirm({\"action\":\"deploy\"}): "
        );
        p.answers.push(json!("ok"));
        assert!(!p.complete());
        assert_eq!(p.cue(style), "  > output of pick({}): ");
        p.answers.push(json!(1));
        assert!(p.complete());
        assert!(answer_hint("run_1", &Wait::Input).contains("sluice send run_1 input"));
    }
}
