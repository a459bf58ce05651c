//! `run`, `tail`, `send`, `cancel`, `runs`, `workflows`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;
use sluice_client::{CreateRun, EventStream, RunFilter, RunStatus, StartOptions};

use super::follow::{self, FollowOptions};
use super::interrupt::Interrupt;
use super::output::{self, say};
use super::render::{Style, truncate};
use super::{Ctx, EXIT_CANCELLED, EXIT_OK, Exit, parse_json, terminal};

/// Where the configuration of workflows is documented.
const CONFIG_DOCS: &str = "docs/protocol.md, section \"Command line and configuration\" ([workflows.NAME] in sluice.toml)";

/// `sluice run WORKFLOW [INPUT_JSON] [--follow] [--json] [--cancel-on-exit]`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The workflow to run (see `sluice workflows`).
    workflow: String,
    /// The run's input as JSON, e.g. '{"n": 50, "delay_ms": 20}'.
    #[arg(value_name = "INPUT_JSON")]
    input: Option<String>,
    /// Watch the run until it ends (answering its prompts); exit 0 completed, 1 failed,
    /// 130 cancelled or Ctrl-C.
    #[arg(long, short)]
    follow: bool,
    /// Print raw JSON: each event envelope on one line (with --follow), else the run record.
    #[arg(long)]
    json: bool,
    /// When this command stops before the run ended (Ctrl-C, or stdout closed), cancel the run
    /// too; without it, the run continues on the server.
    #[arg(long, requires = "follow")]
    cancel_on_exit: bool,
    /// Continue this session.
    #[arg(long, value_name = "SESSION_ID")]
    session: Option<String>,
    /// When the session has a run that has not ended, queue behind it instead of being
    /// refused.
    #[arg(long, requires = "session")]
    enqueue: bool,
    /// Send this Idempotency-Key: running the command again with the same key (and input)
    /// answers the run the first one started, and starts nothing.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

/// `sluice tail RUN_ID [--after N] [--json] [--cancel-on-exit]`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The run to follow.
    run_id: String,
    /// Start after this event seq (default: from the first event).
    #[arg(long, value_name = "N", default_value_t = 0)]
    after: u64,
    /// Print each event envelope as one JSON line, and nothing else on stdout.
    #[arg(long)]
    json: bool,
    /// When this command stops before the run ended (Ctrl-C, or stdout closed), cancel the run
    /// too; without it, the run continues on the server.
    #[arg(long)]
    cancel_on_exit: bool,
}

/// `sluice send RUN_ID TYPE DATA_JSON`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The run.
    run_id: String,
    /// Event type: `input` (human input), `tool-results`, or one the workflow accepts.
    #[arg(value_name = "TYPE")]
    event_type: String,
    /// The event's data as JSON, e.g. '"yes"' or '{"results": [...]}'.
    #[arg(value_name = "DATA_JSON")]
    data: String,
}

/// `sluice cancel RUN_ID`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The run.
    run_id: String,
    /// Recorded in the run's `chain-cancelled` event.
    #[arg(long)]
    reason: Option<String>,
}

/// `sluice runs [--workflow W] [--status S,…] [--session ID] [--limit N] [--cursor C] [--json]`.
#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    /// Only runs of this workflow.
    #[arg(long)]
    workflow: Option<String>,
    /// Only runs in these states (comma-separated: queued, running, waiting, completed,
    /// failed, cancelled).
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    status: Vec<RunStatus>,
    /// Only runs of this session.
    #[arg(long, value_name = "SESSION_ID")]
    session: Option<String>,
    /// How many (1 to 1000).
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Continue after a previous page (its `next_cursor`).
    #[arg(long)]
    cursor: Option<String>,
    /// The page as the server answers it, on one line: `{"runs": [...], "next_cursor": ...}`.
    #[arg(long)]
    json: bool,
}

/// `sluice workflows`.
#[derive(Debug, clap::Args)]
pub struct WorkflowsArgs {
    /// The list as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_status(s: &str) -> Result<RunStatus, String> {
    RunStatus::parse(s.trim()).ok_or_else(|| {
        format!("{s:?} is not one of queued, running, waiting, completed, failed, cancelled")
    })
}

