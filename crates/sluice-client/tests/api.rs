//! Every call of the SDK against a real server, and the error kinds callers match on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::TestServer;
use futures_util::StreamExt;
use serde_json::json;
use sluice_client::{
    Client, CreateRun, ErrorKind, Event, EventStream, RunFilter, RunStatus, ToolResult, kind,
};
use sluice_engine::builtin;
use sluice_server::config::ServerOptions;

fn input(v: serde_json::Value) -> CreateRun {
    CreateRun {
        input: v,
        ..Default::default()
    }
}

async fn collect(mut s: EventStream) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        out.push(ev.unwrap());
    }
    out
}

fn types(evs: &[Event]) -> Vec<&str> {
    evs.iter().map(|e| e.event_type.as_str()).collect()
}

#[test]
fn public_futures_and_streams_are_send() {
    fn is_send<T: Send>(_: &T) {}
    fn is_sync<T: Send + Sync + Clone>(_: &T) {}
    let c = Client::new("http://127.0.0.1:9").unwrap();
    is_sync(&c);
    is_send(&c.events("run_x", 0));
    is_send(&c.events("run_x", 0).raw());
    is_send(&c.workflows());
    is_send(&c.start("ticker", CreateRun::default()));
    is_send(&c.start_and_stream("ticker", CreateRun::default()));
    is_send(&c.run("run_x"));
    is_send(&c.list_runs(&RunFilter::new()));
    is_send(&c.send("run_x", "input", json!(1)));
    is_send(&c.cancel("run_x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_streams_and_records() {
    let s = TestServer::start().await;
    let c = Client::new(&s.base).unwrap();

    let wfs = c.workflows().await.unwrap();
    let names: Vec<&str> = wfs.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["ask-human", "ticker"]);

    // start + handle.wait
    let run = c.start("ticker", input(json!({"n": 3}))).await.unwrap();
    assert!(run.id().starts_with("run_"));
    assert_eq!(run.record().workflow, "ticker");
    let done = run.wait().await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.result, Some(json!({"count": 3})));
    assert_eq!(done.last_seq, 7);

    // whole stream, a cursor, and the end of a finished run (204 → empty)
    let evs = collect(run.events()).await;
    assert_eq!(
        types(&evs),
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
    let evs = collect(c.events(run.id(), 4)).await;
    assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6, 7]);
    assert!(collect(c.events(run.id(), 7)).await.is_empty());
    let filtered = collect(c.events_filtered(run.id(), 0, &["tick"])).await;
    assert_eq!(
        types(&filtered),
        ["tick", "tick", "tick", "chain-completed"]
    );

    // raw envelopes are the server's bytes
    let mut raw = c.events(run.id(), 6).raw();
    let last = raw.next().await.unwrap().unwrap();
    assert!(last.is_terminal());
    let text = std::str::from_utf8(last.json()).unwrap();
    assert!(text.starts_with("{\"seq\":7,\"run_id\":\""), "{text}");
    assert!(raw.next().await.is_none());

    // start_and_stream
    let stream = c
        .start_and_stream("ticker", input(json!({"n": 200, "delay_ms": 1})))
        .await
        .unwrap();
    let id = stream.run_id().to_owned();
    let evs = collect(stream).await;
    assert_eq!(
        evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=204).collect::<Vec<_>>()
    );
    assert_eq!(c.run(&id).await.unwrap().status, RunStatus::Completed);

    // a failing run
    let evs = collect(
        c.start_and_stream("ticker", input(json!({"n": 5, "fail_at": 2})))
            .await
            .unwrap(),
    )
    .await;
    let last = evs.last().unwrap();
    assert_eq!(last.event_type, kind::CHAIN_ERROR);

    // list, filters, pagination
    let page = c.list_runs(&RunFilter::new().limit(2)).await.unwrap();
    assert_eq!(page.runs.len(), 2);
    assert_eq!(page.runs[0].id, evs[0].run_id, "newest first");
    let next = c
        .list_runs(&RunFilter::new().limit(2).cursor(page.next_cursor.unwrap()))
        .await
        .unwrap();
    assert_eq!(next.runs.len(), 1);
    let failed = c
        .list_runs(&RunFilter::new().status(RunStatus::Failed))
        .await
        .unwrap();
    assert_eq!(failed.runs.len(), 1);
    let none = c
        .list_runs(&RunFilter::new().workflow("ask-human"))
        .await
        .unwrap();
    assert!(none.runs.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_cancel_and_sessions() {
    let s = TestServer::start().await;
    let c = Client::new(&s.base).unwrap();

    let run = c
        .start("ask-human", input(json!({"prompt": "ok?"})))
        .await
        .unwrap();
    let mut events = run.events();
    loop {
        let ev = events.next().await.unwrap().unwrap();
        if ev.event_type == kind::INPUT_REQUESTED {
            assert_eq!(ev.data["prompt"], "ok?");
            break;
        }
    }
    // The run may still be settling into `waiting`; a 422 "not waiting" is retried briefly.
    let mut sent = false;
    for _ in 0..100 {
        match c.send_input(run.id(), json!("yes")).await {
            Ok(()) => {
                sent = true;
                break;
            }
            Err(e) if e.kind() == ErrorKind::Invalid => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent);
    let rest: Vec<Event> = {
        let mut v = Vec::new();
        while let Some(e) = events.next().await {
            v.push(e.unwrap());
        }
        v
    };
    assert_eq!(rest.last().unwrap().event_type, kind::CHAIN_COMPLETED);
    assert_eq!(
        c.run(run.id()).await.unwrap().result,
        Some(json!({"answer": "yes"}))
    );
    // 409 once terminal
    let err = c.send_input(run.id(), json!("again")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let err = c.cancel(run.id()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(err.status(), Some(409));

    // tool results to a run that does not wait for them: 422
    let waiting = c.start("ask-human", input(json!(null))).await.unwrap();
    let err = c
        .send_tool_results(
            waiting.id(),
            vec![ToolResult {
                id: "x".into(),
                output: json!(1),
                is_error: false,
            }],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    // cancel a waiting run
    let rec = c
        .cancel_with_reason(waiting.id(), "test over")
        .await
        .unwrap();
    assert_eq!(rec.id, waiting.id());
    let evs = collect(waiting.events()).await;
    let last = evs.last().unwrap();
    assert_eq!(last.event_type, kind::CHAIN_CANCELLED);
    assert_eq!(last.data["reason"], "test over");

    // sessions
    let session = c.create_session(Some(json!({"k": 1}))).await.unwrap();
    assert_eq!(c.session(&session.id).await.unwrap().state, json!({"k": 1}));
    let run = c
        .start(
            "ticker",
            CreateRun {
                input: json!({"n": 1}),
                session_id: Some(session.id.clone()),
                metadata: None,
            },
        )
        .await
        .unwrap();
    run.wait().await.unwrap();
    let in_session = c
        .list_runs(&RunFilter::new().session(&session.id))
        .await
        .unwrap();
    assert_eq!(in_session.runs.len(), 1);
    c.delete_session(&session.id).await.unwrap();
    let err = c.session(&session.id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_kinds() {
    let s = TestServer::start().await;
    let c = Client::new(&s.base).unwrap();

    // 404
    let err = c.run("run_nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.code(), Some("run_not_found"));
    let err = c.start("nope", CreateRun::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = c
        .start_and_stream("nope", CreateRun::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let mut events = c.events("run_nope", 0);
    let err = events.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(events.next().await.is_none(), "a failed stream ends");

    // 422 with the field in the message
    let err = c.start("ticker", input(json!({}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.server_message().unwrap().contains("input.n"), "{err}");
    assert!(!err.is_retryable());

    // transport
    let dead = Client::builder()
        .base_url("http://127.0.0.1:1")
        .build()
        .unwrap();
    let err = dead.workflows().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert!(err.is_retryable());
    assert!(err.to_string().contains("cannot connect"), "{err}");
    let err = dead.events("run_x", 0).next().await.unwrap().unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Transport,
        "the first connection fails fast"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_without_the_right_key() {
    let key = "k1-0123456789abcdef";
    let opts = ServerOptions {
        api_keys: vec![key.into()],
        ..ServerOptions::default()
    };
    let s = TestServer::with(opts, vec![builtin::ticker()]).await;
    for c in [
        Client::new(&s.base).unwrap(),
        Client::builder()
            .base_url(&s.base)
            .api_key("wrong-0123456789abcdef")
            .build()
            .unwrap(),
    ] {
        let err = c.workflows().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
        assert_eq!(err.status(), Some(401));
        let err = c.events("run_x", 0).next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
    }
    let c = Client::builder()
        .base_url(&s.base)
        .api_key(key)
        .build()
        .unwrap();
    let run = c.start("ticker", input(json!({"n": 2}))).await.unwrap();
    assert_eq!(collect(run.events()).await.len(), 6);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_at_capacity_with_retry_after() {
    let limits = sluice_engine::Limits {
        max_concurrent_runs: Some(1),
        queue: Some(1),
        ..Default::default()
    };
    let wf = builtin::ticker().configure("ticker", &limits).unwrap();
    let s = TestServer::with(ServerOptions::default(), vec![wf]).await;
    let c = Client::new(&s.base).unwrap();
    let long = || input(json!({"n": 100_000, "delay_ms": 10}));
    let a = c.start("ticker", long()).await.unwrap();
    let b = c.start("ticker", long()).await.unwrap();
    let err = c.start("ticker", long()).await.unwrap_err();
    match err.kind() {
        ErrorKind::Rejected {
            retry_after: Some(d),
        } => assert!(d >= Duration::from_secs(1)),
        other => panic!("expected Rejected with retry_after, got {other:?}: {err}"),
    }
    assert_eq!(err.code(), Some("queue_full"));
    assert!(err.is_retryable());
    a.cancel().await.unwrap();
    b.cancel().await.unwrap();
    assert_eq!(a.wait().await.unwrap().status, RunStatus::Cancelled);
    assert_eq!(b.wait().await.unwrap().status, RunStatus::Cancelled);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_options_send_an_idempotency_key_and_queue_in_a_busy_session() {
    use sluice_client::StartOptions;
    let s = TestServer::start().await;
    let c = Client::new(&s.base).unwrap();
    let keyed = StartOptions {
        idempotency_key: Some("order-42".into()),
        ..StartOptions::default()
    };
    let first = c
        .start_with("ticker", input(json!({"n": 1})), &keyed)
        .await
        .unwrap();
    let again = c
        .start_with("ticker", input(json!({"n": 1})), &keyed)
        .await
        .unwrap();
    assert_eq!(first.id(), again.id(), "one run for one key");
    let err = c
        .start_with("ticker", input(json!({"n": 2})), &keyed)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("idempotency_key_reused"));

    // A session busy with a run: refused, unless queued behind it.
    let session = c.create_session(None).await.unwrap();
    let in_session = |n: u64| CreateRun {
        input: json!({"n": n, "delay_ms": 20}),
        session_id: Some(session.id.clone()),
        metadata: None,
    };
    let busy = c.start("ticker", in_session(20)).await.unwrap();
    let err = c.start("ticker", in_session(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let enqueue = StartOptions {
        enqueue: true,
        ..StartOptions::default()
    };
    let mut events = c
        .start_and_stream_with("ticker", in_session(1), &enqueue)
        .await
        .unwrap();
    let queued = c.run(events.run_id()).await.unwrap();
    assert_eq!(queued.status, RunStatus::Queued);
    let mut types = Vec::new();
    while let Some(ev) = events.next().await {
        types.push(ev.unwrap().event_type);
    }
    assert_eq!(
        types.last().map(String::as_str),
        Some(kind::CHAIN_COMPLETED)
    );
    let ahead = busy.wait().await.unwrap();
    let behind = c.run(events.run_id()).await.unwrap();
    assert!(behind.started_at >= ahead.finished_at, "it waited its turn");
    s.stop().await;
}
