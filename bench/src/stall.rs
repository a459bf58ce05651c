//! Stalled readers: what a reader that stops reading costs the server. One finished ticker run
//! is read whole once (so the log's caches and the allocator are warm); then, for SSE and then
//! NDJSON, `readers` connections each ask for the run's event stream, read the response head and
//! never read again. Once the server's RSS has settled, the growth per stalled reader is
//! reported, with the kernel's TCP memory (`/proc/net/sockstat`: both ends of every loopback
//! socket, so the readers' receive buffers too). All readers are closed at the end.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::client::{Common, End, FollowOpts, Reader, open_stream, start_run, ticker_input};
use crate::http::{Conn, Response, Target};
use crate::procfs;
use crate::report::Row;
use crate::stats::{kib, thousands};

/// Parameters of the stalled-readers scenario.
#[derive(Debug, Clone, Copy)]
pub struct StallParams {
    /// Stalled readers per format.
    pub readers: u64,
    /// Ticks of the run they read.
    pub events: u64,
}

/// What one format's stalled readers cost.
#[derive(Debug, Clone)]
pub struct Side {
    /// `SSE` or `NDJSON`.
    pub label: &'static str,
    /// Server RSS before the readers connected, KiB.
    pub rss_before_kib: u64,
    /// Server RSS once it settled with every reader stalled, KiB.
    pub rss_stalled_kib: u64,
    /// Kernel TCP memory growth, KiB (both ends).
    pub tcp_kib: u64,
}

impl Side {
    fn per_reader_kib(&self, readers: u64) -> u64 {
        self.rss_stalled_kib.saturating_sub(self.rss_before_kib) / readers.max(1)
    }
}

/// The kernel's TCP memory now, in KiB (`TCP: … mem PAGES` of `/proc/net/sockstat`).
fn tcp_mem_kib() -> anyhow::Result<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").context("reading /proc/net/sockstat")?;
    let pages = s
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.windows(2)
                .find(|w| w[0] == "mem")
                .and_then(|w| w[1].parse::<u64>().ok())
        })
        .ok_or_else(|| anyhow!("/proc/net/sockstat: no TCP mem field"))?;
    Ok(pages * 4)
}

/// The server's RSS once two readings 250 ms apart differ by less than 1 % (at most 20 s).
async fn settled_rss(pid: &str) -> anyhow::Result<u64> {
    let mut last = procfs::sample(pid)?.rss_kib;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = procfs::sample(pid)?.rss_kib;
        if now.abs_diff(last) * 100 < last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

async fn stall(
    target: &Target,
    run_id: &str,
    label: &'static str,
    accept: &str,
    p: &StallParams,
    common: &Common,
    pid: &str,
) -> anyhow::Result<(Side, Vec<Response>)> {
    let rss_before_kib = settled_rss(pid).await?;
    let tcp0 = tcp_mem_kib()?;
    let path = format!("/v1/runs/{run_id}/events");
    let request = target.request("GET", &path, &[("accept", accept)], b"");
    let mut held: Vec<Response> = Vec::with_capacity(p.readers as usize);
    for _ in 0..p.readers {
        let mut conn = Conn::connect(target, common.idle).await?;
        conn.send(&request).await?;
        let resp = conn.read_head(common.idle).await?;
        ensure!(
            resp.status == 200,
            "{label} reader: HTTP {} instead of a stream",
            resp.status
        );
        held.push(resp);
    }
    let rss_stalled_kib = settled_rss(pid).await?;
    let tcp_kib = tcp_mem_kib()?.saturating_sub(tcp0);
    let side = Side {
        label,
        rss_before_kib,
        rss_stalled_kib,
        tcp_kib,
    };
    Ok((side, held))
}

/// Runs the scenario: the run, then SSE's stalled readers, then NDJSON's.
pub async fn run(
    target: &Target,
    p: &StallParams,
    common: &Common,
    pid: Option<&str>,
) -> anyhow::Result<Vec<Side>> {
    let Some(pid) = pid else {
        bail!("stall measures the server's memory: pass --server-pid");
    };
    procfs::check_fd_budget(p.readers);
    let req = start_run(target, "ticker", &ticker_input(p.events, 0, 16), true);
    let mut resp = open_stream(target, &req, common.idle).await?;
    let run_id = resp
        .run_id()
        .ok_or_else(|| anyhow!("the streaming response names no run (Location header)"))?;
    let mut reader = Reader::new(0);
    let end = reader
        .follow(&mut resp, FollowOpts::default(), common.idle)
        .await?;
    ensure!(
        end == End::Terminal && reader.check.clean() && reader.check.ticks == p.events,
        "the run was not read whole and clean: {} ticks of {}",
        reader.check.ticks,
        p.events
    );
    drop(resp);
    // Each format's readers stay stalled while the next format's connect: memory a closed
    // reader gave back to the allocator would otherwise be reused, and the next reader would
    // look cheaper than it is.
    let mut sides = Vec::new();
    let mut held = Vec::new();
    for (label, accept) in [
        ("SSE", "text/event-stream"),
        ("NDJSON", "application/x-ndjson"),
    ] {
        let (side, readers) = stall(target, &run_id, label, accept, p, common, pid).await?;
        sides.push(side);
        held.push(readers);
    }
    Ok(sides)
}

/// Prints each side.
pub fn print(sides: &[Side], p: &StallParams) {
    for s in sides {
        println!(
            "  {}: {} stalled readers; server RSS {} -> {} ({} per reader); kernel TCP memory +{} ({} per reader, both ends)",
            s.label,
            thousands(p.readers),
            kib(s.rss_before_kib),
            kib(s.rss_stalled_kib),
            kib(s.per_reader_kib(p.readers)),
            kib(s.tcp_kib),
            kib(s.tcp_kib / p.readers.max(1)),
        );
    }
}

/// The table rows.
pub fn rows(sides: &[Side], p: &StallParams) -> Vec<Row> {
    let scenario = format!(
        "Stalled readers ({} per format, a finished {}-tick run)",
        thousands(p.readers),
        thousands(p.events)
    );
    sides
        .iter()
        .flat_map(|s| {
            [
                Row::info(
                    &scenario,
                    &format!("server RSS per stalled {} reader", s.label),
                    kib(s.per_reader_kib(p.readers)),
                ),
                Row::info(
                    &scenario,
                    &format!(
                        "kernel TCP memory per stalled {} reader (both ends)",
                        s.label
                    ),
                    kib(s.tcp_kib / p.readers.max(1)),
                ),
            ]
        })
        .collect()
}
