//! S4, admission: against a server whose ticker has a known capacity (`bench/configs/s4.toml`:
//! `max_concurrent_runs` + `queue`), a burst of 10× capacity streaming run requests, all
//! connected first and sent at once. Every request beyond capacity must get 429 (with
//! `Retry-After` and the protocol's error shape) within 10 ms; every accepted run must complete
//! with all its events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::check::Totals;
use crate::client::{Common, FollowOpts, Reader, expect_stream, start_run, ticker_input};
use crate::http::{Conn, Target, unix_nanos};
use crate::procfs;
use crate::report::Row;
use crate::stats::{Summary, dur};

/// Parameters of S4.
#[derive(Debug, Clone)]
pub struct S4Params {
    /// The workflow's `max_concurrent_runs`.
    pub max_concurrent: u64,
    /// The workflow's `queue`.
    pub queue: u64,
    /// Burst size as a multiple of capacity.
    pub factor: u64,
    /// Ticks per run.
    pub events: u64,
    /// Pacing, ms between ticks (so accepted runs hold their slots during the burst).
    pub delay_ms: u64,
    /// Workflow name.
    pub workflow: String,
    /// The 429 latency bound, ms.
    pub limit_ms: f64,
}

impl S4Params {
    /// `max_concurrent + queue`.
    pub fn capacity(&self) -> u64 {
        self.max_concurrent + self.queue
    }
}

struct Timed {
    sent_ns: u64,
    answer: Answer,
}

enum Answer {
    Accepted {
        head: Duration,
        check: crate::check::SeqCheck,
        err: Option<String>,
    },
    Rejected {
        head: Duration,
        retry_after: bool,
        shape: bool,
        code: String,
    },
    Other(String),
}

/// What S4 measured.
#[derive(Debug, Clone, Default)]
pub struct S4Result {
    /// Requests fired.
    pub requests: u64,
    /// Streams accepted (200).
    pub accepted: u64,
    /// 429 answers.
    pub rejected: u64,
    /// Other answers or failures, by description.
    pub other: BTreeMap<String, u64>,
    /// 429 latency, request written to head read, ns.
    pub reject_latency: Summary,
    /// 429s slower than the bound.
    pub slow_rejects: u64,
    /// 429s with `Retry-After`.
    pub with_retry_after: u64,
    /// 429s whose body has the protocol's error shape.
    pub with_shape: u64,
    /// Accepted head latency, ns.
    pub accept_latency: Summary,
    /// Delivery checks of the accepted runs.
    pub totals: Totals,
    /// Accepted runs whose stream failed.
    pub stream_errors: BTreeMap<String, u64>,
    /// First to last request written, ns: how long the client took to fire the burst.
    pub send_spread_ns: u64,
    /// How long the burst's connections took to be all established, ns.
    pub connect_ns: u64,
    /// 429 latency of single requests sent one at a time while the server is full, ns.
    pub single_reject_latency: Summary,
    /// 429 error bodies (`code: message`), counted.
    pub reject_bodies: BTreeMap<String, u64>,
    /// Statuses of the single requests that were not 429.
    pub probe_other: BTreeMap<u16, u64>,
}

/// Single requests sent after the burst while the server is full.
const PROBES: usize = 20;

