//! The raw-socket reference of S1: a bare TCP server that answers any request with the SSE bytes
//! Sluice would write for a ticker run (same framing, same envelope, fresh `t` and `ts` per
//! event), in chunked HTTP/1.1, with no engine and no store. It is the physical limit the
//! server is compared to.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use memchr::memmem;
use sluice_protocol::Timestamp;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::sse::number;

/// Options of the reference.
#[derive(Debug, Clone, Copy)]
pub struct RawOptions {
    /// Ticks per run when the request body names no `n`.
    pub default_events: u64,
    /// Bytes of SSE gathered into one chunk (one `write`).
    pub batch_bytes: usize,
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, opts: RawOptions) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if let Err(e) = handle(stream, opts).await {
                eprintln!("raw-reference: {e:#}");
            }
        });
    }
}

/// Binds 127.0.0.1:0 and serves on a thread of its own (its own single-threaded runtime, so it
/// shares nothing with the load generator's); returns the address.
pub fn spawn_thread(opts: RawOptions) -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("raw-reference".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("raw-reference: runtime: {e}"),
            };
            rt.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(l) => {
                        if let Err(e) = serve(l, opts).await {
                            eprintln!("raw-reference: {e:#}");
                        }
                    }
                    Err(e) => eprintln!("raw-reference: {e}"),
                }
            });
        })
        .context("spawning the raw reference thread")?;
    Ok(addr)
}

async fn handle(mut stream: TcpStream, opts: RawOptions) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(p) = memmem::find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("request head too large");
        }
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut tmp))
            .await
            .context("request timed out")??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
        .min(1 << 20);
    while buf.len() < head_end + len {
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut tmp))
            .await
            .context("request body timed out")??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = &buf[head_end..head_end + len];
    let n = field(body, b"\"n\":").unwrap_or(opts.default_events);
    let text_len = field(body, b"\"text_len\":").unwrap_or(16).min(1 << 20) as usize;
    let delay_ms = field(body, b"\"delay_ms\":").unwrap_or(0).min(60_000);
    let input = format!(r#"{{"n":{n},"delay_ms":{delay_ms},"text_len":{text_len}}}"#);
    // Paced like the ticker, a tick is written as soon as it is made: a streaming server's
    // floor for S2, where there is nothing to gather.
    let batch_bytes = if delay_ms > 0 { 1 } else { opts.batch_bytes };
    write_run(&mut stream, n, text_len, &input, batch_bytes, delay_ms).await
}

fn field(body: &[u8], key: &[u8]) -> Option<u64> {
    let p = memmem::find(body, key)?;
    number(&body[p + key.len()..]).map(|n| n.0)
}

fn now() -> (u64, Timestamp) {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (ns, Timestamp::from_micros((ns / 1000) as i64))
}

