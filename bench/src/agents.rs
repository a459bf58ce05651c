//! Agents: C concurrent runs of the built-in agent against the scripted model server, each
//! streaming `tokens` tokens paced like a real model, one SSE reader each (started with the run).
//!
//! The model server (`sluice-mock-llm --stamp`) writes the time it sent each token into the
//! token's text (`t<unix-ns> `), so the added latency of a token is exactly what Sluice adds
//! between the model's socket and the client's: the provider client and its SSE parsing, the
//! agent step, the engine, the durable log, the follower and the SSE encoder (plus two loopback
//! hops). Also measured: time to first token from the `POST`, delivery checks, tokens per run,
//! and the server's (and the model server's) CPU and RSS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::check::{SeqCheck, Totals};
use crate::client::{Common, FollowOpts, Reader, connect_gate, open_stream, start_run};
use crate::http::{Target, unix_nanos};
use crate::procfs::{self, Usage};
use crate::report::Row;
use crate::s2::{self, short};
use crate::stats::{Summary, dur, kib, thousands};

/// Parameters of the agents scenario.
#[derive(Debug, Clone)]
pub struct AgentsParams {
    /// Concurrent runs (C).
    pub runs: u64,
    /// Tokens the model answers each request with (as the mock server was started with).
    pub tokens: u64,
    /// The model server's pace, tokens per second (for the report and the deadline).
    pub rate: f64,
    /// The agent workflow's name.
    pub workflow: String,
}

/// What the scenario measured.
#[derive(Debug, Clone, Default)]
pub struct AgentsResult {
    /// Runs that streamed to `chain-completed` with every token.
    pub complete: u64,
    /// Runs whose token count was not `tokens`.
    pub wrong_tokens: u64,
    /// Readers that failed, by error.
    pub errors: BTreeMap<String, u64>,
    /// Delivery checks.
    pub totals: Totals,
    /// Added latency of every stamped token, ns.
    pub latency: Summary,
    /// Added latency of the tokens sent once every stream was open, ns.
    pub steady: Summary,
    /// `POST` to first token, ns.
    pub ttft: Summary,
    /// Most streams delivering at once.
    pub peak_concurrent: u64,
    /// Whole scenario, ns.
    pub wall_ns: u64,
    /// Server use, with `--server-pid`.
    pub usage: Option<Usage>,
    /// The model server's CPU seconds during the scenario, with `--mock-pid`.
    pub mock_cpu_s: Option<f64>,
    /// This process's CPU seconds.
    pub client_cpu_s: f64,
    /// Whether the hard deadline cut the scenario short.
    pub timed_out: bool,
}

struct RunOut {
    check: SeqCheck,
    tokens: u64,
    latencies: Vec<(u64, i64)>,
    ttft_ns: Option<i64>,
    open_ns: u64,
    end_ns: u64,
}

/// Runs the scenario.
pub async fn run(
    target: &Target,
    p: &AgentsParams,
    common: &Common,
    pid: Option<&str>,
    mock_pid: Option<&str>,
) -> anyhow::Result<AgentsResult> {
    procfs::check_fd_budget(p.runs);
    let req = Arc::new(start_run(
        target,
        &p.workflow,
        r#"{"message":"Tell me a story."}"#,
        true,
    ));
    let gate = connect_gate(common);
    let watch = procfs::maybe_watch(pid);
    let mock0 = mock_pid
        .and_then(|m| procfs::sample(m).ok())
        .map(|s| s.cpu_s);
    let client0 = procfs::sample("self")?.cpu_s;
    let t0 = unix_nanos();
    let mut set = JoinSet::new();
    for _ in 0..p.runs {
        let (target, req, gate, common) = (target.clone(), req.clone(), gate.clone(), *common);
        set.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let posted = unix_nanos();
            let mut resp = open_stream(&target, &req, common.idle).await?;
            drop(permit);
            let mut r = Reader::new(0);
            let opts = FollowOpts {
                stamped_tokens: true,
                ..FollowOpts::default()
            };
            let followed = r.follow(&mut resp, opts, common.idle).await;
            let out = RunOut {
                tokens: r.tokens,
                ttft_ns: r.first_token_ns.map(|t| t as i64 - posted as i64),
                open_ns: resp.head_ns,
                end_ns: r.last_ns,
                latencies: std::mem::take(&mut r.latencies),
                check: r.check,
            };
            anyhow::Ok((out, followed.err()))
        });
    }
    let run_secs = p.tokens as f64 / p.rate.max(0.001);
    let deadline = Duration::from_secs_f64(run_secs * 3.0) + Duration::from_secs(120);
    let mut res = AgentsResult::default();
    let mut latencies = Vec::with_capacity((p.runs * p.tokens) as usize);
    let mut ttft = Vec::new();
    let mut spans = Vec::new();
    let collect = async {
        while let Some(joined) = set.join_next().await {
            match joined.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok((out, err)) => {
                    res.totals.add(&out.check);
                    latencies.extend_from_slice(&out.latencies);
                    spans.push((out.open_ns, out.end_ns));
                    ttft.extend(out.ttft_ns);
                    if out.tokens != p.tokens {
                        res.wrong_tokens += 1;
                    }
                    match err {
                        None if out.check.clean() && out.tokens == p.tokens => res.complete += 1,
                        None => {}
                        Some(e) => *res.errors.entry(short(&e)).or_default() += 1,
                    }
                }
                Err(e) => *res.errors.entry(short(&e)).or_default() += 1,
            }
        }
    };
    if tokio::time::timeout(deadline, collect).await.is_err() {
        res.timed_out = true;
        set.abort_all();
    }
    res.wall_ns = unix_nanos() - t0;
    res.client_cpu_s = procfs::sample("self")?.cpu_s - client0;
    res.usage = procfs::maybe_finish(watch).await;
    res.mock_cpu_s = match (mock_pid, mock0) {
        (Some(m), Some(before)) => procfs::sample(m).ok().map(|s| s.cpu_s - before),
        _ => None,
    };
    (res.latency, res.steady) = s2::summarize(&latencies, &spans);
    res.ttft = Summary::of(&mut ttft);
    res.peak_concurrent = s2::peak(&spans);
    Ok(res)
}

