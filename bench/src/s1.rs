//! S1, one stream: one ticker run of N small events as fast as it can go, one SSE reader started
//! with the run (`POST … Accept: text/event-stream`). Events/s end to end, time to first event,
//! and every event checked. The same client measures the raw-socket reference.

use anyhow::Context as _;

use crate::check::Totals;
use crate::client::{Common, FollowOpts, Reader, expect_stream, start_run, ticker_input};
use crate::http::{Conn, Target, unix_nanos};
use crate::procfs;
use crate::report::Row;
use crate::stats::{Summary, dur, median, thousands};

/// One big run, measured.
#[derive(Debug, Clone)]
pub struct RunMeasure {
    /// Ticks received.
    pub ticks: u64,
    /// Ticks per second from the request to the terminal event.
    pub events_per_s: f64,
    /// Ticks per second from the first tick to the last.
    pub stream_events_per_s: f64,
    /// Request sent to first tick, ns.
    pub ttfe_ns: u64,
    /// Request sent to terminal event, ns.
    pub elapsed_ns: u64,
    /// SSE body bytes per event.
    pub bytes_per_event: f64,
    /// Server CPU seconds during the run (with `--server-pid`).
    pub server_cpu_s: Option<f64>,
    /// This process's CPU seconds during the run.
    pub client_cpu_s: f64,
}

/// All measurements of one side (Sluice or the raw reference).
#[derive(Debug, Clone)]
pub struct Side {
    /// `sluice` or `raw reference`.
    pub label: String,
    /// The big runs.
    pub runs: Vec<RunMeasure>,
    /// Time to first event of the small runs, ns.
    pub ttfe: Summary,
    /// Delivery checks over every run.
    pub totals: Totals,
}

impl Side {
    fn new(label: &str) -> Self {
        Self {
            label: label.into(),
            runs: Vec::new(),
            ttfe: Summary::default(),
            totals: Totals::default(),
        }
    }

    /// Median time to first event of the big runs (S1's own), ns.
    pub fn big_ttfe(&self) -> i64 {
        let mut v: Vec<f64> = self.runs.iter().map(|r| r.ttfe_ns as f64).collect();
        median(&mut v) as i64
    }

    /// Median events/s over the big runs.
    pub fn events_per_s(&self) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(|r| r.events_per_s).collect();
        median(&mut v)
    }

    /// Prints one line per run and a summary.
    pub fn print(&self) {
        for (k, r) in self.runs.iter().enumerate() {
            let cpu = r
                .server_cpu_s
                .map(|c| format!(", server CPU {c:.2} s"))
                .unwrap_or_default();
            println!(
                "  {} run {}: {} ticks in {} = {} ev/s end to end ({} ev/s first→last tick), \
                 first tick after {}, {:.0} B/event, client CPU {:.2} s{cpu}",
                self.label,
                k + 1,
                thousands(r.ticks),
                dur(r.elapsed_ns as i64),
                thousands(r.events_per_s as u64),
                thousands(r.stream_events_per_s as u64),
                dur(r.ttfe_ns as i64),
                r.bytes_per_event,
                r.client_cpu_s,
            );
        }
        println!(
            "  {}: median {} ev/s; time to first event over {} small runs p50/p99/max {}; \
             lost/dup/ooo {} ({} of {} runs clean)",
            self.label,
            thousands(self.events_per_s() as u64),
            self.ttfe.n,
            self.ttfe.show(),
            self.totals.ldo(),
            self.totals.clean,
            self.totals.readers,
        );
    }
}

/// Parameters of S1.
#[derive(Debug, Clone, Copy)]
pub struct S1Params {
    /// Ticks of the big run.
    pub events: u64,
    /// Characters of each tick's text.
    pub text_len: u64,
    /// Big runs per side.
    pub repeat: u32,
    /// Small runs (one tick) timing the first event.
    pub ttfe_samples: u32,
}

