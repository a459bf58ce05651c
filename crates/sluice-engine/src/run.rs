//! The driver: one task per active run, the only writer of its log.

use std::any::Any;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_protocol::payload::{
    ChainCancelled, ChainCompleted, ChainError, ChainResumed, ChainStarted, ErrorCode, ErrorInfo,
    StepCompleted, StepStarted, ToolResult, ToolResults,
};
use sluice_protocol::{EnvelopeWriter, RawEvent, RunRecord, RunStatus, Timestamp, Usage, kind};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::{JoinError, JoinSet};

use crate::checkpoint::{CHECKPOINT_VERSION, Checkpoint, CollectBuf, Delivery, Wait};
use crate::context::{Context, Done, Failure, Msg, RunShared, StepGate};
use crate::engine::{EngineInner, Slot, WaitingRun};
use crate::event::{AnyEvent, StartEvent, StopEvent, ToolResultsEvent, WorkflowEvent};
use crate::step::{Emit, Step};
use crate::workflow::Workflow;
use crate::{Error, Result, StepError};

/// Messages a step may have in flight before `write_event_to_stream` waits.
const STEP_CHANNEL: usize = 1024;

/// Below this many messages, the driver yields once to let the batch grow before committing it.
const SMALL_BATCH: usize = 64;

/// The driver's receive buffer starts (and shrinks back to) this many messages.
const MIN_BATCH_BUF: usize = 16;

/// A run's first batch takes at most this many messages, each next one twice as many, up to
/// [`STEP_CHANNEL`]: a step that writes a burst at once has its first events committed (and
/// seen) after a small append, not after a thousand-event one.
const FIRST_BATCH: usize = 8;

/// How often a driver that met a store error tries to write the run's end, and the wait before
/// the second try (doubling after each).
const END_ATTEMPTS: u32 = 5;
const END_BACKOFF: Duration = Duration::from_millis(20);

/// Requests from outside to a run's driver.
pub(crate) enum Control {
    /// Boxed: every slot of a run's control channel is as large as the largest message, and
    /// a channel's first block (32 slots) is allocated with the run.
    Deliver(Box<Inbound>),
    /// `taken` is answered as soon as the driver has the cancel: one that is dropped unread
    /// (its driver let go of the run between the sender's lookup and its send) is sent again.
    Cancel {
        reason: Option<String>,
        taken: oneshot::Sender<()>,
    },
}

/// Tells a cancel's sender that the driver has it.
fn took(taken: oneshot::Sender<()>) {
    let _ = taken.send(());
}

/// An event sent into a run, and where its answer goes.
pub(crate) struct Inbound {
    pub event_type: String,
    pub data: Value,
    pub reply: oneshot::Sender<Result<()>>,
}

/// A place in a workflow's queue: its semaphore's acquire, already polled once (tokio's
/// semaphore hands out permits in the order its waiters first waited), for the driver to await.
pub(crate) type InLine = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::result::Result<OwnedSemaphorePermit, tokio::sync::AcquireError>,
            > + Send,
    >,
>;

/// Takes a place in `slot`'s queue now, so that runs queued one after another (at startup, all
/// the recovered ones in a row) get their slots in that order, whichever driver runs first.
pub(crate) async fn get_in_line(slot: &Slot) -> InLine {
    let mut acquire: InLine = Box::pin(slot.semaphore.clone().acquire_owned());
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(acquire.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(r) => Box::pin(std::future::ready(r)),
        std::task::Poll::Pending => acquire,
    }
}

/// How a driver starts.
pub(crate) enum Mode {
    /// A new run (status `queued`), with its slot if one was free at once.
    Fresh(Option<OwnedSemaphorePermit>),
    /// A `waiting` run with a control message on its way.
    Wake,
    /// A run found `running` at startup.
    Recover,
}

enum Outcome {
    /// The result, and the session's new state to write first (see `Emit::with_session_state`).
    Completed(Value, Option<Value>),
    Failed(ErrorInfo),
    Cancelled(Option<String>),
    Sleep,
    Shutdown,
}

/// The deepest a run's result may nest. The record holding it, and the `chain-completed`
/// event around it, are read back by stores and clients with JSON parsers that stop at 128
/// levels (serde_json's default): a deeper result would make the run unreadable.
const MAX_RESULT_DEPTH: usize = 100;

fn failed(code: ErrorCode, message: impl Into<String>) -> Outcome {
    Outcome::Failed(ErrorInfo {
        code,
        message: message.into(),
        details: None,
    })
}

pub(crate) struct Driver {
    engine: Arc<EngineInner>,
    slot: Arc<Slot>,
    wf: Workflow,
    shared: Arc<RunShared>,
    rx: mpsc::Receiver<Msg>,
    ctl: mpsc::Receiver<Control>,
    record: RunRecord,
    next_seq: u64,
    buf: Vec<RawEvent>,
    writer: EnvelopeWriter,
    queues: Vec<VecDeque<Delivery>>,
    busy: Vec<usize>,
    /// Running step instances: number → (step index, its delivery).
    in_flight: HashMap<u32, (usize, Delivery)>,
    tasks: JoinSet<()>,
    /// Which step instance each task runs, to report a task that died without its `Done`.
    task_steps: HashMap<tokio::task::Id, u32>,
    waits: Vec<Wait>,
    step_counter: u32,
    delivery_counter: u64,
    /// Whether the run counts in its workflow's queue.
    in_queue: bool,
    /// The run's slot of its workflow while it runs (for a recovered run, taken by
    /// `Engine::recover` when one was free).
    pub(crate) permit: Option<OwnedSemaphorePermit>,
    deadline: Option<tokio::time::Instant>,
    /// Milliseconds spent waiting for input (not counted toward `run_timeout`), and since when
    /// the run waits now (see [`Checkpoint::waited_ms`]).
    waited_ms: u64,
    waiting_since: Option<Timestamp>,
    started: Instant,
    boundary: bool,
    acks: Vec<oneshot::Sender<Result<()>>>,
    /// Set while the run's record is `waiting`: it counts the run in the workflow's gauge, and
    /// uncounts it when the run leaves `waiting` or the driver ends without keeping it.
    waiting: Option<WaitingRun>,
    /// A run that must end before this one starts.
    pub(crate) after_run: Option<String>,
    /// The run's place in its workflow's queue, when it was queued before its driver ran.
    pub(crate) in_line: Option<InLine>,
    /// The state the run's session had before the run's completion wrote it, until the end is
    /// written: put back if the end fails.
    session_before: Option<Value>,
}

