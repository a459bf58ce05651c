//! S3, resume: a 2,000-event run; the reader drops the connection after 500 events and
//! reconnects with `Last-Event-ID: <last seq>`. Nothing may be lost or duplicated. Run twice:
//! with the run still live at the reconnect (paced ticks) and with it already finished (history).

use anyhow::{Context as _, anyhow};

use crate::client::{
    Common, End, FollowOpts, Reader, follow_run, open_stream, start_run, ticker_input,
};
use crate::http::Target;
use crate::report::Row;
use crate::stats::thousands;

/// Parameters of S3.
#[derive(Debug, Clone, Copy)]
pub struct S3Params {
    /// Ticks of the run.
    pub events: u64,
    /// Events read on a connection before dropping it.
    pub drop_after: u64,
    /// How many times to drop and resume.
    pub drops: u32,
    /// Pacing of the live case, ms between ticks.
    pub live_delay_ms: u64,
}

/// One resumed run.
#[derive(Debug, Clone)]
pub struct Case {
    /// `live` or `history`.
    pub label: &'static str,
    /// Reconnects done.
    pub reconnects: u32,
    /// Distinct events received.
    pub events: u64,
    /// Ticks received.
    pub ticks: u64,
    /// Lost events.
    pub lost: u64,
    /// Duplicated events.
    pub dup: u64,
    /// Out-of-order events.
    pub ooo: u64,
    /// The run completed and every check passed.
    pub clean: bool,
}

async fn case(
    label: &'static str,
    target: &Target,
    p: &S3Params,
    delay_ms: u64,
    common: &Common,
) -> anyhow::Result<Case> {
    let req = start_run(
        target,
        "ticker",
        &ticker_input(p.events, delay_ms, 16),
        true,
    );
    let mut resp = open_stream(target, &req, common.idle).await?;
    let run_id = resp
        .run_id()
        .ok_or_else(|| anyhow!("the streaming response names no run (Location header)"))?;
    let mut r = Reader::new(0);
    let mut reconnects = 0;
    loop {
        let opts = FollowOpts {
            stop_after: (reconnects < p.drops).then_some(p.drop_after),
            ..FollowOpts::default()
        };
        match r.follow(&mut resp, opts, common.idle).await? {
            End::Terminal => break,
            End::Stopped if r.check.terminal.is_some() => break,
            End::Stopped => {
                reconnects += 1;
                let last = r.check.max;
                drop(resp);
                let again = follow_run(target, &run_id, Some(last));
                resp = open_stream(target, &again, common.idle)
                    .await
                    .with_context(|| format!("reconnecting with Last-Event-ID: {last}"))?;
            }
        }
    }
    if r.check.ticks != p.events {
        anyhow::bail!("{} ticks received of {}", r.check.ticks, p.events);
    }
    Ok(Case {
        label,
        reconnects,
        events: r.check.events,
        ticks: r.check.ticks,
        lost: r.check.lost(),
        dup: r.check.dup,
        ooo: r.check.ooo,
        clean: r.check.clean(),
    })
}

/// Runs S3: the live case, then the history case.
pub async fn run(target: &Target, p: &S3Params, common: &Common) -> anyhow::Result<Vec<Case>> {
    Ok(vec![
        case("live", target, p, p.live_delay_ms, common)
            .await
            .context("S3 live case")?,
        case("history", target, p, 0, common)
            .await
            .context("S3 history case")?,
    ])
}

/// Prints the cases.
pub fn print(cases: &[Case]) {
    for c in cases {
        println!(
            "  S3 {}: {} reconnects, {} events ({} ticks), lost/dup/ooo {}/{}/{}{}",
            c.label,
            c.reconnects,
            thousands(c.events),
            thousands(c.ticks),
            c.lost,
            c.dup,
            c.ooo,
            if c.clean { "" } else { " — NOT CLEAN" }
        );
    }
}

/// Table rows.
pub fn rows(cases: &[Case], p: &S3Params) -> Vec<Row> {
    let sc = format!(
        "S3 resume, {} ev, drop after {}",
        thousands(p.events),
        p.drop_after
    );
    cases
        .iter()
        .map(|c| {
            Row::check(
                &sc,
                &format!("lost / dup ({}, {} reconnects)", c.label, c.reconnects),
                format!("{}/{}", c.lost, c.dup),
                "0/0",
                c.clean && c.lost == 0 && c.dup == 0,
            )
        })
        .collect()
}