pub async fn run(ctx: &Ctx, a: RunArgs) -> Exit {
    let input = match a.input.as_deref() {
        Some(text) => parse_json("INPUT_JSON", text)?,
        None => Value::Null,
    };
    let req = CreateRun {
        input,
        session_id: a.session,
        metadata: None,
    };
    let opts = StartOptions {
        idempotency_key: a.idempotency_key,
        enqueue: a.enqueue,
    };
    if !a.follow {
        let handle = ctx
            .client
            .start_with(&a.workflow, req, &opts)
            .await
            .map_err(|e| ctx.refused(&e))?;
        if a.json {
            output::json_line(serde_json::to_string(handle.record()))?;
        } else {
            output::line(handle.id())?;
            say!(
                "started {} ({}); follow it with: sluice tail {}",
                handle.id(),
                a.workflow,
                handle.id()
            );
        }
        return Ok(EXIT_OK);
    }
    // Listening before the first request: Ctrl-C while the run starts is handled too.
    let mut interrupt = Interrupt::listen();
    let start = ctx.client.start_and_stream_with(&a.workflow, req, &opts);
    tokio::pin!(start);
    let stream = tokio::select! {
        biased;
        () = interrupt.recv() => {
            return Err(interrupted_at_start(ctx, &a.workflow, start, a.cancel_on_exit, &mut interrupt).await);
        }
        started = &mut start => started.map_err(|e| ctx.refused(&e))?,
    };
    let opts = FollowOptions {
        json: a.json,
        cancel_on_exit: a.cancel_on_exit,
    };
    Ok(follow::follow(ctx, stream.raw(), opts, &mut interrupt).await)
}

/// Ctrl-C before the server answered the start: the run may or may not exist. To cancel it
/// (`--cancel-on-exit`) its id is needed, so the start is given a few seconds to answer.
async fn interrupted_at_start<F>(
    ctx: &Ctx,
    workflow: &str,
    start: Pin<&mut F>,
    cancel: bool,
    interrupt: &mut Interrupt,
) -> u8
where
    F: Future<Output = sluice_client::Result<EventStream>>,
{
    let maybe = format!(
        "interrupted while starting a run of {workflow}; it may have started on the server (see: sluice runs --workflow {workflow})"
    );
    if !cancel {
        say!("{maybe}");
        return EXIT_CANCELLED;
    }
    let started = tokio::select! {
        biased;
        () = interrupt.recv() => None,
        answer = tokio::time::timeout(Duration::from_secs(5), start) => answer.ok(),
    };
    match started {
        Some(Ok(stream)) => follow::cancel_run(ctx, stream.run_id(), interrupt).await,
        Some(Err(e)) => say!("interrupted; the run was not started: {e}"),
        None => say!("{maybe}"),
    }
    EXIT_CANCELLED
}

pub async fn tail(ctx: &Ctx, a: TailArgs) -> Exit {
    // A run that waits and has nothing past the cursor would show nothing at all: say why.
    if a.after > 0
        && let Ok(rec) = ctx.client.run(&a.run_id).await
        && rec.status == RunStatus::Waiting
        && a.after >= rec.last_seq
    {
        say!(
            "run {} waits for input (or client tool results) asked for at or before event {}: `sluice tail {}` shows the request, `sluice send {} input JSON` answers it",
            rec.id,
            a.after,
            rec.id,
            rec.id
        );
    }
    let mut interrupt = Interrupt::listen();
    let stream = ctx.client.events(&a.run_id, a.after).raw();
    let opts = FollowOptions {
        json: a.json,
        cancel_on_exit: a.cancel_on_exit,
    };
    Ok(follow::follow(ctx, stream, opts, &mut interrupt).await)
}

pub async fn send(ctx: &Ctx, a: SendArgs) -> Exit {
    let data = parse_json("DATA_JSON", &a.data)?;
    ctx.client
        .send(&a.run_id, &a.event_type, data)
        .await
        .map_err(|e| ctx.refused(&e))?;
    output::line(&format!("sent {} to {}", a.event_type, a.run_id))?;
    Ok(EXIT_OK)
}

pub async fn cancel(ctx: &Ctx, a: CancelArgs) -> Exit {
    let answer = match &a.reason {
        Some(r) => ctx.client.cancel_with_reason(&a.run_id, r).await,
        None => ctx.client.cancel(&a.run_id).await,
    };
    let rec = answer.map_err(|e| ctx.refused(&e))?;
    if rec.status == RunStatus::Cancelled {
        output::line(&format!("cancelled {}", rec.id))?;
    } else {
        output::line(&format!(
            "cancelling {} (was {}; it ends with chain-cancelled)",
            rec.id,
            rec.status.as_str()
        ))?;
    }
    Ok(EXIT_OK)
}

