//! Load scenario: many concurrent agent runs streaming from a paced model.
//!
//! ```text
//! cargo run --release -p sluice-agent --example agents_load -- \
//!     [--runs 1000] [--tokens 250] [--rate 50] [--ramp-ms 1000] [--store sqlite|memory]
//! ```
//!
//! Starts, in this process, the scripted model server (`sluice-mock-llm`) in paced mode (every
//! request gets `--tokens` text deltas at `--rate` per second, the first at once) and a Sluice
//! server deploying one agent on it, each on its own runtime (named threads, so CPU time is
//! attributed per component). Then `--runs` clients each start a run (`POST`, spread over
//! `--ramp-ms`) and follow it with an SSE reader (`GET /v1/runs/{id}/events`) to its end.
//!
//! Reported:
//! - added latency per token: the client's receive time minus the token's scheduled send time,
//!   taking the schedule to start at the run's `provider-started` timestamp (written just
//!   before the model request is sent, so this is an upper bound: it includes the request's
//!   trip to the mock, the mock's own lateness, parsing, the log and the SSE hop);
//! - in-server latency: receive time minus the event's `ts` (set when the agent step wrote the
//!   token: the engine, store, follower and SSE encoder);
//! - time to first token from the `POST`;
//! - events received, lost (gaps in `seq`) and duplicated;
//! - CPU seconds (process, and per component by thread name) and peak RSS (`VmHWM`) from
//!   `/proc/self`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use sluice_agent::{AgentOptions, agent};
use sluice_engine::{Engine, Limits};
use sluice_llm::{Provider, ProviderConfig, ProviderKind};
use sluice_mock_llm::{MockServer, Script};
use sluice_protocol::Timestamp;
use sluice_server::config::ServerOptions;
use sluice_store::Store;
use tokio_util::sync::CancellationToken;

struct Args {
    runs: usize,
    tokens: usize,
    rate: f64,
    ramp: Duration,
    store: String,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        runs: 1000,
        tokens: 250,
        rate: 50.0,
        ramp: Duration::from_millis(1000),
        store: "sqlite".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value()?.parse()?,
            "--tokens" => a.tokens = value()?.parse()?,
            "--rate" => a.rate = value()?.parse()?,
            "--ramp-ms" => a.ramp = Duration::from_millis(value()?.parse()?),
            "--store" => a.store = value()?,
            other => bail!(
                "unknown argument {other:?}; usage: agents_load [--runs N] [--tokens N] [--rate PER_S] [--ramp-ms MS] [--store sqlite|memory]"
            ),
        }
    }
    if a.runs == 0 || a.tokens == 0 || !a.rate.is_finite() || a.rate <= 0.0 {
        bail!("--runs, --tokens and --rate must be positive");
    }
    Ok(a)
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn runtime(name: &str, workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()?)
}

/// What one client saw of one run.
#[derive(Default)]
struct RunStats {
    events: u64,
    lost: u64,
    dup: u64,
    tokens: usize,
    added_us: Vec<i64>,
    server_us: Vec<i64>,
    hop_us: Vec<i64>,
    ttft_us: Option<i64>,
    terminal: String,
}

