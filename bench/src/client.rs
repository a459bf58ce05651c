//! The SSE reader every scenario uses: start a run (or follow one) and check every event.

use std::time::Duration;

use anyhow::bail;

use crate::check::SeqCheck;
use crate::http::{Conn, Response, Target};
use crate::sse::{self, Flow, SseParser};

/// How long a reader waits for the stream to close after the terminal event.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Shared knobs of every scenario.
#[derive(Debug, Clone, Copy)]
pub struct Common {
    /// Longest silence on a socket before the reader gives up.
    pub idle: Duration,
    /// Connects (plus request and response head) in flight at once.
    pub connect_concurrency: usize,
}

/// The bytes of `POST /v1/workflows/{workflow}/runs` with `input`, streaming when `stream`.
pub fn start_run(target: &Target, workflow: &str, input: &str, stream: bool) -> Vec<u8> {
    let body = format!(r#"{{"input":{input}}}"#);
    let path = format!("/v1/workflows/{workflow}/runs");
    let mut headers = vec![("content-type", "application/json")];
    if stream {
        headers.push(("accept", "text/event-stream"));
    }
    target.request("POST", &path, &headers, body.as_bytes())
}

/// The bytes of `GET /v1/runs/{id}/events`, after `last_event_id` when given.
pub fn follow_run(target: &Target, run_id: &str, last_event_id: Option<u64>) -> Vec<u8> {
    let path = format!("/v1/runs/{run_id}/events");
    let last = last_event_id.map(|n| n.to_string());
    let mut headers = vec![("accept", "text/event-stream")];
    if let Some(l) = &last {
        headers.push(("last-event-id", l.as_str()));
    }
    target.request("GET", &path, &headers, b"")
}

/// Ticker input JSON.
pub fn ticker_input(n: u64, delay_ms: u64, text_len: u64) -> String {
    format!(r#"{{"n":{n},"delay_ms":{delay_ms},"text_len":{text_len}}}"#)
}

/// Connects, sends `request` and reads the response head; fails unless the status is 200.
pub async fn open_stream(
    target: &Target,
    request: &[u8],
    idle: Duration,
) -> anyhow::Result<Response> {
    let mut conn = Conn::connect(target, idle).await?;
    conn.send(request).await?;
    let mut resp = conn.read_head(idle).await?;
    expect_stream(&mut resp, idle).await?;
    Ok(resp)
}

/// Fails with the status and body unless `resp` is a 200 event stream.
pub async fn expect_stream(resp: &mut Response, idle: Duration) -> anyhow::Result<()> {
    if resp.status != 200 {
        let body = resp.body_text(idle).await;
        bail!(
            "HTTP {} instead of an event stream: {}",
            resp.status,
            body.trim()
        );
    }
    if !resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        bail!(
            "content-type {:?} instead of text/event-stream",
            resp.header("content-type")
        );
    }
    Ok(())
}

/// What a reader collects.
#[derive(Debug, Default)]
pub struct Reader {
    /// Delivery checks.
    pub check: SeqCheck,
    parser: SseParser,
    buf: Vec<u8>,
    /// Unix nanoseconds of the read that brought the first tick.
    pub first_tick_ns: Option<u64>,
    /// Unix nanoseconds of the read that brought the last event.
    pub last_ns: u64,
    /// Unix nanoseconds of the read that brought the terminal event.
    pub terminal_ns: Option<u64>,
    /// `(t, added latency)` of the ticks recorded: creation time (Unix ns) and receive time
    /// minus `t` (ns).
    pub latencies: Vec<(u64, i64)>,
    /// `text-delta` events seen, with [`FollowOpts::stamped_tokens`].
    pub tokens: u64,
    /// Unix nanoseconds of the read that brought the first `text-delta`.
    pub first_token_ns: Option<u64>,
    /// Events dispatched (duplicates included).
    pub dispatched: u64,
    /// Body bytes decoded.
    pub body_bytes: u64,
}

/// Options of [`Reader::follow`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FollowOpts {
    /// Stop (leaving the connection to be dropped) after this many events on this connection.
    pub stop_after: Option<u64>,
    /// Record the latency of ticks created at or after this Unix-nanosecond time.
    pub latency_from: Option<u64>,
    /// Model tokens carry their send time: record the latency of every `text-delta` whose
    /// text is `t<unix-ns> ` (as `sluice-mock-llm --stamp` writes them), not of ticks.
    pub stamped_tokens: bool,
}