async fn write_run(
    stream: &mut TcpStream,
    n: u64,
    text_len: usize,
    input: &str,
    batch_bytes: usize,
    delay_ms: u64,
) -> anyhow::Result<()> {
    let (start_ns, _) = now();
    let t0 = tokio::time::Instant::now();
    let run_id = format!("run_{:032x}", u128::from(start_ns) << 16 | 0x7a3);
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         x-accel-buffering: no\r\nx-sluice-run-id: {run_id}\r\nlocation: /v1/runs/{run_id}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    let text: String = "abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(text_len)
        .collect();
    let mut body = Vec::with_capacity(batch_bytes + 1024);
    let mut frame = Vec::with_capacity(batch_bytes + 1024);
    frame.extend_from_slice(head.as_bytes());
    push_chunk(&mut frame, b"retry: 1000\n\n");
    stream.write_all(&frame).await?;

    let mut seq = 0u64;
    let mut event =
        |body: &mut Vec<u8>, kind: &str, step: Option<u32>, data: &dyn Fn(&mut Vec<u8>, u64)| {
            seq += 1;
            let (t, ts) = now();
            push_event(body, seq, &run_id, kind, ts, step, |out| data(out, t));
        };
    event(&mut body, "chain-started", None, &|out, _| {
        out.extend_from_slice(br#"{"workflow":"ticker","input":"#);
        out.extend_from_slice(input.as_bytes());
        out.push(b'}');
    });
    event(&mut body, "step-started", Some(1), &|out, _| {
        out.extend_from_slice(br#"{"name":"tick"}"#);
    });
    for i in 0..n {
        if delay_ms > 0 && i > 0 {
            // The ticker's own schedule: tick i is due at i × delay_ms from the first.
            tokio::time::sleep_until(t0 + Duration::from_millis(delay_ms.saturating_mul(i))).await;
        }
        event(&mut body, "tick", Some(1), &|out, t| {
            push_tick(out, i, t, &text)
        });
        if body.len() >= batch_bytes {
            frame.clear();
            push_chunk(&mut frame, &body);
            body.clear();
            stream.write_all(&frame).await?;
        }
    }
    let ms = (now().0.saturating_sub(start_ns)) / 1_000_000;
    event(&mut body, "step-completed", Some(1), &|out, _| {
        out.extend_from_slice(format!(r#"{{"name":"tick","duration_ms":{ms}}}"#).as_bytes());
    });
    event(&mut body, "chain-completed", None, &|out, _| {
        out.extend_from_slice(
            format!(
                r#"{{"result":{{"count":{n}}},"usage":{{"input_tokens":0,"output_tokens":0,"total_tokens":0}},"duration_ms":{ms}}}"#
            )
            .as_bytes(),
        );
    });
    frame.clear();
    push_chunk(&mut frame, &body);
    frame.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&frame).await?;
    stream.shutdown().await?;
    Ok(())
}

fn push_chunk(frame: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    frame.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\r\n");
}

/// Tick data as serde writes the ticker's `Tick {i, t, text}`.
fn push_tick(out: &mut Vec<u8>, i: u64, t: u64, text: &str) {
    out.extend_from_slice(br#"{"i":"#);
    push_u64(out, i);
    out.extend_from_slice(br#","t":"#);
    push_u64(out, t);
    out.extend_from_slice(br#","text":""#);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// One SSE event, byte for byte as Sluice's SSE encoder writes a `RawEvent` (run ids and event
/// types need no JSON escaping).
fn push_event(
    out: &mut Vec<u8>,
    seq: u64,
    run_id: &str,
    kind: &str,
    ts: Timestamp,
    step: Option<u32>,
    data: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(b"id: ");
    push_u64(out, seq);
    out.extend_from_slice(b"\nevent: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: {\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"run_id\":\"");
    out.extend_from_slice(run_id.as_bytes());
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"ts\":\"");
    ts.write_rfc3339(out);
    out.push(b'"');
    if let Some(step) = step {
        out.extend_from_slice(b",\"step\":");
        push_u64(out, u64::from(step));
    }
    out.extend_from_slice(b",\"data\":");
    data(out);
    out.extend_from_slice(b"}\n\n");
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use sluice_protocol::RawEvent;

    #[test]
    fn same_bytes_as_sluice() {
        let ts = Timestamp::from_micros(1_763_790_000_123_456);
        let mut mine = Vec::new();
        push_event(&mut mine, 42, "run_0193abc", "tick", ts, Some(1), |o| {
            push_tick(o, 40, 1_763_790_000_123_456_789, "abcdefghijklmnop");
        });
        let data = r#"{"i":40,"t":1763790000123456789,"text":"abcdefghijklmnop"}"#;
        let ev = RawEvent::encode(42, "run_0193abc", "tick", ts, Some(1), data);
        let mut theirs = b"id: 42\nevent: tick\ndata: ".to_vec();
        theirs.extend_from_slice(ev.json());
        theirs.extend_from_slice(b"\n\n");
        assert_eq!(
            String::from_utf8_lossy(&mine),
            String::from_utf8_lossy(&theirs)
        );
    }

    /// The chunks of a chunked HTTP/1.1 response, after its head.
    fn chunks(resp: &[u8]) -> Vec<Vec<u8>> {
        let mut rest = &resp[memmem::find(resp, b"\r\n\r\n").expect("a head") + 4..];
        let mut out = Vec::new();
        loop {
            let eol = memmem::find(rest, b"\r\n").expect("a chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16)
                .expect("a hex chunk size");
            if size == 0 {
                return out;
            }
            out.push(rest[eol + 2..eol + 2 + size].to_vec());
            rest = &rest[eol + 2 + size + 2..];
        }
    }

    fn request(body: &str) -> Vec<Vec<u8>> {
        let addr = spawn_thread(RawOptions {
            default_events: 10,
            batch_bytes: 64 * 1024,
        })
        .unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /v1/runs HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        chunks(&resp)
    }

    fn ticks_per_chunk(chunks: &[Vec<u8>]) -> Vec<usize> {
        chunks
            .iter()
            .map(|c| memmem::find_iter(c, b"event: tick\n").count())
            .filter(|&n| n > 0)
            .collect()
    }

    #[test]
    fn paced_ticks_leave_one_by_one() {
        let got = request(r#"{"workflow":"ticker","input":{"n":4,"delay_ms":1}}"#);
        assert_eq!(ticks_per_chunk(&got), [1, 1, 1, 1]);
        let all = got.concat();
        assert!(memmem::find(&all, br#""input":{"n":4,"delay_ms":1,"text_len":16}"#).is_some());
        assert!(memmem::find(&all, b"event: chain-completed\n").is_some());
    }

    #[test]
    fn unpaced_ticks_are_gathered() {
        let got = request(r#"{"workflow":"ticker","input":{"n":4}}"#);
        assert_eq!(ticks_per_chunk(&got), [4]);
    }
}
