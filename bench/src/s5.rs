//! S5, fan-out: one paced ticker run followed live by many SSE readers. All readers connect
//! first; one starts the run with a streaming `POST`, the others then `GET` its event stream at
//! once. Each reader must get every event; added latency counts the ticks created after that
//! reader's stream opened (the live part; earlier ones come from history by design).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::check::Totals;
use crate::client::{
    Common, FollowOpts, Reader, connect_gate, expect_stream, follow_run, open_stream, start_run,
    ticker_input,
};
use crate::http::{Conn, Target, unix_nanos};
use crate::procfs::{self, Usage};
use crate::report::Row;
use crate::stats::{Summary, dur, kib, thousands};

/// Parameters of S5.
#[derive(Debug, Clone, Copy)]
pub struct S5Params {
    /// Readers (the one that starts the run included).
    pub readers: u64,
    /// Ticks of the run.
    pub events: u64,
    /// ms between ticks.
    pub delay_ms: u64,
}

/// What S5 measured.
#[derive(Debug, Clone, Default)]
pub struct S5Result {
    /// Delivery checks over the readers.
    pub totals: Totals,
    /// Readers that failed, by error.
    pub errors: BTreeMap<String, u64>,
    /// Added latency of live ticks, ns.
    pub latency: Summary,
    /// Run start to the last reader's stream opening, ns.
    pub attach_ns: u64,
    /// Server use, with `--server-pid`.
    pub usage: Option<Usage>,
    /// This process's CPU seconds from the run's start.
    pub client_cpu_s: f64,
}

struct Out {
    check: crate::check::SeqCheck,
    latencies: Vec<(u64, i64)>,
    open_ns: u64,
    err: Option<String>,
}

/// Runs S5.
pub async fn run(
    target: &Target,
    p: &S5Params,
    common: &Common,
    pid: Option<&str>,
) -> anyhow::Result<S5Result> {
    procfs::check_fd_budget(p.readers);
    let followers = p.readers.saturating_sub(1);
    let gate = connect_gate(common);
    let (id_tx, id_rx) = watch::channel::<Option<String>>(None);
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(1024);
    let mut set = JoinSet::new();
    for _ in 0..followers {
        let events = p.events;
        let (target, gate, common, mut id_rx, ready) = (
            target.clone(),
            gate.clone(),
            *common,
            id_rx.clone(),
            ready_tx.clone(),
        );
        set.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let conn = Conn::connect(&target, common.idle).await;
            drop(permit);
            let _ = ready.send(()).await;
            let mut conn = conn?;
            let id = id_rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| anyhow!("the run was never started"))?
                .clone()
                .unwrap_or_default();
            conn.send(&follow_run(&target, &id, None)).await?;
            let mut resp = conn.read_head(common.idle).await?;
            expect_stream(&mut resp, common.idle).await?;
            let live_from = resp.head_ns;
            follow(&mut resp, live_from, events, &common).await
        });
    }
    drop(ready_tx);
    let connect_deadline = Duration::from_secs(60);
    let wait_ready = async {
        let mut n = 0;
        while n < followers && ready_rx.recv().await.is_some() {
            n += 1;
        }
    };
    if tokio::time::timeout(connect_deadline, wait_ready)
        .await
        .is_err()
    {
        eprintln!(
            "warning: S5 readers still connecting after {connect_deadline:?}; starting anyway"
        );
    }

    let watch_proc = procfs::maybe_watch(pid);
    let client0 = procfs::sample("self")?.cpu_s;
    let req = start_run(
        target,
        "ticker",
        &ticker_input(p.events, p.delay_ms, 16),
        true,
    );
    let run_start = unix_nanos();
    let first = open_stream(target, &req, common.idle).await;
    let mut first = match first {
        Ok(r) => r,
        Err(e) => {
            set.abort_all();
            return Err(e.context("S5: starting the run"));
        }
    };
    let run_id = first.run_id();
    let Some(run_id) = run_id else {
        set.abort_all();
        return Err(anyhow!("S5: the streaming response names no run"));
    };
    let _ = id_tx.send(Some(run_id));
    let common_copy = *common;
    let events = p.events;
    set.spawn(async move { follow(&mut first, 0, events, &common_copy).await });

    let deadline = Duration::from_millis(p.events * p.delay_ms) * 3 + Duration::from_secs(120);
    let mut res = S5Result::default();
    let mut latencies = Vec::new();
    let mut last_open = run_start;
    let collect = async {
        while let Some(joined) = set.join_next().await {
            match joined.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(out) => {
                    res.totals.add(&out.check);
                    latencies.extend(out.latencies.iter().map(|l| l.1));
                    last_open = last_open.max(out.open_ns);
                    if let Some(e) = out.err {
                        *res.errors.entry(e).or_default() += 1;
                    }
                }
                Err(e) => {
                    res.totals.readers += 1;
                    *res.errors.entry(format!("{e:#}")).or_default() += 1;
                }
            }
        }
    };
    let timed_out = tokio::time::timeout(deadline, collect).await.is_err();
    if timed_out {
        set.abort_all();
        *res.errors
            .entry(format!("scenario deadline {deadline:?} reached"))
            .or_default() += 1;
    }
    res.client_cpu_s = procfs::sample("self")?.cpu_s - client0;
    res.usage = procfs::maybe_finish(watch_proc).await;
    res.latency = Summary::of(&mut latencies);
    res.attach_ns = last_open.saturating_sub(run_start);
    Ok(res)
}