impl Driver {
    pub(crate) fn new(
        engine: Arc<EngineInner>,
        slot: Arc<Slot>,
        record: RunRecord,
        ctl: mpsc::Receiver<Control>,
    ) -> Self {
        let wf = slot.wf.clone();
        let writer = EnvelopeWriter::new(&record.id);
        let (tx, rx) = mpsc::channel(STEP_CHANNEL);
        let shared = Arc::new(RunShared {
            run_id: record.id.clone(),
            tx,
            stream_bytes: Arc::new(tokio::sync::Semaphore::new(crate::context::STREAM_BYTES)),
            state: Mutex::default(),
            collected: Mutex::default(),
            cancel: engine.token.child_token(),
            usage: Mutex::new(record.usage),
            store: engine.store.clone(),
            sessions: engine.sessions.clone(),
            session_id: record.session_id.clone(),
            workflow: wf.clone(),
        });
        let n = wf.inner.steps.len();
        Self {
            engine,
            slot,
            wf,
            shared,
            rx,
            ctl,
            record,
            next_seq: 1,
            buf: Vec::new(),
            writer,
            queues: vec![VecDeque::new(); n],
            busy: vec![0; n],
            in_flight: HashMap::new(),
            tasks: JoinSet::new(),
            task_steps: HashMap::new(),
            waits: Vec::new(),
            step_counter: 0,
            delivery_counter: 0,
            in_queue: false,
            permit: None,
            deadline: None,
            waited_ms: 0,
            waiting_since: None,
            started: Instant::now(),
            boundary: false,
            acks: Vec::new(),
            waiting: None,
            after_run: None,
            in_line: None,
            session_before: None,
        }
    }

    /// Drives the run until it ends, sleeps, or the engine shuts down. A driver error (the store
    /// failed) ends the run with `chain-error`; when even that cannot be written, the run is left
    /// for recovery at the next start and the engine's waiters get the error.
    pub(crate) async fn run(mut self, mode: Mode) {
        if let Mode::Wake = mode {
            // Only a `waiting` run is woken, and it was counted when it went waiting.
            self.waiting = Some(WaitingRun::adopt(&self.slot));
        }
        if let Err(e) = self.drive(mode).await {
            // Boxed, as the admission below: a rare path's state would otherwise be part of
            // every run's task for its whole life.
            Box::pin(self.on_driver_error(e)).await;
        }
    }

    async fn drive(&mut self, mode: Mode) -> Result<()> {
        self.next_seq = self.engine.store.last_seq(&self.record.id).await? + 1;
        let mut waking = false;
        match mode {
            Mode::Fresh(reserved) => {
                self.in_queue = reserved.is_none();
                // The clock runs from the run's creation, while it queues too.
                self.set_deadline();
                // Boxed: waiting for a slot (or for the session's run ahead) is the largest
                // state a driver has, and most runs pass through it at once or not at all.
                let Some(permit) = Box::pin(self.admit(reserved)).await? else {
                    return Ok(());
                };
                self.permit = Some(permit);
                self.begin_fresh().await?;
            }
            Mode::Wake => {
                if let Err(message) = self.restore().await {
                    return self
                        .end(failed(
                            ErrorCode::Interrupted,
                            format!("could not resume: {message}"),
                        ))
                        .await;
                }
                waking = true;
            }
            Mode::Recover => {
                if let Err(message) = self.restore().await {
                    return self
                        .end(failed(
                            ErrorCode::Interrupted,
                            format!("could not resume after a restart: {message}"),
                        ))
                        .await;
                }
                if self.permit.is_none() {
                    match self.resume_slot().await? {
                        Ok(permit) => self.permit = Some(permit),
                        Err(outcome) => return self.end(outcome).await,
                    }
                }
                self.resume().await?;
            }
        }
        loop {
            if waking {
                match self.wake().await? {
                    Some(Outcome::Sleep) => {
                        if self.try_release() {
                            self.keep_waiting();
                            return Ok(());
                        }
                        continue;
                    }
                    Some(other) => return self.end(other).await,
                    None => {}
                }
            }
            let outcome = self.main_loop().await?;
            match outcome {
                Outcome::Sleep => {
                    self.sleep().await?;
                    if self.try_release() {
                        self.keep_waiting();
                        return Ok(());
                    }
                    waking = true;
                }
                other => return self.end(other).await,
            }
        }
    }

    // ---- admission ----

    /// Waits for a slot of the workflow while queued; `None` if cancelled or shut down meanwhile
    /// (the run has then been ended or left for recovery).
    async fn admit(
        &mut self,
        reserved: Option<OwnedSemaphorePermit>,
    ) -> Result<Option<OwnedSemaphorePermit>> {
        let slot = self.slot.clone();
        let mut ahead = self.after_run.take();
        while let Some(prev) = ahead {
            let store = self.engine.store.clone();
            let from = store.last_seq(&prev).await?;
            let waited_for = prev.clone();
            let previous_ends = async move {
                let mut events =
                    std::pin::pin!(sluice_store::follow(store, prev, from.saturating_sub(1)));
                while let Some(Ok(_)) = events.next().await {}
            };
            if self.queued(previous_ends).await?.is_none() {
                return Ok(None);
            }
            // The run ahead may have been a queued one that was cancelled: the line then goes
            // on behind the newest run of the session before this one that has not ended.
            // (A store shows a run's final record with its terminal event, so the run just
            // waited for is not found again; were it, waiting again would return at once.)
            ahead = match &self.record.session_id {
                Some(session) => self
                    .engine
                    .previous_in_session(session, &self.record.id)
                    .await?
                    .filter(|next| *next != waited_for),
                None => None,
            };
        }
        let permit = match reserved {
            Some(p) => p,
            None => {
                let acquire = match self.in_line.take() {
                    Some(place) => place,
                    None => Box::pin(slot.semaphore.clone().acquire_owned()),
                };
                let Some(acquired) = self.queued(acquire).await? else {
                    return Ok(None);
                };
                self.leave_queue();
                match acquired {
                    Ok(p) => p,
                    Err(_closed) => {
                        self.engine.release(&self.record.id);
                        return Ok(None);
                    }
                }
            }
        };
        Ok(Some(permit))
    }

