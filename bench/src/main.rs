//! `sluice-bench`: the load generator of Sluice's benchmark scenarios (DESIGN.md, "Performance").
//!
//! Every client speaks HTTP/1.1 over a raw `TcpStream` (requests written by hand, chunked bodies
//! decoded and SSE scanned incrementally) so the client is never the bottleneck, and every
//! event received is parsed and checked: `seq` contiguous, no duplicate, in order, one terminal
//! event, and for ticks the creation time `t`, from which the added latency is measured.
//!
//! Layout: `http` (the client), `sse` (scanner and envelope fields), `check` (delivery checks),
//! `client` (the reader all scenarios share), `raw` (the raw-socket reference server), `s1`…`s5`,
//! `agents` and `stall` (scenarios), `procfs` (server RSS and CPU), `report` (the markdown table).
//!
//! ```text
//! sluice-bench all --server http://127.0.0.1:8080 --server-pid 1234
//! sluice-bench s4 --server http://127.0.0.1:8081     # a server run with bench/configs/s4.toml
//! ```

mod agents;
mod check;
mod client;
mod http;
mod procfs;
mod raw;
mod report;
mod s1;
mod s2;
mod s3;
mod s4;
mod s5;
mod sse;
mod stall;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::client::Common;
use crate::http::Target;
use crate::report::Row;

/// Load generator and benchmark scenarios of Sluice. Traffic goes to loopback only; every
/// scenario is bounded in count and time, and the tool exits by itself at --deadline-secs.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Hard deadline of the whole invocation: past it the tool exits (code 3).
    #[arg(long, global = true, default_value_t = 1200)]
    deadline_secs: u64,
    /// Longest silence on a socket before a reader gives up.
    #[arg(long, global = true, default_value_t = 30)]
    idle_secs: u64,
    /// Connection attempts (connect + request + response head) in flight at once.
    #[arg(long, global = true, default_value_t = 256)]
    connect_concurrency: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The raw-socket reference of S1: a bare TCP server writing a ticker run's SSE bytes.
    RawReference(RawArgs),
    /// S1, one stream: events/s and time to first event of one big run.
    S1(S1Args),
    /// S1 against the server and the in-process raw reference, interleaved; prints the ratio.
    S1Compare(S1CompareArgs),
    /// S2, many agents: C concurrent paced runs, one reader each.
    S2(S2Args),
    /// S3, resume: drop after 500 events, reconnect with Last-Event-ID.
    S3(S3Args),
    /// S4, admission: a burst of 10x capacity (server run with bench/configs/s4.toml).
    S4(S4Args),
    /// S5, fan-out: one run, many live readers.
    S5(S5Args),
    /// Agents: C concurrent agent runs against `sluice-mock-llm --stamp` (see bench/run.sh).
    Agents(AgentsArgs),
    /// Stalled readers: server memory per reader that stops reading (SSE and NDJSON).
    Stall(StallArgs),
    /// S1 (with the raw comparison), S2, S3 and S5, then one markdown table.
    All(AllArgs),
}

#[derive(Debug, Args)]
struct RawArgs {
    /// Ticks per run when the request body names no `n`.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// SSE bytes per chunk (one write).
    #[arg(long, default_value_t = 64 * 1024)]
    batch_bytes: usize,
}

#[derive(Debug, Args)]
struct ServerArg {
    /// Base URL of the server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
}

#[derive(Debug, Args, Clone, Copy)]
struct S1Opts {
    /// Ticks of the big run.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Characters of each tick's text.
    #[arg(long, default_value_t = 16)]
    text_len: u64,
    /// Big runs per side (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// One-tick runs timing the first event.
    #[arg(long, default_value_t = 30)]
    ttfe_samples: u32,
}

impl S1Opts {
    fn params(self) -> s1::S1Params {
        s1::S1Params {
            events: self.events,
            text_len: self.text_len,
            repeat: self.repeat.max(1),
            ttfe_samples: self.ttfe_samples.max(1),
        }
    }
}

#[derive(Debug, Args)]
struct S1Args {
    /// Base URL of the server (Sluice, or a `raw-reference` process).
    #[arg(long, required_unless_present = "raw")]
    server: Option<String>,
    /// Measure the raw reference, started in this process.
    #[arg(long, conflicts_with = "server")]
    raw: bool,
    /// The server's process id, to report its CPU time.
    #[arg(long)]
    server_pid: Option<String>,
    #[command(flatten)]
    opts: S1Opts,
}

