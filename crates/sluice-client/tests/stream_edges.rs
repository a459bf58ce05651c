//! Stream behaviour a real server does not show on demand, against scripted HTTP answers:
//! duplicates after a resume, gaps, 204, retried 503, the `Last-Event-ID` sent, silent
//! connections, `Retry-After`, how long a stream keeps trying, oversized events.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{
    Scripted, retry_after_response, sse_open_response, sse_response, sse_response_with_tail,
    status_response,
};
use futures_util::StreamExt;
use sluice_client::{Client, ErrorKind};

fn client(base: &str) -> Client {
    Client::builder()
        .base_url(base)
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .max_reconnect_attempts(3)
        .build()
        .unwrap()
}

fn last_event_ids(s: &Scripted) -> Vec<String> {
    s.requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| {
            r.lines()
                .find_map(|l| l.strip_prefix("last-event-id: "))
                .unwrap_or("-")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn resumes_after_the_last_seq_and_skips_what_it_already_had() {
    let s = Scripted::start(vec![
        sse_response(&[(1, "chain-started"), (2, "tick")]),
        // Half a frame, then the connection ends.
        sse_response_with_tail(&[(2, "tick"), (3, "tick")], "id: 4\ndata: {\"se"),
        status_response(
            "503 Service Unavailable",
            r#"{"error":{"code":"shutting_down","message":"bye"}}"#,
        ),
        sse_response(&[
            (3, "tick"),
            (4, "tick"),
            (5, "chain-completed"),
            (6, "tick"),
        ]),
    ])
    .await;
    let mut events = client(&s.base).events("run_x", 0);
    let mut seqs = Vec::new();
    while let Some(ev) = events.next().await {
        seqs.push(ev.unwrap().seq);
    }
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5],
        "no duplicate, nothing after the terminal event"
    );
    assert_eq!(events.reconnects(), 2);
    assert_eq!(last_event_ids(&s), ["0", "2", "3", "3"]);
}

#[tokio::test]
async fn a_gap_is_an_error() {
    let s = Scripted::start(vec![sse_response(&[(1, "a"), (2, "b"), (4, "c")])]).await;
    let mut events = client(&s.base).events("run_x", 0);
    assert_eq!(events.next().await.unwrap().unwrap().seq, 1);
    assert_eq!(events.next().await.unwrap().unwrap().seq, 2);
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Gap);
    assert!(err.to_string().contains("from seq 2 to 4"), "{err}");
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn no_content_ends_the_stream_and_bad_json_is_a_decode_error() {
    let s = Scripted::start(vec![
        "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".to_owned(),
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 16\r\nconnection: close\r\n\r\ndata: {\"seq\":\n\n\n".to_owned(),
    ])
    .await;
    let c = client(&s.base);
    let mut events = c.events("run_x", 9);
    assert!(events.next().await.is_none());
    assert_eq!(last_event_ids(&s), ["9"]);
    let err = c.events("run_x", 0).next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
}

#[tokio::test]
async fn gives_up_after_the_configured_attempts() {
    let mut script = vec![sse_response(&[(1, "chain-started")])];
    for _ in 0..4 {
        script.push(status_response(
            "503 Service Unavailable",
            r#"{"error":{"code":"shutting_down","message":"bye"}}"#,
        ));
    }
    let s = Scripted::start(script).await;
    let mut events = client(&s.base).events("run_x", 0);
    assert_eq!(events.next().await.unwrap().unwrap().seq, 1);
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    // The stream, then 3 reconnect attempts, all 503.
    assert_eq!(s.requests.lock().unwrap().len(), 4);
}

/// Takes the stream's first event (seq 1), then the error it ends with, within 20 s (else the
/// test fails with `stuck`).
async fn error_after_the_first(
    events: &mut sluice_client::EventStream,
    stuck: &str,
) -> sluice_client::Error {
    assert_eq!(events.next().await.unwrap().unwrap().seq, 1);
    tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect(stuck)
        .unwrap()
        .unwrap_err()
}

fn unavailable() -> String {
    status_response(
        "503 Service Unavailable",
        r#"{"error":{"code":"shutting_down","message":"bye"}}"#,
    )
}

async fn seqs_of(mut events: sluice_client::EventStream) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Some(ev) = events.next().await {
        seqs.push(ev.unwrap().seq);
    }
    seqs
}

