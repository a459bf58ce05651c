//! Following a run's stream for `run --follow` and `tail`: raw JSON lines, or the human view
//! with prompts answered from stdin; Ctrl-C; the exit code of the run's outcome.

use std::future::Future;
use std::io::{BufRead, IsTerminal, Write};
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice_client::{
    Client, ErrorKind, EventStream, RawEvent, RunRecord, RunStatus, ToolResult, kind,
};
use tokio::sync::mpsc;

use super::render::{Next, Outcome, Renderer, Style, ToolAsk, Wait, short_json};
use super::{Ctx, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, terminal};

/// How to follow.
#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    /// Raw envelopes, one per line; no prompts.
    pub json: bool,
    /// Ctrl-C cancels the run.
    pub cancel_on_exit: bool,
}

/// Follows the stream to its end and answers the exit code.
pub async fn follow(ctx: &Ctx, stream: EventStream<RawEvent>, opts: FollowOptions) -> u8 {
    if opts.json {
        follow_json(ctx, stream, opts).await
    } else {
        follow_human(ctx, stream, opts).await
    }
}

async fn follow_json(ctx: &Ctx, mut stream: EventStream<RawEvent>, opts: FollowOptions) -> u8 {
    let run_id = stream.run_id().to_owned();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut outcome = None;
    loop {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => return interrupted(ctx, &run_id, opts.cancel_on_exit).await,
            item = stream.next() => match item {
                Some(Ok(raw)) => {
                    let mut out = std::io::stdout().lock();
                    let written = out
                        .write_all(raw.json())
                        .and_then(|()| out.write_all(b"\n"))
                        .and_then(|()| out.flush());
                    if let Err(e) = written {
                        return output_failed(&e);
                    }
                    if let Some(o) = Outcome::of_type(raw.event_type()) {
                        outcome = Some(o);
                    }
                }
                Some(Err(e)) => return stream_failed(ctx, &e),
                None => break,
            },
        }
    }
    match outcome {
        Some(o) => o.exit_code(),
        None => status_code(ctx, &run_id, None).await,
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

async fn follow_human(ctx: &Ctx, mut stream: EventStream<RawEvent>, opts: FollowOptions) -> u8 {
    let run_id = stream.run_id().to_owned();
    let (tty, color) = terminal();
    let style = Style::new(color);
    let mut view = Renderer::new(std::io::stdout(), style, tty);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut outcome = None;
    // A request awaiting confirmation that the run waits for it, and the check doing that.
    let mut pending: Option<Wait> = None;
    let mut check: Option<Check> = None;
    let mut prompt: Option<Prompt> = None;
    let mut stdin: Option<mpsc::Receiver<Option<String>>> = None;
    let mut stdin_closed = false;
    loop {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => {
                let _ = view.finish();
                return interrupted(ctx, &run_id, opts.cancel_on_exit).await;
            }
            item = stream.next() => {
                let raw = match item {
                    Some(Ok(raw)) => raw,
                    Some(Err(e)) => {
                        let _ = view.finish();
                        return stream_failed(ctx, &e);
                    }
                    None => break,
                };
                let ev = match raw.parse() {
                    Ok(ev) => ev,
                    Err(e) => {
                        let _ = view.finish();
                        eprintln!("sluice: cannot decode event {} of run {run_id}: {e}", raw.seq());
                        return EXIT_USAGE;
                    }
                };
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
                    Err(e) => return output_failed(&e),
                }
            }
            rec = poll(&mut check) => {
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
                            return output_failed(&e);
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
            line = recv(stdin.as_mut()) => {
                let Some(line) = line.flatten() else {
                    // End of input: stop prompting; the run keeps waiting on the server.
                    stdin = None;
                    stdin_closed = true;
                    if let Some(p) = prompt.take() {
                        view.answered(false);
                        let _ = view.note(&format!("stdin is closed; the run keeps waiting. {}", answer_hint(&run_id, &p.wait)));
                    }
                    continue;
                };
                let Some(p) = prompt.as_mut() else {
                    // Typed while nothing was asked: ignored.
                    continue;
                };
                view.answered(std::io::stdin().is_terminal());
                p.answers.push(parse_answer(&line));
                if !p.complete() {
                    if let Err(e) = view.cue(&p.cue(style)) {
                        return output_failed(&e);
                    }
                    continue;
                }
                let Some(p) = prompt.take() else { continue };
                match answer(&ctx.client, &run_id, &p).await {
                    Ok(shown) => {
                        let _ = view.note(&format!("↳ sent {shown}"));
                    }
                    Err(e) if e.kind() == ErrorKind::Conflict => {
                        let _ = view.note("(the run has already ended)");
                    }
                    Err(e) => {
                        let _ = view.note(&format!("could not send the answer: {e}. {}", answer_hint(&run_id, &p.wait)));
                    }
                }
            }
        }
    }
    let _ = view.finish();
    match outcome {
        Some(o) => o.exit_code(),
        None => status_code(ctx, &run_id, Some(&mut view)).await,
    }
}

/// Answers the output of a ready future, or never.
async fn poll(check: &mut Option<Check>) -> sluice_client::Result<RunRecord> {
    match check {
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
async fn answer(client: &Client, run_id: &str, p: &Prompt) -> sluice_client::Result<String> {
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

/// Ctrl-C: cancel the run when asked to, and exit 130.
async fn interrupted(ctx: &Ctx, run_id: &str, cancel: bool) -> u8 {
    if cancel {
        match tokio::time::timeout(Duration::from_secs(5), ctx.client.cancel(run_id)).await {
            Ok(Ok(_)) => eprintln!("sluice: interrupted; cancelled run {run_id}"),
            Ok(Err(e)) if e.kind() == ErrorKind::Conflict => {
                eprintln!("sluice: interrupted; run {run_id} had already ended");
            }
            Ok(Err(e)) => eprintln!("sluice: interrupted; could not cancel run {run_id}: {e}"),
            Err(_) => eprintln!("sluice: interrupted; cancelling run {run_id} timed out"),
        }
    } else {
        eprintln!(
            "sluice: interrupted; run {run_id} continues on the server (follow: sluice tail {run_id}; stop: sluice cancel {run_id})"
        );
    }
    EXIT_CANCELLED
}

/// The stream ended with an error: exit 2 (connection, not found, data loss).
fn stream_failed(ctx: &Ctx, e: &sluice_client::Error) -> u8 {
    ctx.fail(e, EXIT_USAGE)
}

fn output_failed(e: &std::io::Error) -> u8 {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        EXIT_OK
    } else {
        eprintln!("sluice: cannot write the output: {e}");
        EXIT_USAGE
    }
}

/// The stream ended without a terminal event (a cursor already at a finished run's end): the
/// exit code of the run's status.
async fn status_code(ctx: &Ctx, run_id: &str, view: Option<&mut Renderer<std::io::Stdout>>) -> u8 {
    let rec = match ctx.client.run(run_id).await {
        Ok(r) => r,
        Err(e) => return ctx.fail(&e, EXIT_USAGE),
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
            eprintln!(
                "sluice: the event stream of run {run_id} ended while it is {}",
                other.as_str()
            );
            EXIT_USAGE
        }
    }
}
