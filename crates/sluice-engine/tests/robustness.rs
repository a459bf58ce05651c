//! The engine when things go wrong: panics outside a step's future, store failures, a step that
//! never stops writing, events racing the end of a run, retried collectors, late writes from a
//! kept `Context`, and recovery of runs in odd states. Every case is bounded by a generous
//! timeout so that a regression fails instead of hanging the suite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_engine::{
    AnyEvent, Context, Emit, Engine, Error, RetryPolicy, StartEvent, StartRun, Step, StepError,
    StopEvent, Workflow, WorkflowEvent, builtin,
};
use sluice_protocol::payload::ErrorCode;
use sluice_protocol::{Event, RawEvent, RunRecord, RunStatus, SessionRecord};
use sluice_store::{InboxEntry, RunFilter, RunPage, Store};
use sluice_store_memory::MemoryStore;
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Left(u32);
impl WorkflowEvent for Left {
    const NAME: &'static str = "left";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Right(u32);
impl WorkflowEvent for Right {
    const NAME: &'static str = "right";
}

/// Fails the test instead of hanging it.
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    bounded_for(30, what, fut).await
}

async fn bounded_for<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still not done after {secs} s (the run hangs)"),
    }
}

fn input(v: Value) -> StartRun {
    StartRun {
        input: v,
        ..Default::default()
    }
}

/// Every event of a finished run, checking `seq` is 1, 2, 3… and only the last is terminal.
async fn events(store: Arc<dyn Store>, id: &str) -> Vec<Event> {
    let raw = store.read(id, 0, 10_000_000).await.unwrap();
    let all: Vec<Event> = raw.iter().map(|r| r.parse().unwrap()).collect();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq must be contiguous");
        assert_eq!(
            e.is_terminal(),
            i + 1 == all.len(),
            "exactly one terminal event, last: {:?}",
            e.event_type
        );
    }
    all
}

fn types(evs: &[Event]) -> Vec<&str> {
    evs.iter().map(|e| e.event_type.as_str()).collect()
}

// ---- 1. panics outside the step's future ----