    /// While the run is queued: waits for `ready`, refusing deliveries (a queued run waits for
    /// nothing) and honouring cancel and shutdown. `None` when the run was cancelled (and ended)
    /// or the engine shuts down (and the run is left for recovery); either way it left the queue.
    async fn queued<T>(
        &mut self,
        ready: impl std::future::Future<Output = T>,
    ) -> Result<Option<T>> {
        tokio::pin!(ready);
        let deadline = self.deadline;
        loop {
            tokio::select! {
                biased;
                _ = self.engine.token.cancelled() => break,
                // Its run_timeout ran out before it got a slot: it ends without starting.
                () = sleep_until(deadline) => {
                    self.leave_queue();
                    let timeout = self.timeout();
                    self.end(timeout).await?;
                    return Ok(None);
                }
                c = self.ctl.recv() => match c {
                    Some(Control::Cancel { reason, taken }) => {
                        took(taken);
                        self.leave_queue();
                        self.end(Outcome::Cancelled(reason)).await?;
                        return Ok(None);
                    }
                    Some(Control::Deliver(d)) => {
                        let Inbound { event_type, reply, .. } = *d;
                        let run_id = self.record.id.clone();
                        let _ = reply.send(Err(Error::NotWaiting { run_id, event_type, waiting_for: Vec::new() }));
                    }
                    None => break,
                },
                v = &mut ready => return Ok(Some(v)),
            }
        }
        self.leave_queue();
        self.engine.release(&self.record.id);
        Ok(None)
    }

    /// Leaves the workflow's queue, once.
    fn leave_queue(&mut self) {
        if std::mem::take(&mut self.in_queue) {
            self.slot.leave_queue();
        }
    }

    /// A slot for a run that was admitted before and goes on now: woken from `waiting` with its
    /// input, or recovered after a restart. When none is free, the run becomes `queued` until
    /// one is, and first checkpoints what it has accepted, so that the deliveries that woke it
    /// are durable and answered now rather than when a slot frees. Meanwhile further deliveries
    /// are accepted and checkpointed the same way. `Err` with the outcome to end with when a
    /// cancel (`Cancelled`) or shutdown (`Shutdown`: the `queued` run then goes on from its
    /// checkpoint at the next start) comes first, or `Failed` when the run's `run_timeout` runs
    /// out meanwhile.
    async fn resume_slot(&mut self) -> Result<std::result::Result<OwnedSemaphorePermit, Outcome>> {
        if let Ok(permit) = self.slot.semaphore.clone().try_acquire_owned() {
            return Ok(Ok(permit));
        }
        self.record.status = RunStatus::Queued;
        self.record.last_seq = self.next_seq - 1;
        self.record.usage = self.usage();
        // Into the queue count before the record says `queued`, out of the waiting one.
        self.waiting = None;
        if !self.in_queue {
            self.in_queue = true;
            self.slot.enter_queue();
        }
        self.engine.store.put_run(&self.record).await?;
        self.checkpoint().await?;
        let acquire = self.slot.semaphore.clone().acquire_owned();
        tokio::pin!(acquire);
        let mut open = true;
        // The run's `run_timeout` goes on counting while it queues for a slot.
        self.set_deadline();
        let deadline = self.deadline;
        let outcome = loop {
            tokio::select! {
                biased;
                _ = self.engine.token.cancelled() => break Outcome::Shutdown,
                () = sleep_until(deadline) => break self.timeout(),
                c = self.ctl.recv(), if open => match c {
                    Some(Control::Cancel { reason, taken }) => {
                        took(taken);
                        break Outcome::Cancelled(reason);
                    }
                    Some(Control::Deliver(d)) => {
                        let Inbound { event_type, data, reply } = *d;
                        match self.accept_delivery(&event_type, data) {
                            Ok(()) => {
                                self.acks.push(reply);
                                self.checkpoint().await?;
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    None => open = false,
                },
                p = &mut acquire => match p {
                    Ok(permit) => {
                        self.leave_queue();
                        return Ok(Ok(permit));
                    }
                    // The engine closed the workflow's slots: it is going away.
                    Err(_closed) => break Outcome::Shutdown,
                },
            }
        };
        self.leave_queue();
        Ok(Err(outcome))
    }

    // ---- starting ----

    async fn begin_fresh(&mut self) -> Result<()> {
        // A run created with its slot was recorded `running` already (`Engine::start`).
        if self.record.status != RunStatus::Running || self.record.started_at.is_none() {
            self.record.status = RunStatus::Running;
            self.record.started_at = Some(Timestamp::now());
            self.engine.store.put_run(&self.record).await?;
        }
        self.set_deadline();
        self.push_chain_started();
        self.route(AnyEvent {
            name: StartEvent::NAME.to_owned(),
            data: self.record.input.clone(),
        })
        .map_err(|_| Error::InvalidWorkflow {
            workflow: self.wf.name().to_owned(),
            message: "no start step".into(),
        })?;
        Ok(())
    }

    fn push_chain_started(&mut self) {
        let started = ChainStarted {
            workflow: self.wf.name().to_owned(),
            input: self.record.input.clone(),
            session_id: self.record.session_id.clone(),
        };
        self.push(kind::CHAIN_STARTED, None, &started);
    }

    /// The run's `run_timeout` counts from its start, less the time it waited for input.
    fn set_deadline(&mut self) {
        // From the run's creation: time queued for its first slot counts (DESIGN: a run that
        // waits in a full queue past its timeout has timed out), time `waiting` does not.
        let started = self.record.created_at;
        let waited = self.waited_ms;
        self.deadline = self.wf.inner.run_timeout.map(|limit| {
            let since_start = Timestamp::now().millis_since(started);
            let elapsed = Duration::from_millis(since_start.saturating_sub(waited));
            tokio::time::Instant::now() + limit.saturating_sub(elapsed)
        });
    }

    /// Input arrived: the wait for it ends, and the time it took stops counting against the
    /// run's `run_timeout`.
    fn end_wait(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.waited_ms = self
                .waited_ms
                .saturating_add(Timestamp::now().millis_since(since));
        }
    }

    /// Loads the checkpoint (a run interrupted before its first one restarts from its input).
    async fn restore(&mut self) -> std::result::Result<(), String> {
        let cp = match self.engine.store.get_checkpoint(&self.record.id).await {
            Ok(cp) => cp,
            Err(e) => return Err(e.to_string()),
        };
        let cp: Checkpoint = match cp {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("unreadable checkpoint: {e}"))?
            }
            None => Checkpoint {
                version: CHECKPOINT_VERSION,
                queues: self
                    .start_steps()
                    .map(|name| {
                        (
                            name,
                            vec![Delivery {
                                event: AnyEvent {
                                    name: StartEvent::NAME.to_owned(),
                                    data: self.record.input.clone(),
                                },
                                id: 0,
                            }],
                        )
                    })
                    .collect(),
                ..Checkpoint::default()
            },
        };
        if cp.version > CHECKPOINT_VERSION {
            return Err(format!(
                "checkpoint version {} is newer than this server",
                cp.version
            ));
        }
        // Deliveries of a version 1 checkpoint have no id: number them after the known ones.
        let known = cp
            .queues
            .iter()
            .flat_map(|(_, q)| q.iter().map(|d| d.id))
            .chain(cp.collect.values().flat_map(|b| {
                b.pending
                    .iter()
                    .map(|(d, _)| *d)
                    .chain(b.done.iter().map(|(d, _)| *d))
            }))
            .max()
            .unwrap_or(0);
        self.delivery_counter = cp.delivery_counter.max(known);
        let mut collect = cp.collect;
        for (name, events) in cp.collected {
            let buf = collect.entry(name).or_default();
            for event in events {
                self.delivery_counter += 1;
                buf.pending.push((self.delivery_counter, event));
            }
        }
        *self.shared.state.lock().unwrap_or_else(|p| p.into_inner()) = cp.state;
        *self
            .shared
            .collected
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = collect;
        *self.shared.usage.lock().unwrap_or_else(|p| p.into_inner()) = cp.usage;
        for (name, deliveries) in cp.queues {
            let Some(i) = self.wf.inner.steps.iter().position(|s| s.name == name) else {
                return Err(format!(
                    "step {name:?} of the checkpoint is no longer in the workflow"
                ));
            };
            for mut d in deliveries {
                if d.id == 0 {
                    self.delivery_counter += 1;
                    d.id = self.delivery_counter;
                }
                self.queues[i].push_back(d);
            }
        }
        self.waits = cp.waits;
        self.step_counter = cp.step_counter;
        self.waited_ms = cp.waited_ms;
        self.waiting_since = cp.waiting_since;
        Ok(())
    }