async fn one_run(
    target: &Target,
    n: u64,
    text_len: u64,
    common: &Common,
    pid: Option<&str>,
) -> anyhow::Result<(RunMeasure, Reader)> {
    let req = start_run(target, "ticker", &ticker_input(n, 0, text_len), true);
    let mut conn = Conn::connect(target, common.idle).await?;
    let server0 = pid.and_then(|p| procfs::sample(p).ok());
    let client0 = procfs::sample("self")?;
    let t0 = unix_nanos();
    conn.send(&req).await?;
    let mut resp = conn.read_head(common.idle).await?;
    expect_stream(&mut resp, common.idle).await?;
    let mut reader = Reader::new(0);
    reader
        .follow(&mut resp, FollowOpts::default(), common.idle)
        .await?;
    let client1 = procfs::sample("self")?;
    let server_cpu_s = match (pid, server0) {
        (Some(p), Some(s0)) => procfs::sample(p).ok().map(|s1| s1.cpu_s - s0.cpu_s),
        _ => None,
    };
    let end = reader.terminal_ns.unwrap_or(reader.last_ns);
    let first = reader.first_tick_ns.unwrap_or(end);
    let elapsed = end.saturating_sub(t0).max(1);
    let ticks = reader.check.ticks;
    let span = end.saturating_sub(first).max(1);
    let m = RunMeasure {
        ticks,
        events_per_s: ticks as f64 * 1e9 / elapsed as f64,
        stream_events_per_s: ticks.saturating_sub(1) as f64 * 1e9 / span as f64,
        ttfe_ns: first.saturating_sub(t0),
        elapsed_ns: elapsed,
        bytes_per_event: reader.body_bytes as f64 / reader.dispatched.max(1) as f64,
        server_cpu_s,
        client_cpu_s: client1.cpu_s - client0.cpu_s,
    };
    Ok((m, reader))
}

async fn big_run(
    side: &mut Side,
    target: &Target,
    p: &S1Params,
    common: &Common,
    pid: Option<&str>,
) -> anyhow::Result<()> {
    let (m, reader) = one_run(target, p.events, p.text_len, common, pid)
        .await
        .with_context(|| format!("{}: the {}-event run", side.label, p.events))?;
    side.totals.add(&reader.check);
    if reader.check.ticks != p.events {
        anyhow::bail!(
            "{}: {} ticks received of {}",
            side.label,
            reader.check.ticks,
            p.events
        );
    }
    side.runs.push(m);
    Ok(())
}

async fn ttfe(
    side: &mut Side,
    target: &Target,
    p: &S1Params,
    common: &Common,
) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    for _ in 0..p.ttfe_samples {
        let (m, reader) = one_run(target, 1, p.text_len, common, None)
            .await
            .with_context(|| format!("{}: a one-tick run", side.label))?;
        side.totals.add(&reader.check);
        samples.push(m.ttfe_ns as i64);
    }
    side.ttfe = Summary::of(&mut samples);
    Ok(())
}

/// Measures one side: `repeat` big runs, then the small runs.
pub async fn measure(
    label: &str,
    target: &Target,
    p: &S1Params,
    common: &Common,
    pid: Option<&str>,
) -> anyhow::Result<Side> {
    let mut side = Side::new(label);
    for _ in 0..p.repeat {
        big_run(&mut side, target, p, common, pid).await?;
    }
    ttfe(&mut side, target, p, common).await?;
    Ok(side)
}

/// The three sides of the comparison.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Sluice.
    pub sluice: Side,
    /// The raw reference writing 64 KiB chunks: the physical limit.
    pub raw: Side,
    /// The raw reference writing one chunk (one `write`) per event, for context.
    pub raw_per_event: Side,
}

/// Sluice and the raw reference, big runs interleaved (raw, sluice, raw, …) so that load from
/// elsewhere on the machine hits both alike; then one run of the one-write-per-event reference.
pub async fn compare(
    sluice: &Target,
    raw: &Target,
    raw_per_event: &Target,
    p: &S1Params,
    common: &Common,
    pid: Option<&str>,
) -> anyhow::Result<Comparison> {
    let mut s = Side::new("sluice");
    let mut r = Side::new("raw reference");
    let mut r1 = Side::new("raw reference, one write per event");
    for _ in 0..p.repeat {
        big_run(&mut r, raw, p, common, None).await?;
        big_run(&mut s, sluice, p, common, pid).await?;
    }
    big_run(&mut r1, raw_per_event, p, common, None).await?;
    ttfe(&mut r, raw, p, common).await?;
    ttfe(&mut s, sluice, p, common).await?;
    Ok(Comparison {
        sluice: s,
        raw: r,
        raw_per_event: r1,
    })
}