/// Why [`Reader::follow`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The terminal event arrived and the stream then closed.
    Terminal,
    /// `stop_after` was reached.
    Stopped,
}

impl Reader {
    /// A reader starting after `from`.
    pub fn new(from: u64) -> Self {
        Self {
            check: SeqCheck::new(from),
            buf: Vec::with_capacity(64 * 1024),
            ..Self::default()
        }
    }

    /// Reads `resp` to its end (or `stop_after`), checking every event.
    ///
    /// # Errors
    /// Socket errors, idle timeouts, a body that ends before the terminal event, or a stream
    /// that stays open after it.
    pub async fn follow(
        &mut self,
        resp: &mut Response,
        opts: FollowOpts,
        idle: Duration,
    ) -> anyhow::Result<End> {
        self.buf.clear();
        let mut on_conn = 0u64;
        loop {
            let wait = if self.check.terminal.is_some() {
                CLOSE_GRACE
            } else {
                idle
            };
            let before = self.buf.len();
            let now = match resp.next_body(&mut self.buf, wait).await {
                Ok(Some(now)) => now,
                Ok(None) => break,
                Err(e) if self.check.terminal.is_some() => {
                    bail!("the stream did not end cleanly after the terminal event: {e:#}")
                }
                Err(e) => return Err(e),
            };
            self.body_bytes += (self.buf.len() - before) as u64;
            let check = &mut self.check;
            let first_tick = &mut self.first_tick_ns;
            let terminal_ns = &mut self.terminal_ns;
            let latencies = &mut self.latencies;
            let dispatched = &mut self.dispatched;
            let tokens = &mut self.tokens;
            let first_token = &mut self.first_token_ns;
            let flow = self.parser.parse(&mut self.buf, |ev| {
                *dispatched += 1;
                on_conn += 1;
                let tick = ev.kind == b"tick";
                match sse::envelope(ev.data, tick) {
                    Some(env) => {
                        let id = ev.id.and_then(sse::number).map(|n| n.0);
                        check.observe(env.seq, id, ev.kind, env.i);
                        if terminal_ns.is_none() && check.terminal.is_some() {
                            *terminal_ns = Some(now);
                        }
                        if opts.stamped_tokens && ev.kind == b"text-delta" {
                            *tokens += 1;
                            first_token.get_or_insert(now);
                            if let Some(t) = sse::stamped_text(ev.data) {
                                latencies.push((t, now as i64 - t as i64));
                            }
                        }
                        if tick {
                            first_tick.get_or_insert(now);
                            if let (Some(t), Some(from)) = (env.t, opts.latency_from)
                                && t >= from
                            {
                                latencies.push((t, now as i64 - t as i64));
                            }
                        }
                    }
                    None => check.malformed += 1,
                }
                if opts.stop_after.is_some_and(|n| on_conn >= n) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            });
            self.last_ns = now;
            if flow == Flow::Stop {
                return Ok(End::Stopped);
            }
        }
        if !self.buf.is_empty() {
            bail!(
                "the stream ended in the middle of an event ({} bytes left)",
                self.buf.len()
            );
        }
        if self.check.terminal.is_none() {
            bail!(
                "the stream ended before the terminal event (last seq {})",
                self.check.max
            );
        }
        Ok(End::Terminal)
    }
}

/// Opens (and holds) up to `n` permits at once: bounds connects in flight.
pub fn connect_gate(common: &Common) -> std::sync::Arc<tokio::sync::Semaphore> {
    std::sync::Arc::new(tokio::sync::Semaphore::new(
        common.connect_concurrency.max(1),
    ))
}
