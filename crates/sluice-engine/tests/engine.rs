//! The engine end to end on the in-memory store: routing, fan-out/fan-in, workers, retries,
//! timeouts, cancellation, panics, validation, followers, waiting and resuming, recovery.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_engine::{
    AnyEvent, Context, Emit, Engine, Error, InputEvent, RetryPolicy, StartEvent, StartRun, Step,
    StepError, StopEvent, Workflow, WorkflowEvent, builtin,
};
use sluice_protocol::payload::ErrorCode;
use sluice_protocol::{Event, RunStatus};
use sluice_store::Store;
use sluice_store_memory::MemoryStore;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Query(String);
impl WorkflowEvent for Query {
    const NAME: &'static str = "query";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Found {
    source: String,
    hits: u32,
}
impl WorkflowEvent for Found {
    const NAME: &'static str = "found";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Other(u32);
impl WorkflowEvent for Other {
    const NAME: &'static str = "other";
}

fn engine_with(wfs: Vec<Workflow>) -> Engine {
    Engine::new(Arc::new(MemoryStore::new()), wfs).unwrap()
}

fn input(v: Value) -> StartRun {
    StartRun {
        input: v,
        ..Default::default()
    }
}

/// A run of session `ses_1`, queued behind `after_run` when given.
fn in_session(input: Value, after_run: Option<&str>) -> StartRun {
    StartRun {
        input,
        session_id: Some("ses_1".into()),
        after_run: after_run.map(str::to_owned),
        ..Default::default()
    }
}

/// The log of a run that asked for input once, got it, and completed.
const ASKED_AND_ANSWERED: [&str; 8] = [
    "chain-started",
    "step-started",
    "input-requested",
    "step-completed",
    "chain-resumed",
    "step-started",
    "step-completed",
    "chain-completed",
];

/// Every event of the run, checking `seq` is 1, 2, 3… and only the last is terminal.
async fn events(engine: &Engine, id: &str) -> Vec<Event> {
    let all: Vec<Event> = engine
        .handle(id)
        .envelopes(0)
        .map(|e| e.unwrap())
        .collect()
        .await;
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq must be contiguous");
        assert_eq!(
            e.is_terminal(),
            i + 1 == all.len(),
            "exactly one terminal event, last"
        );
    }
    all
}

fn types(evs: &[Event]) -> Vec<&str> {
    evs.iter().map(|e| e.event_type.as_str()).collect()
}

async fn run_to_end(
    engine: &Engine,
    wf: &str,
    v: Value,
) -> (sluice_protocol::RunRecord, Vec<Event>) {
    let run = engine.start(wf, input(v)).await.unwrap();
    let record = run.wait().await.unwrap();
    let evs = events(engine, run.id()).await;
    (record, evs)
}

#[tokio::test]
async fn routes_across_steps_with_lifecycle_events() {
    let wf = Workflow::builder("pipeline")
        .stream_event("progress")
        .step(
            Step::new("parse", |_c: Context, s: StartEvent| async move {
                Ok(Query(s.0["q"].as_str().unwrap_or("").into()).into())
            })
            .emits::<Query>(),
        )
        .step(
            Step::new("search", |c: Context, q: Query| async move {
                c.write_event_to_stream("progress", &json!({"pct": 50}))
                    .await?;
                Ok(Found {
                    source: q.0,
                    hits: 3,
                }
                .into())
            })
            .emits::<Found>(),
        )
        .step(
            Step::new("answer", |_c: Context, f: Found| async move {
                Ok(Emit::stop(json!({"hits": f.hits, "q": f.source})))
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "pipeline", json!({"q": "rust"})).await;
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(rec.result, Some(json!({"hits": 3, "q": "rust"})));
    assert_eq!(rec.last_seq, evs.len() as u64);
    assert_eq!(
        types(&evs),
        [
            "chain-started",
            "step-started",
            "step-completed",
            "step-started",
            "progress",
            "step-completed",
            "step-started",
            "step-completed",
            "chain-completed"
        ]
    );
    let steps: Vec<Option<u32>> = evs.iter().map(|e| e.step).collect();
    assert_eq!(
        steps,
        [
            None,
            Some(1),
            Some(1),
            Some(2),
            Some(2),
            Some(2),
            Some(3),
            Some(3),
            None
        ]
    );
    assert_eq!(
        evs[0].data,
        json!({"workflow": "pipeline", "input": {"q": "rust"}})
    );
    assert_eq!(evs[1].data, json!({"name": "parse"}));
    assert_eq!(evs[8].data["result"], json!({"hits": 3, "q": "rust"}));
    assert!(evs[8].data["duration_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_and_fan_in_with_collect_events() {
    let wf = Workflow::builder("fanout")
        .step(
            Step::new("split", |c: Context, _s: StartEvent| async move {
                for src in ["a", "b", "c"] {
                    c.send_event(Query(src.into())).await?;
                }
                Ok(Other(7).into())
            })
            .emits::<Query>()
            .emits::<Other>(),
        )
        .step(
            Step::new("search", |_c: Context, q: Query| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Found {
                    source: q.0,
                    hits: 1,
                }
                .into())
            })
            .emits::<Found>()
            .num_workers(3),
        )
        .step(
            Step::any(
                "join",
                &["found", "other"],
                |c: Context, ev: AnyEvent| async move {
                    let Some(all) = c.collect_events(ev, &["found", "found", "found", "other"])
                    else {
                        return Ok(Emit::none());
                    };
                    let mut sources: Vec<String> = all[..3]
                        .iter()
                        .map(|e| e.decode::<Found>().unwrap().source)
                        .collect();
                    sources.sort();
                    Ok(Emit::stop(
                        json!({"sources": sources, "other": all[3].data}),
                    ))
                },
            )
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "fanout", json!(null)).await;
    assert_eq!(rec.status, RunStatus::Completed, "{:?}", rec.error);
    assert_eq!(
        rec.result,
        Some(json!({"sources": ["a", "b", "c"], "other": 7}))
    );
    let started = evs
        .iter()
        .filter(|e| e.event_type == "step-started")
        .count();
    assert_eq!(
        started,
        1 + 3 + 4,
        "split, three searches, four join instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn num_workers_bounds_concurrency() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let wf = Workflow::builder("workers")
        .step(
            Step::new("split", |c: Context, _s: StartEvent| async move {
                for i in 0..12 {
                    c.send_event(Other(i)).await?;
                }
                Ok(Emit::none())
            })
            .emits::<Other>(),
        )
        .step(
            Step::new("work", move |_c: Context, o: Other| {
                let (r, p) = (r.clone(), p.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok(Found {
                        source: o.0.to_string(),
                        hits: 1,
                    }
                    .into())
                }
            })
            .emits::<Found>()
            .num_workers(4),
        )
        .step(
            Step::new("join", |c: Context, f: Found| async move {
                match c.collect(f, 12)? {
                    Some(all) => Ok(Emit::stop(all.len())),
                    None => Ok(Emit::none()),
                }
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, _) = run_to_end(&engine, "workers", json!(null)).await;
    assert_eq!(rec.result, Some(json!(12)));
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "exactly num_workers instances ran at once"
    );
}

fn flaky(fail_times: usize, attempts: u32) -> (Workflow, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let wf = Workflow::builder("flaky")
        .step(
            Step::new("call", move |_c: Context, _s: StartEvent| {
                let calls = c2.clone();
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n <= fail_times {
                        return Err(StepError::new(format!("attempt {n} failed")));
                    }
                    Ok(Emit::stop(json!({"attempts": n})))
                }
            })
            .emits::<StopEvent>()
            .retry(RetryPolicy::exponential(attempts, Duration::from_millis(5))),
        )
        .build()
        .unwrap();
    (wf, calls)
}

#[tokio::test]
async fn retries_then_success() {
    let (wf, calls) = flaky(2, 3);
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "flaky", json!(null)).await;
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(rec.result, Some(json!({"attempts": 3})));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        types(&evs),
        [
            "chain-started",
            "step-started",
            "step-completed",
            "chain-completed"
        ]
    );
}

#[tokio::test]
async fn retries_exhausted_end_in_chain_error() {
    let (wf, calls) = flaky(10, 3);
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "flaky", json!(null)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(rec.status, RunStatus::Failed);
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Failed);
    assert_eq!(err.message, "step \"call\" failed: attempt 3 failed");
    assert_eq!(
        types(&evs),
        ["chain-started", "step-started", "chain-error"]
    );
    assert_eq!(evs[2].data["error"]["code"], "failed");
    assert_eq!(evs[2].data["error"]["details"]["step"], 1);
}