pub async fn runs(ctx: &Ctx, a: RunsArgs) -> Exit {
    let filter = RunFilter {
        workflow: a.workflow,
        statuses: a.status,
        session_id: a.session,
        limit: Some(a.limit),
        cursor: a.cursor,
    };
    let page = ctx
        .client
        .list_runs(&filter)
        .await
        .map_err(|e| ctx.refused(&e))?;
    if a.json {
        // `next_cursor` always present (null on the last page), after `runs`.
        let json = serde_json::to_string(&page.runs).and_then(|runs| {
            serde_json::to_string(&page.next_cursor)
                .map(|cursor| format!("{{\"runs\":{runs},\"next_cursor\":{cursor}}}"))
        });
        output::json_line(json)?;
        return Ok(EXIT_OK);
    }
    if page.runs.is_empty() {
        let filtered = filter.workflow.is_some()
            || !filter.statuses.is_empty()
            || filter.session_id.is_some()
            || filter.cursor.is_some();
        if filtered {
            output::line("no runs match")?;
        } else {
            output::line("no runs yet; start one with: sluice run ticker '{\"n\": 5}' --follow")?;
        }
        return Ok(EXIT_OK);
    }
    let (_, color) = terminal();
    let style = Style::new(color);
    let rows: Vec<[String; 5]> = page
        .runs
        .iter()
        .map(|r| {
            let created = r.created_at.to_string();
            [
                r.id.clone(),
                r.workflow.clone(),
                r.status.as_str().to_owned(),
                r.last_seq.to_string(),
                created.get(..19).unwrap_or(&created).replace('T', " "),
            ]
        })
        .collect();
    let header = ["RUN", "WORKFLOW", "STATUS", "EVENTS", "CREATED (UTC)"];
    print_table(&header, &rows, |col, cell| {
        if col == 2 {
            style.status(cell)
        } else {
            cell.to_owned()
        }
    })?;
    if let Some(cursor) = page.next_cursor {
        output::line(&style.dim(&format!("more: {}", next_page(&filter, &cursor))))?;
    }
    Ok(EXIT_OK)
}

/// The command line of the next page: the same filters, the new cursor.
fn next_page(filter: &RunFilter, cursor: &str) -> String {
    let mut cmd = String::from("sluice runs");
    if let Some(w) = &filter.workflow {
        cmd.push_str(&format!(" --workflow {w}"));
    }
    if !filter.statuses.is_empty() {
        let list: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        cmd.push_str(&format!(" --status {}", list.join(",")));
    }
    if let Some(s) = &filter.session_id {
        cmd.push_str(&format!(" --session {s}"));
    }
    if let Some(l) = filter.limit.filter(|l| *l != 20) {
        cmd.push_str(&format!(" --limit {l}"));
    }
    cmd.push_str(&format!(" --cursor {cursor}"));
    cmd
}

pub async fn workflows(ctx: &Ctx, a: WorkflowsArgs) -> Exit {
    let list = ctx.client.workflows().await.map_err(|e| ctx.refused(&e))?;
    if a.json {
        output::json_line(serde_json::to_string(&list))?;
        return Ok(EXIT_OK);
    }
    let (_, color) = terminal();
    let style = Style::new(color);
    if list.is_empty() {
        output::line(&format!("no workflows are deployed on {}.", ctx.server))?;
        output::line(&format!(
            "add one in the server's config file and restart it: see {CONFIG_DOCS}"
        ))?;
        return Ok(EXIT_OK);
    }
    let rows: Vec<[String; 3]> = list
        .iter()
        .map(|w| [w.name.clone(), w.kind.clone(), truncate(&w.description, 70)])
        .collect();
    print_table(&["NAME", "KIND", "DESCRIPTION"], &rows, |_, c| c.to_owned())?;
    if !list.iter().any(|w| w.kind == "agent") {
        output::line("")?;
        output::line(&style.dim(
            "no agent is configured. To add one, start `sluice serve` with OPENAI_API_KEY or",
        ))?;
        output::line(&style.dim(&format!(
            "OPENAI_BASE_URL set (serves `assistant`), or declare kind = \"agent\" in a config file: see {CONFIG_DOCS}"
        )))?;
    }
    Ok(EXIT_OK)
}

/// Left-aligned columns two spaces apart; `paint` styles a cell after padding is computed.
fn print_table<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    paint: impl Fn(usize, &str) -> String,
) -> Result<(), u8> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fmt_row = |cells: Vec<(String, usize)>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut line = String::new();
        for (i, (shown, len)) in cells.into_iter().enumerate() {
            line.push_str(&shown);
            if i < last {
                line.push_str(&" ".repeat(widths[i].saturating_sub(len) + 2));
            }
        }
        line
    };
    output::line(&fmt_row(
        header
            .iter()
            .map(|h| (h.to_string(), h.chars().count()))
            .collect(),
    ))?;
    for row in rows {
        output::line(&fmt_row(
            row.iter()
                .enumerate()
                .map(|(i, c)| (paint(i, c), c.chars().count()))
                .collect(),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_keeps_the_filters() {
        let f = RunFilter {
            limit: Some(20),
            ..RunFilter::default()
        };
        assert_eq!(next_page(&f, "c1"), "sluice runs --cursor c1");
        let f = RunFilter {
            workflow: Some("ticker".into()),
            statuses: vec![RunStatus::Failed, RunStatus::Cancelled],
            session_id: Some("ses_1".into()),
            limit: Some(5),
            cursor: Some("old".into()),
        };
        assert_eq!(
            next_page(&f, "c2"),
            "sluice runs --workflow ticker --status failed,cancelled --session ses_1 --limit 5 --cursor c2"
        );
        assert!(parse_status(" waiting ").is_ok());
        assert!(parse_status("sleeping").is_err());
    }
}