/// Follows the run from its first event (which has `events` ticks) to its end.
async fn follow(
    resp: &mut crate::http::Response,
    live_from: u64,
    events: u64,
    common: &Common,
) -> anyhow::Result<Out> {
    let mut r = Reader::new(0);
    r.check.expect_ticks(events);
    let opts = FollowOpts {
        latency_from: Some(live_from),
        ..FollowOpts::default()
    };
    let err = r
        .follow(resp, opts, common.idle)
        .await
        .err()
        .map(|e| format!("{e:#}"));
    Ok(Out {
        latencies: std::mem::take(&mut r.latencies),
        check: r.check,
        open_ns: resp.head_ns,
        err,
    })
}

impl S5Result {
    /// Prints the details.
    pub fn print(&self, p: &S5Params) {
        println!(
            "  S5 {} readers of one {}-tick run ({} ms apart): {}/{} complete and clean, \
             lost/dup/ooo {}, other anomalies {}; all readers attached {} after the run started",
            p.readers,
            thousands(p.events),
            p.delay_ms,
            self.totals.clean,
            p.readers,
            self.totals.ldo(),
            self.totals.other,
            dur(self.attach_ns as i64),
        );
        println!(
            "  added latency of live ticks p50/p99/max {} over {} deliveries; client CPU {:.2} s",
            self.latency.show(),
            thousands(self.latency.n as u64),
            self.client_cpu_s,
        );
        if let Some(u) = &self.usage {
            println!(
                "  server: RSS {} before, {} peak (sampled); CPU {:.2} s",
                kib(u.rss_before_kib),
                kib(u.rss_peak_kib),
                u.cpu_s
            );
        }
        for (e, n) in &self.errors {
            println!("  {n} readers failed: {e}");
        }
    }

    /// Table rows.
    pub fn rows(&self, p: &S5Params) -> Vec<Row> {
        let sc = format!("S5 fan-out, {} readers", thousands(p.readers));
        let mut rows = vec![
            Row::check(
                &sc,
                "readers complete; lost / dup / out-of-order",
                format!("{}/{}; {}", self.totals.clean, p.readers, self.totals.ldo()),
                "all; 0/0/0",
                self.totals.clean == p.readers && self.errors.is_empty(),
            ),
            Row::info(
                &sc,
                "added latency p50 / p99 / max (live)",
                self.latency.show(),
            ),
        ];
        if let Some(u) = &self.usage {
            rows.push(Row::info(
                &sc,
                "server RSS peak; CPU seconds",
                format!("{}; {:.2} s", kib(u.rss_peak_kib), u.cpu_s),
            ));
        }
        rows
    }
}
