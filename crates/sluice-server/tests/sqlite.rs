//! The core end-to-end path on the SQLite store (a real database file): create, stream in the
//! same call, resume with `Last-Event-ID` (0 lost, 0 duplicated), 204 at the end, the final
//! record, a waiting run brought back by an event, and paginated listing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{SseReader, TestServer, seqs};
use serde_json::json;
use sluice_server::config::ServerOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_stream_resume_on_sqlite() {
    let s = TestServer::sqlite(ServerOptions::default()).await;
    // Create and stream in the same call; drop the reader after 300 events.
    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("accept", "text/event-stream")
        .json(&json!({"input": {"n": 996, "delay_ms": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-sluice-run-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut sse = SseReader::new(resp);
    let mut got = Vec::new();
    while got.len() < 300 {
        got.push(sse.next_event().await.unwrap());
    }
    drop(sse);
    let last = got.last().unwrap()["seq"].as_u64().unwrap();
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    got.extend(SseReader::new(resp).rest().await);
    assert_eq!(
        seqs(&got),
        (1..=1000).collect::<Vec<_>>(),
        "0 lost, 0 duplicated"
    );
    assert_eq!(got.last().unwrap()["type"], "chain-completed");

    // The record was final before the terminal event was visible.
    let (status, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["result"], json!({"count": 996}));
    assert_eq!(rec["last_seq"], 1000);
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("last-event-id", "1000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_and_listing_on_sqlite() {
    let s = TestServer::sqlite(ServerOptions::default()).await;
    let id = s.start_run("ask-human", json!({"prompt": "ok?"})).await;
    s.wait_status(&id, "waiting").await;
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    let r = s
        .send_event(&id, &json!({"type": "input", "data": "yes"}))
        .await;
    assert_eq!(r.status(), 202);
    let evs = sse.rest().await;
    assert_eq!(seqs(&evs), (1..=evs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        evs.last().unwrap()["data"]["result"],
        json!({"answer": "yes"})
    );

    for n in 1..=3 {
        s.client
            .post(s.url("/v1/workflows/ticker/runs?wait=true"))
            .json(&json!({"input": {"n": n}}))
            .send()
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={c}"));
        let (status, page) = s.get_json(&format!("/v1/runs?limit=2{q}")).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 4);
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    let (status, body) = s.get_json("/v1/runs?cursor=nope").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_request");
    s.stop().await;
}