#[tokio::test]
async fn a_silent_connection_is_resumed_after_the_idle_timeout() {
    // Events 1 and 2, then the connection stays open and says nothing (no keep-alive either).
    let s = Scripted::start_with(vec![
        (
            sse_open_response(&[(1, "chain-started"), (2, "tick")]),
            true,
        ),
        (
            sse_response(&[(2, "tick"), (3, "tick"), (4, "chain-completed")]),
            false,
        ),
    ])
    .await;
    let c = Client::builder()
        .base_url(&s.base)
        .idle_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .build()
        .unwrap();
    let mut events = c.events("run_x", 0);
    let mut seqs = Vec::new();
    let follow = async {
        while let Some(ev) = events.next().await {
            seqs.push(ev.unwrap().seq);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), follow)
        .await
        .expect("the stream never resumed");
    assert_eq!(seqs, [1, 2, 3, 4], "everything once");
    assert_eq!(events.reconnects(), 1);
    assert_eq!(last_event_ids(&s), ["0", "2"]);
}

#[tokio::test]
async fn keeps_reconnecting_past_ten_failures_by_default() {
    // Like a server that is down for a while: 15 failed attempts, then it is back.
    let mut script = vec![sse_response(&[(1, "chain-started")])];
    script.extend((0..15).map(|_| unavailable()));
    script.push(sse_response(&[(2, "tick"), (3, "chain-completed")]));
    let s = Scripted::start(script).await;
    let c = Client::builder()
        .base_url(&s.base)
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build()
        .unwrap();
    let seqs = tokio::time::timeout(Duration::from_secs(20), seqs_of(c.events("run_x", 0)))
        .await
        .expect("the stream did not finish");
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(s.requests.lock().unwrap().len(), 17);
}

#[tokio::test]
async fn gives_up_after_the_reconnect_timeout() {
    let mut script = vec![sse_response(&[(1, "chain-started")])];
    script.extend((0..1000).map(|_| unavailable()));
    let s = Scripted::start(script).await;
    let c = Client::builder()
        .base_url(&s.base)
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(10))
        .reconnect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut events = c.events("run_x", 0);
    let err = error_after_the_first(&mut events, "the stream never gave up").await;
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    let attempts = s.requests.lock().unwrap().len() - 1;
    assert!(
        (2..1000).contains(&attempts),
        "retried for a while, then stopped: {attempts} attempts"
    );
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn a_long_retry_after_is_capped_in_both_forms() {
    let s = Scripted::start(vec![
        sse_response(&[(1, "chain-started")]),
        retry_after_response("503 Service Unavailable", "3600"),
        retry_after_response("429 Too Many Requests", "Fri, 01 Jan 2100 00:00:00 GMT"),
        sse_response(&[(2, "chain-completed")]),
    ])
    .await;
    let c = Client::builder()
        .base_url(&s.base)
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .max_retry_after(Duration::from_millis(20))
        .build()
        .unwrap();
    let seqs = tokio::time::timeout(Duration::from_secs(20), seqs_of(c.events("run_x", 0)))
        .await
        .expect("waited for the server's Retry-After instead of the cap");
    assert_eq!(seqs, [1, 2]);
    assert_eq!(s.requests.lock().unwrap().len(), 4);

    // The error a caller sees keeps the server's value (here an HTTP date, ~75 years ahead).
    let s = Scripted::start(vec![retry_after_response(
        "429 Too Many Requests",
        "Fri, 01 Jan 2100 00:00:00 GMT",
    )])
    .await;
    let err = Client::new(&s.base)
        .unwrap()
        .run("run_x")
        .await
        .unwrap_err();
    match err.kind() {
        ErrorKind::Rejected {
            retry_after: Some(d),
        } => assert!(d > Duration::from_secs(70 * 365 * 86_400), "{d:?}"),
        other => panic!("expected Rejected with a retry_after, got {other:?}"),
    }
}

