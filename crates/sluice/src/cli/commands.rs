//! `run`, `tail`, `send`, `cancel`, `runs`, `workflows`.

use serde_json::Value;
use sluice_client::{CreateRun, ErrorKind, RunFilter, RunStatus};

use super::follow::{self, FollowOptions};
use super::render::{Style, truncate};
use super::{Ctx, EXIT_FAILED, EXIT_OK, EXIT_USAGE, parse_json, terminal};

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
    /// 130 cancelled.
    #[arg(long, short)]
    follow: bool,
    /// Print raw JSON: each event envelope on one line (with --follow), else the run record.
    #[arg(long)]
    json: bool,
    /// On Ctrl-C, cancel the run too (without it, the run continues on the server).
    #[arg(long, requires = "follow")]
    cancel_on_exit: bool,
    /// Continue this session.
    #[arg(long, value_name = "SESSION_ID")]
    session: Option<String>,
}

/// `sluice tail RUN_ID [--after N] [--json]`.
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

/// `sluice runs`.
#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    /// Only runs of this workflow.
    #[arg(long)]
    workflow: Option<String>,
    /// Only runs in these states (comma-separated: queued, running, waiting, completed,
    /// failed, cancelled).
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    status: Vec<RunStatus>,
    /// How many (1 to 1000).
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Continue after a previous page.
    #[arg(long)]
    cursor: Option<String>,
    /// One run record per line, as JSON.
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

pub async fn run(ctx: &Ctx, a: RunArgs) -> u8 {
    let input = match a.input.as_deref() {
        Some(text) => match parse_json("INPUT_JSON", text) {
            Ok(v) => v,
            Err(code) => return code,
        },
        None => Value::Null,
    };
    let req = CreateRun {
        input,
        session_id: a.session,
        metadata: None,
    };
    let not_started = |e: &sluice_client::Error| {
        let code = ctx.fail(e, EXIT_USAGE);
        if e.kind() == ErrorKind::NotFound {
            eprintln!("sluice: `sluice workflows` lists the deployed workflows");
        }
        code
    };
    if !a.follow {
        return match ctx.client.start(&a.workflow, req).await {
            Ok(handle) => {
                if a.json {
                    match serde_json::to_string(handle.record()) {
                        Ok(line) => println!("{line}"),
                        Err(e) => {
                            eprintln!("sluice: {e}");
                            return EXIT_USAGE;
                        }
                    }
                } else {
                    println!("{}", handle.id());
                    eprintln!(
                        "sluice: started {} ({}); follow it with: sluice tail {}",
                        handle.id(),
                        a.workflow,
                        handle.id()
                    );
                }
                EXIT_OK
            }
            Err(e) => not_started(&e),
        };
    }
    let stream = match ctx.client.start_and_stream(&a.workflow, req).await {
        Ok(s) => s,
        Err(e) => return not_started(&e),
    };
    let opts = FollowOptions {
        json: a.json,
        cancel_on_exit: a.cancel_on_exit,
    };
    follow::follow(ctx, stream.raw(), opts).await
}

pub async fn tail(ctx: &Ctx, a: TailArgs) -> u8 {
    let stream = ctx.client.events(&a.run_id, a.after).raw();
    let opts = FollowOptions {
        json: a.json,
        cancel_on_exit: false,
    };
    follow::follow(ctx, stream, opts).await
}

pub async fn send(ctx: &Ctx, a: SendArgs) -> u8 {
    let data = match parse_json("DATA_JSON", &a.data) {
        Ok(v) => v,
        Err(code) => return code,
    };
    match ctx.client.send(&a.run_id, &a.event_type, data).await {
        Ok(()) => {
            println!("sent {} to {}", a.event_type, a.run_id);
            EXIT_OK
        }
        Err(e) => ctx.fail(&e, EXIT_FAILED),
    }
}

pub async fn cancel(ctx: &Ctx, a: CancelArgs) -> u8 {
    let answer = match &a.reason {
        Some(r) => ctx.client.cancel_with_reason(&a.run_id, r).await,
        None => ctx.client.cancel(&a.run_id).await,
    };
    match answer {
        Ok(rec) if rec.status == RunStatus::Cancelled => {
            println!("cancelled {}", rec.id);
            EXIT_OK
        }
        Ok(rec) => {
            println!(
                "cancelling {} (was {}; it ends with chain-cancelled)",
                rec.id,
                rec.status.as_str()
            );
            EXIT_OK
        }
        Err(e) => ctx.fail(&e, EXIT_FAILED),
    }
}

pub async fn runs(ctx: &Ctx, a: RunsArgs) -> u8 {
    let filter = RunFilter {
        workflow: a.workflow,
        statuses: a.status,
        session_id: None,
        limit: Some(a.limit),
        cursor: a.cursor,
    };
    let page = match ctx.client.list_runs(&filter).await {
        Ok(p) => p,
        Err(e) => return ctx.fail(&e, EXIT_FAILED),
    };
    if a.json {
        for r in &page.runs {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return EXIT_USAGE;
                }
            }
        }
        return EXIT_OK;
    }
    if page.runs.is_empty() {
        println!("no runs yet; start one with: sluice run ticker '{{\"n\": 5}}' --follow");
        return EXIT_OK;
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
    });
    if let Some(cursor) = page.next_cursor {
        println!(
            "{}",
            style.dim(&format!("more: sluice runs --cursor {cursor}"))
        );
    }
    EXIT_OK
}

pub async fn workflows(ctx: &Ctx, a: WorkflowsArgs) -> u8 {
    let list = match ctx.client.workflows().await {
        Ok(l) => l,
        Err(e) => return ctx.fail(&e, EXIT_FAILED),
    };
    if a.json {
        return match serde_json::to_string(&list) {
            Ok(text) => {
                println!("{text}");
                EXIT_OK
            }
            Err(e) => {
                eprintln!("sluice: {e}");
                EXIT_USAGE
            }
        };
    }
    let (_, color) = terminal();
    let style = Style::new(color);
    if list.is_empty() {
        println!("no workflows are deployed on {}.", ctx.server);
        println!("add one in the server's config file and restart it: see {CONFIG_DOCS}");
        return EXIT_OK;
    }
    let rows: Vec<[String; 3]> = list
        .iter()
        .map(|w| [w.name.clone(), w.kind.clone(), truncate(&w.description, 70)])
        .collect();
    print_table(&["NAME", "KIND", "DESCRIPTION"], &rows, |_, c| c.to_owned());
    if !list.iter().any(|w| w.kind == "agent") {
        println!();
        println!(
            "{}",
            style.dim(
                "no agent is configured. To add one, start `sluice serve` with OPENAI_API_KEY or"
            )
        );
        println!(
            "{}",
            style.dim(&format!(
                "OPENAI_BASE_URL set (serves `assistant`), or declare kind = \"agent\" in a config file: see {CONFIG_DOCS}"
            ))
        );
    }
    EXIT_OK
}

/// Left-aligned columns two spaces apart; `paint` styles a cell after padding is computed.
fn print_table<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    paint: impl Fn(usize, &str) -> String,
) {
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
    println!(
        "{}",
        fmt_row(
            header
                .iter()
                .map(|h| (h.to_string(), h.chars().count()))
                .collect()
        )
    );
    for row in rows {
        println!(
            "{}",
            fmt_row(
                row.iter()
                    .enumerate()
                    .map(|(i, c)| (paint(i, c), c.chars().count()))
                    .collect()
            )
        );
    }
}
