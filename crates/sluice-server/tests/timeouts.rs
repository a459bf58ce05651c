//! Connection timeouts on a real server, driven over raw TCP: a request head must arrive within
//! `server.header_timeout` (slowloris), its body within `server.body_timeout` (else 408), an idle
//! keep-alive connection is closed after `server.idle_timeout`, and none of them cuts an event
//! stream or a WebSocket that stays open longer than all three.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_engine::builtin;
use sluice_server::config::{Config, ConfigError, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Far more than any timeout under test: a connection still open after this was not closed.
const LIMIT: Duration = Duration::from_secs(10);

fn opts(header: Duration, idle: Duration) -> ServerOptions {
    ServerOptions {
        header_timeout: header,
        body_timeout: header,
        idle_timeout: idle,
        heartbeat: Duration::from_millis(100),
        ..ServerOptions::default()
    }
}

async fn server(options: ServerOptions) -> TestServer {
    TestServer::with(options, vec![builtin::ticker(), builtin::ask_human()]).await
}

/// Reads (and drops) whatever comes until the server closes the connection; how long that
/// took from `since`. Panics if it is still open after [`LIMIT`].
async fn wait_closed(c: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(LIMIT, async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection");
    since.elapsed()
}

/// One whole response (head and `content-length` body) from a keep-alive connection.
async fn read_response(c: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if raw.len() >= end + 4 + len {
                return String::from_utf8(raw).unwrap();
            }
        }
        let n = tokio::time::timeout(LIMIT, c.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
}

/// Answers the `ask-human` run `id`, then reads its stream on `c` (what was read so far in
/// `seen`) up to the terminal event.
async fn answer_and_read_to_the_end(
    s: &TestServer,
    id: &str,
    c: &mut TcpStream,
    seen: &mut String,
) {
    let r = s
        .send_event(id, &json!({"type": "input", "data": "yes"}))
        .await;
    assert_eq!(r.status(), 202);
    let mut buf = [0u8; 4096];
    tokio::time::timeout(LIMIT, async {
        while !seen.contains("chain-completed") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the terminal event: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .expect("the terminal event");
}

async fn healthz(c: &mut TcpStream) -> String {
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_request_head_is_closed_and_frees_its_connection_slot() {
    let header = Duration::from_millis(300);
    let s = server(ServerOptions {
        max_connections: 1,
        ..opts(header, Duration::from_secs(30))
    })
    .await;
    let started = Instant::now();
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The only connection slot is taken: this one waits in the backlog until the first closes.
    let waiting = tokio::spawn({
        let addr = s.addr;
        async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            healthz(&mut c).await
        }
    });
    let took = wait_closed(&mut slow, started).await;
    assert!(took >= header - Duration::from_millis(50), "{took:?}");
    let answer = tokio::time::timeout(LIMIT, waiting)
        .await
        .expect("served once the slow connection was closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let s = server(opts(Duration::from_millis(300), Duration::from_secs(30))).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    wait_closed(&mut silent, started).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickling_in_byte_by_byte_is_still_closed_after_the_header_timeout() {
    let s = server(opts(Duration::from_millis(300), Duration::from_secs(30))).await;
    let started = Instant::now();
    let c = TcpStream::connect(s.addr).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    // One byte every 50 ms (for up to 10 s): each arrives well within the timeout, the head never
    // completes.
    let trickle = tokio::spawn(async move {
        wr.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await?;
        for _ in 0..200 {
            wr.write_all(b"x").await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::io::Result::Ok(())
    });
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(LIMIT, rd.read(&mut buf))
        .await
        .expect("the server closed the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() < LIMIT);
    trickle.abort();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_millis(1500));
    let s = server(opts(header, idle)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let answer = healthz(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Idle for longer than the header timeout: the idle timeout applies, the connection stays.
    tokio::time::sleep(header * 2).await;
    let answer = healthz(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let idle_since = Instant::now();
    let took = wait_closed(&mut c, idle_since).await;
    assert!(took >= idle - Duration::from_millis(500), "{took:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_head_on_a_keep_alive_connection_has_the_header_timeout() {
    // The idle timeout is far away: only the header timeout, counted from the first byte of the
    // second head, can close this connection within LIMIT.
    let s = server(opts(Duration::from_millis(300), Duration::from_secs(60))).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let answer = healthz(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    wait_closed(&mut c, Instant::now()).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_open_longer_than_both_timeouts_is_not_closed() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_millis(300));
    let s = server(opts(header, idle)).await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        format!(
            "GET /v1/runs/{id}/events HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read for five times the timeouts: heartbeats keep coming, the stream stays open.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + (header + idle) * 5;
    loop {
        match tokio::time::timeout_at(until, c.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) => panic!("the stream was closed: {seen}"),
            Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => panic!("the stream broke: {e}; {seen}"),
        }
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("input-requested"), "{seen}");
    assert!(seen.matches(": ping").count() >= 3, "{seen}");
    // The run goes on and the same stream delivers its end.
    answer_and_read_to_the_end(&s, &id, &mut c, &mut seen).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_open_longer_than_both_timeouts_is_not_closed() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_millis(300));
    let s = server(ServerOptions {
        // No pings either: nothing at all crosses the socket while the test waits.
        heartbeat: Duration::from_secs(60),
        ..opts(header, idle)
    })
    .await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/runs/{id}/events", s.addr))
            .await
            .unwrap();
    tokio::time::sleep((header + idle) * 3).await;
    ws.send(Message::Text(
        json!({"type": "input", "data": "yes"}).to_string().into(),
    ))
    .await
    .unwrap();
    let mut accepted = false;
    let mut completed = false;
    tokio::time::timeout(LIMIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                accepted |= v["accepted"] == json!(true);
                completed |= v["type"] == "chain-completed";
            }
        }
    })
    .await
    .expect("the socket closes after the terminal event");
    assert!(accepted, "the event sent after the wait was accepted");
    assert!(completed, "the run completed");
    s.stop().await;
}

/// The head of a JSON `POST` announcing a body of `len` bytes.
fn post_head(path: &str, len: usize, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n{extra}\r\n"
    )
}

/// The JSON body of a whole response.
fn body_of(response: &str) -> Value {
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

/// Asserts `response` is the body timeout's answer: 408, `Connection: close`, the error shape.
fn assert_body_timed_out(response: &str) {
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    let head = response.to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close\r\n"), "{response}");
    let body = body_of(response);
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("server.body_timeout"), "{message}");
}

async fn run_count(s: &TestServer) -> usize {
    let (status, page) = s.get_json("/v1/runs").await;
    assert_eq!(status, 200, "{page}");
    page["runs"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_coming_gets_408_and_its_connection_is_closed() {
    let body_timeout = Duration::from_millis(300);
    let s = server(ServerOptions {
        body_timeout,
        ..opts(Duration::from_secs(10), Duration::from_secs(30))
    })
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    // Content-Length: 100, and only the first 10 bytes of the body.
    let body = format!("{:<100}", r#"{"input": {"n": 1}}"#);
    c.write_all(post_head("/v1/workflows/ticker/runs", 100, "").as_bytes())
        .await
        .unwrap();
    c.write_all(&body.as_bytes()[..10]).await.unwrap();
    let started = Instant::now();
    let answer = read_response(&mut c).await;
    assert_body_timed_out(&answer);
    assert!(
        started.elapsed() >= body_timeout - Duration::from_millis(50),
        "answered before the body timeout: {:?}",
        started.elapsed()
    );
    // Closed after the answer, although the client could still send the rest.
    wait_closed(&mut c, Instant::now()).await;
    assert_eq!(run_count(&s).await, 0, "no run was started");
    // The server goes on serving: the same request, sent in full, starts its run.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(format!("{}{body}", post_head("/v1/workflows/ticker/runs", 100, "")).as_bytes())
        .await
        .unwrap();
    let answer = read_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert_eq!(body_of(&answer)["workflow"], "ticker");
    assert_eq!(run_count(&s).await, 1);
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("sluice_http_responses_total{class=\"4xx\"} 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_trickling_in_is_cut_at_the_body_timeout() {
    let s = server(ServerOptions {
        body_timeout: Duration::from_millis(300),
        ..opts(Duration::from_secs(10), Duration::from_secs(30))
    })
    .await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let c = TcpStream::connect(s.addr).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    // An event for the waiting run, one byte every 50 ms (200 bytes: 10 s): each byte well
    // within the timeout, the whole body far beyond it.
    let body = format!("{:<200}", r#"{"type": "input", "data": "yes"}"#);
    let trickle = tokio::spawn(async move {
        wr.write_all(post_head(&format!("/v1/runs/{id}/events"), 200, "").as_bytes())
            .await?;
        for b in body.bytes() {
            wr.write_all(&[b]).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::io::Result::Ok(wr)
    });
    let mut raw = Vec::new();
    // To the end of the connection (a reset, as the trickle's next byte meets the closed
    // socket, ends it too: what was read is kept).
    let _ = tokio::time::timeout(LIMIT, rd.read_to_end(&mut raw))
        .await
        .expect("answered and closed before the body was complete");
    assert_body_timed_out(&String::from_utf8(raw).unwrap());
    trickle.abort();
    assert!(
        !matches!(trickle.await, Ok(Ok(_))),
        "the whole body was sent before the answer"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_that_arrives_within_the_body_timeout_is_served() {
    let s = server(ServerOptions {
        body_timeout: Duration::from_secs(5),
        ..opts(Duration::from_millis(300), Duration::from_secs(30))
    })
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let body = r#"{"input": {"n": 3}}"#;
    c.write_all(post_head("/v1/workflows/ticker/runs?wait=true", body.len(), "").as_bytes())
        .await
        .unwrap();
    // In two parts, the pause longer than the header timeout: only the body timeout applies.
    c.write_all(&body.as_bytes()[..8]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.write_all(&body.as_bytes()[8..]).await.unwrap();
    let answer = read_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(body_of(&answer)["result"], json!({"count": 3}));
    // Keep-alive: the connection serves the next request.
    assert!(healthz(&mut c).await.starts_with("HTTP/1.1 200"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answering_with_its_event_stream_outlives_the_body_timeout() {
    let timeout = Duration::from_millis(300);
    let s = server(opts(timeout, timeout)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let body = r#"{"input": {"prompt": "ok?"}}"#;
    c.write_all(
        format!(
            "{}{body}",
            post_head(
                "/v1/workflows/ask-human/runs",
                body.len(),
                "accept: text/event-stream\r\n"
            )
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read for five times the timeouts: heartbeats keep coming, the stream stays open.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + timeout * 5;
    loop {
        match tokio::time::timeout_at(until, c.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) => panic!("the stream was closed: {seen}"),
            Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => panic!("the stream broke: {e}; {seen}"),
        }
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("input-requested"), "{seen}");
    assert!(seen.matches(": ping").count() >= 3, "{seen}");
    let id = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-sluice-run-id: "))
        .unwrap()
        .trim()
        .to_owned();
    answer_and_read_to_the_end(&s, &id, &mut c, &mut seen).await;
    s.stop().await;
}

#[test]
fn the_timeouts_are_configurable_and_checked() {
    let d = ServerOptions::default();
    assert_eq!(d.header_timeout, Duration::from_secs(10));
    assert_eq!(d.body_timeout, Duration::from_secs(30));
    assert_eq!(d.idle_timeout, Duration::from_secs(60));
    let c = Config::from_toml(
        "[server]\nheader_timeout = \"2s\"\nbody_timeout = \"1m\"\nidle_timeout = \"90s\"\n",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.server.header_timeout, Duration::from_secs(2));
    assert_eq!(c.server.body_timeout, Duration::from_secs(60));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(90));
    let c = Config::from_toml_and_env(
        "",
        [("SLUICE_SERVER__BODY_TIMEOUT".to_owned(), "250ms".to_owned())],
    )
    .unwrap();
    assert_eq!(c.server.body_timeout, Duration::from_millis(250));
    for key in ["header_timeout", "body_timeout", "idle_timeout"] {
        let c = Config::from_toml(&format!("[server]\n{key} = \"50ms\"\n")).unwrap();
        match c.validate() {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, format!("server.{key}")),
            other => panic!("{key}: {other:?}"),
        }
    }
}