    fn start_steps(&self) -> impl Iterator<Item = String> + '_ {
        let idx = self
            .wf
            .inner
            .routes
            .get(StartEvent::NAME)
            .cloned()
            .unwrap_or_default();
        idx.into_iter().map(|i| self.wf.inner.steps[i].name.clone())
    }

    /// Continues after a pause or a restart: `chain-resumed`, status `running`.
    async fn resume(&mut self) -> Result<()> {
        self.record.status = RunStatus::Running;
        // Out of the waiting count before the record says `running` (whoever reads the new
        // status sees the new count); should the write fail, the run ends anyway.
        self.waiting = None;
        if self.record.started_at.is_none() {
            self.record.started_at = Some(Timestamp::now());
        }
        self.record.last_seq = self.next_seq - 1;
        self.engine.store.put_run(&self.record).await?;
        self.set_deadline();
        if self.next_seq == 1 {
            // Interrupted before anything was written, not even `chain-started`: it starts now.
            self.push_chain_started();
        } else {
            self.push(
                kind::CHAIN_RESUMED,
                None,
                &ChainResumed {
                    from_step: self.step_counter,
                },
            );
        }
        Ok(())
    }

    /// While woken from `waiting`: handles control messages until one resumes the run
    /// (`None`), or none is left (`Some(Sleep)`), or the run ends.
    async fn wake(&mut self) -> Result<Option<Outcome>> {
        loop {
            let c = tokio::select! {
                biased;
                _ = self.engine.token.cancelled() => return Ok(Some(Outcome::Shutdown)),
                c = self.ctl.recv() => c,
                () = tokio::time::sleep(Duration::from_millis(50)) => None,
            };
            match c {
                None => return Ok(Some(Outcome::Sleep)),
                Some(Control::Cancel { reason, taken }) => {
                    took(taken);
                    return Ok(Some(Outcome::Cancelled(reason)));
                }
                Some(Control::Deliver(d)) => {
                    let Inbound {
                        event_type,
                        data,
                        reply,
                    } = *d;
                    match self.accept_delivery(&event_type, data) {
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                        Ok(()) => {
                            self.acks.push(reply);
                            self.end_wait();
                            match self.resume_slot().await? {
                                Ok(permit) => self.permit = Some(permit),
                                Err(outcome) => return Ok(Some(outcome)),
                            }
                            self.resume().await?;
                            // The delivery is durable once checkpointed; only then is it acknowledged.
                            self.checkpoint().await?;
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    /// Checks an inbound event against the outstanding waits and routes it.
    fn accept_delivery(&mut self, event_type: &str, data: Value) -> Result<()> {
        let Some(pos) = self.waits.iter().position(|w| w.reply == event_type) else {
            return Err(Error::NotWaiting {
                run_id: self.record.id.clone(),
                event_type: event_type.to_owned(),
                waiting_for: self.waits.iter().map(|w| w.reply.clone()).collect(),
            });
        };
        if event_type == ToolResultsEvent::NAME {
            check_tool_results(&data)?;
        }
        self.waits.remove(pos);
        let event = AnyEvent {
            name: event_type.to_owned(),
            data,
        };
        let targets = self
            .wf
            .inner
            .routes
            .get(event_type)
            .cloned()
            .unwrap_or_default();
        for i in targets {
            self.enqueue(i, event.clone());
        }
        self.boundary = true;
        Ok(())
    }

    // ---- the main loop ----

    async fn main_loop(&mut self) -> Result<Outcome> {
        // Grows with the batches actually received (and shrinks back after a burst): a run
        // that streams a token at a time holds a few slots, not STEP_CHANNEL of them.
        let mut msgs = Vec::with_capacity(MIN_BATCH_BUF);
        let mut batch = FIRST_BATCH;
        // A store whose appends wait for a group commit lets the next batch grow by itself.
        let yield_first = !self.engine.store.groups_appends();
        let mut first_turn = true;
        loop {
            // Checked on every turn: a step that keeps the channel full cannot starve it.
            if let Some(outcome) = self.timed_out() {
                return Ok(outcome);
            }
            if let Some(outcome) = self.dispatch() {
                return Ok(outcome);
            }
            if std::mem::take(&mut first_turn) {
                // The steps just started get to run before the first append, so that what
                // they write at once shares it with `chain-started` and `step-started`: a
                // run's first events then reach readers one commit sooner.
                tokio::task::yield_now().await;
                while msgs.len() < batch {
                    let Ok(m) = self.rx.try_recv() else { break };
                    msgs.push(m);
                }
                if let Some(outcome) = self.take_all(&mut msgs) {
                    return Ok(outcome);
                }
                // As after any batch: into the log, a checkpoint at a step's end, and what they
                // sent may start other steps.
                self.settle().await?;
                continue;
            }
            // Everything produced so far becomes visible before the driver blocks.
            self.flush().await?;
            let deadline = self.deadline;
            let outcome = tokio::select! {
                biased;
                _ = self.engine.token.cancelled() => Some(Outcome::Shutdown),
                c = self.ctl.recv() => match c {
                    Some(Control::Cancel { reason, taken }) => {
                        took(taken);
                        Some(Outcome::Cancelled(reason))
                    }
                    Some(Control::Deliver(d)) => {
                        let Inbound { event_type, data, reply } = *d;
                        match self.accept_delivery(&event_type, data) {
                            Ok(()) => self.acks.push(reply),
                            Err(e) => { let _ = reply.send(Err(e)); }
                        }
                        None
                    }
                    None => None,
                },
                // Finished tasks are reaped as they finish; one that died without its `Done`
                // (a panic outside the step's future, an abort) fails its step.
                Some(joined) = self.tasks.join_next_with_id() => self.on_joined(joined),
                n = self.rx.recv_many(&mut msgs, batch) => {
                    let limit = batch;
                    batch = (batch * 2).min(STEP_CHANNEL);
                    // Under load, let producers add to a small batch before it is committed:
                    // it keeps an overloaded server batching, at a cost of milliseconds to paced
                    // events; not where the store groups appends (ARCHITECTURE.md, Decisions).
                    let mut n = n;
                    if yield_first && n < SMALL_BATCH {
                        tokio::task::yield_now().await;
                        while n < limit {
                            let Ok(m) = self.rx.try_recv() else { break };
                            msgs.push(m);
                            n += 1;
                        }
                    }
                    let out = self.take_all(&mut msgs);
                    if msgs.capacity() > 4 * n.max(MIN_BATCH_BUF) {
                        msgs.shrink_to(n.max(MIN_BATCH_BUF));
                    }
                    out
                }
                () = sleep_until(deadline) => Some(self.timeout()),
            };
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            self.settle().await?;
        }
    }

    /// After a batch: its events into the log, and a checkpoint when a step ended.
    async fn settle(&mut self) -> Result<()> {
        self.flush().await?;
        if self.boundary {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Handles the messages taken from the channel, in order; the outcome of the first that
    /// ends the run.
    fn take_all(&mut self, msgs: &mut Vec<Msg>) -> Option<Outcome> {
        let mut out = None;
        for m in msgs.drain(..) {
            match out {
                None => out = self.on_msg(m),
                // The run ends; what steps wrote before still goes into the log.
                Some(_) => self.keep_stream(m),
            }
        }
        out
    }

    fn timeout(&self) -> Outcome {
        let limit = self.wf.inner.run_timeout.unwrap_or_default();
        failed(
            ErrorCode::Timeout,
            format!("the run exceeded its run_timeout of {limit:?}"),
        )
    }

    fn timed_out(&self) -> Option<Outcome> {
        let deadline = self.deadline?;
        (tokio::time::Instant::now() >= deadline).then(|| self.timeout())
    }

    /// A step task has ended. Normally its `Done` is on the channel already; if it panicked or
    /// was aborted outside the step's future, there is none and the step fails here.
    fn on_joined(
        &mut self,
        joined: std::result::Result<(tokio::task::Id, ()), JoinError>,
    ) -> Option<Outcome> {
        let err = match joined {
            Ok((id, ())) => {
                self.task_steps.remove(&id);
                return None;
            }
            Err(e) => e,
        };
        let n = self.task_steps.remove(&err.id())?;
        if !self.in_flight.contains_key(&n) {
            return None;
        }
        let failure = if err.is_panic() {
            let what = panic_message(&*err.into_panic());
            Failure {
                error: StepError::new(format!("panicked: {what}")).no_retry(),
                panicked: true,
            }
        } else {
            Failure {
                error: StepError::new("its task was aborted").no_retry(),
                panicked: false,
            }
        };
        self.on_done(n, Err(failure), Duration::ZERO)
    }

    /// Starts step instances for queued events; ends the run when nothing can happen any more.
    fn dispatch(&mut self) -> Option<Outcome> {
        for i in 0..self.queues.len() {
            while self.busy[i] < self.wf.inner.steps[i].num_workers {
                let Some(delivery) = self.queues[i].pop_front() else {
                    break;
                };
                if self.step_counter >= self.wf.inner.max_steps {
                    return Some(failed(
                        ErrorCode::MaxSteps,
                        format!(
                            "the run reached its budget of {} steps",
                            self.wf.inner.max_steps
                        ),
                    ));
                }
                self.start_step(i, delivery);
            }
        }
        if self.in_flight.is_empty() {
            if !self.waits.is_empty() {
                return Some(Outcome::Sleep);
            }
            return Some(failed(
                ErrorCode::Failed,
                "the workflow stalled: no step is running, no event is pending and nothing is awaited",
            ));
        }
        None
    }

    fn start_step(&mut self, i: usize, delivery: Delivery) {
        self.step_counter += 1;
        let n = self.step_counter;
        let step: &Step = &self.wf.inner.steps[i];
        let started = StepStarted {
            name: step.name.clone(),
        };
        let gate = Arc::new(StepGate::default());
        let ctx = Context::new(
            self.shared.clone(),
            n,
            Arc::from(step.name.as_str()),
            delivery.id,
            gate.clone(),
        );
        let (handler, retry, timeout) = (step.handler.clone(), step.retry.clone(), step.timeout);
        self.push(kind::STEP_STARTED, Some(n), &started);
        self.busy[i] += 1;
        let event = delivery.event.clone();
        self.in_flight.insert(n, (i, delivery));
        let tx = self.shared.tx.clone();
        let task = self.tasks.spawn(async move {
            let t0 = Instant::now();
            let mut attempt = 1u32;
            let outcome = loop {
                match run_attempt(&handler, &ctx, &event, timeout).await {
                    Ok(Ok(emit)) => break Ok(emit),
                    Ok(Err(e)) if e.retryable && attempt < retry.max_attempts => {
                        tracing::debug!(run_id = %ctx.run_id(), step = n, attempt, error = %e, "step failed; retrying");
                        tokio::time::sleep(jitter(retry.backoff(attempt))).await;
                        attempt += 1;
                    }
                    Ok(Err(error)) => break Err(Failure { error, panicked: false }),
                    Err(panic) => {
                        let what = panic_message(&*panic);
                        break Err(Failure { error: StepError::new(format!("panicked: {what}")).no_retry(), panicked: true });
                    }
                }
            };
            // Writes of `Context` clones still under way go on the channel before `Done`;
            // later ones fail.
            gate.close().await;
            let done = Done { step: n, outcome, duration: t0.elapsed() };
            let _ = tx.send(Msg::Done(Box::new(done))).await;
        });
        self.task_steps.insert(task.id(), n);
    }

    /// After the run's outcome is known: a message still goes into the log if it is a stream
    /// event (its write was acknowledged); routing and step ends no longer matter.
    fn keep_stream(&mut self, msg: Msg) {
        if let Msg::Stream { .. } = msg {
            self.on_msg(msg);
        }
    }

    fn on_msg(&mut self, msg: Msg) -> Option<Outcome> {
        match msg {
            Msg::Stream {
                step,
                event_type,
                data,
                ts,
                held,
            } => {
                let seq = self.next_seq;
                self.buf.push(match event_type {
                    Cow::Borrowed(t) => self.writer.encode_static(seq, t, ts, step, &data),
                    Cow::Owned(t) => self.writer.encode(seq, &t, ts, step, &data),
                });
                self.next_seq += 1;
                // Out of the channel: its room goes back to the steps.
                drop(held);
                None
            }
            Msg::Send { event } => self.route(event).err(),
            Msg::Done(done) => {
                let Done {
                    step,
                    outcome,
                    duration,
                } = *done;
                self.on_done(step, outcome, duration)
            }
        }
    }

    fn on_done(
        &mut self,
        n: u32,
        outcome: std::result::Result<Emit, Failure>,
        duration: Duration,
    ) -> Option<Outcome> {
        let (i, delivery) = self.in_flight.remove(&n)?;
        self.busy[i] -= 1;
        self.boundary = true;
        let name = self.wf.inner.steps[i].name.clone();
        // The instance is over: a set it collected is no longer needed for its retries.
        if let Some(buf) = self.shared.collected().get_mut(&name) {
            buf.done.retain(|(d, _)| *d != delivery.id);
        }
        let emit = match outcome {
            Ok(emit) => emit,
            Err(Failure { error, panicked }) => {
                let mut details = json!({"step": n, "name": name, "panicked": panicked});
                if let (Some(extra), Some(obj)) = (error.details, details.as_object_mut()) {
                    obj.insert("details".into(), extra);
                }
                return Some(Outcome::Failed(ErrorInfo {
                    code: error.code,
                    message: format!("step {name:?} failed: {}", error.message),
                    details: Some(details),
                }));
            }
        };
        if let Some(message) = emit.error {
            return Some(failed(
                ErrorCode::Failed,
                format!("step {name:?} failed: {message}"),
            ));
        }
        for w in emit.waits {
            self.push_value(w.stream_type, Some(n), &w.data);
            self.waits.push(Wait {
                reply: w.reply.to_owned(),
                step: n,
            });
        }
        self.push(
            kind::STEP_COMPLETED,
            Some(n),
            &StepCompleted {
                name,
                duration_ms: duration.as_millis() as u64,
            },
        );
        let mut session_state = emit.session_state;
        for event in emit.events {
            if event.name == StopEvent::NAME {
                if sluice_protocol::json::depth(&event.data) > MAX_RESULT_DEPTH {
                    return Some(failed(
                        ErrorCode::Failed,
                        format!(
                            "the run's result is nested deeper than {MAX_RESULT_DEPTH} levels (arrays and objects)"
                        ),
                    ));
                }
                return Some(Outcome::Completed(event.data, session_state.take()));
            }
            if let Err(o) = self.route(event) {
                return Some(o);
            }
        }
        None
    }

    fn route(&mut self, event: AnyEvent) -> std::result::Result<(), Outcome> {
        let Some(targets) = self.wf.inner.routes.get(&event.name) else {
            return Err(failed(
                ErrorCode::Failed,
                format!("event {:?} was emitted but no step accepts it", event.name),
            ));
        };
        let targets = targets.clone();
        for i in targets {
            self.enqueue(i, event.clone());
        }
        Ok(())
    }

    /// Queues `event` for step `i` as a new delivery.
    fn enqueue(&mut self, i: usize, event: AnyEvent) {
        self.delivery_counter += 1;
        self.queues[i].push_back(Delivery {
            event,
            id: self.delivery_counter,
        });
    }

    // ---- the log ----

    fn push(&mut self, event_type: &'static str, step: Option<u32>, data: &impl serde::Serialize) {
        let data = serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned());
        let (seq, ts) = (self.next_seq, Timestamp::now());
        self.buf.push(
            self.writer
                .encode_static(seq, event_type, ts, step, data.as_bytes()),
        );
        self.next_seq += 1;
    }

    fn push_value(&mut self, event_type: &'static str, step: Option<u32>, data: &Value) {
        self.push(event_type, step, data);
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.engine.store.append(&self.record.id, &self.buf).await?;
        self.engine.count_events(self.buf.len());
        self.buf.clear();
        Ok(())
    }

    async fn checkpoint(&mut self) -> Result<()> {
        self.flush().await?;
        let mut queues: Vec<(String, Vec<Delivery>)> = Vec::new();
        for (i, step) in self.wf.inner.steps.iter().enumerate() {
            let mut deliveries: Vec<Delivery> = Vec::new();
            let mut running: Vec<(&u32, &Delivery)> = self
                .in_flight
                .iter()
                .filter(|(_, (s, _))| *s == i)
                .map(|(n, (_, d))| (n, d))
                .collect();
            running.sort_by_key(|(n, _)| **n);
            deliveries.extend(running.into_iter().map(|(_, d)| d.clone()));
            deliveries.extend(self.queues[i].iter().cloned());
            if !deliveries.is_empty() {
                queues.push((step.name.clone(), deliveries));
            }
        }
        let collect: HashMap<String, CollectBuf> = self
            .shared
            .collected()
            .iter()
            .filter(|(_, b)| !b.pending.is_empty() || !b.done.is_empty())
            .map(|(k, b)| (k.clone(), b.clone()))
            .collect();
        let cp = Checkpoint {
            version: CHECKPOINT_VERSION,
            state: self
                .shared
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            collect,
            collected: HashMap::new(),
            queues,
            waits: self.waits.clone(),
            step_counter: self.step_counter,
            delivery_counter: self.delivery_counter,
            usage: self.usage(),
            waited_ms: self.waited_ms,
            waiting_since: self.waiting_since,
        };
        let bytes = serde_json::to_vec(&cp)?;
        self.engine
            .store
            .put_checkpoint(&self.record.id, Bytes::from(bytes))
            .await?;
        self.boundary = false;
        for ack in self.acks.drain(..) {
            let _ = ack.send(Ok(()));
        }
        Ok(())
    }

    fn usage(&self) -> Usage {
        *self.shared.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- pausing and ending ----

    async fn sleep(&mut self) -> Result<()> {
        self.waiting_since = Some(Timestamp::now());
        self.checkpoint().await?;
        self.record.status = RunStatus::Waiting;
        self.record.last_seq = self.next_seq - 1;
        self.record.usage = self.usage();
        // Counted before the record says `waiting`; should the write fail, the run ends and
        // the count goes with it.
        if self.waiting.is_none() {
            self.waiting = Some(WaitingRun::enter(&self.slot));
        }
        self.engine.store.put_run(&self.record).await?;
        self.permit = None;
        Ok(())
    }

    /// The driver exits while the run stays `waiting` in the store: it stays counted, and the
    /// store may let go of the log's cached events (a run may wait for days).
    fn keep_waiting(&mut self) {
        if let Some(w) = self.waiting.take() {
            w.keep();
        }
        self.engine.store.idle(&self.record.id);
    }

    /// Gives up the run's slot in the engine's registry unless control messages are queued.
    fn try_release(&mut self) -> bool {
        self.engine
            .release_if(&self.record.id, || self.ctl.is_empty())
    }

    /// Stops every step instance and takes what they wrote into the log buffer: the channel is
    /// closed (later writes fail) and drained, so every write that was acknowledged is kept.
    async fn stop_steps(&mut self) {
        self.shared.cancel.cancel();
        self.tasks.abort_all();
        self.task_steps.clear();
        self.rx.close();
        while let Some(m) = self.rx.recv().await {
            self.keep_stream(m);
        }
    }

    async fn end(&mut self, outcome: Outcome) -> Result<()> {
        // Stop the steps first, then drain, then the terminal event: nothing can follow it.
        self.stop_steps().await;
        if let Outcome::Shutdown = outcome {
            self.checkpoint().await?;
            // A woken run that had not resumed is still `waiting` in the store, and stays so
            // across the restart: it stays counted.
            self.keep_waiting();
            self.engine.release(&self.record.id);
            return Ok(());
        }
        // From here on, senders see a closed channel and wait for the final record.
        self.ctl.close();
        self.flush().await?;
        self.write_end(outcome).await
    }

    /// Writes the final record and the terminal event at `next_seq`, then lets go of the run.
    async fn write_end(&mut self, outcome: Outcome) -> Result<()> {
        let usage = self.usage();
        let now = Timestamp::now();
        let started = self.record.started_at.unwrap_or(self.record.created_at);
        let duration_ms = now.millis_since(started);
        let (event_type, data) = match outcome {
            Outcome::Completed(result, session_state) => {
                if let (Some(state), Some(id)) = (session_state, &self.record.session_id) {
                    let engine = &self.engine;
                    let previous = crate::context::put_session_state(
                        &*engine.store,
                        &engine.sessions,
                        id,
                        state,
                    )
                    .await?;
                    self.session_before = Some(previous);
                }
                self.record.status = RunStatus::Completed;
                self.record.result = Some(result.clone());
                self.record.error = None;
                (
                    kind::CHAIN_COMPLETED,
                    serde_json::to_string(&ChainCompleted {
                        result,
                        usage,
                        duration_ms,
                    })?,
                )
            }
            Outcome::Failed(error) => {
                self.record.status = RunStatus::Failed;
                self.record.result = None;
                self.record.error = Some(error.clone());
                (
                    kind::CHAIN_ERROR,
                    serde_json::to_string(&ChainError {
                        error,
                        usage: Some(usage),
                    })?,
                )
            }
            Outcome::Cancelled(reason) => {
                self.record.status = RunStatus::Cancelled;
                self.record.result = None;
                self.record.error = None;
                (
                    kind::CHAIN_CANCELLED,
                    serde_json::to_string(&ChainCancelled { reason })?,
                )
            }
            Outcome::Sleep | Outcome::Shutdown => return Ok(()),
        };
        let terminal =
            RawEvent::encode(self.next_seq, &self.record.id, event_type, now, None, &data);
        // A run cancelled (or failed) while waiting leaves the count before its end is visible.
        self.waiting = None;
        self.record.usage = usage;
        self.record.finished_at = Some(now);
        self.record.last_seq = self.next_seq;
        self.engine.store.finish(&self.record, &terminal).await?;
        self.session_before = None;
        self.engine.count_events(1);
        self.let_go();
        Ok(())
    }

    /// After the terminal event: answers everyone still waiting on the run and leaves the
    /// registry.
    fn let_go(&mut self) {
        self.slot
            .finished(self.started.elapsed(), self.record.status);
        // Deliveries accepted since the last checkpoint were consumed by the run's end.
        for ack in self.acks.drain(..) {
            let _ = ack.send(Ok(()));
        }
        self.permit = None;
        self.engine.release(&self.record.id);
        // Control messages that raced with the end get the definitive answer.
        while let Ok(c) = self.ctl.try_recv() {
            if let Control::Deliver(d) = c {
                let _ = d
                    .reply
                    .send(Err(Error::finished(&self.record.id, self.record.status)));
            }
        }
    }

    // ---- driver errors ----

    /// The driver failed (a store error, in practice): end the run with `chain-error`, retrying
    /// a few times; if the end cannot be written either, leave the run `running` for recovery
    /// and make sure no one in this process waits for it forever.
    async fn on_driver_error(&mut self, e: Error) {
        let run_id = self.record.id.clone();
        let reason = match &e {
            Error::Store(store) => format!("the store failed: {}", error_chain(store)),
            other => format!("the run's driver failed: {}", error_chain(other)),
        };
        tracing::error!(run_id = %run_id, error = %reason, "run driver failed; ending the run");
        self.leave_queue();
        self.stop_steps().await;
        self.ctl.close();
        // Deliveries accepted since the last checkpoint were not made durable: they fail.
        let acks = std::mem::take(&mut self.acks);
        let error = ErrorInfo {
            code: ErrorCode::Failed,
            message: reason.clone(),
            details: None,
        };
        let mut backoff = END_BACKOFF;
        for attempt in 1..=END_ATTEMPTS {
            match self.end_after_error(&error).await {
                Ok(()) => {
                    for ack in acks {
                        let _ = ack.send(Err(Error::finished(&run_id, self.record.status)));
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(run_id = %run_id, attempt, error = %error_chain(&e), "could not write the end of a failed run");
                }
            }
            if attempt < END_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        tracing::error!(run_id = %run_id, "the run is left `running` for recovery at the next start");
        self.engine.abandon(&run_id, &reason);
        for ack in acks {
            let _ = ack.send(Err(self.engine.abandoned_error(&run_id, &reason)));
        }
        self.permit = None;
        self.engine.release(&run_id);
        while let Ok(c) = self.ctl.try_recv() {
            if let Control::Deliver(d) = c {
                let _ = d
                    .reply
                    .send(Err(self.engine.abandoned_error(&run_id, &reason)));
            }
        }
    }

    /// One attempt at ending a run whose driver failed, from what the store holds now.
    async fn end_after_error(&mut self, error: &ErrorInfo) -> Result<()> {
        let store = self.engine.store.clone();
        let id = self.record.id.clone();
        if let Some(rec) = store.get_run(&id).await?
            && rec.status.is_terminal()
        {
            // An earlier `finish` went through after all.
            self.session_before = None;
            self.record = rec;
            self.let_go();
            return Ok(());
        }
        // The run will not complete after all: its session gets back the state it had.
        if let (Some(previous), Some(session)) =
            (self.session_before.take(), self.record.session_id.clone())
        {
            let sessions = &self.engine.sessions;
            if let Err(e) =
                crate::context::put_session_state(&*store, sessions, &session, previous).await
            {
                tracing::error!(run_id = %id, session_id = %session, error = %error_chain(&e), "could not restore the session of a run that failed at its end");
            }
        }
        let last = store.last_seq(&id).await?;
        // Numbered events the store has are done; the rest go in if they still continue the log.
        self.buf.retain(|e| e.seq() > last);
        let mut end = last;
        if self.buf.first().is_some_and(|e| e.seq() == last + 1) {
            match store.append(&id, &self.buf).await {
                Ok(()) => {
                    end = last + self.buf.len() as u64;
                    self.engine.count_events(self.buf.len());
                }
                Err(e) => {
                    tracing::warn!(run_id = %id, lost = self.buf.len(), error = %error_chain(&e), "events of a failed run could not be written");
                }
            }
        }
        self.buf.clear();
        self.next_seq = end + 1;
        self.write_end(Outcome::Failed(error.clone())).await
    }
}

/// `e` and its sources, joined with `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

/// One attempt of a step: the handler is called and its future polled inside `catch_unwind`,
/// within the step's timeout.
async fn run_attempt(
    handler: &crate::step::Handler,
    ctx: &Context,
    event: &AnyEvent,
    timeout: Option<Duration>,
) -> std::result::Result<std::result::Result<Emit, StepError>, Box<dyn Any + Send>> {
    let fut = std::panic::catch_unwind(AssertUnwindSafe(|| handler(ctx.clone(), event.clone())))?;
    let fut = AssertUnwindSafe(fut).catch_unwind();
    match timeout {
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Ok(Err(StepError::new(format!(
                "the step exceeded its timeout of {limit:?}"
            ))
            .code(ErrorCode::Timeout))),
        },
        None => fut.await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Checks the `data` of an inbound `tool-results` event, naming the field at fault by its path
/// (`data.results[1]: missing field \`output\``).
fn check_tool_results(data: &Value) -> Result<()> {
    let invalid = |path: String, e: serde_json::Error| Error::InvalidInput(format!("{path}: {e}"));
    // serde reads an array as a struct's fields by position; these must be objects.
    let object = |path: String, v: &Value| match v {
        Value::Array(_) => Err(Error::InvalidInput(format!(
            "{path}: invalid type: array, expected an object"
        ))),
        _ => Ok(()),
    };
    object("data".to_owned(), data)?;
    if let Some(results) = data.get("results").and_then(Value::as_array) {
        for (i, r) in results.iter().enumerate() {
            let path = format!("data.results[{i}]");
            object(path.clone(), r)?;
            ToolResult::deserialize(r).map_err(|e| invalid(path, e))?;
        }
    }
    ToolResults::deserialize(data).map_err(|e| invalid("data".to_owned(), e))?;
    Ok(())
}

/// ±25% jitter, from a cheap per-call random source. Saturates instead of overflowing.
fn jitter(d: Duration) -> Duration {
    let nanos = Timestamp::now().as_micros() as u64 ^ (d.as_nanos() as u64).rotate_left(17);
    let mut x = nanos | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let frac = (x % 1000) as f64 / 1000.0; // 0..1
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.75 + frac * 0.5)).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_errors_name_the_field_by_its_path() {
        let err = |data: Value| match check_tool_results(&data) {
            Err(Error::InvalidInput(m)) => m,
            other => format!("not InvalidInput: {other:?}"),
        };
        let good = json!({"id": "call_a", "output": "sunny"});
        assert!(check_tool_results(&json!({"results": [good.clone()]})).is_ok());
        let m = err(json!({"results": [good, {"id": "call_b"}]}));
        assert!(
            m.starts_with("data.results[1]: missing field `output`"),
            "{m}"
        );
        let m = err(json!({"results": [{"id": "c", "output": 1, "extra": 2}]}));
        assert!(
            m.starts_with("data.results[0]: unknown field `extra`"),
            "{m}"
        );
        let m = err(json!({"answers": []}));
        assert!(m.starts_with("data: unknown field `answers`"), "{m}");
        let m = err(json!({"results": "none"}));
        assert!(m.starts_with("data: invalid type"), "{m}");
        // Arrays are not read as the fields by position.
        let m = err(json!([[{"id": "c", "output": 1}]]));
        assert_eq!(m, "data: invalid type: array, expected an object");
        let m = err(json!({"results": [["c", 1, false]]}));
        assert_eq!(
            m,
            "data.results[0]: invalid type: array, expected an object"
        );
    }

    #[test]
    fn control_messages_stay_small() {
        // Likewise for the control channel: a delivery is boxed, a cancel carries its reason.
        let size = std::mem::size_of::<Control>();
        assert!(size <= 32, "Control is {size} bytes");
    }

    #[test]
    fn step_messages_stay_small() {
        // Every slot of a run's channel is a `Msg`: a larger one costs memory per active run
        // (S2's RSS grew 5 KiB per run when `Done` held a bigger `Emit` inline).
        let size = std::mem::size_of::<Msg>();
        assert!(size <= 96, "Msg is {size} bytes");
    }

    #[test]
    fn jitter_stays_within_a_quarter_and_never_panics() {
        for ms in [0u64, 1, 100, 10_000] {
            let d = Duration::from_millis(ms);
            let j = jitter(d);
            assert!(
                j >= d.mul_f64(0.75) && j <= d.mul_f64(1.25),
                "{d:?} -> {j:?}"
            );
        }
        for _ in 0..100 {
            assert!(jitter(Duration::MAX) >= Duration::MAX.mul_f64(0.74));
            jitter(Duration::from_secs(u64::MAX / 4 * 3));
        }
    }
}