async fn one_run(
    client: reqwest::Client,
    base: Arc<str>,
    start_at: tokio::time::Instant,
    interval_ns: f64,
) -> anyhow::Result<RunStats> {
    tokio::time::sleep_until(start_at).await;
    let posted = unix_nanos();
    let resp = client
        .post(format!("{base}/v1/workflows/agent/runs"))
        .json(&json!({"input": {"message": "Tell me a story."}}))
        .send()
        .await?;
    if resp.status() != 202 {
        bail!("start answered {}", resp.status());
    }
    let record: Value = resp.json().await?;
    let id = record["id"].as_str().context("no run id")?.to_owned();
    let resp = client
        .get(format!("{base}/v1/runs/{id}/events"))
        .header("accept", "text/event-stream")
        .send()
        .await?;
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut stats = RunStats::default();
    let mut last_seq = 0u64;
    let mut anchor: Option<i64> = None;
    while let Some(chunk) = body.next().await {
        let received = unix_nanos();
        buf.extend_from_slice(&chunk?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            let Some(data) = frame
                .split(|&b| b == b'\n')
                .find_map(|line| line.strip_prefix(b"data: "))
            else {
                continue;
            };
            let event: Value = serde_json::from_slice(data)?;
            stats.events += 1;
            let seq = event["seq"].as_u64().unwrap_or(0);
            if seq <= last_seq {
                stats.dup += 1;
                continue;
            }
            stats.lost += seq - last_seq - 1;
            last_seq = seq;
            let ts = event["ts"]
                .as_str()
                .and_then(|t| Timestamp::parse(t).ok())
                .map(|t| t.as_micros() * 1000)
                .unwrap_or(received);
            match event["type"].as_str().unwrap_or_default() {
                "provider-started" => anchor = Some(ts),
                "text-delta" => {
                    let k = stats.tokens as f64;
                    let scheduled = anchor.unwrap_or(ts) + (k * interval_ns) as i64;
                    stats.added_us.push((received - scheduled) / 1000);
                    stats.server_us.push((received - ts) / 1000);
                    stats.hop_us.push((ts - scheduled) / 1000);
                    if stats.tokens == 0 {
                        stats.ttft_us = Some((received - posted) / 1000);
                    }
                    stats.tokens += 1;
                }
                t if t.starts_with("chain-") && t != "chain-started" && t != "chain-resumed" => {
                    stats.terminal = t.to_owned();
                }
                _ => {}
            }
        }
    }
    Ok(stats)
}