/// Runs S4.
pub async fn run(target: &Target, p: &S4Params, common: &Common) -> anyhow::Result<S4Result> {
    let total = p.capacity() * p.factor;
    procfs::check_fd_budget(total);
    let req = Arc::new(start_run(
        target,
        &p.workflow,
        &ticker_input(p.events, p.delay_ms, 16),
        true,
    ));
    // Every burst connection, and the probe below, meet here: the requests go out together,
    // only once all are connected.
    let barrier = Arc::new(Barrier::new(total as usize + 1));
    let t_connect = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..total {
        let (target, req, barrier, common, events) = (
            target.clone(),
            req.clone(),
            barrier.clone(),
            *common,
            p.events,
        );
        set.spawn(async move {
            let conn = Conn::connect(&target, common.idle).await;
            barrier.wait().await;
            let mut conn = conn?;
            let sent_ns = unix_nanos();
            let t0 = Instant::now();
            conn.send(&req).await?;
            let mut resp = conn.read_head(common.idle).await?;
            let head = t0.elapsed();
            match resp.status {
                200 => {
                    expect_stream(&mut resp, common.idle).await?;
                    let mut r = Reader::new(0);
                    let mut err = r
                        .follow(&mut resp, FollowOpts::default(), common.idle)
                        .await
                        .err()
                        .map(|e| format!("{e:#}"));
                    if err.is_none() && r.check.ticks != events {
                        err = Some(format!("{} ticks of {events}", r.check.ticks));
                    }
                    anyhow::Ok(Timed {
                        sent_ns,
                        answer: Answer::Accepted {
                            head,
                            check: r.check,
                            err,
                        },
                    })
                }
                429 => {
                    let retry_after = resp.header("retry-after").is_some();
                    let body = resp.body(common.idle, 64 * 1024).await?;
                    let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
                    let shape = json.as_ref().is_some_and(|v| {
                        v["error"]["code"].is_string() && v["error"]["message"].is_string()
                    });
                    let code = json.map_or_else(
                        || String::from_utf8_lossy(&body).chars().take(120).collect(),
                        |v| {
                            let m = v["error"]["message"].as_str().unwrap_or_default();
                            let m: String = m.chars().take(120).collect();
                            format!("{}: {m}", v["error"]["code"].as_str().unwrap_or("?"))
                        },
                    );
                    Ok(Timed {
                        sent_ns,
                        answer: Answer::Rejected {
                            head,
                            retry_after,
                            shape,
                            code,
                        },
                    })
                }
                s => {
                    let body = resp.body_text(common.idle).await;
                    Ok(Timed {
                        sent_ns,
                        answer: Answer::Other(format!("HTTP {s}: {}", body.trim())),
                    })
                }
            }
        });
    }
    // While the burst's runs hold every slot, single requests one after another: the 429 path
    // alone, without the burst's queueing.
    let probe = {
        let (target, req, common, barrier) =
            (target.clone(), req.clone(), *common, barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let connected = t_connect.elapsed();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut lat = Vec::new();
            let mut other = BTreeMap::<u16, u64>::new();
            for _ in 0..PROBES {
                let Ok(mut conn) = Conn::connect(&target, common.idle).await else {
                    continue;
                };
                let t0 = Instant::now();
                if conn.send(&req).await.is_err() {
                    continue;
                }
                match conn.read_head(common.idle).await {
                    Ok(resp) if resp.status == 429 => lat.push(t0.elapsed().as_nanos() as i64),
                    Ok(resp) => *other.entry(resp.status).or_default() += 1,
                    Err(_) => *other.entry(0).or_default() += 1,
                }
            }
            (lat, other, connected)
        })
    };
    let mut res = S4Result {
        requests: total,
        ..S4Result::default()
    };
    let (mut rej, mut acc, mut sent) = (Vec::new(), Vec::new(), Vec::new());
    let limit = Duration::from_secs_f64(p.limit_ms / 1000.0);
    let deadline = Duration::from_millis(p.events * p.delay_ms) * (p.factor as u32 + 2)
        + Duration::from_secs(60);
    let collect = async {
        while let Some(joined) = set.join_next().await {
            let answer = joined
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .map(|t| {
                    sent.push(t.sent_ns);
                    t.answer
                });
            match answer {
                Ok(Answer::Accepted { head, check, err }) => {
                    res.accepted += 1;
                    acc.push(head.as_nanos() as i64);
                    res.totals.add(&check);
                    if let Some(e) = err {
                        *res.stream_errors.entry(e).or_default() += 1;
                    }
                }
                Ok(Answer::Rejected {
                    head,
                    retry_after,
                    shape,
                    code,
                }) => {
                    *res.reject_bodies.entry(code).or_default() += 1;
                    res.rejected += 1;
                    rej.push(head.as_nanos() as i64);
                    res.slow_rejects += u64::from(head > limit);
                    res.with_retry_after += u64::from(retry_after);
                    res.with_shape += u64::from(shape);
                }
                Ok(Answer::Other(s)) => *res.other.entry(s).or_default() += 1,
                Err(e) => *res.other.entry(format!("{e:#}")).or_default() += 1,
            }
        }
    };
    if tokio::time::timeout(deadline, collect).await.is_err() {
        set.abort_all();
        return Err(anyhow!("S4 did not finish within {deadline:?}"));
    }
    if let (Some(a), Some(b)) = (sent.iter().min(), sent.iter().max()) {
        res.send_spread_ns = b - a;
    }
    res.reject_latency = Summary::of(&mut rej);
    res.accept_latency = Summary::of(&mut acc);
    let (mut probed, probe_other, connected) = probe.await.unwrap_or_default();
    res.single_reject_latency = Summary::of(&mut probed);
    res.probe_other = probe_other;
    res.connect_ns = connected.as_nanos() as u64;
    Ok(res)
}