#[tokio::test]
async fn a_panic_before_the_steps_future_exists_ends_the_run() {
    let wf = Workflow::builder("eager")
        .step(
            Step::any("explode", &["start"], |_c: Context, _e: AnyEvent| {
                // Synchronous code before `async move`, as users write it.
                if true {
                    panic!("before the future");
                }
                async move { Ok(Emit::stop(1)) }
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine.start("eager", input(Value::Null)).await.unwrap();
    let rec = bounded("eager panic", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Failed);
    assert!(err.message.contains("before the future"), "{}", err.message);
    assert_eq!(err.details.unwrap()["panicked"], true);
    assert_eq!(
        types(&events(store, run.id()).await),
        ["chain-started", "step-started", "chain-error"]
    );
}

/// Panics when dropped: a user's guard that misbehaves while its future is torn down.
struct PanicOnDrop;
impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("guard dropped");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_step_task_outside_the_future_ends_the_run() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let wf = Workflow::builder("dropper")
        .step(
            Step::new("hold", move |_c: Context, _s: StartEvent| {
                let calls = c2.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _guard = PanicOnDrop;
                    std::future::pending::<()>().await;
                    Ok(Emit::stop(1))
                }
            })
            .emits::<StopEvent>()
            // The timeout drops the future outside `catch_unwind`: the guard panics in the task.
            .timeout(Duration::from_millis(50))
            .retry(RetryPolicy::exponential(3, Duration::from_millis(1))),
        )
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine.start("dropper", input(Value::Null)).await.unwrap();
    let rec = bounded("panic in the task body", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    let err = rec.error.unwrap();
    assert!(err.message.contains("guard dropped"), "{}", err.message);
    assert_eq!(err.details.unwrap()["panicked"], true);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a panic is not retried");
    assert_eq!(
        types(&events(store, run.id()).await),
        ["chain-started", "step-started", "chain-error"]
    );
}

// ---- 2. store failures in the driver ----

/// A store that fails on demand, delegating everything else to a [`MemoryStore`].
#[derive(Default)]
struct Faulty {
    inner: MemoryStore,
    /// Appends that succeed before every later one fails (`usize::MAX`: never fail).
    appends_ok: AtomicUsize,
    appends: AtomicUsize,
    fail_finish: AtomicBool,
    /// `finish` of this run fails.
    fail_finish_of: Mutex<Option<String>>,
    /// The next `finish` calls that fail.
    finish_failures: AtomicUsize,
    /// The next `list_runs` calls that fail.
    list_failures: AtomicUsize,
    /// Events handed out by `read`.
    events_read: AtomicUsize,
    /// Microseconds every append takes (a slow disk).
    append_delay_us: AtomicUsize,
    /// Milliseconds every `create_run` takes to return once the run is recorded.
    create_delay_ms: AtomicUsize,
    /// `create_run` calls begun.
    creates_begun: AtomicUsize,
    /// `create_run` calls returned.
    creates_done: AtomicUsize,
    /// While set, every append waits (a stuck disk) until `unstuck` is notified.
    stuck: AtomicBool,
    unstuck: Notify,
    /// Every `create_run`, `put_run` and `append`, in order: the run record's status, or the
    /// types of the appended events.
    writes: Mutex<Vec<String>>,
}

impl Faulty {
    fn new() -> Self {
        Self {
            appends_ok: AtomicUsize::new(usize::MAX),
            ..Self::default()
        }
    }

    fn log(&self, write: String) {
        self.writes.lock().unwrap().push(write);
    }

    fn boom(what: &str) -> sluice_store::Error {
        sluice_store::Error::Backend {
            message: format!("injected {what} failure"),
            source: None,
        }
    }
}

#[async_trait]
impl Store for Faulty {
    async fn create_run(&self, record: &RunRecord) -> sluice_store::Result<()> {
        self.creates_begun.fetch_add(1, Ordering::SeqCst);
        self.log(format!("create_run {}", record.status.as_str()));
        self.inner.create_run(record).await?;
        // Recorded, but slow to say so (a busy writer): a caller may give up meanwhile.
        let delay = self.create_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        self.creates_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn get_run(&self, id: &str) -> sluice_store::Result<Option<RunRecord>> {
        self.inner.get_run(id).await
    }
    async fn put_run(&self, record: &RunRecord) -> sluice_store::Result<()> {
        self.log(format!("put_run {}", record.status.as_str()));
        self.inner.put_run(record).await
    }
    async fn list_runs(&self, filter: &RunFilter) -> sluice_store::Result<RunPage> {
        let failing = self
            .list_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Self::boom("list"));
        }
        self.inner.list_runs(filter).await
    }
    async fn delete_run(&self, id: &str) -> sluice_store::Result<()> {
        self.inner.delete_run(id).await
    }
    fn groups_appends(&self) -> bool {
        self.inner.groups_appends()
    }

    async fn append(&self, run_id: &str, events: &[RawEvent]) -> sluice_store::Result<()> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst);
        let types: Vec<&str> = events.iter().map(RawEvent::event_type).collect();
        self.log(format!("append {}", types.join(" ")));
        if n >= self.appends_ok.load(Ordering::SeqCst) {
            return Err(Self::boom("append"));
        }
        let delay = self.append_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay as u64)).await;
        }
        while self.stuck.load(Ordering::SeqCst) {
            let unstuck = self.unstuck.notified();
            if !self.stuck.load(Ordering::SeqCst) {
                break;
            }
            unstuck.await;
        }
        self.inner.append(run_id, events).await
    }
    async fn finish(&self, record: &RunRecord, terminal: &RawEvent) -> sluice_store::Result<()> {
        let of = self.fail_finish_of.lock().unwrap().clone();
        let counted = self
            .finish_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if counted
            || self.fail_finish.load(Ordering::SeqCst)
            || of.as_deref() == Some(record.id.as_str())
        {
            return Err(Self::boom("finish"));
        }
        self.inner.finish(record, terminal).await
    }
    async fn read(
        &self,
        run_id: &str,
        after: u64,
        limit: usize,
    ) -> sluice_store::Result<Vec<RawEvent>> {
        let got = self.inner.read(run_id, after, limit).await?;
        self.events_read.fetch_add(got.len(), Ordering::SeqCst);
        Ok(got)
    }
    async fn last_seq(&self, run_id: &str) -> sluice_store::Result<u64> {
        self.inner.last_seq(run_id).await
    }
    async fn wait_for(&self, run_id: &str, after: u64) -> sluice_store::Result<()> {
        self.inner.wait_for(run_id, after).await
    }
    async fn put_checkpoint(&self, run_id: &str, checkpoint: Bytes) -> sluice_store::Result<()> {
        self.inner.put_checkpoint(run_id, checkpoint).await
    }
    async fn get_checkpoint(&self, run_id: &str) -> sluice_store::Result<Option<Bytes>> {
        self.inner.get_checkpoint(run_id).await
    }
    async fn inbox_push(
        &self,
        run_id: &str,
        event_type: &str,
        data: &Value,
    ) -> sluice_store::Result<u64> {
        self.inner.inbox_push(run_id, event_type, data).await
    }
    async fn inbox_read(&self, run_id: &str) -> sluice_store::Result<Vec<InboxEntry>> {
        self.inner.inbox_read(run_id).await
    }
    async fn inbox_ack(&self, run_id: &str, up_to: u64) -> sluice_store::Result<()> {
        self.inner.inbox_ack(run_id, up_to).await
    }
    async fn create_session(&self, session: &SessionRecord) -> sluice_store::Result<()> {
        self.inner.create_session(session).await
    }
    async fn get_session(&self, id: &str) -> sluice_store::Result<Option<SessionRecord>> {
        self.inner.get_session(id).await
    }
    async fn put_session(&self, session: &SessionRecord) -> sluice_store::Result<()> {
        self.inner.put_session(session).await
    }
    async fn delete_session(&self, id: &str) -> sluice_store::Result<bool> {
        self.inner.delete_session(id).await
    }
}