impl AgentsResult {
    /// Prints the details.
    pub fn print(&self, p: &AgentsParams) {
        println!(
            "  agents C={} x {} tokens at {} tokens/s: {}/{} runs complete with every token in {}; \
             peak {} streams at once; {} runs with a wrong token count",
            p.runs,
            p.tokens,
            p.rate,
            self.complete,
            p.runs,
            dur(self.wall_ns as i64),
            self.peak_concurrent,
            self.wrong_tokens,
        );
        println!(
            "  added latency per token p50/p99/max {} over {} tokens ({} over the {} sent once \
             every stream was open); time to first token p50/p99/max {}; lost/dup/ooo {}; \
             client CPU {:.2} s",
            self.latency.show(),
            thousands(self.latency.n as u64),
            self.steady.show(),
            thousands(self.steady.n as u64),
            self.ttft.show(),
            self.totals.ldo(),
            self.client_cpu_s,
        );
        if let Some(u) = &self.usage {
            println!(
                "  server: RSS {} before, {} peak (sampled), VmHWM {}; CPU {:.2} s{}",
                kib(u.rss_before_kib),
                kib(u.rss_peak_kib),
                kib(u.hwm_kib),
                u.cpu_s,
                self.mock_cpu_s
                    .map(|c| format!("; model server CPU {c:.2} s"))
                    .unwrap_or_default(),
            );
        }
        if self.timed_out {
            println!("  the scenario hit its deadline: the remaining readers were abandoned");
        }
        for (e, n) in &self.errors {
            println!("  {n} readers failed: {e}");
        }
    }

    /// Table rows.
    pub fn rows(&self, p: &AgentsParams) -> Vec<Row> {
        let sc = format!(
            "Agents C={}, {} tokens at {}/s",
            thousands(p.runs),
            p.tokens,
            p.rate
        );
        let mut rows = vec![
            Row::info(
                &sc,
                "added latency per token p50 / p99 / max",
                self.latency.show(),
            ),
            Row::info(
                &sc,
                "added latency p50 / p99 / max, once all streams open",
                self.steady.show(),
            ),
            Row::info(
                &sc,
                "time to first token (from POST) p50 / p99 / max",
                self.ttft.show(),
            ),
            Row::check(
                &sc,
                "runs complete with every token; lost / dup / out-of-order",
                format!("{}/{}; {}", self.complete, p.runs, self.totals.ldo()),
                "all; 0/0/0",
                self.complete == p.runs && self.errors.is_empty() && !self.timed_out,
            ),
            Row::info(
                &sc,
                "peak concurrent streams",
                thousands(self.peak_concurrent),
            ),
        ];
        if let Some(u) = &self.usage {
            let per_run = u.rss_peak_kib.saturating_sub(u.rss_before_kib) as f64
                / self.peak_concurrent.max(1) as f64;
            rows.push(Row::info(
                &sc,
                "server RSS peak (growth per active run)",
                format!("{} ({per_run:.1} KiB/run)", kib(u.rss_peak_kib)),
            ));
            rows.push(Row::info(
                &sc,
                "server CPU seconds",
                format!(
                    "{:.2} s over {}{}",
                    u.cpu_s,
                    dur(self.wall_ns as i64),
                    self.mock_cpu_s
                        .map(|c| format!(" (model server: {c:.2} s)"))
                        .unwrap_or_default()
                ),
            ));
        }
        if !self.errors.is_empty() {
            let first = self.errors.iter().next().map(|(e, n)| format!("{n}× {e}"));
            rows.push(Row::check(
                &sc,
                "reader errors",
                first.unwrap_or_default().replace('|', "\\|"),
                "none",
                false,
            ));
        }
        rows
    }
}