/// utime + stime of the process and of each thread name, in seconds.
fn cpu() -> (f64, BTreeMap<String, f64>) {
    const TICK: f64 = 100.0; // USER_HZ on Linux
    let parse = |stat: &str| -> Option<(String, f64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((name, ticks / TICK))
    };
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse(&s))
        .map_or(0.0, |(_, s)| s);
    let mut threads: BTreeMap<String, f64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for task in dir.flatten() {
            if let Some((name, secs)) = std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| parse(&s))
            {
                let group = if name.starts_with("sluice-server") {
                    "server runtime".to_owned()
                } else if name.starts_with("sluice-") {
                    format!("server: {name}")
                } else if name.starts_with("mock-llm") {
                    "model mock".to_owned()
                } else if name.starts_with("load-client") {
                    "load clients".to_owned()
                } else {
                    format!("other ({name})")
                };
                *threads.entry(group).or_default() += secs;
            }
        }
    }
    (process, threads)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let mock_rt = runtime("mock-llm", 1)?;
    let server_rt = runtime("sluice-server", 2)?;
    let client_rt = runtime("load-client", 1)?;

    let mock = mock_rt.block_on(MockServer::start(
        Script::paced(a.tokens, a.rate).record(false),
    ))?;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = match a.store.as_str() {
        "memory" => Arc::new(sluice_store_memory::MemoryStore::new()),
        "sqlite" => Arc::new(sluice_store_sqlite::SqliteStore::open(
            dir.path().join("sluice.db"),
            Default::default(),
        )?),
        other => bail!("--store {other:?}: expected sqlite or memory"),
    };
    let provider = Provider::new(
        ProviderConfig::new("mock", ProviderKind::OpenAi, mock.base_url())
            .with_max_concurrent_requests(a.runs.max(1)),
    )?;
    let workflow = agent("agent", AgentOptions::new(provider, "paced"))?.configure(
        "agent",
        &Limits {
            max_concurrent_runs: Some(a.runs.max(1000)),
            queue: Some(a.runs),
            ..Limits::default()
        },
    )?;
    let shutdown = CancellationToken::new();
    let (base, engine, serving) = server_rt.block_on(async {
        let engine = Engine::new(store, [workflow])?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base: Arc<str> = format!("http://{}", listener.local_addr()?).into();
        let app = sluice_server::App::new(engine.clone(), ServerOptions::default());
        let serving = tokio::spawn(sluice_server::serve(listener, app, shutdown.clone()));
        anyhow::Ok((base, engine, serving))
    })?;

    println!(
        "agents_load: {} runs, {} tokens each at {}/s, starts spread over {:?}, store {}",
        a.runs, a.tokens, a.rate, a.ramp, a.store
    );
    let rss_before = status_kib("VmRSS:");
    let (cpu0, threads0) = cpu();
    let t0 = Instant::now();
    let interval_ns = 1e9 / a.rate;
    let results: Vec<anyhow::Result<RunStats>> = client_rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(a.runs * 2)
            .tcp_nodelay(true)
            .build()?;
        let begin = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..a.runs {
            let at = begin + a.ramp.mul_f64(i as f64 / a.runs as f64);
            tasks.spawn(one_run(client.clone(), base.clone(), at, interval_ns));
        }
        let mut out = Vec::with_capacity(a.runs);
        while let Some(r) = tasks.join_next().await {
            out.push(r.map_err(anyhow::Error::from).and_then(|r| r));
        }
        anyhow::Ok(out)
    })?;
    let wall = t0.elapsed();
    let (cpu1, threads1) = cpu();
    let rss_peak = status_kib("VmHWM:");
    let rss_end = status_kib("VmRSS:");

    let mut failed = 0;
    let mut incomplete = 0;
    let (mut events, mut lost, mut dup, mut tokens) = (0u64, 0u64, 0u64, 0usize);
    let (mut added, mut server, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    let mut hop = Vec::new();
    for r in results {
        match r {
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("a client failed: {e:#}");
                }
            }
            Ok(s) => {
                if s.terminal != "chain-completed" || s.tokens != a.tokens {
                    incomplete += 1;
                }
                events += s.events;
                lost += s.lost;
                dup += s.dup;
                tokens += s.tokens;
                added.extend(s.added_us);
                server.extend(s.server_us);
                hop.extend(s.hop_us);
                ttft.extend(s.ttft_us);
            }
        }
    }
    added.sort_unstable();
    server.sort_unstable();
    hop.sort_unstable();
    ttft.sort_unstable();
    let expected_events = (a.tokens as u64 + 8) * a.runs as u64;
    println!("wall time            {:.2} s", wall.as_secs_f64());
    println!(
        "runs                 {} ok, {} incomplete, {} client errors",
        a.runs - failed - incomplete,
        incomplete,
        failed
    );
    println!(
        "events received      {events} (expected {expected_events}), lost {lost}, dup {dup}; text-delta {tokens}"
    );
    println!(
        "events/s             {:.0} appended by the engine over the load",
        engine.events_appended() as f64 / wall.as_secs_f64()
    );
    println!(
        "added latency (ms)   p50 {:.2}  p99 {:.2}  max {:.2}   (receive − scheduled send, anchored at provider-started)",
        pct(&added, 0.5),
        pct(&added, 0.99),
        pct(&added, 1.0)
    );
    println!(
        "in-server (ms)       p50 {:.2}  p99 {:.2}  max {:.2}   (receive − event ts)",
        pct(&server, 0.5),
        pct(&server, 0.99),
        pct(&server, 1.0)
    );
    println!(
        "model → step (ms)    p50 {:.2}  p99 {:.2}  max {:.2}   (event ts − scheduled send)",
        pct(&hop, 0.5),
        pct(&hop, 0.99),
        pct(&hop, 1.0)
    );
    println!(
        "first token (ms)     p50 {:.2}  p99 {:.2}  max {:.2}   (from the POST)",
        pct(&ttft, 0.5),
        pct(&ttft, 0.99),
        pct(&ttft, 1.0)
    );
    println!(
        "CPU                  {:.2} s process over {:.2} s wall ({:.0}% of one core)",
        cpu1 - cpu0,
        wall.as_secs_f64(),
        (cpu1 - cpu0) / wall.as_secs_f64() * 100.0
    );
    for (group, secs) in &threads1 {
        let before = threads0.get(group).copied().unwrap_or(0.0);
        println!("  {group:<20} {:.2} s", secs - before);
    }
    println!(
        "RSS                  peak {:.1} MiB (process), before load {:.1} MiB, at end {:.1} MiB",
        rss_peak as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );

    shutdown.cancel();
    server_rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(15), serving).await;
    });
    drop(mock);
    if failed > 0 || incomplete > 0 || lost > 0 || dup > 0 {
        bail!("the load run was not clean");
    }
    Ok(())
}