/// A run started with a free slot is recorded `running` once, with its start time, and its
/// first events go into the log together: the step's first writes share the append of
/// `chain-started` and `step-started` (one commit fewer before a reader sees the step's output).
#[tokio::test]
async fn a_run_with_a_free_slot_is_recorded_running_once_and_its_first_events_share_an_append() {
    let store = Arc::new(Faulty::new());
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    let run = engine
        .start("ticker", input(json!({"n": 3})))
        .await
        .unwrap();
    let rec = run.record().await.unwrap();
    assert_eq!(rec.status, RunStatus::Running);
    assert_eq!(rec.started_at, Some(rec.created_at));
    let rec = bounded("the run", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    let writes = store.writes.lock().unwrap().clone();
    assert_eq!(
        writes[..2],
        [
            "create_run running",
            "append chain-started step-started tick tick tick step-completed"
        ],
        "{writes:#?}"
    );
    // Beyond its slot, a run is recorded `queued`, and `running` once it has one.
    let store = Arc::new(Faulty::new());
    let wf = Workflow::builder("one")
        .step(
            Step::new("wait", |_c: Context, _s: StartEvent| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Emit::stop(1))
            })
            .emits::<StopEvent>(),
        )
        .max_concurrent_runs(1)
        .queue(1)
        .build()
        .unwrap();
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let first = engine.start("one", input(json!(null))).await.unwrap();
    let second = engine.start("one", input(json!(null))).await.unwrap();
    let rec = second.record().await.unwrap();
    assert_eq!((rec.status, rec.started_at), (RunStatus::Queued, None));
    for run in [&first, &second] {
        let rec = bounded("the runs", run.wait()).await.unwrap();
        assert_eq!(rec.status, RunStatus::Completed);
        assert!(rec.started_at.unwrap() >= rec.created_at);
    }
    let writes = store.writes.lock().unwrap().clone();
    let records: Vec<&String> = writes.iter().filter(|w| !w.starts_with("append")).collect();
    assert_eq!(
        records[..3],
        ["create_run running", "create_run queued", "put_run running"],
        "{writes:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_ends_the_run_with_chain_error() {
    let store = Arc::new(Faulty::new());
    store.appends_ok.store(3, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    let run = engine
        .start("ticker", input(json!({"n": 1000, "delay_ms": 1})))
        .await
        .unwrap();
    let rec = bounded("store failure", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Failed);
    assert!(err.message.contains("store failed"), "{}", err.message);
    let all = events(store.clone(), run.id()).await;
    assert_eq!(all.last().unwrap().event_type, "chain-error");
    assert_eq!(all.last().unwrap().data["error"]["code"], "failed");
    assert_eq!(rec.last_seq, all.len() as u64);
    // The run is over for everyone.
    assert!(matches!(
        bounded("cancel", run.cancel()).await,
        Err(Error::RunFinished { .. })
    ));
    assert_eq!(engine.active_runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_written_at_completion_is_put_back_when_the_end_cannot_be_written() {
    let wf = Workflow::builder("remember")
        .step(
            Step::new("end", |_c: Context, _s: StartEvent| async move {
                Ok(Emit::stop("done").with_session_state(json!({"by": "run"})))
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let store = Arc::new(Faulty::new());
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let now = sluice_protocol::Timestamp::now();
    let session = SessionRecord {
        id: "ses_f".into(),
        created_at: now,
        updated_at: now,
        state: json!({"by": "before"}),
        active_run: None,
        owner: None,
    };
    store.create_session(&session).await.unwrap();
    let state = || async { store.get_session("ses_f").await.unwrap().unwrap().state };
    let start = || StartRun {
        session_id: Some("ses_f".into()),
        ..StartRun::default()
    };

    // The completed end fails once; the run then ends `failed`, and the session is as it was.
    store.finish_failures.store(1, Ordering::SeqCst);
    let run = engine.start("remember", start()).await.unwrap();
    let rec = bounded("failed end", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Failed, "{:?}", rec.error);
    assert_eq!(state().await, json!({"by": "before"}));

    // When it goes through, the state is the run's.
    let run = engine.start("remember", start()).await.unwrap();
    let rec = bounded("end", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(state().await, json!({"by": "run"}));
}

/// A shutdown that begins while a run is being created waits for the run's driver, which
/// stops at its checkpoint: `shutdown` never returns with a run half started, and no driver is
/// spawned after it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_run_being_started() {
    let store = Arc::new(Faulty::new());
    store.create_delay_ms.store(300, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    let starting = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .start("ticker", input(json!({"n": 1_000_000, "delay_ms": 1})))
                .await
                .map(|run| run.id().to_owned())
        }
    });
    bounded("create_run begins", async {
        while store.creates_begun.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(bounded("shutdown", engine.shutdown(Duration::from_secs(20))).await);
    // The start had recorded its run and spawned its driver (which the shutdown then stopped)
    // before the shutdown returned. (The start's own future may still be finishing.)
    assert_eq!(
        store.creates_done.load(Ordering::SeqCst),
        1,
        "shutdown returned while a run was still being started"
    );
    let id = bounded("the start returns", starting)
        .await
        .unwrap()
        .expect("the start began before the shutdown");
    assert_eq!(engine.active_runs(), 0);
    // Left for recovery at the next start, not ended.
    let rec = store.get_run(&id).await.unwrap().unwrap();
    assert!(!rec.status.is_terminal(), "{:?}", rec.status);
    // Once shut down, nothing starts.
    assert!(matches!(
        engine.start("ticker", input(json!({"n": 1}))).await,
        Err(Error::ShuttingDown)
    ));
}

/// A caller that gives up on `start` after the run was recorded (a client that disconnects)
/// does not leave the run without a driver: it runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_abandoned_after_the_run_was_recorded_still_runs() {
    let store = Arc::new(Faulty::new());
    store.create_delay_ms.store(300, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        engine.start("ticker", input(json!({"n": 3}))),
    )
    .await;
    assert!(gave_up.is_err(), "the start was still under way");
    let rec = bounded("the abandoned start's run completes", async {
        loop {
            let page = store.list_runs(&RunFilter::default()).await.unwrap();
            if let Some(r) = page.runs.first()
                && r.status.is_terminal()
            {
                break r.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(
        types(&events(store.clone(), &rec.id).await).last().copied(),
        Some("chain-completed")
    );
    assert_eq!(engine.active_runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_not_even_the_end_can_be_written_waiters_get_an_error() {
    let store = Arc::new(Faulty::new());
    store.appends_ok.store(2, Ordering::SeqCst);
    store.fail_finish.store(true, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    let run = engine
        .start("ticker", input(json!({"n": 1000, "delay_ms": 1})))
        .await
        .unwrap();
    let waited = bounded("wait on an abandoned run", run.wait()).await;
    match waited {
        Err(Error::Store(e)) => assert!(e.to_string().contains("store"), "{e}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    // Left for recovery: still `running` in the store, with no terminal event.
    let rec = store.get_run(run.id()).await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::Running);
    assert!(bounded("send", run.send("input", json!(1))).await.is_err());
    assert!(bounded("cancel", run.cancel()).await.is_err());
    assert_eq!(engine.active_runs(), 0);
}

// ---- 3. the run timeout under a step that never pauses ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_timeout_fires_while_a_step_writes_without_pause() {
    let wf = Workflow::builder("firehose")
        .stream_event("spray")
        .step(
            Step::new("spray", |c: Context, _s: StartEvent| async move {
                let mut i = 0u64;
                loop {
                    c.write_event_to_stream("spray", &i).await?;
                    i += 1;
                }
            })
            .emits::<StopEvent>(),
        )
        .run_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    // Appends slower than the step writes: the step's channel is never empty when the driver
    // looks at it.
    let store = Arc::new(Faulty::new());
    store.append_delay_us.store(2_000, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine.start("firehose", input(Value::Null)).await.unwrap();
    // 200 ms are enough; 10 s leave room for a slow machine, not for a starved timer.
    let rec = bounded_for(10, "run timeout under load", run.wait())
        .await
        .unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(rec.error.unwrap().code, ErrorCode::Timeout);
    let all = events(store, run.id()).await;
    assert_eq!(all.last().unwrap().event_type, "chain-error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_writing_large_events_waits_for_room_not_memory() {
    const EVENTS: usize = 40;
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let wf = Workflow::builder("blobs")
        .stream_event("blob")
        .step(
            Step::new("write", move |c: Context, _s: StartEvent| {
                let w = w.clone();
                async move {
                    let text = "x".repeat(1 << 20);
                    for i in 0..EVENTS {
                        c.write_event_to_stream("blob", &json!({"i": i, "text": text}))
                            .await?;
                        w.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Emit::stop(EVENTS))
                }
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    // The log is stuck from the run's first append (its lifecycle events) on, while the step
    // writes: it gets as far as the channel lets it.
    let store = Arc::new(Faulty::new());
    store.stuck.store(true, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine.start("blobs", input(Value::Null)).await.unwrap();
    let mut early = 0;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(Ordering::SeqCst);
        if now == early && now > 0 || now == EVENTS {
            break;
        }
        early = now;
    }
    // The channel would take 1,024 messages; its byte budget (8 MiB) takes seven of these.
    let early = written.load(Ordering::SeqCst);
    assert!(
        (1..16).contains(&early),
        "{early} MiB-sized writes returned while the log was stuck"
    );
    store.stuck.store(false, Ordering::SeqCst);
    store.unstuck.notify_waiters();
    let rec = bounded_for(30, "the run ends", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    let blobs: Vec<u64> = events(store, run.id())
        .await
        .iter()
        .filter(|e| e.event_type == "blob")
        .map(|e| e.data["i"].as_u64().unwrap())
        .collect();
    assert_eq!(blobs, (0..EVENTS as u64).collect::<Vec<_>>());
}

// ---- 4. acknowledged events survive the end of the run ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_acknowledged_to_a_step_are_in_the_log_before_the_end() {
    for round in 0..20 {
        let acked = Arc::new(AtomicUsize::new(0));
        let writer_gone = Arc::new(AtomicBool::new(false));
        let (a1, a2, gone) = (acked.clone(), acked.clone(), writer_gone.clone());
        /// Marks the writer's end (also when its task is aborted).
        struct Gone(Arc<AtomicBool>);
        impl Drop for Gone {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let wf = Workflow::builder("race")
            .stream_event("note")
            .step(
                Step::new("fork", |c: Context, _s: StartEvent| async move {
                    c.send_event(Left(0)).await?;
                    Ok(Right(0).into())
                })
                .emits::<Left>()
                .emits::<Right>(),
            )
            .step(
                Step::new("writer", move |c: Context, _l: Left| {
                    let (acked, gone) = (a1.clone(), gone.clone());
                    async move {
                        let _gone = Gone(gone);
                        loop {
                            c.write_event_to_stream("note", &json!({})).await?;
                            acked.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                        }
                    }
                })
                .emits::<StopEvent>(),
            )
            .step(
                Step::new("stopper", move |_c: Context, _r: Right| {
                    let acked = a2.clone();
                    async move {
                        while acked.load(Ordering::SeqCst) < 300 {
                            tokio::task::yield_now().await;
                        }
                        Ok(Emit::stop("done"))
                    }
                })
                .emits::<StopEvent>(),
            )
            .build()
            .unwrap();
        let store = Arc::new(MemoryStore::new());
        let engine = Engine::new(store.clone(), [wf]).unwrap();
        let run = engine.start("race", input(Value::Null)).await.unwrap();
        let rec = bounded("race", run.wait()).await.unwrap();
        assert_eq!(rec.status, RunStatus::Completed, "{:?}", rec.error);
        bounded("writer stops", async {
            while !writer_gone.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        let all = events(store, run.id()).await;
        let notes = all.iter().filter(|e| e.event_type == "note").count();
        assert_eq!(
            notes,
            acked.load(Ordering::SeqCst),
            "round {round}: every acknowledged write is in the log"
        );
    }
}

// ---- 5. collect_events and retries ----

#[tokio::test]
async fn a_retried_collector_neither_double_buffers_nor_loses_its_set() {
    let failed_once: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let f2 = failed_once.clone();
    let wf = Workflow::builder("collect-retry")
        .step(
            Step::new("fork", |c: Context, _s: StartEvent| async move {
                c.send_event(Left(1)).await?;
                c.send_event(Left(2)).await?;
                Ok(Emit::none())
            })
            .emits::<Left>(),
        )
        .step(
            Step::new("join", move |c: Context, l: Left| {
                let failed_once = f2.clone();
                async move {
                    let id = l.0;
                    let got = c.collect(l, 2)?;
                    // Every delivery fails once after collecting: once with the set incomplete,
                    // once with it complete.
                    if failed_once.lock().unwrap().insert(id) {
                        return Err(StepError::new(format!("transient failure for {id}")));
                    }
                    match got {
                        Some(all) => {
                            let mut ids: Vec<u32> = all.iter().map(|l| l.0).collect();
                            ids.sort_unstable();
                            Ok(Emit::stop(ids))
                        }
                        None => Ok(Emit::none()),
                    }
                }
            })
            .emits::<StopEvent>()
            .retry(RetryPolicy::exponential(3, Duration::from_millis(1))),
        )
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine
        .start("collect-retry", input(Value::Null))
        .await
        .unwrap();
    let rec = bounded("collect retry", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed, "{:?}", rec.error);
    assert_eq!(rec.result, Some(json!([1, 2])));
    assert_eq!(failed_once.lock().unwrap().len(), 2);
}

// ---- 6. a Context kept after its step completed ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_clone_cannot_write_after_its_step_completed() {
    let go = Arc::new(Notify::new());
    let late: Arc<Mutex<Option<Result<(), String>>>> = Arc::default();
    let late_done = Arc::new(Notify::new());
    let (go1, go2) = (go.clone(), go.clone());
    let (late1, late2) = (late.clone(), late.clone());
    let (done1, done2) = (late_done.clone(), late_done.clone());
    let wf = Workflow::builder("leaky")
        .stream_event("late")
        .stream_event("early")
        .step(
            Step::new("first", move |c: Context, _s: StartEvent| {
                let (go, late, done) = (go1.clone(), late1.clone(), done1.clone());
                async move {
                    let kept = c.clone();
                    tokio::spawn(async move {
                        go.notified().await;
                        let r = kept.write_event_to_stream("late", &json!({})).await;
                        let sent = kept.send_event(Right(9)).await;
                        assert!(sent.is_err(), "send_event after completion must fail");
                        *late.lock().unwrap() = Some(r.map_err(|e| e.to_string()));
                        done.notify_one();
                    });
                    c.write_event_to_stream("early", &json!({})).await?;
                    Ok(Left(1).into())
                }
            })
            .emits::<Left>()
            .emits::<Right>(),
        )
        .step(
            Step::new("second", move |_c: Context, _l: Left| {
                let (go, late, done) = (go2.clone(), late2.clone(), done2.clone());
                async move {
                    // Step 1 has completed (its step-completed is before this step-started).
                    go.notify_one();
                    done.notified().await;
                    let outcome = late.lock().unwrap().clone();
                    Ok(Emit::stop(json!({"late": format!("{outcome:?}")})))
                }
            })
            .emits::<StopEvent>(),
        )
        .step(
            Step::new(
                "never",
                |_c: Context, _r: Right| async move { Ok(Emit::none()) },
            )
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine.start("leaky", input(Value::Null)).await.unwrap();
    let rec = bounded("late write", run.wait()).await.unwrap();
    assert_eq!(rec.status, RunStatus::Completed, "{:?}", rec.error);
    let outcome = rec.result.unwrap()["late"].as_str().unwrap().to_owned();
    assert!(
        outcome.starts_with("Some(Err(") && outcome.contains("has completed"),
        "the late write fails with a clear error: {outcome}"
    );
    let all = events(store, run.id()).await;
    assert_eq!(
        types(&all),
        [
            "chain-started",
            "step-started",
            "early",
            "step-completed",
            "step-started",
            "step-completed",
            "chain-completed"
        ]
    );
}

// ---- 7. RunHandle::wait and record ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_does_not_read_the_log_and_record_has_a_live_last_seq() {
    let gate = Arc::new(Notify::new());
    let g2 = gate.clone();
    let wf = Workflow::builder("gated")
        .stream_event("tick")
        .step(
            Step::new("tick", move |c: Context, _s: StartEvent| {
                let gate = g2.clone();
                async move {
                    for i in 0..10 {
                        c.write_event_to_stream("tick", &i).await?;
                    }
                    gate.notified().await;
                    for i in 10..5000 {
                        c.write_event_to_stream("tick", &i).await?;
                    }
                    Ok(Emit::stop(5000))
                }
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap();
    let store = Arc::new(Faulty::new());
    let engine = Engine::new(store.clone(), [wf]).unwrap();
    let run = engine.start("gated", input(Value::Null)).await.unwrap();
    // chain-started, step-started and ten ticks are committed while the step waits.
    bounded("first ticks", async {
        while store.last_seq(run.id()).await.unwrap() < 12 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let live = run.record().await.unwrap();
    assert_eq!(live.status, RunStatus::Running);
    assert_eq!(
        live.last_seq, 12,
        "the record reports the log's live last seq"
    );
    let before = store.events_read.load(Ordering::SeqCst);
    let waiter = tokio::spawn({
        let run = run.clone();
        async move { run.wait().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.notify_one();
    let rec = bounded("wait", waiter).await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    let read = store.events_read.load(Ordering::SeqCst) - before;
    assert!(
        read < 1000,
        "wait must not replay the log: it read {read} of {} events",
        rec.last_seq
    );
}

// ---- 8 and 9. recovery ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_goes_on_past_runs_it_cannot_handle() {
    let store = Arc::new(Faulty::new());
    let mut orphan = RunRecord::new("run_0001_orphan", "gone", json!(null));
    orphan.status = RunStatus::Running;
    store.create_run(&orphan).await.unwrap();
    let mut good = RunRecord::new("run_0002_good", "ticker", json!({"n": 2}));
    good.status = RunStatus::Running;
    store.create_run(&good).await.unwrap();
    // The orphan cannot be interrupted, and the first listing fails.
    *store.fail_finish_of.lock().unwrap() = Some("run_0001_orphan".into());
    store.list_failures.store(1, Ordering::SeqCst);
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    let recovered = bounded("recover", engine.recover()).await.unwrap();
    assert_eq!(recovered.resumed, 1);
    assert_eq!(recovered.interrupted, 0);
    assert_eq!(
        recovered.errors, 2,
        "one failed listing, one failed interrupt"
    );
    let rec = bounded("good run", engine.handle("run_0002_good").wait())
        .await
        .unwrap();
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(
        store
            .get_run("run_0001_orphan")
            .await
            .unwrap()
            .unwrap()
            .status,
        RunStatus::Running,
        "left as it was for the next start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_recovered_with_an_empty_log_starts_with_chain_started() {
    // A crash right after the record went `running` and before `chain-started` was written.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut rec = RunRecord::new("run_crashed", "ticker", json!({"n": 2}));
    rec.status = RunStatus::Running;
    rec.started_at = Some(sluice_protocol::Timestamp::now());
    store.create_run(&rec).await.unwrap();
    let engine = Engine::new(store.clone(), [builtin::ticker()]).unwrap();
    assert_eq!(engine.recover().await.unwrap().resumed, 1);
    let rec = bounded("recovered run", engine.handle("run_crashed").wait())
        .await
        .unwrap();
    assert_eq!(rec.status, RunStatus::Completed, "{:?}", rec.error);
    let all = events(store, "run_crashed").await;
    assert_eq!(
        types(&all),
        [
            "chain-started",
            "step-started",
            "tick",
            "tick",
            "step-completed",
            "chain-completed"
        ]
    );
    assert_eq!(
        all[0].data,
        json!({"workflow": "ticker", "input": {"n": 2}})
    );
}

#[tokio::test]
async fn wait_follows_a_run_through_a_pause_and_another_engine() {
    // wait() on a run whose engine shut down while it waited: returns once the run ends, here
    // driven by a second engine on the same store.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = Engine::new(store.clone(), [builtin::ask_human()]).unwrap();
    let run = first.start("ask-human", input(Value::Null)).await.unwrap();
    let mut evs = std::pin::pin!(run.envelopes(0));
    while let Some(e) = evs.next().await {
        if e.unwrap().event_type == "input-requested" {
            break;
        }
    }
    let waiter = tokio::spawn({
        let h = run.clone();
        async move { h.wait().await }
    });
    assert!(first.shutdown(Duration::from_secs(5)).await);
    let second = Engine::new(store.clone(), [builtin::ask_human()]).unwrap();
    bounded("send", async {
        loop {
            match second.send(run.id(), "input", json!("ok")).await {
                Ok(()) => break,
                Err(Error::NotWaiting { .. }) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    let rec = bounded("waiter", waiter).await.unwrap().unwrap();
    assert_eq!(rec.result, Some(json!({"answer": "ok"})));
}