impl S4Result {
    /// Prints the details.
    pub fn print(&self, p: &S4Params) {
        println!(
            "  S4 burst of {} (connected in {}, all written within {}) against capacity {} ({} \
             running + {} queued): {} accepted, {} answered 429, {} other",
            self.requests,
            dur(self.connect_ns as i64),
            dur(self.send_spread_ns as i64),
            p.capacity(),
            p.max_concurrent,
            p.queue,
            self.accepted,
            self.rejected,
            self.other.values().sum::<u64>()
        );
        println!(
            "  429 latency p50/p99/max {} ({} over {} ms; {} with Retry-After, {} with the error \
             shape); accepted head latency p50/p99/max {}",
            self.reject_latency.show(),
            self.slow_rejects,
            p.limit_ms,
            self.with_retry_after,
            self.with_shape,
            self.accept_latency.show()
        );
        println!(
            "  429 latency of {} single requests sent one at a time while full: p50/p99/max {}",
            self.single_reject_latency.n,
            self.single_reject_latency.show()
        );
        println!(
            "  accepted runs complete {}/{}; lost/dup/ooo {}",
            self.totals.clean,
            self.accepted,
            self.totals.ldo()
        );
        for (body, n) in &self.reject_bodies {
            println!("  {n}× 429 {body}");
        }
        for (status, n) in &self.probe_other {
            println!("  {n} single requests answered {status} instead of 429 (0: no answer)");
        }
        for (e, n) in self.other.iter().chain(&self.stream_errors) {
            println!("  {n}×: {e}");
        }
    }

    /// Table rows.
    pub fn rows(&self, p: &S4Params) -> Vec<Row> {
        let sc = format!(
            "S4 admission, burst {} vs capacity {}",
            self.requests,
            p.capacity()
        );
        let bound = format!("all < {} ms", p.limit_ms);
        vec![
            Row::check(
                &sc,
                "accepted / 429 / other",
                format!(
                    "{} / {} / {}",
                    self.accepted,
                    self.rejected,
                    self.other.values().sum::<u64>()
                ),
                &format!("{} / {} / 0", p.capacity(), self.requests - p.capacity()),
                self.accepted == p.capacity()
                    && self.rejected == self.requests - p.capacity()
                    && self.other.is_empty(),
            ),
            // A performance target like S1's and S2's: reported ("miss"), not a failed check.
            Row::target(
                &sc,
                "429 latency p50 / p99 / max",
                self.reject_latency.show(),
                &bound,
                self.rejected > 0 && self.slow_rejects == 0,
            ),
            Row::check(
                &sc,
                "429s with Retry-After and error body",
                format!(
                    "{} and {} of {}",
                    self.with_retry_after, self.with_shape, self.rejected
                ),
                "all",
                self.with_retry_after == self.rejected && self.with_shape == self.rejected,
            ),
            Row::check(
                &sc,
                "accepted runs complete; lost / dup / ooo",
                format!(
                    "{}/{}; {}",
                    self.totals.clean,
                    self.accepted,
                    self.totals.ldo()
                ),
                "all; 0/0/0",
                self.totals.clean == self.accepted && self.stream_errors.is_empty(),
            ),
            Row::info(
                &sc,
                "429 latency, single requests while full, p50 / p99",
                format!(
                    "{} / {}",
                    dur(self.single_reject_latency.p50),
                    dur(self.single_reject_latency.p99)
                ),
            ),
            Row::info(
                &sc,
                "accepted: time to response head p50",
                dur(self.accept_latency.p50),
            ),
        ]
    }
}