#[derive(Debug, Args)]
struct S1CompareArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The server's process id, to report its CPU time.
    #[arg(long)]
    server_pid: Option<String>,
    #[command(flatten)]
    opts: S1Opts,
}

#[derive(Debug, Args)]
struct S2Args {
    #[command(flatten)]
    server: ServerArg,
    /// Concurrent runs (C).
    #[arg(long, default_value_t = 1000)]
    runs: u64,
    /// Events per second of each run (R).
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Events per run.
    #[arg(long, default_value_t = 100)]
    events: u64,
    /// The server's process id: report its RSS (/proc/PID/status) and CPU (/proc/PID/stat).
    #[arg(long)]
    server_pid: Option<String>,
    /// Also write every tick as a CSV line `created_ms,latency_ms` (creation time from the
    /// scenario's start), to see when a tail happened.
    #[arg(long)]
    latencies_out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct S3Args {
    #[command(flatten)]
    server: ServerArg,
    /// Ticks of the run.
    #[arg(long, default_value_t = 2000)]
    events: u64,
    /// Events read before dropping the connection.
    #[arg(long, default_value_t = 500)]
    drop_after: u64,
    /// Drops (and resumes) per run.
    #[arg(long, default_value_t = 1)]
    drops: u32,
    /// ms between ticks in the live case.
    #[arg(long, default_value_t = 1)]
    live_delay_ms: u64,
}

#[derive(Debug, Args)]
struct S4Args {
    #[command(flatten)]
    server: ServerArg,
    /// The workflow's max_concurrent_runs (as in bench/configs/s4.toml).
    #[arg(long, default_value_t = 10)]
    max_concurrent: u64,
    /// The workflow's queue (as in bench/configs/s4.toml).
    #[arg(long, default_value_t = 10)]
    queue: u64,
    /// Burst size as a multiple of capacity.
    #[arg(long, default_value_t = 10)]
    factor: u64,
    /// Ticks per run.
    #[arg(long, default_value_t = 100)]
    events: u64,
    /// ms between ticks (accepted runs hold their slots through the burst).
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
    /// Workflow name.
    #[arg(long, default_value = "ticker")]
    workflow: String,
    /// Bound on each 429's latency, ms.
    #[arg(long, default_value_t = 10.0)]
    limit_ms: f64,
}

#[derive(Debug, Args)]
struct S5Args {
    #[command(flatten)]
    server: ServerArg,
    /// Readers following the run.
    #[arg(long, default_value_t = 1000)]
    readers: u64,
    /// Ticks of the run.
    #[arg(long, default_value_t = 2000)]
    events: u64,
    /// ms between ticks.
    #[arg(long, default_value_t = 5)]
    delay_ms: u64,
    /// The server's process id, to report its RSS and CPU.
    #[arg(long)]
    server_pid: Option<String>,
}

#[derive(Debug, Args)]
struct AgentsArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Concurrent agent runs (C).
    #[arg(long, default_value_t = 1000)]
    runs: u64,
    /// Tokens per answer, as `sluice-mock-llm --tokens` was started with.
    #[arg(long, default_value_t = 250)]
    tokens: u64,
    /// Tokens per second, as `sluice-mock-llm --rate` was started with.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// The agent workflow (kind = "agent", on the mock model server).
    #[arg(long, default_value = "agent")]
    workflow: String,
    /// The server's process id, to report its RSS and CPU.
    #[arg(long)]
    server_pid: Option<String>,
    /// The model server's process id, to report its CPU.
    #[arg(long)]
    mock_pid: Option<String>,
}

#[derive(Debug, Args)]
struct StallArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Stalled readers per format.
    #[arg(long, default_value_t = 200)]
    readers: u64,
    /// Ticks of the run they read (enough to fill every buffer between server and reader).
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// The server's process id (required: the scenario measures its RSS).
    #[arg(long)]
    server_pid: Option<String>,
}

