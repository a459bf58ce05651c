//! The HTTP API end to end on an ephemeral port: every route and status, streams, resume,
//! heartbeats, admission, idempotency, auth, and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{SseReader, TestServer, seqs};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_engine::builtin;
use sluice_server::config::ServerOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_and_run_lifecycle() {
    let s = TestServer::start().await;
    let (status, wfs) = s.get_json("/v1/workflows").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = wfs
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ask-human", "ticker"]);
    assert_eq!(wfs[1]["input_schema"]["required"], json!(["n"]));

    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .json(&json!({"input": {"n": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let rec: Value = resp.json().await.unwrap();
    let id = rec["id"].as_str().unwrap();
    assert!(id.starts_with("run_"));
    assert_eq!(location, format!("/v1/runs/{id}"));
    assert_eq!(rec["workflow"], "ticker");
    assert!(rec.get("owner").is_none());

    // ?wait=true answers the finished record.
    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs?wait=true"))
        .json(&json!({"input": {"n": 5}, "metadata": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let done: Value = resp.json().await.unwrap();
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"], json!({"count": 5}));
    assert_eq!(done["last_seq"], 9);
    assert_eq!(done["metadata"], json!({"k": "v"}));
    assert!(done["finished_at"].is_string());

    s.wait_status(id, "completed").await;
    let (status, got) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["last_seq"], 7);

    // list: newest first, filters, pagination.
    let (_, page) = s.get_json("/v1/runs?limit=1").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 1);
    assert_eq!(page["runs"][0]["id"], done["id"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page2) = s
        .get_json(&format!("/v1/runs?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["runs"][0]["id"], rec["id"]);
    assert!(page2.get("next_cursor").is_none());
    // A cursor is a position in id (creation) order, whether or not its run exists.
    let (status, oldest) = s
        .get_json(&format!("/v1/runs?cursor=run_{}", "0".repeat(32)))
        .await;
    assert_eq!((status, oldest["runs"].clone()), (200, json!([])));
    let (_, newest) = s
        .get_json(&format!("/v1/runs?cursor=run_{}", "f".repeat(32)))
        .await;
    assert_eq!(newest["runs"].as_array().unwrap().len(), 2);
    let (_, filtered) = s.get_json("/v1/runs?workflow=ask-human").await;
    assert_eq!(filtered["runs"], json!([]));
    let (_, by_status) = s.get_json("/v1/runs?status=completed,failed").await;
    assert_eq!(by_status["runs"].as_array().unwrap().len(), 2);
    s.stop().await;
}

/// Numbers come back as they were sent: a double is parsed to the nearest value, so that its
/// shortest form is the one the client wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_round_trip_exactly() {
    let s = TestServer::start().await;
    let numbers = "[0.09082719268432227,0.9213340547657813,0.41064072326067835,0.056350375035050804,0.1,1e-7]";
    let body = format!(r#"{{"input":{{"n":1}},"metadata":{{"v":{numbers}}}}}"#);
    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs?wait=true"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = s
        .client
        .get(s.url(&format!("/v1/runs/{id}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(numbers), "sent {numbers}, got {text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_is_negotiated_case_insensitively_and_by_q() {
    let s = TestServer::start().await;
    let create = |accept: &'static str| {
        s.client
            .post(s.url("/v1/workflows/ticker/runs"))
            .header("accept", accept)
            .json(&json!({"input": {"n": 1}}))
            .send()
    };
    for (accept, status, content_type) in [
        ("Text/Event-Stream", 200, "text/event-stream"),
        ("APPLICATION/X-NDJSON", 200, "application/x-ndjson"),
        (
            "text/event-stream;q=0, application/json",
            202,
            "application/json",
        ),
        (
            "application/json, text/event-stream;q=0.5",
            202,
            "application/json",
        ),
        (
            "application/x-ndjson;q=0, text/event-stream",
            200,
            "text/event-stream",
        ),
    ] {
        let resp = create(accept).await.unwrap();
        assert_eq!(resp.status(), status, "{accept}");
        assert_eq!(resp.headers()["content-type"], content_type, "{accept}");
        let body = resp.text().await.unwrap();
        if status == 202 {
            let rec: Value = serde_json::from_str(&body).unwrap();
            assert!(rec["id"].is_string(), "{accept}: {body}");
        } else {
            assert!(body.contains("chain-completed"), "{accept}: {body}");
        }
    }
    // Media types are case-insensitive in Content-Type too.
    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("content-type", "Application/JSON; charset=UTF-8")
        .body(r#"{"input":{"n":1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // The events route: NDJSON when preferred, in any case; SSE otherwise.
    let resp = create("application/json").await.unwrap();
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (accept, content_type) in [
        ("Application/X-NDJSON", "application/x-ndjson"),
        (
            "application/x-ndjson;q=0, text/event-stream",
            "text/event-stream",
        ),
        ("*/*", "text/event-stream"),
    ] {
        let resp = s
            .client
            .get(s.url(&format!("/v1/runs/{id}/events")))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{accept}");
        assert_eq!(resp.headers()["content-type"], content_type, "{accept}");
        assert!(resp.text().await.unwrap().contains("chain-completed"));
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_accept_streams_the_run() {
    let s = TestServer::start().await;
    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("accept", "text/event-stream")
        .json(&json!({"input": {"n": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert!(resp.headers().get("content-encoding").is_none());
    let mut sse = SseReader::new(resp);
    let first = sse.next().await.unwrap();
    assert_eq!(first.retry, Some(1000));
    let evs = sse.rest().await;
    let types: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "chain-started",
            "step-started",
            "tick",
            "tick",
            "tick",
            "step-completed",
            "chain-completed"
        ]
    );
    assert_eq!(seqs(&evs), [1, 2, 3, 4, 5, 6, 7]);

    // NDJSON in the same call.
    let resp = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("accept", "application/x-ndjson")
        .json(&json!({"input": {"n": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(seqs(&lines), [1, 2, 3, 4, 5, 6]);
    s.stop().await;
}

async fn sse_events(s: &TestServer, id: &str, extra: &str) -> Vec<Value> {
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events{extra}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    SseReader::new(resp).rest().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_readers_of_three_transports_see_identical_sequences() {
    let s = TestServer::start().await;
    let id = s
        .start_run("ticker", json!({"n": 300, "delay_ms": 1}))
        .await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (client, url) = (s.client.clone(), s.url(&format!("/v1/runs/{id}/events")));
        tasks.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap();
            SseReader::new(resp).rest().await
        }));
    }
    {
        let (client, url) = (s.client.clone(), s.url(&format!("/v1/runs/{id}/events")));
        tasks.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("accept", "application/x-ndjson")
                .send()
                .await
                .unwrap();
            let text = resp.text().await.unwrap();
            text.lines()
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        }));
    }
    {
        let url = format!("ws://{}/v1/runs/{id}/events", s.addr);
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut out = Vec::new();
            while let Some(msg) = ws.next().await {
                match msg.unwrap() {
                    tokio_tungstenite::tungstenite::Message::Text(t) => {
                        out.push(serde_json::from_str::<Value>(t.as_str()).unwrap())
                    }
                    tokio_tungstenite::tungstenite::Message::Close(_) => break,
                    _ => {}
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    assert_eq!(all[0].len(), 304);
    assert_eq!(seqs(&all[0]), (1..=304).collect::<Vec<_>>());
    for other in &all[1..] {
        assert_eq!(other, &all[0]);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_dropped_after_500_resumes_with_last_event_id() {
    let s = TestServer::start().await;
    let id = s
        .start_run("ticker", json!({"n": 1996, "delay_ms": 0}))
        .await;
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    let mut got = Vec::new();
    while got.len() < 500 {
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
    got.extend(SseReader::new(resp).rest().await);
    assert_eq!(
        seqs(&got),
        (1..=2000).collect::<Vec<_>>(),
        "0 lost, 0 duplicated"
    );

    // At the end of a finished run: 204, which stops EventSource reconnecting.
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events?after=2000")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("last-event-id", "2000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    // ?types filters server-side; the terminal event always comes through.
    let filtered = sse_events(&s, &id, "?types=step-started,step-completed").await;
    let types: Vec<&str> = filtered
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["step-started", "step-completed", "chain-completed"]);
    // The ticker's own type, which it declares.
    let ticks = sse_events(&s, &id, "?types=tick").await;
    assert!(ticks.len() > 1, "{ticks:?}");
    assert!(
        ticks[..ticks.len() - 1].iter().all(|e| e["type"] == "tick"),
        "{ticks:?}"
    );
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events?types=tock")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"tock\"") && message.contains("its own: tick"),
        "{message}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_while_a_run_waits_then_input_completes_it() {
    let opts = ServerOptions {
        heartbeat: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ask_human()]).await;
    let id = s.start_run("ask-human", json!({"prompt": "Go?"})).await;
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    let mut pings = 0;
    let mut seen = Vec::new();
    while pings < 3 {
        let f = sse.next().await.unwrap();
        if f.comment {
            pings += 1;
        } else if let Some(d) = f.data {
            seen.push(d["type"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        seen,
        [
            "chain-started",
            "step-started",
            "input-requested",
            "step-completed"
        ]
    );
    s.wait_status(&id, "waiting").await;

    // Not waiting for tool results: 422; malformed: 400; missing type: 422.
    let r = s
        .send_event(
            &id,
            &json!({"type": "tool-results", "data": {"results": []}}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_input");
    assert!(err["error"]["message"].as_str().unwrap().contains("input"));
    let r = s.send_event(&id, &json!({"data": 1})).await;
    assert_eq!(r.status(), 422);
    let r = s
        .send_event(&id, &json!({"type": "input", "data": "yes"}))
        .await;
    assert_eq!(r.status(), 202);
    let rest = sse.rest().await;
    let types: Vec<&str> = rest.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "chain-resumed",
            "step-started",
            "step-completed",
            "chain-completed"
        ]
    );
    let (_, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["result"], json!({"answer": "yes"}));
    // Terminal: 409.
    let r = s
        .send_event(&id, &json!({"type": "input", "data": "again"}))
        .await;
    assert_eq!(r.status(), 409);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_beyond_capacity_gets_429_with_retry_after_and_accepted_runs_complete() {
    let limits = sluice_engine::Limits {
        max_concurrent_runs: Some(4),
        queue: Some(6),
        ..Default::default()
    };
    // Runs hold their slot until the gate opens, so the burst meets exactly 4 + 6 places
    // however the 100 concurrent requests interleave.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let wf = common::gate_workflow(gate.clone())
        .configure("gate", &limits)
        .unwrap();
    let s = TestServer::with(ServerOptions::default(), vec![wf]).await;
    let burst = (0..100).map(|_| {
        s.client
            .post(s.url("/v1/workflows/gate/runs"))
            .json(&json!({}))
            .send()
    });
    let answers = futures_util::future::join_all(burst).await;
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for r in answers {
        let r = r.unwrap();
        match r.status().as_u16() {
            202 => accepted.push(
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ),
            429 => {
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1);
                assert_eq!(
                    r.json::<Value>().await.unwrap()["error"]["code"],
                    "queue_full"
                );
                rejected += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted.len(), 10);
    assert_eq!(rejected, 90);
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("sluice_rejections_total{reason=\"queue_full\"} 90"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_runs_running{workflow=\"gate\"} 4"));
    assert!(metrics.contains("sluice_runs_queued{workflow=\"gate\"} 6"));
    gate.add_permits(100);
    for id in &accepted {
        let evs = sse_events(&s, id, "").await;
        assert_eq!(evs.last().unwrap()["type"], "chain-completed");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_run_retention_removed_starts_a_new_run() {
    let opts = ServerOptions {
        max_finished_runs: 1,
        sweep_interval: Duration::from_secs(1),
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker()]).await;
    let create = |key: Option<&'static str>| {
        let mut req = s
            .client
            .post(s.url("/v1/workflows/ticker/runs?wait=true"))
            .json(&json!({"input": {"n": 1}}));
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    let first: Value = create(Some("k-swept")).await.unwrap().json().await.unwrap();
    let first_id = first["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        assert_eq!(create(None).await.unwrap().status(), 200);
    }
    // The sweeper keeps one finished run: the keyed one goes.
    let mut gone = false;
    for _ in 0..100 {
        if s.get_json(&format!("/v1/runs/{first_id}")).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the sweeper removed the keyed run");
    let again = create(Some("k-swept")).await.unwrap();
    assert_eq!(again.status(), 200, "a new run, waited for");
    let again: Value = again.json().await.unwrap();
    assert_ne!(again["id"], first_id.as_str());
    assert_eq!(again["status"], "completed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_of_an_idempotent_create_get_one_run() {
    let s = TestServer::start().await;
    let create = |key: &'static str, input: Value| {
        s.client
            .post(s.url("/v1/workflows/ticker/runs"))
            .header("idempotency-key", key)
            .json(&json!({ "input": input }))
            .send()
    };
    let answers = futures_util::future::join_all(
        (0..20).map(|_| create("k-1", json!({"n": 2, "delay_ms": 1}))),
    )
    .await;
    let mut ids = Vec::new();
    let mut statuses = Vec::new();
    for r in answers {
        let r = r.unwrap();
        statuses.push(r.status().as_u16());
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        19,
        "{statuses:?}"
    );
    assert!(ids.iter().all(|id| id == &ids[0]), "one run: {ids:?}");
    let (_, all) = s.get_json("/v1/runs?workflow=ticker").await;
    assert_eq!(all["runs"].as_array().unwrap().len(), 1);

    // The same key with another body: 422, and nothing starts.
    let r = create("k-1", json!({"n": 3})).await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "idempotency_key_reused"
    );
    // A create that fails does not use up its key.
    let r = create("k-2", json!({"n": "many"})).await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_input"
    );
    let r = create("k-2", json!({"n": 1})).await.unwrap();
    assert_eq!(r.status(), 202);
    // Keys belong to their workflow: the same key elsewhere is another run.
    let r = s
        .client
        .post(s.url("/v1/workflows/ask-human/runs"))
        .header("idempotency-key", "k-1")
        .json(&json!({"input": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (_, all) = s.get_json("/v1/runs").await;
    assert_eq!(all["runs"].as_array().unwrap().len(), 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_idempotent_create() {
    let s = TestServer::start().await;
    let id = s
        .start_run("ticker", json!({"n": 100000, "delay_ms": 5}))
        .await;
    let r = s
        .client
        .post(s.url(&format!("/v1/runs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The answer shows the run as the cancel left it.
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "cancelled", "{body}");
    assert!(body["finished_at"].is_string(), "{body}");
    let evs = sse_events(&s, &id, "").await;
    assert_eq!(evs.last().unwrap()["type"], "chain-cancelled");
    let (_, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["status"], "cancelled");
    let r = s
        .client
        .post(s.url(&format!("/v1/runs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    let create = || {
        s.client
            .post(s.url("/v1/workflows/ticker/runs"))
            .header("idempotency-key", "order-42")
            .json(&json!({"input": {"n": 1}}))
            .send()
    };
    let a: Value = create().await.unwrap().json().await.unwrap();
    let r = create().await.unwrap();
    assert_eq!(r.status(), 200, "a replayed create answers the same run");
    let b: Value = r.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    // Two keys in one request: which one is meant is not guessed.
    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("idempotency-key", "order-42")
        .header("idempotency-key", "order-43")
        .json(&json!({"input": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Idempotency-Key: given more than once"
    );
    let (_, all) = s.get_json("/v1/runs?workflow=ticker").await;
    assert_eq!(all["runs"].as_array().unwrap().len(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_own_their_runs() {
    let (k1, k2, admin) = (
        "k1-0123456789abcdef",
        "k2-0123456789abcdef",
        "ad-0123456789abcdef",
    );
    let opts = ServerOptions {
        api_keys: vec![k1.into(), k2.into()],
        admin_keys: vec![admin.into()],
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker()]).await;
    let r = s.client.get(s.url("/v1/workflows")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"sluice\"");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    // Two sets of credentials: neither is guessed at.
    let r = s
        .client
        .get(s.url("/v1/workflows"))
        .header("authorization", format!("Bearer {k1}"))
        .header("authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // With keys, any Host or Origin may call (the key is what counts).
    let r = s
        .client
        .get(s.url("/v1/workflows"))
        .bearer_auth(k1)
        .header("host", "api.example.com")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(s.url("/v1/workflows"))
        .bearer_auth("wrong-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        s.client
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "health needs no key"
    );

    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs?wait=true"))
        .bearer_auth(k1)
        .json(&json!({"input": {"n": 1}}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let get = |key: &'static str, path: String| s.client.get(s.url(&path)).bearer_auth(key).send();
    assert_eq!(
        get(k1, format!("/v1/runs/{id}")).await.unwrap().status(),
        200
    );
    assert_eq!(
        get(k2, format!("/v1/runs/{id}")).await.unwrap().status(),
        404,
        "a foreign run is invisible"
    );
    assert_eq!(
        get(k2, format!("/v1/runs/{id}/events"))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        get(admin, format!("/v1/runs/{id}")).await.unwrap().status(),
        200
    );
    let r = s
        .client
        .post(s.url(&format!("/v1/runs/{id}/cancel")))
        .bearer_auth(k2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let list: Value = get(k2, "/v1/runs".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["runs"], json!([]));
    let list: Value = get(admin, "/v1/runs".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["runs"].as_array().unwrap().len(), 1);

    // The scheme is case-insensitive; another scheme is not a bearer key.
    for auth in [format!("bearer {k1}"), format!("BEARER  {k1} ")] {
        let r = s
            .client
            .get(s.url(&format!("/v1/runs/{id}")))
            .header("authorization", auth.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{auth}");
    }
    let r = s
        .client
        .get(s.url("/v1/workflows"))
        .header("authorization", format!("Basic {k1}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A foreign session is invisible too, and cannot be continued or deleted.
    let r = s
        .client
        .post(s.url("/v1/sessions"))
        .bearer_auth(k1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        get(k1, format!("/v1/sessions/{sid}"))
            .await
            .unwrap()
            .status(),
        200
    );
    let r = get(k2, format!("/v1/sessions/{sid}")).await.unwrap();
    assert_eq!(r.status(), 404, "a foreign session is invisible");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "session_not_found"
    );
    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .bearer_auth(k2)
        .json(&json!({"input": {"n": 1}, "session_id": sid}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .client
        .delete(s.url(&format!("/v1/sessions/{sid}")))
        .bearer_auth(k2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        get(admin, format!("/v1/sessions/{sid}"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get(k1, format!("/v1/sessions/{sid}"))
            .await
            .unwrap()
            .status(),
        200,
        "the foreign delete did nothing"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_beyond_the_log() {
    let s = TestServer::start().await;
    // A finished run: at or beyond its last event, 204 on every transport.
    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs?wait=true"))
        .json(&json!({"input": {"n": 1}}))
        .send()
        .await
        .unwrap();
    let done: Value = r.json().await.unwrap();
    let (id, last) = (
        done["id"].as_str().unwrap(),
        done["last_seq"].as_u64().unwrap(),
    );
    for after in [last, last + 5] {
        let r = s
            .client
            .get(s.url(&format!("/v1/runs/{id}/events?after={after}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "after={after}");
    }
    let e = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/runs/{id}/events?after={}",
        s.addr,
        last + 5
    ))
    .await
    .unwrap_err();
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 204),
        other => panic!("{other}"),
    }

    // A live (waiting) run: beyond its last event is a 400; at it, the stream waits.
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let (_, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    let last = rec["last_seq"].as_u64().unwrap();
    let r = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("last-event-id", (last + 1).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("beyond")
    );
    let e = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/runs/{id}/events?after={}",
        s.addr,
        last + 1
    ))
    .await
    .unwrap_err();
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("{other}"),
    }
    let r = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events?after={last}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut sse = SseReader::new(r);
    let r = s
        .send_event(&id, &json!({"type": "input", "data": "yes"}))
        .await;
    assert_eq!(r.status(), 202);
    let rest = sse.rest().await;
    assert_eq!(rest.first().unwrap()["seq"].as_u64().unwrap(), last + 1);
    assert_eq!(rest.last().unwrap()["type"], "chain-completed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_pings_while_the_run_waits() {
    let opts = ServerOptions {
        heartbeat: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ask_human()]).await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/runs/{id}/events", s.addr))
            .await
            .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    let mut events = 0;
    let mut pings = 0;
    let read = async {
        while pings < 3 {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(_) => events += 1,
                Message::Ping(_) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("pings while idle");
    assert!(events >= 3, "the history came first");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_closes_answer_the_client_and_name_protocol_errors() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    let s = TestServer::start().await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let url = format!("ws://{}/v1/runs/{id}/events", s.addr);
    // The close that ends the socket, once the history has been read.
    async fn close_of(
        ws: &mut tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> Option<CloseFrame> {
        let read = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    other => panic!("the socket ended without a close frame: {other:?}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("closed in time")
    }

    // A client's close is answered with a close frame: the handshake completes.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    close_of(&mut ws).await;

    // A text frame that is not UTF-8: 1007.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let frame = Frame::message(vec![0xff, 0xfe], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    let frame = close_of(&mut ws).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1007, "{frame:?}");

    // A continuation frame with no message to continue: a protocol error, 1002.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let frame = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    let frame = close_of(&mut ws).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1002, "{frame:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_histogram_and_waiting_runs() {
    let s = TestServer::start().await;
    for _ in 0..2 {
        let id = s.start_run("ask-human", json!(null)).await;
        s.wait_status(&id, "waiting").await;
    }
    s.start_run("ticker", json!({"n": 1})).await;
    let text = s.metrics_text().await;
    assert!(
        text.contains("sluice_runs_waiting{workflow=\"ask-human\"} 2"),
        "{text}"
    );
    assert!(text.contains("sluice_runs_waiting{workflow=\"ticker\"} 0"));
    let conns = s.metric("sluice_connections_open").await.unwrap();
    assert!(conns >= 1.0, "{conns}");
    // The histogram is cumulative and ends at the count.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("sluice_http_request_duration_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 11);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let count: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sluice_http_request_duration_seconds_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(*buckets.last().unwrap(), count);
    assert!(count >= 5.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiting_gauge_follows_a_run_into_waiting_and_out_by_input_or_cancel() {
    let s = TestServer::start().await;
    let gauge = "sluice_runs_waiting{workflow=\"ask-human\"}";
    assert_eq!(s.metric(gauge).await, Some(0.0));

    // Waits, then gets its input.
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    assert_eq!(s.metric(gauge).await, Some(1.0));
    // An event it does not wait for is refused; the run goes on waiting, counted once.
    let r = s
        .send_event(
            &id,
            &json!({"type": "tool-results", "data": {"results": []}}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(s.metric(gauge).await, Some(1.0));
    let r = s
        .send_event(&id, &json!({"type": "input", "data": "yes"}))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        s.metric(gauge).await,
        Some(0.0),
        "the accepted input resumed it"
    );
    s.wait_status(&id, "completed").await;
    assert_eq!(s.metric(gauge).await, Some(0.0));

    // Waits, then is cancelled.
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    assert_eq!(s.metric(gauge).await, Some(1.0));
    let r = s
        .client
        .post(s.url(&format!("/v1/runs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "cancelled");
    assert_eq!(s.metric(gauge).await, Some(0.0));
    assert_eq!(
        s.metric("sluice_runs_waiting{workflow=\"ticker\"}").await,
        Some(0.0)
    );
    // The two runs' starts and ends, by how each ended.
    for (metric, want) in [
        ("sluice_runs_started_total{workflow=\"ask-human\"}", 2.0),
        (
            "sluice_runs_ended_total{workflow=\"ask-human\",status=\"completed\"}",
            1.0,
        ),
        (
            "sluice_runs_ended_total{workflow=\"ask-human\",status=\"cancelled\"}",
            1.0,
        ),
        (
            "sluice_runs_ended_total{workflow=\"ask-human\",status=\"failed\"}",
            0.0,
        ),
        ("sluice_runs_started_total{workflow=\"ticker\"}", 0.0),
    ] {
        assert_eq!(s.metric(metric).await, Some(want), "{metric}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_client_frames_are_sent_events() {
    let s = TestServer::with(ServerOptions::default(), vec![builtin::ask_human()]).await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/runs/{id}/events", s.addr))
            .await
            .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text("not json".into())).await.unwrap();
    // JSON of the wrong shape: the code a POST of it gets.
    ws.send(Message::Text(r#"{"data":1}"#.into()))
        .await
        .unwrap();
    ws.send(Message::Binary(r#"{"type":"input","data":1}"#.into()))
        .await
        .unwrap();
    let deep = format!(
        r#"{{"type":"input","data":{}1{}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    ws.send(Message::Text(deep.into())).await.unwrap();
    ws.send(Message::Text(r#"["input",41]"#.into()))
        .await
        .unwrap();
    let long_type = format!(r#"{{"type":"{}"}}"#, "a".repeat(65));
    ws.send(Message::Text(long_type.into())).await.unwrap();
    ws.send(Message::Text(r#"{"type":"input","data":42}"#.into()))
        .await
        .unwrap();
    let mut texts = Vec::new();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            texts.push(serde_json::from_str::<Value>(t.as_str()).unwrap());
        }
    }
    let replies: Vec<&Value> = texts.iter().filter(|t| t.get("seq").is_none()).collect();
    assert_eq!(replies[0]["error"]["code"], "invalid_request");
    assert_eq!(replies[1]["error"]["code"], "invalid_input");
    assert_eq!(replies[2]["error"]["code"], "invalid_request");
    assert!(
        replies[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("binary"),
        "{}",
        replies[2]
    );
    assert_eq!(replies[3]["error"]["code"], "invalid_request");
    assert_eq!(replies[4]["error"]["code"], "invalid_input");
    assert_eq!(replies[5]["error"]["code"], "invalid_input");
    let message = replies[5]["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("frame.type: "), "{message}");
    assert_eq!(replies[6], &json!({"accepted": true}));
    assert_eq!(texts.last().unwrap()["type"], "chain-completed");
    assert_eq!(
        texts.last().unwrap()["data"]["result"],
        json!({"answer": 42})
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused_and_what_is_accepted_reads_back() {
    let s = TestServer::with(
        ServerOptions::default(),
        vec![builtin::ticker(), builtin::ask_human()],
    )
    .await;
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    // Deeper than 64 levels anywhere in a body: 400, nothing started or sent.
    let post = |path: String, body: String| {
        s.client
            .post(s.url(&path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post(
        "/v1/workflows/ask-human/runs".into(),
        format!(r#"{{"metadata":{{"x":{}}}}}"#, nested(70)),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nested deeper than 64"),
        "{body}"
    );
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    // 126 levels parsed before (serde_json stops at 128), and made the run's record unreadable.
    let r = post(
        format!("/v1/runs/{id}/events"),
        format!(r#"{{"type":"input","data":{}}}"#, nested(126)),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let r = post(
        "/v1/sessions".into(),
        format!(r#"{{"state":{}}}"#, nested(100)),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    // Brackets inside strings are text, not nesting.
    let r = post(
        format!("/v1/runs/{id}/events"),
        format!(
            r#"{{"type":"input","data":{{"text":"{}","v":{}}}}}"#,
            "[".repeat(500),
            nested(60)
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    s.wait_status(&id, "completed").await;
    // The run, its events and the list of runs all read back.
    let (status, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(rec["result"]["answer"]["text"], "[".repeat(500));
    let r = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("chain-completed"));
    let (status, list) = s.get_json("/v1/runs").await;
    assert_eq!(status, 200);
    assert!(
        list["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == json!(id))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_websocket_upgrade_is_a_400_not_an_event_stream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::with(ServerOptions::default(), vec![builtin::ask_human()]).await;
    let id = s.start_run("ask-human", json!(null)).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // No Sec-WebSocket-Key.
    let req = format!(
        "GET /v1/runs/{id}/events HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
         connection: upgrade, close\r\nsec-websocket-version: 13\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_gets_a_5xx() {
    let opts = ServerOptions {
        max_body: 4096,
        max_event: 1024,
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker(), builtin::ask_human()]).await;
    let id = s.start_run("ticker", json!({"n": 1})).await;
    let post = |path: &str, ct: &str, body: Vec<u8>| {
        s.client
            .post(s.url(path))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut req = s.client.get(s.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    let cases: Vec<(u16, reqwest::Response)> = vec![
        (
            400,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                b"{\"input\":".to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            400,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                vec![0xff, 0xfe, b'{'],
            )
            .await
            .unwrap(),
        ),
        (
            422,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                br#"{"input":{"n":1},"bogus":1}"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            422,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                br#"{"input":{"n":true}}"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            422,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                br#"{"session_id":5}"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            422,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                b"[1,2]".to_vec(),
            )
            .await
            .unwrap(),
        ),
        // An array is not read as the body's fields by position.
        (
            422,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                br#" [{"n":1},null,{"m":1}]"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            422,
            post("/v1/sessions", "application/json", br#"[{"k":1}]"#.to_vec())
                .await
                .unwrap(),
        ),
        (
            422,
            post(
                &format!("/v1/runs/{id}/events"),
                "application/json",
                br#"["input","x"]"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            422,
            post(
                &format!("/v1/runs/{id}/cancel"),
                "application/json",
                br#"["why"]"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            415,
            post("/v1/workflows/ticker/runs", "text/plain", b"n=1".to_vec())
                .await
                .unwrap(),
        ),
        (
            413,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                format!("{{\"input\":\"{}\"}}", "x".repeat(10_000)).into_bytes(),
            )
            .await
            .unwrap(),
        ),
        (
            404,
            post(
                "/v1/workflows/nope/runs",
                "application/json",
                b"{}".to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            404,
            post(
                "/v1/workflows/ticker/runs",
                "application/json",
                br#"{"session_id":"ses_none","input":{"n":1}}"#.to_vec(),
            )
            .await
            .unwrap(),
        ),
        (
            400,
            s.client
                .post(s.url("/v1/workflows/ticker/runs?wait=maybe"))
                .json(&json!({}))
                .send()
                .await
                .unwrap(),
        ),
        (
            400,
            s.client
                .post(s.url("/v1/workflows/ticker/runs"))
                .header("idempotency-key", "")
                .json(&json!({"input": {"n": 1}}))
                .send()
                .await
                .unwrap(),
        ),
        (404, get("/v1/runs/run_nope", &[]).await.unwrap()),
        (404, get("/v1/runs/run_nope/events", &[]).await.unwrap()),
        (
            400,
            get(&format!("/v1/runs/{id}/events?after=-7"), &[])
                .await
                .unwrap(),
        ),
        (
            400,
            get(
                &format!("/v1/runs/{id}/events"),
                &[("last-event-id", "abc")],
            )
            .await
            .unwrap(),
        ),
        (
            // Checked even where the header would win.
            400,
            get(
                &format!("/v1/runs/{id}/events?after=abc"),
                &[("last-event-id", "2")],
            )
            .await
            .unwrap(),
        ),
        (
            400,
            get(
                &format!("/v1/runs/{id}/events"),
                &[("last-event-id", "2"), ("last-event-id", "6")],
            )
            .await
            .unwrap(),
        ),
        (
            400,
            get(&format!("/v1/runs/{id}/events?types=Tick"), &[])
                .await
                .unwrap(),
        ),
        (
            // Well formed, but nothing the ticker writes: a typo.
            400,
            get(
                &format!("/v1/runs/{id}/events?types=tick,chain-complete"),
                &[],
            )
            .await
            .unwrap(),
        ),
        (
            400,
            get(&format!("/v1/runs/{id}/events?types=tock"), &[])
                .await
                .unwrap(),
        ),
        (
            400,
            get(&format!("/v1/runs/{id}/events?bogus=1"), &[])
                .await
                .unwrap(),
        ),
        (400, get("/v1/runs?limit=0", &[]).await.unwrap()),
        (400, get("/v1/runs?limit=abc", &[]).await.unwrap()),
        (400, get("/v1/runs?limit=5000", &[]).await.unwrap()),
        (400, get("/v1/runs?status=done", &[]).await.unwrap()),
        (400, get("/v1/runs?cursor=garbage", &[]).await.unwrap()),
        (
            400,
            get("/v1/runs?cursor=run_%27%20OR%201%3D1", &[])
                .await
                .unwrap(),
        ),
        (400, get("/v1/runs?cursor=", &[]).await.unwrap()),
        // Of the right prefix but not a run id: not something this API handed out.
        (400, get("/v1/runs?cursor=run_zzz", &[]).await.unwrap()),
        (
            400,
            get("/v1/runs?cursor=run_0196F2A0C1D27A3B8C4D5E6F70819203", &[])
                .await
                .unwrap(),
        ),
        (
            404,
            s.client
                .post(s.url("/v1/runs/run_nope/events"))
                .json(&json!({"type": "input"}))
                .send()
                .await
                .unwrap(),
        ),
        (
            404,
            s.client
                .post(s.url("/v1/runs/run_nope/cancel"))
                .send()
                .await
                .unwrap(),
        ),
        (
            413,
            post(
                &format!("/v1/runs/{id}/events"),
                "application/json",
                format!("{{\"type\":\"input\",\"data\":\"{}\"}}", "y".repeat(2000)).into_bytes(),
            )
            .await
            .unwrap(),
        ),
        (
            405,
            s.client.delete(s.url("/v1/runs")).send().await.unwrap(),
        ),
        (
            405,
            s.client.put(s.url("/v1/workflows")).send().await.unwrap(),
        ),
        (
            404,
            s.client.get(s.url("/v2/anything")).send().await.unwrap(),
        ),
    ];
    for (i, (want, resp)) in cases.into_iter().enumerate() {
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "case {i}: {body}");
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "case {i}: error shape: {body}"
        );
    }
    // None of the refused creates started a run.
    let (_, list) = s.get_json("/v1/runs").await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 1, "{list}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints() {
    let s = TestServer::start().await;
    assert_eq!(s.get_json("/healthz").await, (200, json!({"status": "ok"})));
    assert_eq!(
        s.get_json("/readyz").await,
        (200, json!({"status": "ready"}))
    );
    // A path no route serves: a 404 that names it.
    for path in ["/v1/workflows/ticker", "/v2/anything"] {
        let (status, body) = s.get_json(path).await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(path), "{message}");
    }
    let (status, doc) = s.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/workflows",
        "/v1/workflows/{name}/runs",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/events",
        "/v1/runs/{id}/cancel",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    s.start_run("ticker", json!({"n": 2})).await;
    let text = s.metrics_text().await;
    for name in [
        "sluice_runs_running{workflow=\"ticker\"}",
        "sluice_events_appended_total",
        "sluice_stream_readers",
        "sluice_http_request_duration_seconds_count",
    ] {
        assert!(text.contains(name), "{name} in {text}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_and_refuses_new_work() {
    let s = TestServer::start().await;
    let id = s
        .start_run("ticker", json!({"n": 1000000, "delay_ms": 10}))
        .await;
    let resp = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    sse.next_event().await.unwrap();
    // A `?wait=true` create waiting for its run when the shutdown begins.
    let waiting = s
        .client
        .post(s.url("/v1/workflows/ticker/runs?wait=true"))
        .json(&json!({"input": {"n": 1000000, "delay_ms": 10}}))
        .send();
    let waiting = tokio::spawn(waiting);
    let waited_id = loop {
        let (_, page) = s.get_json("/v1/runs").await;
        let runs = page["runs"].as_array().unwrap();
        if let Some(r) = runs.iter().find(|r| r["id"] != id.as_str()) {
            break r["id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let engine = s.engine.clone();
    let started = std::time::Instant::now();
    s.stop().await;
    // The open stream ended instead of blocking shutdown.
    tokio::time::timeout(Duration::from_secs(5), sse.rest())
        .await
        .expect("stream did not end");
    // The cut-off create says which run it started, so a client follows it, not retries.
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["location"],
        format!("/v1/runs/{waited_id}").as_str()
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shutting_down");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&waited_id),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(
        engine
            .start("ticker", sluice_engine::StartRun::default())
            .await,
        Err(sluice_engine::Error::ShuttingDown)
    ));
}

/// A server on a [`common::GatedStore`] with the ticker, and a new session on it.
async fn gated_session() -> (TestServer, std::sync::Arc<common::GatedStore>, String) {
    let store = std::sync::Arc::new(common::GatedStore::new());
    let s = TestServer::with_store(
        ServerOptions::default(),
        vec![builtin::ticker()],
        store.clone(),
    )
    .await;
    let ses: Value = s
        .client
        .post(s.url("/v1/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = ses["id"].as_str().unwrap().to_owned();
    (s, store, sid)
}

/// A run started in a session whose update then fails is cancelled (its session would not know
/// it), the client gets the error, and the `Idempotency-Key` stays with that run: a retry
/// answers it rather than starting a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_session_update_cancels_the_run_and_keeps_its_key() {
    let (s, store, sid) = gated_session().await;
    store
        .fail_put_session
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let create = || {
        s.client
            .post(s.url("/v1/workflows/ticker/runs"))
            .header("idempotency-key", "k-session-1")
            .json(&json!({"input": {"n": 1000000, "delay_ms": 10}, "session_id": sid}))
            .send()
    };
    let r = create().await.unwrap();
    assert_eq!(r.status(), 500, "a store failure is the server's");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal", "{body}");
    // The run that was started is cancelled, not left running outside its session.
    let (_, page) = s.get_json("/v1/runs").await;
    let runs = page["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{page}");
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    s.wait_status(&id, "cancelled").await;
    let log = s
        .client
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let end: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(end["type"], "chain-cancelled", "{log}");
    let reason = end["data"]["reason"].as_str().unwrap();
    assert!(reason.contains("could not be updated"), "{reason}");
    // The same key answers the same run.
    store
        .fail_put_session
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let again = create().await.unwrap();
    assert_eq!(again.status(), 200, "a replay");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], id.as_str());
    assert_eq!(
        s.get_json("/v1/runs").await.1["runs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    s.stop().await;
}

/// A client that disconnects while its create is being recorded does not stop it halfway: the
/// run starts, its session names it as the active run, and its `Idempotency-Key` answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_client_disconnects_is_finished_by_the_server() {
    use tokio::io::AsyncWriteExt;
    let (s, store, sid) = gated_session().await;
    store
        .slow_put_session_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let body = json!({"input": {"n": 1000000, "delay_ms": 10}, "session_id": sid}).to_string();
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let request = format!(
        "POST /v1/workflows/ticker/runs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nidempotency-key: k-gone\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let before = store
        .put_sessions_begun
        .load(std::sync::atomic::Ordering::SeqCst);
    conn.write_all(request.as_bytes()).await.unwrap();
    // Gone while the session update is under way.
    for _ in 0..1000 {
        if store
            .put_sessions_begun
            .load(std::sync::atomic::Ordering::SeqCst)
            > before
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(conn);
    let mut active = Value::Null;
    for _ in 0..500 {
        let (_, ses) = s.get_json(&format!("/v1/sessions/{sid}")).await;
        if ses["active_run"].is_string() {
            active = ses["active_run"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let id = active
        .as_str()
        .expect("the session names the run")
        .to_owned();
    let (status, rec) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!((status, &rec["session_id"]), (200, &json!(sid)));
    assert!(
        rec["status"] == "running" || rec["status"] == "queued",
        "{rec}"
    );
    store
        .slow_put_session_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let again = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("idempotency-key", "k-gone")
        .json(&json!({"input": {"n": 1000000, "delay_ms": 10}, "session_id": sid}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "the key answers the run");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_run_leaves_the_session_busy_with_the_one_before_it() {
    let s = TestServer::with(ServerOptions::default(), vec![builtin::ask_human()]).await;
    let sid = s
        .client
        .post(s.url("/v1/sessions"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let start = |q: &'static str| {
        s.client
            .post(s.url(&format!("/v1/workflows/ask-human/runs{q}")))
            .json(&json!({"session_id": sid}))
            .send()
    };
    let id = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 202);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a = id(start("").await.unwrap()).await;
    s.wait_status(&a, "waiting").await;
    // B queues behind A and is cancelled: the session names B, but A still waits.
    let b = id(start("?if_busy=enqueue").await.unwrap()).await;
    let r = s
        .client
        .post(s.url(&format!("/v1/runs/{b}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    s.wait_status(&b, "cancelled").await;
    let r = start("").await.unwrap();
    assert_eq!(r.status(), 409, "A is still the session's active run");
    let message = r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains(&a), "{message}");
    let r = s
        .client
        .delete(s.url(&format!("/v1/sessions/{sid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "no delete while A waits");
    // Enqueued now, C follows A (not the cancelled B): it starts once A has its answer.
    let c = id(start("?if_busy=enqueue").await.unwrap()).await;
    let (_, rec) = s.get_json(&format!("/v1/runs/{c}")).await;
    assert_eq!(rec["status"], "queued");
    let r = s
        .client
        .post(s.url(&format!("/v1/runs/{a}/events")))
        .json(&json!({"type": "input", "data": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    s.wait_status(&a, "completed").await;
    s.wait_status(&c, "waiting").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_hold_one_active_run_and_enqueue_on_request() {
    let s = TestServer::start().await;
    let r = s.client.post(s.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let ses: Value = r.json().await.unwrap();
    let sid = ses["id"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("ses_"));
    assert_eq!(s.get_json(&format!("/v1/sessions/{sid}")).await.0, 200);

    let start = |input: Value, q: &'static str| {
        s.client
            .post(s.url(&format!("/v1/workflows/ticker/runs{q}")))
            .json(&json!({"input": input, "session_id": sid}))
            .send()
    };
    let first: Value = start(json!({"n": 30, "delay_ms": 10}), "")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first_id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first["session_id"], sid.as_str());

    let busy = start(json!({"n": 1}), "").await.unwrap();
    assert_eq!(busy.status(), 409);
    assert!(
        busy.json::<Value>().await.unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("if_busy=enqueue")
    );
    assert_eq!(
        start(json!({"n": 1}), "?if_busy=later")
            .await
            .unwrap()
            .status(),
        400
    );

    let second = start(json!({"n": 2}), "?if_busy=enqueue").await.unwrap();
    assert_eq!(second.status(), 202);
    let second: Value = second.json().await.unwrap();
    let second_id = second["id"].as_str().unwrap().to_owned();
    assert_eq!(second["status"], "queued");
    let (_, ses) = s.get_json(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(
        ses["active_run"],
        second_id.as_str(),
        "the newest active run"
    );
    let r = s
        .client
        .delete(s.url(&format!("/v1/sessions/{sid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "no delete while a run is active");

    // The queued run starts only after the first has ended.
    sse_events(&s, &second_id, "").await;
    let (_, a) = s.get_json(&format!("/v1/runs/{first_id}")).await;
    let (_, b) = s.get_json(&format!("/v1/runs/{second_id}")).await;
    assert_eq!(a["status"], "completed");
    assert_eq!(b["status"], "completed");
    assert!(b["started_at"].as_str().unwrap() >= a["finished_at"].as_str().unwrap());
    let (_, by_session) = s.get_json(&format!("/v1/runs?session_id={sid}")).await;
    assert_eq!(by_session["runs"].as_array().unwrap().len(), 2);
    let (_, ses) = s.get_json(&format!("/v1/sessions/{sid}")).await;
    assert!(ses.get("active_run").is_none(), "no run is active: {ses}");

    let r = s
        .client
        .delete(s.url(&format!("/v1/sessions/{sid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.get_json(&format!("/v1/sessions/{sid}")).await.0, 404);
    assert_eq!(start(json!({"n": 1}), "").await.unwrap().status(), 404);
    s.stop().await;
}

/// A WebSocket client that sends pings and never reads the pongs meets back-pressure: the
/// server stops reading its frames once a pong cannot be written, instead of buffering pongs
/// without bound (a ping flood grew the server by gigabytes in seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ping_flood_that_reads_nothing_is_held_back() {
    use std::io::{Read, Write};
    let s = TestServer::start().await;
    let id = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&id, "waiting").await;
    let (addr, run) = (s.addr, id.clone());
    let written = tokio::task::spawn_blocking(move || {
        let id = run;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&addr.into()).unwrap();
        let mut conn: std::net::TcpStream = sock.into();
        let head = format!(
            "GET /v1/runs/{id}/events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).unwrap();
        // The answer's head, and what came after it (the run's first events): read, so that
        // nothing the server sent waits in this socket before the flood.
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "closed during the handshake");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&answer));
        // Masked pings of 125 bytes, as fast as the socket takes them, for 3 s.
        let mut frame = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
        frame.extend((0..125u8).map(|i| i ^ [1, 2, 3, 4][usize::from(i % 4)]));
        let burst = frame.repeat(512);
        conn.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let started = std::time::Instant::now();
        let (mut early, mut late) = (0usize, 0usize);
        while started.elapsed() < Duration::from_secs(3) {
            match conn.write(&burst) {
                Ok(n) if started.elapsed() < Duration::from_secs(2) => early += n,
                Ok(n) => late += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("write failed: {e}"),
            }
        }
        (early, late)
    })
    .await
    .unwrap();
    // Once the socket's buffers are full the server reads nothing more: the last second
    // takes nothing (it took megabytes a second while the server read on).
    let (early, late) = written;
    assert!(early > 0, "nothing was written");
    assert_eq!(
        late, 0,
        "the server went on reading pings it could not answer"
    );
    // The server still serves others.
    let (status, _) = s.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(status, 200);
    s.stop().await;
}

/// Without keys, a browser page of another site cannot reach the server: not by DNS
/// rebinding (a foreign `Host`) nor by a cross-site request (a foreign `Origin`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_other_sites_pages_are_refused() {
    let s = TestServer::start().await;
    let get = |headers: &'static [(&'static str, &'static str)]| {
        let mut req = s.client.get(s.url("/v1/runs"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    for headers in [
        &[("host", "evil.example:8080")][..],
        &[("origin", "http://evil.example")][..],
        &[("origin", "null")][..],
    ] {
        let r = get(headers).await.unwrap();
        assert_eq!(r.status(), 403, "{headers:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
    }
    for headers in [
        &[("host", "localhost:8080")][..],
        &[("origin", "http://127.0.0.1:3000")][..],
        &[][..],
    ] {
        assert_eq!(get(headers).await.unwrap().status(), 200, "{headers:?}");
    }
    // A form posted from another site starts nothing.
    let r = s
        .client
        .post(s.url("/v1/workflows/ticker/runs"))
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (_, list) = s.get_json("/v1/runs").await;
    assert_eq!(list["runs"], json!([]));
    s.stop().await;
}
