//! Server-wide limits and shutdown on a real server: open streams (503 `overloaded`, before a
//! WebSocket upgrade too), WebSocket message size, open TCP connections, 503 while draining,
//! and the hard end of shutdown within the grace period.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{GatedStore, SseReader, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_engine::builtin;
use sluice_server::config::ServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(s: &TestServer, path: &str) -> String {
    format!("ws://{}{path}", s.addr)
}

/// The next reply frame (not an envelope), or `None` once the socket is closed.
async fn next_reply(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v.get("seq").is_none() {
                    return Some(v);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(
                    frame.map(|f| u16::from(f.code)),
                    Some(1008),
                    "closed as a policy violation"
                );
                return None;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// One `GET /healthz` on a fresh connection; the raw answer.
async fn raw_healthz(addr: std::net::SocketAddr) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_streams_get_503_overloaded_before_anything_starts() {
    let opts = ServerOptions {
        max_streams: 2,
        heartbeat: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker(), builtin::ask_human()]).await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let events = s.url(&format!("/v1/runs/{id}/events"));
    let a = s.client.get(&events).send().await.unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(ws_url(&s, &format!("/v1/runs/{id}/events")))
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    assert_eq!(s.metric("sluice_stream_readers").await, Some(2.0));

    // SSE beyond the limit.
    let r = s.client.get(&events).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "overloaded"
    );
    // A WebSocket beyond the limit gets the HTTP answer, not an upgrade.
    match tokio_tungstenite::connect_async(ws_url(&s, &format!("/v1/runs/{id}/events"))).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected a 503, got {:?}", other.map(|_| ())),
    }
    // A create that asks for a stream is refused before the run is started.
    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("accept", "text/event-stream")
        .json(&json!({"input": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let (_, runs) = s.get_json("/v1/runs?workflow=ticker").await;
    assert_eq!(runs["runs"], json!([]), "nothing started");
    // Non-stream requests are not affected.
    assert_eq!(s.get_json(&format!("/v1/runs/{id}")).await.0, 200);
    assert_eq!(
        s.metric("sluice_rejections_total{reason=\"too_many_streams\"}")
            .await,
        Some(3.0)
    );

    // A stream that goes frees its place.
    drop(a);
    b.close(None).await.unwrap();
    let mut admitted = None;
    for _ in 0..500 {
        let r = s.client.get(&events).send().await.unwrap();
        if r.status() == 200 {
            admitted = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut sse = SseReader::new(admitted.expect("a freed place is reused"));
    assert_eq!(sse.next().await.unwrap().retry, Some(1000));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_are_limited_by_the_event_size() {
    let opts = ServerOptions {
        max_event: 1024,
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ask_human()]).await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(ws_url(&s, &format!("/v1/runs/{id}/events")))
            .await
            .unwrap();
    // Over max_event but within the frame allowance: the event is refused, in the protocol's
    // error shape, and the socket stays open.
    let data = "x".repeat(2000);
    ws.send(Message::Text(
        json!({"type": "input", "data": data}).to_string().into(),
    ))
    .await
    .unwrap();
    let reply = next_reply(&mut ws).await.unwrap();
    assert_eq!(reply["error"]["code"], "too_large");
    assert_eq!(
        reply["error"]["message"],
        "the event's data exceeds the limit of 1024 bytes"
    );
    // Far over: the WebSocket layer refuses the message and closes the socket.
    let data = "x".repeat(64 * 1024);
    let _ = ws
        .send(Message::Text(
            json!({"type": "input", "data": data}).to_string().into(),
        ))
        .await;
    assert_eq!(next_reply(&mut ws).await, None, "closed, not answered");
    // The run is still waiting.
    let (_, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["status"], "waiting");
    s.stop().await;
}

/// One `GET /healthz` with a header of `len` bytes on a fresh connection; the raw answer.
async fn healthz_with_header(addr: std::net::SocketAddr, len: usize) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(len)
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_far_over_64_kib_is_431_and_the_server_goes_on() {
    // The server buffers about 64 KiB per connection (hyper's default is ~400 KiB): the request
    // head must fit in it. (hyper checks the bound while a head is incomplete, after each read:
    // a head a little over it may still be parsed, one far over it is not.)
    let s = TestServer::start().await;
    let fits = healthz_with_header(s.addr, 60 * 1024).await;
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits:.80}");
    let over = healthz_with_header(s.addr, 200 * 1024).await;
    assert!(over.starts_with("HTTP/1.1 431"), "{over:.80}");
    let after = raw_healthz(s.addr).await;
    assert!(after.starts_with("HTTP/1.1 200"), "{after:.80}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_max_body_is_413_before_it_is_sent() {
    let opts = ServerOptions {
        max_body: 4096,
        body_timeout: Duration::from_secs(60),
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker()]).await;
    for expect in ["", "expect: 100-continue\r\n"] {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let head = format!(
            "POST /v1/workflows/ticker/runs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n{expect}\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        // Nothing of the body is sent: the answer must not wait for it (nor invite it).
        let mut answer = String::new();
        let mut buf = vec![0u8; 4096];
        while !answer.contains("too_large") {
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
                .await
                .expect("answered without the body")
                .unwrap();
            if n == 0 {
                break;
            }
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(answer.starts_with("HTTP/1.1 413"), "{expect:?}: {answer}");
        assert!(answer.contains("\"too_large\""), "{answer}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let opts = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker()]).await;
    let held_a = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let held_b = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // Give the server time to accept both (it takes a permit for each).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = tokio::spawn(raw_healthz(s.addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "the third connection is not served at the limit"
    );
    drop(held_a);
    let answer = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held_b);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_at_the_limit_fill_the_configured_backlog() {
    // At the connection limit the server accepts nothing: every further connection waits in
    // the listen backlog. With tokio's or std's bind (a backlog of 128) the kernel would drop
    // the attempts beyond ~129, and those clients would hang in SYN retries.
    const WAITING: usize = 400;
    let opts = ServerOptions {
        max_connections: 1,
        listen_backlog: 1024,
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker()]).await;
    let held = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // Let the server accept it: its one permit is taken.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let connects: Vec<_> = (0..WAITING)
        .map(|_| {
            let addr = s.addr;
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
            })
        })
        .collect();
    let mut waiting = Vec::with_capacity(WAITING);
    for c in connects {
        let stream = c
            .await
            .unwrap()
            .expect("a connection waiting in the backlog completes its handshake")
            .unwrap();
        waiting.push(stream);
    }
    assert_eq!(waiting.len(), WAITING);
    // Once they close, the server works through the backlog and serves a new client.
    drop(held);
    drop(waiting);
    let answer = tokio::time::timeout(Duration::from_secs(10), raw_healthz(s.addr))
        .await
        .expect("served once the backlog has drained");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_requests_get_503_and_readyz_says_so() {
    let store = Arc::new(GatedStore::new());
    let opts = ServerOptions {
        shutdown_grace: Duration::from_secs(20),
        ..ServerOptions::default()
    };
    let s = TestServer::with_store(
        opts,
        vec![builtin::ticker(), builtin::ask_human()],
        store.clone(),
    )
    .await;
    let id = s
        .start_run("ticker", json!({"n": 1000000, "delay_ms": 10}))
        .await;
    s.wait_status(&id, "running").await;
    assert_eq!(s.get_json("/readyz").await.0, 200);
    // The run's shutdown checkpoint waits at the gate: the server stays in its drain.
    store.arm();
    s.shutdown.cancel();
    let mut draining = false;
    for _ in 0..500 {
        let (status, body) = s.get_json("/readyz").await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "shutting_down");
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz turns 503");
    let (status, body) = s.get_json("/v1/workflows").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("shutting_down"))
    );
    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .json(&json!({"input": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(s.get_json("/healthz").await.0, 200, "still alive");
    let refused = s
        .metric("sluice_rejections_total{reason=\"shutting_down\"}")
        .await
        .unwrap();
    assert!(refused >= 3.0, "{refused}");
    store.release();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), s.task)
        .await
        .expect("the server stops once the runs have checkpointed")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_the_grace_period_and_closes_what_is_left() {
    let grace = Duration::from_secs(2);
    let opts = ServerOptions {
        shutdown_grace: grace,
        ..ServerOptions::default()
    };
    let s = TestServer::with_store(
        opts,
        vec![builtin::ticker()],
        Arc::new(sluice_store_memory::MemoryStore::new()),
    )
    .await;
    // A request whose body never finishes keeps its connection busy through the drain.
    let mut slow = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/workflows/ticker/runs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"input\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("serve returned")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    // Within the grace (and it did wait for the busy connection); before, it was twice that.
    assert!(took >= grace - Duration::from_millis(500), "{took:?}");
    assert!(took < grace + Duration::from_millis(1500), "{took:?}");
    // The busy connection was closed, not left behind.
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the connection was closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