#[derive(Debug, Args)]
struct AllArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The server's process id, to report its RSS and CPU.
    #[arg(long)]
    server_pid: Option<String>,
    #[command(flatten)]
    s1: S1Opts,
    /// Readers of S5.
    #[arg(long, default_value_t = 1000)]
    readers: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let deadline = Duration::from_secs(cli.deadline_secs);
    // The hard deadline: whatever happens, the tool ends by itself.
    let _ = std::thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            eprintln!("sluice-bench: hard deadline of {deadline:?} reached, exiting");
            std::process::exit(3);
        });
    let common = Common {
        idle: Duration::from_secs(cli.idle_secs.max(1)),
        connect_concurrency: cli.connect_concurrency,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command, common)) {
        Ok(rows) if report::failed(&rows) => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn raw_target(events: u64, batch_bytes: usize) -> anyhow::Result<Target> {
    let addr = raw::spawn_thread(raw::RawOptions {
        default_events: events,
        batch_bytes,
    })?;
    Target::parse(&format!("http://{addr}"))
}

/// The two in-process raw references: 64 KiB writes (the limit) and one write per event.
fn raw_targets(events: u64) -> anyhow::Result<(Target, Target)> {
    Ok((raw_target(events, 64 * 1024)?, raw_target(events, 1)?))
}

fn finish(title: &str, rows: Vec<Row>) -> Vec<Row> {
    println!();
    println!("### {title}");
    println!();
    report::print_table(&rows);
    rows
}

async fn dispatch(command: Command, common: Common) -> anyhow::Result<Vec<Row>> {
    match command {
        Command::RawReference(a) => {
            let listener = tokio::net::TcpListener::bind(&a.listen)
                .await
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            let local = listener.local_addr()?;
            anyhow::ensure!(local.ip().is_loopback(), "--listen: loopback only");
            println!("listening on http://{local}");
            raw::serve(
                listener,
                raw::RawOptions {
                    default_events: a.events,
                    batch_bytes: a.batch_bytes.max(1),
                },
            )
            .await?;
            Ok(Vec::new())
        }
        Command::S1(a) => {
            let p = a.opts.params();
            let (target, label) = match &a.server {
                Some(url) => (Target::parse(url)?, "server"),
                None => (raw_target(p.events, 64 * 1024)?, "raw reference"),
            };
            println!("S1 against {} ({label})", target.url());
            let side = s1::measure(label, &target, &p, &common, a.server_pid.as_deref()).await?;
            side.print();
            Ok(finish("S1", s1::rows(&side, &p)))
        }
        Command::S1Compare(a) => {
            let p = a.opts.params();
            let target = Target::parse(&a.server.server)?;
            let (raw, raw1) = raw_targets(p.events)?;
            println!(
                "S1 compare: Sluice {} vs raw reference {}",
                target.url(),
                raw.url()
            );
            let pid = a.server_pid.as_deref();
            let c = s1::compare(&target, &raw, &raw1, &p, &common, pid).await?;
            c.print();
            Ok(finish("S1", s1::compare_rows(&c, &p)))
        }
        Command::S2(a) => {
            let target = Target::parse(&a.server.server)?;
            let p = s2::S2Params {
                runs: a.runs,
                rate: a.rate,
                events: a.events,
                text_len: 16,
                latencies_out: a.latencies_out.clone(),
            };
            let res = s2::run(&target, &p, &common, a.server_pid.as_deref()).await?;
            res.print(&p);
            Ok(finish("S2", res.rows(&p)))
        }
        Command::S3(a) => {
            let target = Target::parse(&a.server.server)?;
            let p = s3::S3Params {
                events: a.events,
                drop_after: a.drop_after.max(1),
                drops: a.drops,
                live_delay_ms: a.live_delay_ms,
            };
            let cases = s3::run(&target, &p, &common).await?;
            s3::print(&cases);
            Ok(finish("S3", s3::rows(&cases, &p)))
        }
        Command::S4(a) => {
            let target = Target::parse(&a.server.server)?;
            let p = s4::S4Params {
                max_concurrent: a.max_concurrent,
                queue: a.queue,
                factor: a.factor.max(1),
                events: a.events,
                delay_ms: a.delay_ms,
                workflow: a.workflow,
                limit_ms: a.limit_ms,
            };
            let res = s4::run(&target, &p, &common).await?;
            res.print(&p);
            Ok(finish("S4", res.rows(&p)))
        }
        Command::S5(a) => {
            let target = Target::parse(&a.server.server)?;
            let p = s5::S5Params {
                readers: a.readers.max(1),
                events: a.events,
                delay_ms: a.delay_ms,
            };
            let res = s5::run(&target, &p, &common, a.server_pid.as_deref()).await?;
            res.print(&p);
            Ok(finish("S5", res.rows(&p)))
        }
        Command::Agents(a) => {
            let target = Target::parse(&a.server.server)?;
            let p = agents::AgentsParams {
                runs: a.runs.max(1),
                tokens: a.tokens,
                rate: a.rate,
                workflow: a.workflow,
            };
            let res = agents::run(
                &target,
                &p,
                &common,
                a.server_pid.as_deref(),
                a.mock_pid.as_deref(),
            )
            .await?;
            res.print(&p);
            Ok(finish("Agents", res.rows(&p)))
        }
        Command::Stall(a) => {
            let target = Target::parse(&a.server.server)?;
            let p = stall::StallParams {
                readers: a.readers.max(1),
                events: a.events.max(1),
            };
            let sides = stall::run(&target, &p, &common, a.server_pid.as_deref()).await?;
            stall::print(&sides, &p);
            Ok(finish("Stalled readers", stall::rows(&sides, &p)))
        }
        Command::All(a) => all(a, common).await,
    }
}

async fn all(a: AllArgs, common: Common) -> anyhow::Result<Vec<Row>> {
    let target = Target::parse(&a.server.server)?;
    let pid = a.server_pid.as_deref();
    let mut rows = Vec::new();

    let p1 = a.s1.params();
    println!("== S1: one stream, Sluice vs raw-socket reference");
    let s1_rows = match raw_targets(p1.events) {
        Ok((raw, raw1)) => match s1::compare(&target, &raw, &raw1, &p1, &common, pid).await {
            Ok(c) => {
                c.print();
                s1::compare_rows(&c, &p1)
            }
            Err(e) => vec![Row::error("S1 one stream", &e)],
        },
        Err(e) => vec![Row::error("S1 one stream", &e)],
    };
    rows.extend(s1_rows);

    // S2 at C=10,000 runs on a fresh server of its own (bench/run.sh --big): its RSS growth
    // per run would otherwise reuse the heap the scenarios before it left behind.
    for (runs, rate) in [(1000, 50.0)] {
        let p = s2::S2Params {
            runs,
            rate,
            events: 100,
            text_len: 16,
            latencies_out: None,
        };
        println!("== S2: {runs} concurrent runs at {rate} ev/s");
        match s2::run(&target, &p, &common, pid).await {
            Ok(res) => {
                res.print(&p);
                rows.extend(res.rows(&p));
            }
            Err(e) => rows.push(Row::error(&format!("S2 C={runs}"), &e)),
        }
    }

    let p3 = s3::S3Params {
        events: 2000,
        drop_after: 500,
        drops: 1,
        live_delay_ms: 1,
    };
    println!("== S3: resume with Last-Event-ID");
    match s3::run(&target, &p3, &common).await {
        Ok(cases) => {
            s3::print(&cases);
            rows.extend(s3::rows(&cases, &p3));
        }
        Err(e) => rows.push(Row::error("S3 resume", &e)),
    }

    let p5 = s5::S5Params {
        readers: a.readers.max(1),
        events: 2000,
        delay_ms: 5,
    };
    println!("== S5: {} readers of one live run", p5.readers);
    match s5::run(&target, &p5, &common, pid).await {
        Ok(res) => {
            res.print(&p5);
            rows.extend(res.rows(&p5));
        }
        Err(e) => rows.push(Row::error("S5 fan-out", &e)),
    }

    if let Some(pid) = pid
        && let Ok(s) = procfs::sample(pid)
    {
        rows.push(Row::info(
            "Server process",
            "VmHWM (peak RSS) over all scenarios; CPU seconds since start",
            format!("{}; {:.1} s", stats::kib(s.hwm_kib), s.cpu_s),
        ));
    }
    Ok(finish(
        &format!(
            "Results (sluice-bench all, {} cores, loopback, {})",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            sluice_now()
        ),
        rows,
    ))
}

fn sluice_now() -> String {
    let mut out = Vec::new();
    sluice_protocol::Timestamp::now().write_rfc3339(&mut out);
    String::from_utf8_lossy(&out[..16.min(out.len())]).replace('T', " ") + " UTC"
}