const TTFE_TARGET_NS: i64 = 1_000_000;

/// Table rows of one side alone.
pub fn rows(side: &Side, p: &S1Params) -> Vec<Row> {
    let sc = format!("S1 one stream, {} ev ({})", thousands(p.events), side.label);
    vec![
        Row::info(
            &sc,
            "events/s end to end (median)",
            thousands(side.events_per_s() as u64),
        ),
        Row::target(
            &sc,
            "time to first event of the big run (median)",
            dur(side.big_ttfe()),
            "≤ 1 ms",
            !side.runs.is_empty() && side.big_ttfe() <= TTFE_TARGET_NS,
        ),
        Row::info(
            &sc,
            "time to first event of one-tick runs p50 / p99",
            format!("{} / {}", dur(side.ttfe.p50), dur(side.ttfe.p99)),
        ),
        Row::check(
            &sc,
            "lost / dup / out-of-order",
            side.totals.ldo(),
            "0/0/0",
            side.totals.clean == side.totals.readers,
        ),
    ]
}

impl Comparison {
    /// Prints every side.
    pub fn print(&self) {
        self.raw.print();
        for r in &self.raw_per_event.runs {
            println!(
                "  raw reference, one write per event: {} ev/s end to end",
                thousands(r.events_per_s as u64)
            );
        }
        self.sluice.print();
    }
}

/// Table rows of the comparison.
pub fn compare_rows(c: &Comparison, p: &S1Params) -> Vec<Row> {
    let (s, r) = (&c.sluice, &c.raw);
    let sc = format!("S1 one stream, {} ev", thousands(p.events));
    let ratio = s.events_per_s() / r.events_per_s().max(1.0);
    vec![
        Row::info(
            &sc,
            "events/s, Sluice (median)",
            thousands(s.events_per_s() as u64),
        ),
        Row::info(
            &sc,
            "events/s, raw-socket reference, 64 KiB writes (median)",
            thousands(r.events_per_s() as u64),
        ),
        Row::info(
            &sc,
            "events/s, raw reference writing each event alone",
            thousands(c.raw_per_event.events_per_s() as u64),
        ),
        Row::target(
            &sc,
            "Sluice / raw reference",
            format!("{:.0}%", ratio * 100.0),
            "≥ 80%",
            ratio >= 0.8,
        ),
        // DESIGN's S1 target is the big run's own first event; one-tick runs are beside it.
        Row::target(
            &sc,
            "time to first event of the big run (median), Sluice",
            dur(s.big_ttfe()),
            "≤ 1 ms",
            !s.runs.is_empty() && s.big_ttfe() <= TTFE_TARGET_NS,
        ),
        Row::info(
            &sc,
            "time to first event of the big run (median), raw",
            dur(r.big_ttfe()),
        ),
        Row::info(
            &sc,
            "time to first event of one-tick runs p50 / p99, Sluice; raw",
            format!(
                "{} / {}; {} / {}",
                dur(s.ttfe.p50),
                dur(s.ttfe.p99),
                dur(r.ttfe.p50),
                dur(r.ttfe.p99)
            ),
        ),
        Row::info(&sc, "server CPU per run (median)", {
            let mut v: Vec<f64> = s.runs.iter().filter_map(|m| m.server_cpu_s).collect();
            if v.is_empty() {
                "n/a (no --server-pid)".into()
            } else {
                format!("{:.2} s", median(&mut v))
            }
        }),
        Row::check(
            &sc,
            "lost / dup / out-of-order (Sluice; raw)",
            format!("{}; {}", s.totals.ldo(), r.totals.ldo()),
            "0/0/0",
            s.totals.clean == s.totals.readers && r.totals.clean == r.totals.readers,
        ),
    ]
}