#[tokio::test]
async fn an_endless_line_is_an_error_not_a_growing_buffer() {
    // A stream whose data line never ends.
    let head = sse_open_response(&[(1, "chain-started")]);
    let response = format!("{head}data: {}", "x".repeat(100_000));
    let s = Scripted::start_with(vec![(response, true)]).await;
    let c = Client::builder()
        .base_url(&s.base)
        .max_event_size(16 * 1024)
        .build()
        .unwrap();
    let mut events = c.events("run_x", 0);
    let err = error_after_the_first(&mut events, "kept buffering").await;
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert!(
        err.to_string()
            .contains("maximum event size of 16384 bytes"),
        "{err}"
    );
    assert!(events.next().await.is_none());
    assert_eq!(s.requests.lock().unwrap().len(), 1, "not retried");
}

#[tokio::test]
async fn an_error_answer_whose_body_never_ends_is_read_for_the_request_timeout_only() {
    // A 503 that announces a large body and sends the start of it, then nothing.
    let stuck = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\nconnection: close\r\n\r\n{\"error\":{\"code\":\"shutting_down\"".to_owned();
    let s = Scripted::start_with(vec![
        (sse_response(&[(1, "chain-started")]), false),
        (stuck, true),
    ])
    .await;
    let c = Client::builder()
        .base_url(&s.base)
        .request_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .max_reconnect_attempts(1)
        .build()
        .unwrap();
    let mut events = c.events("run_x", 0);
    let err = error_after_the_first(&mut events, "waited for the rest of the error body").await;
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert!(err.to_string().contains("Service Unavailable"), "{err}");
}

#[tokio::test]
async fn a_retry_after_of_zero_does_not_shorten_the_backoff() {
    let zero = || retry_after_response("503 Service Unavailable", "0");
    let s = Scripted::start(vec![
        sse_response(&[(1, "chain-started")]),
        zero(),
        zero(),
        zero(),
        sse_response(&[(2, "chain-completed")]),
    ])
    .await;
    let c = Client::builder()
        .base_url(&s.base)
        .reconnect_backoff(Duration::from_millis(200), Duration::from_millis(200))
        .build()
        .unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(seqs_of(c.events("run_x", 0)).await, [1, 2]);
    // Four reconnects (after the close, then after each 503), each at least half the backoff.
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn keep_alives_on_connections_that_close_at_once_do_not_reset_the_limits() {
    // After the first event, every connection sends a keep-alive and closes.
    let ping = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 21\r\nconnection: close\r\n\r\nretry: 1000\n\n: ping\n\n".to_owned();
    let mut script = vec![sse_response(&[(1, "chain-started")])];
    script.extend(std::iter::repeat_n(ping, 10));
    let s = Scripted::start(script).await;
    let mut events = client(&s.base).events("run_x", 0);
    assert_eq!(events.next().await.unwrap().unwrap().seq, 1);
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport, "{err}");
    // The stream, then the 3 reconnect attempts allowed.
    assert_eq!(s.requests.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_server_that_answered_503_is_retried_through_a_broken_connection() {
    // Before any connection: a 503 (the server is there), then a connection that closes with
    // no answer (a transport error, as a refused connect while it restarts), then the stream.
    let s = Scripted::start(vec![
        unavailable(),
        String::new(),
        sse_response(&[(1, "chain-started"), (2, "chain-completed")]),
    ])
    .await;
    assert_eq!(seqs_of(client(&s.base).events("run_x", 0)).await, [1, 2]);
    assert_eq!(s.requests.lock().unwrap().len(), 3);

    // A transport error alone, before any answer, is not retried: a wrong address fails fast.
    let s = Scripted::start(vec![String::new(), sse_response(&[(1, "chain-started")])]).await;
    let err = client(&s.base)
        .events("run_x", 0)
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport, "{err}");
    assert_eq!(s.requests.lock().unwrap().len(), 1);
}