#[tokio::test(start_paused = true)]
async fn step_timeout_ends_with_timeout_code() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let wf = Workflow::builder("slow")
        .step(
            Step::new("sleepy", move |_c: Context, _s: StartEvent| {
                let calls = c2.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(Emit::stop(1))
                }
            })
            .emits::<StopEvent>()
            .timeout(Duration::from_secs(5))
            .retry(RetryPolicy::exponential(2, Duration::from_secs(1))),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "slow", json!(null)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a timed-out attempt is retried like any failure"
    );
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Timeout);
    assert!(
        err.message.contains("exceeded its timeout of 5s"),
        "{}",
        err.message
    );
    assert_eq!(
        types(&evs),
        ["chain-started", "step-started", "chain-error"]
    );
}

#[tokio::test(start_paused = true)]
async fn run_timeout_ends_the_run() {
    let wf = Workflow::builder("forever")
        .step(
            Step::new("wait", |_c: Context, _s: StartEvent| async move {
                std::future::pending::<()>().await;
                Ok(Emit::stop(1))
            })
            .emits::<StopEvent>(),
        )
        .run_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "forever", json!(null)).await;
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(rec.error.unwrap().code, ErrorCode::Timeout);
    assert_eq!(
        types(&evs),
        ["chain-started", "step-started", "chain-error"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_step() {
    let engine = engine_with(vec![builtin::ticker()]);
    let run = engine
        .start("ticker", input(json!({"n": 1000, "delay_ms": 5})))
        .await
        .unwrap();
    let mut evs = std::pin::pin!(run.envelopes(0));
    // Wait until the step is writing ticks.
    while let Some(e) = evs.next().await {
        if e.unwrap().event_type == "tick" {
            break;
        }
    }
    run.cancel().await.unwrap();
    let rec = run.wait().await.unwrap();
    assert_eq!(rec.status, RunStatus::Cancelled);
    let all = events(&engine, run.id()).await;
    assert_eq!(all.last().unwrap().event_type, "chain-cancelled");
    assert!(all.iter().filter(|e| e.event_type == "tick").count() < 1000);
    // A finished run refuses further control.
    assert!(matches!(
        run.cancel().await,
        Err(Error::RunFinished {
            status: "cancelled",
            ..
        })
    ));
    assert!(matches!(
        run.send("input", json!(1)).await,
        Err(Error::RunFinished { .. })
    ));
}

#[tokio::test]
async fn panicking_step_ends_in_chain_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let wf = Workflow::builder("boom")
        .step(
            Step::new("explode", move |_c: Context, _s: StartEvent| {
                let calls = c2.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if true {
                        panic!("kaboom");
                    }
                    Ok(Emit::stop(1))
                }
            })
            .emits::<StopEvent>()
            .retry(RetryPolicy::exponential(5, Duration::from_millis(1))),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "boom", json!(null)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "panics are not retried");
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Failed);
    assert_eq!(err.message, "step \"explode\" failed: panicked: kaboom");
    assert_eq!(err.details.unwrap()["panicked"], true);
    assert_eq!(
        types(&evs),
        ["chain-started", "step-started", "chain-error"]
    );
}

