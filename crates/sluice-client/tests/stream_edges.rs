//! Stream behaviour a real server does not show on demand, against scripted HTTP answers:
//! duplicates after a resume, gaps, 204, retried 503, the `Last-Event-ID` sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Scripted, sse_response, sse_response_with_tail, status_response};
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