#[test]
fn validation_names_step_and_type() {
    let ok = |_c: Context, _s: StartEvent| async move { Ok(Emit::stop(1)) };
    let msg = |b: sluice_engine::WorkflowBuilder| match b.build() {
        Err(Error::InvalidWorkflow { message, .. }) => message,
        other => panic!("expected InvalidWorkflow, got {other:?}"),
    };
    assert_eq!(
        msg(Workflow::builder("w").step(
            Step::new(
                "q",
                |_c: Context, _q: Query| async move { Ok(Emit::stop(1)) }
            )
            .emits::<StopEvent>()
        )),
        "no step accepts the start event (StartEvent)"
    );
    assert_eq!(
        msg(Workflow::builder("w").step(Step::new("a", ok).emits::<Query>().emits::<StopEvent>())),
        "step \"a\" emits \"query\" but no step accepts it"
    );
    assert_eq!(
        msg(Workflow::builder("w")
            .step(Step::new("a", ok).emits::<StopEvent>())
            .step(Step::new("b", |_c: Context, _q: Query| async move {
                Ok(Emit::none())
            }))),
        "step \"b\" accepts \"query\" but no step emits it (declare it with .emits())"
    );
    assert_eq!(
        msg(Workflow::builder("w")
            .step(Step::new("a", ok).emits::<Query>())
            .step(
                Step::new(
                    "b",
                    |_c: Context, _q: Query| async move { Ok(Emit::none()) }
                )
                .emits::<Query>()
            )),
        "no step reachable from the start emits StopEvent, so no run could complete"
    );
    assert_eq!(
        msg(Workflow::builder("w")
            .step(Step::new("a", ok).emits::<StopEvent>())
            .step(Step::new("a", ok).emits::<StopEvent>())),
        "two steps are named \"a\""
    );
    assert_eq!(
        msg(Workflow::builder("w").step(Step::new("a", ok).requests_input().emits::<StopEvent>())),
        "step \"a\" waits for \"input\" but no step accepts it"
    );
    assert_eq!(
        msg(Workflow::builder("Bad Name").step(Step::new("a", ok).emits::<StopEvent>())),
        "the workflow name must match [a-z][a-z0-9._-]{0,63}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_followers_see_identical_sequences() {
    const N: u64 = 5000;
    // The step produces nothing until every follower is reading: all ticks reach them live.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g2 = gate.clone();
    let wf = Workflow::builder("gated-ticker")
        .stream_event("tick")
        .step(
            Step::new("tick", move |c: Context, _s: StartEvent| {
                let gate = g2.clone();
                async move {
                    let _open = gate.acquire_many(3).await?;
                    for i in 0..N {
                        c.write_event_to_stream("tick", &json!({"i": i})).await?;
                    }
                    Ok(Emit::stop(N))
                }
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let run = engine
        .start("gated-ticker", input(json!(null)))
        .await
        .unwrap();
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let (h, gate, store) = (run.clone(), gate.clone(), engine.store().clone());
            tokio::spawn(async move {
                let mut events = std::pin::pin!(h.events(0));
                let mut seen = Vec::new();
                let mut head_at_open = None;
                while let Some(e) = events.next().await {
                    let e = e.unwrap();
                    let step_started = e.event_type() == "step-started";
                    seen.push(e);
                    if step_started {
                        // Caught up with the log's head: from here on, everything is live.
                        head_at_open = Some(store.last_seq(h.id()).await.unwrap());
                        gate.add_permits(1);
                    }
                }
                (seen, head_at_open)
            })
        })
        .collect();
    let mut seen = Vec::new();
    for f in followers {
        let (events, head_at_open) = f.await.unwrap();
        assert_eq!(
            head_at_open,
            Some(2),
            "the follower was at the head (chain-started, step-started) before any tick"
        );
        seen.push(events);
    }
    assert_eq!(seen[0].len() as u64, N + 4);
    for (i, e) in seen[0].iter().enumerate() {
        assert_eq!(e.seq(), i as u64 + 1);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
    let ticks = seen[0].iter().filter(|e| e.event_type() == "tick").count() as u64;
    assert_eq!(ticks, N, "every tick was delivered live to every follower");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_joining_mid_run_gets_everything() {
    let engine = engine_with(vec![builtin::ticker()]);
    let run = engine
        .start("ticker", input(json!({"n": 200, "delay_ms": 1})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last = run.record().await.unwrap();
    assert_eq!(last.status, RunStatus::Running);
    let late = events(&engine, run.id()).await;
    assert_eq!(late.len(), 204);
    let from_cursor: Vec<u64> = run.events(100).map(|e| e.unwrap().seq()).collect().await;
    assert_eq!(from_cursor, (101..=204).collect::<Vec<_>>());
    let ticks: Vec<u64> = late
        .iter()
        .filter(|e| e.event_type == "tick")
        .map(|e| e.data["i"].as_u64().unwrap())
        .collect();
    assert_eq!(ticks, (0..200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_input_holding_no_task_and_resumes() {
    let engine = engine_with(vec![builtin::ask_human()]);
    let run = engine
        .start("ask-human", input(json!({"prompt": "Proceed?"})))
        .await
        .unwrap();
    let mut evs = std::pin::pin!(run.envelopes(0));
    let mut prefix = Vec::new();
    while let Some(e) = evs.next().await {
        let e = e.unwrap();
        let t = e.event_type.clone();
        prefix.push(e);
        if t == "step-completed" {
            break;
        }
    }
    assert_eq!(
        types(&prefix),
        [
            "chain-started",
            "step-started",
            "input-requested",
            "step-completed"
        ]
    );
    assert_eq!(prefix[2].data, json!({"prompt": "Proceed?"}));
    assert_eq!(prefix[2].step, Some(1));
    // The run goes waiting and its driver task exits.
    for _ in 0..100 {
        if run.record().await.unwrap().status == RunStatus::Waiting && engine.active_runs() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(run.record().await.unwrap().status, RunStatus::Waiting);
    assert_eq!(engine.active_runs(), 0, "a waiting run holds no task");

    // Wrong type: 422-style refusal naming what it waits for; the run keeps waiting.
    match run.send("tool-results", json!({"results": []})).await {
        Err(Error::NotWaiting { waiting_for, .. }) => assert_eq!(waiting_for, ["input"]),
        other => panic!("expected NotWaiting, got {other:?}"),
    }
    assert_eq!(run.record().await.unwrap().status, RunStatus::Waiting);

    run.send("input", json!({"ok": true})).await.unwrap();
    let rec = run.wait().await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(rec.result, Some(json!({"answer": {"ok": true}})));
    let all = events(&engine, run.id()).await;
    assert_eq!(types(&all), ASKED_AND_ANSWERED);
    assert_eq!(all[4].data, json!({"from_step": 1}));
    // A second answer is refused: the run is over.
    assert!(matches!(
        run.send("input", json!(2)).await,
        Err(Error::RunFinished { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_run_survives_an_engine_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = Engine::new(store.clone(), [builtin::ask_human()]).unwrap();
    let run = first.start("ask-human", input(Value::Null)).await.unwrap();
    let id = run.id().to_owned();
    for _ in 0..200 {
        if run.record().await.unwrap().status == RunStatus::Waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(first.shutdown(Duration::from_secs(5)).await);
    assert!(matches!(
        run.send("input", json!(1)).await,
        Err(Error::ShuttingDown)
    ));

    let second = Engine::new(store.clone(), [builtin::ask_human()]).unwrap();
    assert_eq!(
        second.recover().await.unwrap(),
        sluice_engine::Recovered::default()
    );
    second.send(&id, "input", json!("yes")).await.unwrap();
    let rec = second.handle(&id).wait().await.unwrap();
    assert_eq!(rec.result, Some(json!({"answer": "yes"})));
}

/// Runs queued behind one another in a session keep their order across a restart: after it,
/// each still waits for the run before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_queued_runs_keep_their_order_across_a_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let workflows = || [builtin::ask_human(), builtin::ticker()];
    let first = Engine::new(store.clone(), workflows()).unwrap();
    let a = first
        .start("ask-human", in_session(Value::Null, None))
        .await
        .unwrap();
    let b = first
        .start("ticker", in_session(json!({"n": 2}), Some(a.id())))
        .await
        .unwrap();
    let c = first
        .start("ticker", in_session(json!({"n": 2}), Some(b.id())))
        .await
        .unwrap();
    until_status(&first, a.id(), RunStatus::Waiting).await;
    assert!(first.shutdown(Duration::from_secs(5)).await);

    let second = Engine::new(store.clone(), workflows()).unwrap();
    assert_eq!(second.recover().await.unwrap().requeued, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in [b.id(), c.id()] {
        let rec = second.handle(id).record().await.unwrap();
        assert_eq!(
            rec.status,
            RunStatus::Queued,
            "{id} started before its turn"
        );
    }
    second.send(a.id(), "input", json!("go")).await.unwrap();
    let (ra, rb, rc) = (
        second.handle(a.id()).wait().await.unwrap(),
        second.handle(b.id()).wait().await.unwrap(),
        second.handle(c.id()).wait().await.unwrap(),
    );
    for rec in [&ra, &rb, &rc] {
        assert_eq!(rec.status, RunStatus::Completed);
    }
    assert!(rb.started_at >= ra.finished_at, "b started before a ended");
    assert!(rc.started_at >= rb.finished_at, "c started before b ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_run_that_held_the_slot_goes_on_first() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let workflows = || {
        let limits = sluice_engine::Limits {
            max_concurrent_runs: Some(1),
            queue: Some(8),
            ..Default::default()
        };
        [builtin::ticker().configure("ticker", &limits).unwrap()]
    };
    let first = Engine::new(store.clone(), workflows()).unwrap();
    let holder = first
        .start("ticker", input(json!({"n": 40, "delay_ms": 10})))
        .await
        .unwrap();
    until_status(&first, holder.id(), RunStatus::Running).await;
    let mut queued = Vec::new();
    for _ in 0..6 {
        let h = first.start("ticker", input(json!({"n": 2}))).await.unwrap();
        queued.push(h.id().to_owned());
    }
    assert!(first.shutdown(Duration::from_secs(5)).await);
    assert_eq!(
        store.get_run(holder.id()).await.unwrap().unwrap().status,
        RunStatus::Running,
        "left running for the next start"
    );

    let second = Engine::new(store.clone(), workflows()).unwrap();
    let recovered = second.recover().await.unwrap();
    assert_eq!((recovered.resumed, recovered.requeued), (1, 6));
    let held = second.handle(holder.id()).wait().await.unwrap();
    assert_eq!(held.status, RunStatus::Completed);
    let mut previous = held.finished_at;
    for id in &queued {
        let rec = second.handle(id).wait().await.unwrap();
        assert_eq!(rec.status, RunStatus::Completed);
        // The queue keeps its order: each starts after the one queued before it has ended.
        assert!(
            rec.started_at >= previous,
            "{id} took the slot before the run ahead of it ended: {:?} < {previous:?}",
            rec.started_at
        );
        previous = rec.finished_at;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_session_run_keeps_the_rest_of_the_line() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = Engine::new(store, [builtin::ask_human(), builtin::ticker()]).unwrap();
    let a = engine
        .start("ask-human", in_session(Value::Null, None))
        .await
        .unwrap();
    let b = engine
        .start("ticker", in_session(json!({"n": 2}), Some(a.id())))
        .await
        .unwrap();
    let c = engine
        .start("ticker", in_session(json!({"n": 2}), Some(b.id())))
        .await
        .unwrap();
    until_status(&engine, a.id(), RunStatus::Waiting).await;
    engine.cancel(b.id(), None).await.unwrap();
    assert_eq!(b.wait().await.unwrap().status, RunStatus::Cancelled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rec = c.record().await.unwrap();
    assert_eq!(
        rec.status,
        RunStatus::Queued,
        "c started while a, ahead of the cancelled b, still runs"
    );
    engine.send(a.id(), "input", json!("go")).await.unwrap();
    let (ra, rc) = (a.wait().await.unwrap(), c.wait().await.unwrap());
    assert_eq!(ra.status, RunStatus::Completed);
    assert_eq!(rc.status, RunStatus::Completed);
    assert!(rc.started_at >= ra.finished_at, "c started before a ended");
}

/// `WorkflowStats::waiting` of the only workflow.
fn waiting(engine: &Engine) -> usize {
    engine.stats()[0].waiting
}

async fn until_status(engine: &Engine, id: &str, status: RunStatus) {
    for _ in 0..1000 {
        if engine.handle(id).record().await.unwrap().status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("run {id} never reached {status:?}");
}

/// Until no driver is left: every run sleeps (or has ended) with no task.
async fn until_idle(engine: &Engine) {
    for _ in 0..1000 {
        if engine.active_runs() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("drivers still active: {}", engine.active_runs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiting_count_follows_pauses_wakes_cancels_and_restarts() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = Engine::new(store.clone(), [builtin::ask_human()]).unwrap();
    assert_eq!(waiting(&first), 0);
    let a = first.start("ask-human", input(Value::Null)).await.unwrap();
    let b = first.start("ask-human", input(Value::Null)).await.unwrap();
    until_status(&first, a.id(), RunStatus::Waiting).await;
    until_status(&first, b.id(), RunStatus::Waiting).await;
    until_idle(&first).await;
    assert_eq!(waiting(&first), 2, "two paused runs, no driver holds them");

    // A delivery it does not wait for wakes a run, is refused, and the run sleeps again:
    // still counted once.
    assert!(matches!(
        a.send("tool-results", json!({"results": []})).await,
        Err(Error::NotWaiting { .. })
    ));
    until_idle(&first).await;
    assert_eq!(waiting(&first), 2);

    // Cancelled while waiting.
    b.cancel().await.unwrap();
    assert_eq!(b.wait().await.unwrap().status, RunStatus::Cancelled);
    assert_eq!(waiting(&first), 1);

    // A waiting run outlives the engine, and the next one counts it.
    assert!(first.shutdown(Duration::from_secs(5)).await);
    assert_eq!(waiting(&first), 1, "shutdown does not end a waiting run");
    let second = Engine::new(store.clone(), [builtin::ask_human()]).unwrap();
    assert_eq!(waiting(&second), 0);
    second.recover().await.unwrap();
    assert_eq!(waiting(&second), 1);
    second.recover().await.unwrap();
    assert_eq!(waiting(&second), 1, "counted by the first recovery only");

    // Its input arrives: it leaves `waiting` before the send is acknowledged.
    second.send(a.id(), "input", json!("yes")).await.unwrap();
    assert_eq!(waiting(&second), 0);
    let rec = second.handle(a.id()).wait().await.unwrap();
    assert_eq!(rec.result, Some(json!({"answer": "yes"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_pauses_twice_is_counted_while_it_waits_each_time() {
    let wf = Workflow::builder("twice")
        .step(
            Step::new("ask", |_c: Context, _s: StartEvent| async move {
                Ok(Emit::none().request_input(Default::default()))
            })
            .requests_input(),
        )
        .step(
            Step::new("answer", |_c: Context, input: InputEvent| async move {
                if input.0 == json!("again") {
                    Ok(Emit::none().request_input(Default::default()))
                } else {
                    Ok(Emit::stop(input.0))
                }
            })
            .requests_input()
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let run = engine.start("twice", input(Value::Null)).await.unwrap();
    until_status(&engine, run.id(), RunStatus::Waiting).await;
    assert_eq!(waiting(&engine), 1);
    // Resumed (uncounted), then paused again by the answer step (counted again), quickly
    // enough that the count may already be back at 1 when the send returns.
    run.send("input", json!("again")).await.unwrap();
    for _ in 0..1000 {
        let rec = run.record().await.unwrap();
        if rec.status == RunStatus::Waiting && rec.last_seq > 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    until_idle(&engine).await;
    assert_eq!(waiting(&engine), 1, "counted once, not once per pause");
    run.send("input", json!("done")).await.unwrap();
    assert_eq!(run.wait().await.unwrap().result, Some(json!("done")));
    assert_eq!(waiting(&engine), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_run_resumes_after_restart_from_its_checkpoint() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let slow_second = || {
        Workflow::builder("two")
            .step(
                Step::new("first", |c: Context, _s: StartEvent| async move {
                    c.set("seen", 1)?;
                    Ok(Query("x".into()).into())
                })
                .emits::<Query>(),
            )
            .step(
                Step::new("second", |c: Context, _q: Query| async move {
                    let marker: Option<u32> = c.get("seen")?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(Emit::stop(json!({"seen": marker})))
                })
                .emits::<StopEvent>(),
            )
            .build()
            .unwrap()
    };
    let first = Engine::new(store.clone(), [slow_second()]).unwrap();
    let run = first.start("two", input(Value::Null)).await.unwrap();
    let id = run.id().to_owned();
    // Stop the engine while "second" sleeps.
    let mut evs = std::pin::pin!(run.envelopes(0));
    let mut started = 0;
    while let Some(e) = evs.next().await {
        if e.unwrap().event_type == "step-started" {
            started += 1;
            if started == 2 {
                break;
            }
        }
    }
    assert!(first.shutdown(Duration::from_secs(5)).await);
    assert_eq!(
        store.get_run(&id).await.unwrap().unwrap().status,
        RunStatus::Running
    );

    let second = Engine::new(store.clone(), [slow_second()]).unwrap();
    assert_eq!(second.recover().await.unwrap().resumed, 1);
    let rec = second.handle(&id).wait().await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(
        rec.result,
        Some(json!({"seen": 1})),
        "state restored from the checkpoint"
    );
    let all = events(&second, &id).await;
    assert_eq!(
        types(&all),
        [
            "chain-started",
            "step-started",
            "step-completed",
            "step-started",
            "chain-resumed",
            "step-started",
            "step-completed",
            "chain-completed"
        ]
    );
    assert_eq!(all[4].data, json!({"from_step": 2}));
    assert_eq!(
        all[5].step,
        Some(3),
        "the interrupted instance runs again under a new number"
    );
}

#[tokio::test]
async fn run_of_undeployed_workflow_is_interrupted_on_recovery() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut rec = sluice_protocol::RunRecord::new("run_orphan", "gone", json!(null));
    rec.status = RunStatus::Running;
    store.create_run(&rec).await.unwrap();
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    assert_eq!(engine.recover().await.unwrap().interrupted, 1);
    let rec = store.get_run("run_orphan").await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(rec.error.unwrap().code, ErrorCode::Interrupted);
    assert_eq!(types(&events(&engine, "run_orphan").await), ["chain-error"]);
}

#[tokio::test]
async fn step_budget_ends_with_max_steps() {
    let wf = Workflow::builder("looper")
        .step(
            Step::new("start", |_c: Context, _s: StartEvent| async move {
                Ok(Other(0).into())
            })
            .emits::<Other>(),
        )
        .step(
            Step::new("again", |_c: Context, o: Other| async move {
                if o.0 > 1_000_000 {
                    Ok(Emit::stop(o.0))
                } else {
                    Ok(Other(o.0 + 1).into())
                }
            })
            .emits::<Other>()
            .emits::<StopEvent>(),
        )
        .max_steps(5)
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "looper", json!(null)).await;
    assert_eq!(rec.error.unwrap().code, ErrorCode::MaxSteps);
    assert_eq!(
        evs.iter()
            .filter(|e| e.event_type == "step-started")
            .count(),
        5
    );
}

#[tokio::test]
async fn a_workflow_that_stalls_fails_instead_of_hanging() {
    let wf = Workflow::builder("stall")
        .step(
            Step::new("start", |_c: Context, _s: StartEvent| async move {
                Ok(Emit::none())
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, _) = run_to_end(&engine, "stall", json!(null)).await;
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Failed);
    assert!(err.message.contains("stalled"), "{}", err.message);
}

#[tokio::test]
async fn invalid_input_and_unknown_workflow_are_refused_before_a_run_exists() {
    let engine = engine_with(vec![builtin::ticker()]);
    match engine.start("ticker", input(json!({"n": "many"}))).await {
        Err(Error::InvalidInput(m)) => assert!(m.starts_with("input.n:"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        engine.start("nope", input(json!({}))).await,
        Err(Error::UnknownWorkflow(_))
    ));
    assert!(
        engine
            .store()
            .list_runs(&Default::default())
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    assert!(matches!(
        engine.send("run_nope", "input", json!(1)).await,
        Err(Error::UnknownRun(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_queues_then_refuses() {
    // Steps hold their slot until the gate opens, so which runs hold a slot and which queue
    // does not depend on how fast this machine runs them.
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let wf = Workflow::builder("gated")
        .step(
            Step::new("hold", move |_c: Context, _s: StartEvent| {
                let mut open = gate_rx.clone();
                async move {
                    open.wait_for(|o| *o).await.unwrap();
                    Ok(Emit::stop(1))
                }
            })
            .emits::<StopEvent>(),
        )
        .max_concurrent_runs(2)
        .queue(3)
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match engine.start("gated", input(json!(null))).await {
            Ok(h) => accepted.push(h),
            Err(Error::QueueFull { retry_after, .. }) => {
                assert!(retry_after >= Duration::from_secs(1));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(accepted.len(), 5, "2 running + 3 queued");
    assert_eq!(refused, 5);
    let stats = engine.stats();
    assert_eq!((stats[0].running, stats[0].queued), (2, 3));
    let queued = accepted.last().unwrap().record().await.unwrap();
    assert_eq!(queued.status, RunStatus::Queued);
    gate.send_replace(true);
    for h in &accepted {
        assert_eq!(h.wait().await.unwrap().status, RunStatus::Completed);
    }
    // A finished run gives its slot back after its record says so: wait for both slots.
    gate.send_replace(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.stats()[0].running > 0 || engine.stats()[0].queued > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Cancelling a queued run ends it without it ever starting.
    let mut blockers = Vec::new();
    for _ in 0..3 {
        blockers.push(engine.start("gated", input(json!(null))).await.unwrap());
    }
    let stats = engine.stats();
    assert_eq!((stats[0].running, stats[0].queued), (2, 1));
    let last = blockers.pop().unwrap();
    last.cancel().await.unwrap();
    let rec = last.wait().await.unwrap();
    assert_eq!(rec.status, RunStatus::Cancelled);
    assert_eq!(
        types(&events(&engine, last.id()).await),
        ["chain-cancelled"]
    );
    gate.send_replace(true);
    for h in &blockers {
        assert_eq!(h.wait().await.unwrap().status, RunStatus::Completed);
    }
}

#[tokio::test]
async fn a_result_nested_too_deep_fails_the_run() {
    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!([v]);
        }
        v
    }
    let wf = Workflow::builder("deep")
        .step(
            Step::new("nest", |_c: Context, s: StartEvent| async move {
                let levels = s.0.as_u64().unwrap() as usize;
                Ok(Emit::stop(nested(levels)))
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    // Deep, but readable back by a parser that stops at 128 levels, with room for the record.
    let (rec, _) = run_to_end(&engine, "deep", json!(100)).await;
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(rec.result, Some(nested(100)));
    // Deeper: the run fails, saying why, instead of leaving a record nobody can read.
    let (rec, evs) = run_to_end(&engine, "deep", json!(101)).await;
    assert_eq!(rec.status, RunStatus::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.code, ErrorCode::Failed);
    assert!(
        error.message.contains("nested deeper than 100"),
        "{}",
        error.message
    );
    assert_eq!(types(&evs).last(), Some(&"chain-error"));
}

#[tokio::test]
async fn steps_write_step_level_and_declared_types_only() {
    let wf = Workflow::builder("rude")
        .stream_event("tick")
        .step(
            Step::new("s", |c: Context, _s: StartEvent| async move {
                let denied = c.write_event_to_stream("chain-completed", &json!({})).await;
                let bad = c.write_event_to_stream("Not Valid", &json!({})).await;
                let undeclared = c.write_event_to_stream("tock", &json!({})).await;
                c.write_event_to_stream("text-delta", &json!({"text": "ok"}))
                    .await?;
                c.write_event_to_stream("tick", &json!({})).await?;
                Ok(Emit::stop(json!([
                    denied.is_err(),
                    bad.is_err(),
                    matches!(undeclared, Err(Error::InvalidEventType(t)) if t == "tock")
                ])))
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    assert!(wf.writes("tick") && wf.writes("text-delta") && wf.writes("chain-completed"));
    assert!(!wf.writes("tock"));
    assert_eq!(wf.stream_events().collect::<Vec<_>>(), ["tick"]);
    let engine = engine_with(vec![wf]);
    let (rec, evs) = run_to_end(&engine, "rude", json!(null)).await;
    assert_eq!(rec.result, Some(json!([true, true, true])));
    assert_eq!(
        types(&evs),
        [
            "chain-started",
            "step-started",
            "text-delta",
            "tick",
            "step-completed",
            "chain-completed"
        ]
    );
    // A declared type must be a valid name of the workflow's own.
    for bad in ["text-delta", "chain-error", "Tick", ""] {
        let built = Workflow::builder("w")
            .stream_event(bad)
            .step(
                Step::new("s", |_c: Context, _s: StartEvent| async move {
                    Ok(Emit::stop(json!(1)))
                })
                .emits::<StopEvent>(),
            )
            .build();
        assert!(
            matches!(built, Err(Error::InvalidWorkflow { .. })),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn public_futures_and_streams_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let engine = engine_with(vec![builtin::ticker()]);
    let h = engine.handle("run_x");
    is_send(&engine.start("ticker", StartRun::default()));
    is_send(&engine.send("run_x", "input", json!(1)));
    is_send(&h.wait());
    is_send(&h.events(0));
    is_send(&h.envelopes(0));
    is_send(&engine.recover());
    let _ = InputEvent(json!(1));
}

#[tokio::test]
async fn sweep_removes_finished_runs_beyond_retention() {
    let engine = engine_with(vec![builtin::ticker(), builtin::ask_human()]);
    let mut done = Vec::new();
    for n in 0..5 {
        let run = engine
            .start("ticker", input(json!({"n": n})))
            .await
            .unwrap();
        run.wait().await.unwrap();
        done.push(run.id().to_owned());
    }
    let waiting = engine.start("ask-human", input(Value::Null)).await.unwrap();
    for _ in 0..200 {
        if waiting.record().await.unwrap().status == RunStatus::Waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let keep2 = sluice_engine::Retention {
        ttl: None,
        max_finished_runs: Some(2),
    };
    assert_eq!(engine.sweep(&keep2).await.unwrap(), 3);
    let left: Vec<String> = engine
        .store()
        .list_runs(&Default::default())
        .await
        .unwrap()
        .runs
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        left,
        [waiting.id().to_owned(), done[4].clone(), done[3].clone()]
    );
    assert!(
        engine
            .store()
            .read(&done[0], 0, 10)
            .await
            .unwrap()
            .is_empty(),
        "the log went with the record"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let ttl = sluice_engine::Retention {
        ttl: Some(Duration::from_millis(1)),
        max_finished_runs: None,
    };
    assert_eq!(engine.sweep(&ttl).await.unwrap(), 2);
    assert_eq!(
        engine
            .store()
            .list_runs(&Default::default())
            .await
            .unwrap()
            .runs
            .len(),
        1,
        "the waiting run stays"
    );
}

/// Creates session `id` with `state` in the engine's store.
async fn new_session(engine: &Engine, id: &str, state: Value) {
    let now = sluice_protocol::Timestamp::now();
    let session = sluice_protocol::SessionRecord {
        id: id.into(),
        created_at: now,
        updated_at: now,
        state,
        active_run: None,
        owner: None,
    };
    engine.store().create_session(&session).await.unwrap();
}

#[tokio::test]
async fn steps_read_and_write_their_session_state() {
    let wf = Workflow::builder("counter")
        .step(
            Step::new("count", |c: Context, _s: StartEvent| async move {
                let seen = c
                    .session_state()
                    .await?
                    .and_then(|v| v["runs"].as_u64())
                    .unwrap_or(0);
                c.set_session_state(json!({"runs": seen + 1})).await?;
                Ok(Emit::stop(
                    json!({"session": c.session_id(), "runs": seen + 1}),
                ))
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    new_session(&engine, "ses_1", Value::Null).await;
    for expected in 1..=2u64 {
        let start = StartRun {
            session_id: Some("ses_1".into()),
            ..Default::default()
        };
        let rec = engine
            .start("counter", start)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(
            rec.result,
            Some(json!({"session": "ses_1", "runs": expected}))
        );
    }
    let outside = engine
        .start("counter", StartRun::default())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(outside.result, Some(json!({"session": null, "runs": 1})));
}

#[tokio::test]
async fn a_session_state_given_with_the_stop_is_written_only_if_the_run_completes() {
    // Input "deep": a result nested too deeply, so the run fails after the step returned its
    // stop and the state. "plain": a new state with the stop. "none": a state without a stop.
    let wf = Workflow::builder("later")
        .step(
            Step::new("end", |_c: Context, s: StartEvent| async move {
                let mut result = json!("ok");
                if s.0 == json!("deep") {
                    for _ in 0..200 {
                        result = json!([result]);
                    }
                }
                if s.0 == json!("none") {
                    return Ok(Emit::event(Other(1)).with_session_state(json!({"by": "none"})));
                }
                Ok(Emit::stop(result).with_session_state(json!({"by": s.0})))
            })
            .emits::<StopEvent>()
            .emits::<Other>(),
        )
        .step(
            Step::new("other", |_c: Context, _o: Other| async move {
                Ok(Emit::stop("other"))
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    new_session(&engine, "ses_2", json!({"by": "nobody"})).await;
    let state = || async {
        let s = engine.store().get_session("ses_2").await.unwrap().unwrap();
        s.state
    };
    let run = |input: &'static str| {
        let start = StartRun {
            input: json!(input),
            session_id: Some("ses_2".into()),
            ..Default::default()
        };
        let engine = engine.clone();
        async move {
            engine
                .start("later", start)
                .await
                .unwrap()
                .wait()
                .await
                .unwrap()
        }
    };
    assert_eq!(run("deep").await.status, RunStatus::Failed);
    assert_eq!(
        state().await,
        json!({"by": "nobody"}),
        "a failed run leaves it"
    );
    assert_eq!(run("none").await.result, Some(json!("other")));
    assert_eq!(state().await, json!({"by": "nobody"}), "no stop, no state");

    // Written before the terminal event: whoever sees the run end reads the new state.
    let start = StartRun {
        input: json!("plain"),
        session_id: Some("ses_2".into()),
        ..Default::default()
    };
    let handle = engine.start("later", start).await.unwrap();
    let mut events = std::pin::pin!(handle.envelopes(0));
    while let Some(e) = events.next().await {
        if e.unwrap().is_terminal() {
            break;
        }
    }
    assert_eq!(state().await, json!({"by": "plain"}));

    // The write takes the session's lock: while someone else holds it (the server, between
    // reading the session and writing it back), the run's end waits.
    let held = engine.lock_session("ses_2").await;
    let start = StartRun {
        input: json!("again"),
        session_id: Some("ses_2".into()),
        ..Default::default()
    };
    let handle = engine.start("later", start).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(handle.record().await.unwrap().status, RunStatus::Running);
    assert_eq!(state().await, json!({"by": "plain"}));
    drop(held);
    assert_eq!(handle.wait().await.unwrap().status, RunStatus::Completed);
    assert_eq!(state().await, json!({"by": "again"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_is_atomic_across_concurrent_steps() {
    let wf = Workflow::builder("counter-race")
        .step(
            Step::new("split", |c: Context, _s: StartEvent| async move {
                for i in 0..8 {
                    c.send_event(Other(i)).await?;
                }
                Ok(Emit::none())
            })
            .emits::<Other>(),
        )
        .step(
            Step::new("bump", |c: Context, o: Other| async move {
                let mut last = 0u64;
                for _ in 0..100 {
                    let new = c.update("count", |v: Option<u64>| v.unwrap_or(0) + 1)?;
                    assert!(new > last, "update returns the new value");
                    last = new;
                    tokio::task::yield_now().await;
                }
                let done = c.update("done", |v: Option<Vec<u32>>| {
                    let mut v = v.unwrap_or_default();
                    v.push(o.0);
                    v
                })?;
                if done.len() == 8 {
                    let total: Option<u64> = c.get("count")?;
                    return Ok(Emit::stop(total));
                }
                Ok(Emit::none())
            })
            .emits::<StopEvent>()
            .num_workers(4),
        )
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    let (rec, _) = run_to_end(&engine, "counter-race", json!(null)).await;
    assert_eq!(rec.status, RunStatus::Completed, "{:?}", rec.error);
    assert_eq!(rec.result, Some(json!(800)), "no update was lost");
}

/// One slot: a run given `"hold"` holds it until `gate` opens; any other asks for input and
/// completes with the answer.
fn one_slot(gate: tokio::sync::watch::Receiver<bool>) -> Workflow {
    one_slot_builder(gate).build().unwrap()
}

fn one_slot_builder(gate: tokio::sync::watch::Receiver<bool>) -> sluice_engine::WorkflowBuilder {
    Workflow::builder("one-slot")
        .step(
            Step::new("start", move |_c: Context, s: StartEvent| {
                let mut open = gate.clone();
                async move {
                    if s.0 == json!("hold") {
                        open.wait_for(|o| *o).await.unwrap();
                        return Ok(Emit::stop("held"));
                    }
                    if s.0 == json!("ask-late") {
                        // Works a while before it asks.
                        tokio::time::sleep(Duration::from_millis(400)).await;
                    }
                    Ok(Emit::none().request_input(Default::default()))
                }
            })
            .requests_input()
            .emits::<StopEvent>(),
        )
        .step(
            Step::new("answer", |_c: Context, input: InputEvent| async move {
                Ok(Emit::stop(input.0))
            })
            .emits::<StopEvent>(),
        )
        .max_concurrent_runs(1)
        .queue(4)
}

/// A run of `one-slot` paused for input, and another holding the only slot.
async fn waiting_behind_a_full_workflow(engine: &Engine) -> (String, String) {
    let asking = engine.start("one-slot", input(json!("ask"))).await.unwrap();
    until_status(engine, asking.id(), RunStatus::Waiting).await;
    until_idle(engine).await;
    let holder = engine
        .start("one-slot", input(json!("hold")))
        .await
        .unwrap();
    until_status(engine, holder.id(), RunStatus::Running).await;
    assert_eq!(engine.stats()[0].running, 1);
    (asking.id().to_owned(), holder.id().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_to_a_waiting_run_is_taken_at_once_while_its_workflow_is_full() {
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let engine = engine_with(vec![one_slot(gate_rx)]);
    let (asking, holder) = waiting_behind_a_full_workflow(&engine).await;

    // Answered now, not when the slot frees: the input is checkpointed and the run queues.
    tokio::time::timeout(
        Duration::from_secs(10),
        engine.send(&asking, "input", json!("yes")),
    )
    .await
    .expect("the send is answered while the slot is taken")
    .unwrap();
    let record = engine.handle(&asking).record().await.unwrap();
    assert_eq!(record.status, RunStatus::Queued);
    let stats = &engine.stats()[0];
    assert_eq!((stats.running, stats.queued, stats.waiting), (1, 1, 0));
    // It waits for nothing more.
    assert!(matches!(
        engine.send(&asking, "input", json!("again")).await,
        Err(Error::NotWaiting { .. })
    ));

    gate.send_replace(true);
    let done = engine.handle(&asking).wait().await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.result, Some(json!("yes")));
    assert_eq!(
        engine.handle(&holder).wait().await.unwrap().result,
        Some(json!("held"))
    );
    assert_eq!(types(&events(&engine, &asking).await), ASKED_AND_ANSWERED);
    let stats = &engine.stats()[0];
    assert_eq!((stats.queued, stats.waiting), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_queued_after_its_input_can_be_cancelled_and_outlives_a_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (_closed, gate_rx) = tokio::sync::watch::channel(false);
    let first = Engine::new(store.clone(), [one_slot(gate_rx)]).unwrap();
    let kept = first.start("one-slot", input(json!("ask"))).await.unwrap();
    until_status(&first, kept.id(), RunStatus::Waiting).await;
    let (cancelled, _holder) = waiting_behind_a_full_workflow(&first).await;
    first.send(&cancelled, "input", json!(1)).await.unwrap();
    until_status(&first, &cancelled, RunStatus::Queued).await;
    // A cancel does not wait for the slot either.
    let handle = first.handle(&cancelled);
    tokio::time::timeout(Duration::from_secs(10), async {
        handle.cancel().await.unwrap();
        handle.wait().await.unwrap()
    })
    .await
    .expect("the cancel is taken while the slot is taken");
    assert_eq!(handle.record().await.unwrap().status, RunStatus::Cancelled);
    assert_eq!(first.stats()[0].queued, 0);

    // Queued with its input when the engine stops: it goes on from its checkpoint.
    first
        .send(kept.id(), "input", json!("later"))
        .await
        .unwrap();
    until_status(&first, kept.id(), RunStatus::Queued).await;
    assert!(first.shutdown(Duration::from_secs(5)).await);

    let (gate, gate_rx) = tokio::sync::watch::channel(true);
    let second = Engine::new(store.clone(), [one_slot(gate_rx)]).unwrap();
    let recovered = second.recover().await.unwrap();
    assert_eq!(
        (recovered.resumed, recovered.requeued),
        (2, 0),
        "{recovered:?}"
    );
    let done = second.handle(kept.id()).wait().await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(
        done.result,
        Some(json!("later")),
        "the input was not asked again"
    );
    let seen = types(&events(&second, kept.id()).await)
        .into_iter()
        .filter(|t| *t == "input-requested")
        .count();
    assert_eq!(seen, 1);
    drop(gate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_input_does_not_count_toward_run_timeout() {
    // A run that waits longer than its timeout, across a restart too, gets its input and
    // completes: a waiting run holds no task and no slot, and its input is not thrown away.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (_gate, gate_rx) = tokio::sync::watch::channel(false);
    let workflows = || {
        [one_slot_builder(gate_rx.clone())
            .run_timeout(Duration::from_millis(500))
            .build()
            .unwrap()]
    };
    let first = Engine::new(store.clone(), workflows()).unwrap();
    let asking = first.start("one-slot", input(json!("ask"))).await.unwrap();
    until_status(&first, asking.id(), RunStatus::Waiting).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(first.shutdown(Duration::from_secs(5)).await);

    let second = Engine::new(store.clone(), workflows()).unwrap();
    second.recover().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    second
        .send(asking.id(), "input", json!("late"))
        .await
        .unwrap();
    let done = second.handle(asking.id()).wait().await.unwrap();
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.error);
    assert_eq!(done.result, Some(json!("late")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_queued_after_its_input_still_times_out() {
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let wf = one_slot_builder(gate_rx)
        .run_timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    let engine = engine_with(vec![wf]);
    // The asking run works 400 ms before it waits (waiting does not count toward the timeout):
    // 400 ms of its timeout are left when its input comes, while the holder, which starts
    // then, has 800.
    let asking = engine
        .start("one-slot", input(json!("ask-late")))
        .await
        .unwrap();
    until_status(&engine, asking.id(), RunStatus::Waiting).await;
    let holder = engine
        .start("one-slot", input(json!("hold")))
        .await
        .unwrap();
    until_status(&engine, holder.id(), RunStatus::Running).await;
    engine
        .send(asking.id(), "input", json!("late"))
        .await
        .unwrap();
    // The run times out in the queue, while the slot is still taken.
    let done = tokio::time::timeout(Duration::from_secs(10), asking.wait())
        .await
        .expect("the queued run did not time out")
        .unwrap();
    assert_eq!(done.status, RunStatus::Failed);
    assert_eq!(done.error.unwrap().code, ErrorCode::Timeout);
    assert_eq!(holder.record().await.unwrap().status, RunStatus::Running);
    assert_eq!(engine.stats()[0].queued, 0);
    gate.send_replace(true);
}

/// A cancel racing the run into `waiting` (its driver letting go of it) is never lost: every
/// run ends cancelled, none is left waiting with its cancel acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_the_run_into_waiting_is_not_lost() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = Engine::new(store, [builtin::ask_human()]).unwrap();
    let mut cancels = tokio::task::JoinSet::new();
    let mut ids = Vec::new();
    for i in 0..300u64 {
        let h = engine.start("ask-human", input(json!(null))).await.unwrap();
        ids.push(h.id().to_owned());
        let (engine, id) = (engine.clone(), h.id().to_owned());
        cancels.spawn(async move {
            // Spread over the moment the driver goes to sleep.
            for _ in 0..(i % 8) {
                tokio::task::yield_now().await;
            }
            engine.cancel(&id, None).await
        });
    }
    while let Some(r) = cancels.join_next().await {
        r.unwrap().unwrap();
    }
    for id in &ids {
        let rec = tokio::time::timeout(Duration::from_secs(10), engine.handle(id).wait())
            .await
            .unwrap_or_else(|_| panic!("{id}: its cancel was acknowledged but it never ended"))
            .unwrap();
        assert_eq!(rec.status, RunStatus::Cancelled, "{id}");
    }
}

/// A run's `run_timeout` counts from its creation: the time it queues for its first slot
/// counts, so a run still queued when its time is up ends with `timeout`, its work undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_queued_for_the_first_slot_counts_toward_run_timeout() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let limits = sluice_engine::Limits {
        max_concurrent_runs: Some(1),
        queue: Some(4),
        run_timeout: Some(Duration::from_millis(400)),
        ..Default::default()
    };
    let engine = Engine::new(
        store,
        [builtin::ticker().configure("ticker", &limits).unwrap()],
    )
    .unwrap();
    // Holds the slot until its own timeout, 400 ms from now.
    let holder = engine
        .start("ticker", input(json!({"n": 100, "delay_ms": 10})))
        .await
        .unwrap();
    let queued = engine
        .start("ticker", input(json!({"n": 1})))
        .await
        .unwrap();
    let held = holder.wait().await.unwrap();
    assert_eq!(held.status, RunStatus::Failed);
    let rec = queued.wait().await.unwrap();
    assert_eq!(rec.status, RunStatus::Failed, "{rec:?}");
    assert_eq!(rec.error.as_ref().unwrap().code, ErrorCode::Timeout);
    let mut events = Box::pin(queued.events(0));
    while let Some(ev) = events.next().await {
        assert_ne!(ev.unwrap().event_type(), "tick", "it never ran its step");
    }
}
