use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use serde_json::Value;
use sluice_protocol::payload::ErrorCode;
use sluice_protocol::{Event, RawEvent, RunRecord, RunStatus};
use sluice_store::{FastMap, RunFilter, Store};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

use crate::run::{Control, Driver, Inbound, Mode};
use crate::sessions::{SessionGuard, SessionLocks};
use crate::workflow::Workflow;
use crate::{Error, Result};

/// Control messages that may queue for one run.
const CONTROL_CHANNEL: usize = 64;

/// How often a send or cancel retries while a run changes hands (ends, pauses, wakes); with
/// 1 ms pauses this bounds the wait to a few seconds.
const CONTROL_RETRIES: usize = 5_000;

/// How often [`Engine::recover`] tries to list one page of runs.
const LIST_ATTEMPTS: u32 = 3;

/// How a run is started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StartRun {
    /// The workflow's input.
    pub input: Value,
    /// The session the run continues.
    pub session_id: Option<String>,
    /// Free-form metadata kept in the record.
    pub metadata: Option<Value>,
    /// Label of the API key starting it.
    pub owner: Option<String>,
    /// Use this id instead of a fresh one (for idempotent creation by the server).
    pub run_id: Option<String>,
    /// Stay `queued` until this run has ended (runs of one session, one after the other).
    pub after_run: Option<String>,
    /// The `Idempotency-Key` the server created the run for, kept in its record.
    pub idempotency: Option<sluice_protocol::IdempotencyKey>,
}

/// Admission state of one workflow.
pub(crate) struct Slot {
    pub wf: Workflow,
    pub semaphore: Arc<Semaphore>,
    queued: AtomicUsize,
    /// Runs in status `waiting`, each counted by one [`WaitingRun`].
    waiting: AtomicUsize,
    /// Moving average of run durations in ms (for `Retry-After`).
    avg_ms: AtomicU64,
    /// Runs this engine created, and runs it ended: completed, failed, cancelled.
    started: AtomicU64,
    ended: [AtomicU64; 3],
}

impl Slot {
    /// Counts a run created.
    pub fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a finished run: its end by status, and its duration (moving average used for
    /// `Retry-After`).
    pub fn finished(&self, took: Duration, status: RunStatus) {
        let i = match status {
            RunStatus::Completed => 0,
            RunStatus::Failed => 1,
            _ => 2,
        };
        self.ended[i].fetch_add(1, Ordering::Relaxed);
        let ms = took.as_millis() as u64;
        let old = self.avg_ms.load(Ordering::Relaxed);
        let new = if old == 0 { ms } else { (old * 7 + ms) / 8 };
        self.avg_ms.store(new, Ordering::Relaxed);
    }

    /// Counts a run that was admitted before (woken from `waiting`, or recovered) while it
    /// waits for a slot again. It is not refused: the queue limit applies to new runs.
    pub fn enter_queue(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    pub fn leave_queue(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_sub(1));
    }

    fn leave_waiting(&self) {
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
    }

    fn retry_after(&self) -> Duration {
        let avg = self.avg_ms.load(Ordering::Relaxed).max(100);
        let queued = self.queued.load(Ordering::Relaxed) as u64 + 1;
        let per_slot = self.wf.max_concurrent_runs().max(1) as u64;
        let ms = avg.saturating_mul(queued) / per_slot;
        Duration::from_secs(ms.div_ceil(1000).clamp(1, 60))
    }
}

/// One run counted in its workflow's [`WorkflowStats::waiting`]. Dropping it uncounts the run,
/// so every way a run leaves `waiting` (its input arrives, it is cancelled, it fails, its driver
/// errs or panics) takes it out of the count without a line of its own.
///
/// A waiting run has no driver: when its driver exits with the run still `waiting`, it
/// [`keep`](WaitingRun::keep)s the count, and the driver that wakes the run
/// [`adopt`](WaitingRun::adopt)s it again (only a `waiting` run is ever woken, once at a time).
/// Runs already waiting when the engine starts are counted by [`Engine::recover`].
pub(crate) struct WaitingRun {
    slot: Option<Arc<Slot>>,
}

impl WaitingRun {
    /// The run enters `waiting`: counts it.
    pub(crate) fn enter(slot: &Arc<Slot>) -> Self {
        slot.waiting.fetch_add(1, Ordering::AcqRel);
        Self {
            slot: Some(slot.clone()),
        }
    }

    /// A woken run, counted while it slept.
    pub(crate) fn adopt(slot: &Arc<Slot>) -> Self {
        Self {
            slot: Some(slot.clone()),
        }
    }

    /// The run goes on waiting without a driver: it stays counted.
    pub(crate) fn keep(mut self) {
        self.slot = None;
    }
}

impl Drop for WaitingRun {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.leave_waiting();
        }
    }
}

/// Counters of one workflow, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowStats {
    /// Workflow name.
    pub name: String,
    /// Runs holding an execution slot.
    pub running: usize,
    /// Runs waiting for a slot.
    pub queued: usize,
    /// Runs in status `waiting` (paused for input or client tools; they hold no slot): those
    /// this engine paused, and those found waiting by [`Engine::recover`].
    pub waiting: usize,
    /// Runs this engine created (not those it recovered), since it started.
    pub started: u64,
    /// Runs this engine ended, since it started, by how: `completed`.
    pub completed: u64,
    /// … `failed`.
    pub failed: u64,
    /// … `cancelled`.
    pub cancelled: u64,
}

pub(crate) struct EngineInner {
    pub store: Arc<dyn Store>,
    slots: FastMap<String, Arc<Slot>>,
    active: Mutex<FastMap<String, mpsc::Sender<Control>>>,
    pub token: CancellationToken,
    tracker: TaskTracker,
    events: AtomicU64,
    /// Runs whose driver gave up after a store failure without writing their end, with why.
    /// They stay `running` in the store until the next start recovers them.
    abandoned: Mutex<FastMap<String, String>>,
    /// Wakes [`RunHandle::wait`] callers when a run is abandoned.
    abandon_notify: Notify,
    /// Whether [`Engine::recover`] has counted the runs found `waiting`.
    waiting_counted: AtomicBool,
    /// Held by whoever writes a session record: see [`Engine::lock_session`].
    pub sessions: Arc<SessionLocks>,
}

impl EngineInner {
    /// The newest run of `session` created before `run_id` (ids grow with creation) that has
    /// not ended.
    pub(crate) async fn previous_in_session(
        &self,
        session: &str,
        run_id: &str,
    ) -> Result<Option<String>> {
        let page = self
            .store
            .list_runs(&RunFilter {
                session_id: Some(session.to_owned()),
                statuses: vec![RunStatus::Queued, RunStatus::Running, RunStatus::Waiting],
                limit: 1,
                cursor: Some(run_id.to_owned()),
                ..RunFilter::default()
            })
            .await?;
        Ok(page.runs.into_iter().next().map(|r| r.id))
    }

    fn active(&self) -> MutexGuard<'_, FastMap<String, mpsc::Sender<Control>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn release(&self, run_id: &str) {
        self.active().remove(run_id);
    }

    /// A guard for work that may spawn a driver (starting or waking a run). While it is held,
    /// [`Engine::shutdown`] does not consider the drivers finished; taken after the shutdown
    /// began, it is refused. So a run started or woken during shutdown either gets its driver
    /// before shutdown's wait ends (the driver then reaches its checkpoint like every other)
    /// or is refused with [`Error::ShuttingDown`]: no driver is spawned after that wait.
    fn guard(&self) -> Result<TaskTrackerToken> {
        // The tracker counts the token first, the cancellation is checked second: a shutdown
        // that cancels after the check cannot finish waiting before the token is dropped.
        let token = self.tracker.token();
        if self.token.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        Ok(token)
    }

    pub fn release_if(&self, run_id: &str, cond: impl FnOnce() -> bool) -> bool {
        let mut active = self.active();
        if cond() {
            active.remove(run_id);
            true
        } else {
            false
        }
    }

    pub fn count_events(&self, n: usize) {
        self.events.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn abandoned_map(&self) -> MutexGuard<'_, FastMap<String, String>> {
        self.abandoned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a run's driver gave up on it, and wakes its waiters.
    pub fn abandon(&self, run_id: &str, reason: &str) {
        self.abandoned_map()
            .insert(run_id.to_owned(), reason.to_owned());
        self.abandon_notify.notify_waiters();
    }

    /// The error callers get for an abandoned run.
    pub fn abandoned_error(&self, run_id: &str, reason: &str) -> Error {
        Error::Store(sluice_store::Error::Backend {
            message: format!(
                "run {run_id:?} stopped: {reason}; it stays running until the server restarts and recovers it"
            ),
            source: None,
        })
    }

    fn check_abandoned(&self, run_id: &str) -> Result<()> {
        match self.abandoned_map().get(run_id) {
            Some(reason) => Err(self.abandoned_error(run_id, reason)),
            None => Ok(()),
        }
    }
}

/// The workflow engine: deployed workflows, their admission control, and one driver task per
/// active run. Cheap to clone.
///
/// ```
/// # async fn demo() -> sluice_engine::Result<()> {
/// use std::sync::Arc;
/// use sluice_engine::{Engine, StartRun, builtin};
/// let store = Arc::new(sluice_store_memory::MemoryStore::new());
/// let engine = Engine::new(store, [builtin::ticker()])?;
/// let run = engine.start("ticker", StartRun { input: serde_json::json!({"n": 3}), ..Default::default() }).await?;
/// let record = run.wait().await?;
/// assert_eq!(record.result, Some(serde_json::json!({"count": 3})));
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workflows", &self.inner.slots.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What [`Engine::recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Runs found `running`, or `queued` after they had started (input had woken them and they
    /// waited for a slot), resumed from their checkpoint.
    pub resumed: usize,
    /// Runs found `queued` that had not started, queued again.
    pub requeued: usize,
    /// Runs that could not continue and ended with `chain-error` `interrupted`.
    pub interrupted: usize,
    /// Store errors met on the way (a page of runs that could not be listed, a run that could
    /// not be interrupted); each is logged, and what it concerns is left as it was for the next
    /// start.
    pub errors: usize,
}

impl Engine {
    /// An engine serving `workflows` on `store`.
    ///
    /// # Errors
    /// [`Error::InvalidWorkflow`] when two workflows share a name or there are none.
    pub fn new(
        store: Arc<dyn Store>,
        workflows: impl IntoIterator<Item = Workflow>,
    ) -> Result<Self> {
        let mut slots = FastMap::default();
        for wf in workflows {
            let name = wf.name().to_owned();
            let slot = Slot {
                semaphore: Arc::new(Semaphore::new(wf.max_concurrent_runs())),
                wf,
                queued: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                avg_ms: AtomicU64::new(0),
                started: AtomicU64::new(0),
                ended: Default::default(),
            };
            if slots.insert(name.clone(), Arc::new(slot)).is_some() {
                return Err(Error::InvalidWorkflow {
                    workflow: name,
                    message: "deployed twice".into(),
                });
            }
        }
        if slots.is_empty() {
            return Err(Error::InvalidWorkflow {
                workflow: String::new(),
                message: "no workflow is deployed".into(),
            });
        }
        let inner = EngineInner {
            store,
            slots,
            active: Mutex::default(),
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
            events: AtomicU64::new(0),
            abandoned: Mutex::default(),
            abandon_notify: Notify::new(),
            waiting_counted: AtomicBool::new(false),
            sessions: Arc::default(),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The store runs are kept in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Waits for the lock of session `id`. Hold it from reading a session record to writing
    /// it back: the engine takes it too when a run writes its session's state (at completion,
    /// or from a step), so a writer holding it cannot undo another's change.
    pub async fn lock_session(&self, id: &str) -> SessionGuard<'_> {
        self.inner.sessions.lock(id).await
    }

    /// Deployed workflows, by name.
    pub fn workflows(&self) -> Vec<Workflow> {
        let mut all: Vec<Workflow> = self.inner.slots.values().map(|s| s.wf.clone()).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// A deployed workflow.
    pub fn workflow(&self, name: &str) -> Option<Workflow> {
        self.inner.slots.get(name).map(|s| s.wf.clone())
    }

    /// Starts a run: validates the input, admits it (or queues it), records it and spawns its
    /// driver. Returns at once; follow the run with the handle. Once admitted, the run is
    /// recorded and started even if the caller stops waiting for this future.
    ///
    /// # Errors
    /// [`Error::UnknownWorkflow`], [`Error::InvalidInput`], [`Error::QueueFull`],
    /// [`Error::ShuttingDown`], or a store error.
    pub async fn start(&self, workflow: &str, req: StartRun) -> Result<RunHandle> {
        // Held until the driver is spawned: a shutdown that begins meanwhile waits for the
        // driver instead of returning while a run is half started.
        let spawning = self.inner.guard()?;
        let slot = self
            .inner
            .slots
            .get(workflow)
            .ok_or_else(|| Error::UnknownWorkflow(workflow.to_owned()))?
            .clone();
        slot.wf.validate_input(&req.input)?;
        // A run that follows another waits in the queue, holding no slot.
        let free = if req.after_run.is_some() {
            None
        } else {
            slot.semaphore.clone().try_acquire_owned().ok()
        };
        let permit = match free {
            Some(p) => Some(p),
            None => {
                let cap = slot.wf.queue();
                let admitted = slot
                    .queued
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                        (q < cap).then_some(q + 1)
                    })
                    .is_ok();
                if !admitted {
                    return Err(Error::QueueFull {
                        workflow: workflow.to_owned(),
                        retry_after: slot.retry_after(),
                    });
                }
                None
            }
        };
        let id = req.run_id.unwrap_or_else(new_run_id);
        let mut record = RunRecord::new(id.clone(), workflow, req.input);
        record.session_id = req.session_id;
        record.metadata = req.metadata;
        record.owner = req.owner;
        record.idempotency = req.idempotency;
        if permit.is_some() {
            // It has its slot: it is running from the moment it is recorded, and its driver
            // need not write the record again before its first event.
            record.status = RunStatus::Running;
            record.started_at = Some(record.created_at);
        }
        // The record and the driver are one step: done on a task of their own, so a caller
        // that goes away (a client that disconnects) cannot leave a run recorded with no driver.
        // A queued run takes its place in the queue now, in the order of these calls.
        let in_line = match (&permit, &req.after_run) {
            (None, None) => Some(crate::run::get_in_line(&slot).await),
            _ => None,
        };
        let inner = self.inner.clone();
        let after_run = req.after_run;
        let create = tokio::spawn(async move {
            if let Err(e) = inner.store.create_run(&record).await {
                if permit.is_none() {
                    slot.leave_queue();
                }
                return Err(Error::from(e));
            }
            slot.started();
            let (tx, rx) = mpsc::channel(CONTROL_CHANNEL);
            inner.active().insert(record.id.clone(), tx);
            let mut driver = Driver::new(inner.clone(), slot, record, rx);
            driver.after_run = after_run;
            driver.in_line = in_line;
            inner.tracker.spawn(driver.run(Mode::Fresh(permit)));
            drop(spawning);
            Ok(())
        });
        create
            .await
            .map_err(|e| task_failed("recording the run", &e))??;
        Ok(self.handle(&id))
    }

    /// A handle on a run by id (whether it exists is checked by the handle's calls).
    pub fn handle(&self, run_id: &str) -> RunHandle {
        RunHandle {
            id: run_id.to_owned(),
            engine: self.clone(),
        }
    }

    /// Sends an event into a run: `input`, `tool-results`, or another type the run waits for.
    /// Returns once the event is durably part of the run (in its checkpoint).
    ///
    /// # Errors
    /// [`Error::UnknownRun`], [`Error::RunFinished`] (the run has ended),
    /// [`Error::NotWaiting`] (it does not wait for this type), [`Error::InvalidInput`]
    /// (`tool-results` of the wrong shape), [`Error::ShuttingDown`].
    pub async fn send(&self, run_id: &str, event_type: &str, data: Value) -> Result<()> {
        for _ in 0..CONTROL_RETRIES {
            let Some(tx) = self.control(run_id).await? else {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            let (reply, answer) = oneshot::channel();
            let msg = Control::Deliver(Box::new(Inbound {
                event_type: event_type.to_owned(),
                data: data.clone(),
                reply,
            }));
            if tx.send(msg).await.is_err() {
                continue;
            }
            match answer.await {
                Ok(res) => return res,
                Err(_) => continue,
            }
        }
        Err(Error::ShuttingDown)
    }

    /// Cancels a run: it ends with `chain-cancelled` (a queued or waiting run too).
    ///
    /// # Errors
    /// [`Error::UnknownRun`], [`Error::RunFinished`], [`Error::ShuttingDown`].
    pub async fn cancel(&self, run_id: &str, reason: Option<String>) -> Result<()> {
        for _ in 0..CONTROL_RETRIES {
            let Some(tx) = self.control(run_id).await? else {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            // Done once the driver has it: a driver that let go of the run after this lookup
            // drops the message unread, and the cancel goes to whoever has the run now.
            let (taken, has_it) = oneshot::channel();
            let msg = Control::Cancel {
                reason: reason.clone(),
                taken,
            };
            if tx.send(msg).await.is_ok() && has_it.await.is_ok() {
                return Ok(());
            }
        }
        Err(Error::ShuttingDown)
    }

    /// The control channel of a run's driver, waking a `waiting` run if needed. `None` when the
    /// state changed underneath (retry).
    async fn control(&self, run_id: &str) -> Result<Option<mpsc::Sender<Control>>> {
        // As in `start`: a waiting run woken while the engine shuts down is waited for.
        let spawning = self.inner.guard()?;
        if let Some(tx) = self.inner.active().get(run_id) {
            // A closed channel belongs to a driver writing the run's end: retry shortly.
            return Ok((!tx.is_closed()).then(|| tx.clone()));
        }
        let record = self
            .inner
            .store
            .get_run(run_id)
            .await?
            .ok_or_else(|| Error::UnknownRun(run_id.to_owned()))?;
        if record.status.is_terminal() {
            return Err(Error::finished(run_id, record.status));
        }
        self.inner.check_abandoned(run_id)?;
        let Some(slot) = self.inner.slots.get(&record.workflow).cloned() else {
            return Err(Error::UnknownWorkflow(record.workflow));
        };
        let rx = {
            let mut active = self.inner.active();
            if let Some(tx) = active.get(run_id) {
                return Ok((!tx.is_closed()).then(|| tx.clone()));
            }
            if record.status != RunStatus::Waiting {
                // Running or queued with no driver: only between a crash and `recover`.
                return Err(Error::NotWaiting {
                    run_id: run_id.to_owned(),
                    event_type: String::new(),
                    waiting_for: Vec::new(),
                });
            }
            let (tx, rx) = mpsc::channel(CONTROL_CHANNEL);
            active.insert(run_id.to_owned(), tx);
            rx
        };
        // Re-read under the claim: the record cannot change while we hold it. On a task of its
        // own, so that a caller going away cannot leave the claim behind with no driver (every
        // later delivery would find its channel closed).
        let inner = self.inner.clone();
        let id = run_id.to_owned();
        let wake = tokio::spawn(async move {
            let record = match inner.store.get_run(&id).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    inner.release(&id);
                    return Err(Error::UnknownRun(id));
                }
                Err(e) => {
                    inner.release(&id);
                    return Err(e.into());
                }
            };
            if record.status != RunStatus::Waiting {
                inner.release(&id);
                return Ok(None);
            }
            let tx = inner.active().get(&id).cloned();
            let driver = Driver::new(inner.clone(), slot, record, rx);
            inner.tracker.spawn(driver.run(Mode::Wake));
            drop(spawning);
            Ok(tx)
        });
        wake.await.unwrap_or_else(|e| {
            self.inner.release(run_id);
            Err(task_failed("waking the run", &e))
        })
    }

    /// Continues after a restart: runs found `running` resume from their last checkpoint with
    /// `chain-resumed` (or end with `chain-error` `interrupted` when that is impossible, e.g. the
    /// workflow is no longer deployed); runs found `queued` queue again, those of a session
    /// behind the run of the session before them, as when they were queued. They are taken up in
    /// the order they were admitted: runs that held a slot first (each takes a free slot at
    /// once), then queued runs oldest first. `waiting` runs stay
    /// waiting and resume when their input arrives; they are counted in
    /// [`WorkflowStats::waiting`] (by the first call only). Call once, before serving.
    ///
    /// One bad run does not stop the others: a store error is logged, counted in
    /// [`Recovered::errors`], and the run (or the rest of the listing, when a page cannot be read
    /// after a few tries) is left as it is for the next start.
    ///
    /// # Errors
    /// None at present: store errors are counted, not returned.
    pub async fn recover(&self) -> Result<Recovered> {
        let mut out = Recovered::default();
        let mut cursor = None;
        let count_waiting = !self.inner.waiting_counted.swap(true, Ordering::AcqRel);
        let mut statuses = vec![RunStatus::Running, RunStatus::Queued];
        if count_waiting {
            statuses.push(RunStatus::Waiting);
        }
        // First the list (newest first, as the store gives it): waiting runs are counted at
        // once; the others are taken up afterwards in the order they were admitted, so the
        // runs that held slots go on first and the queue keeps its order (ids grow with
        // creation). Only ids are kept: a record (its input) may be large.
        let mut to_resume: Vec<(bool, String)> = Vec::new();
        loop {
            let filter = RunFilter {
                statuses: statuses.clone(),
                limit: 1000,
                cursor: cursor.take(),
                ..RunFilter::default()
            };
            let Some(page) = self.list_for_recovery(&filter, &mut out).await else {
                break;
            };
            for record in page.runs {
                if self.inner.active().contains_key(&record.id) {
                    continue;
                }
                if record.status == RunStatus::Waiting {
                    // It waits with no driver, as if this engine had paused it: counted until
                    // the driver that wakes it lets go of the count.
                    if let Some(slot) = self.inner.slots.get(&record.workflow) {
                        WaitingRun::enter(slot).keep();
                    }
                    continue;
                }
                let fresh = record.status == RunStatus::Queued && record.started_at.is_none();
                to_resume.push((fresh, record.id));
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        to_resume.sort();
        for (_, id) in to_resume {
            let record = match self.inner.store.get_run(&id).await {
                Ok(Some(r)) if !r.status.is_terminal() && r.status != RunStatus::Waiting => r,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!(run_id = %id, error = %e, "could not read a run to recover; it is left for the next start");
                    out.errors += 1;
                    continue;
                }
            };
            // Shutting down: the rest stays as it is, for the next start.
            if !self.recover_one(record, &mut out).await {
                break;
            }
        }
        Ok(out)
    }

    /// Takes up one run found `running` or `queued` at startup; `false` when the engine is
    /// shutting down (the run is left as it is).
    async fn recover_one(&self, record: RunRecord, out: &mut Recovered) -> bool {
        if self.inner.active().contains_key(&record.id) {
            return true;
        }
        self.inner.abandoned_map().remove(&record.id);
        let Some(slot) = self.inner.slots.get(&record.workflow).cloned() else {
            let id = record.id.clone();
            match self
                .interrupt(record, "its workflow is no longer deployed")
                .await
            {
                Ok(()) => out.interrupted += 1,
                Err(e) => {
                    tracing::error!(run_id = %id, error = %e, source = ?std::error::Error::source(&e), "could not interrupt a run during recovery; it is left for the next start");
                    out.errors += 1;
                }
            }
            return true;
        };
        let Ok(_spawning) = self.inner.guard() else {
            return false;
        };
        // A queued run that had started (woken from `waiting` and waiting for a slot again)
        // goes on from its checkpoint; one that never started starts afresh. A run that goes
        // on takes its slot here, if one is free, before the next run is looked at.
        let (mode, permit) = if record.status == RunStatus::Queued && record.started_at.is_none() {
            out.requeued += 1;
            slot.queued.fetch_add(1, Ordering::AcqRel);
            (Mode::Fresh(None), None)
        } else {
            out.resumed += 1;
            (
                Mode::Recover,
                slot.semaphore.clone().try_acquire_owned().ok(),
            )
        };
        // A session's runs go one after the other: one queued behind another (`after_run`,
        // not in the record) waits again for the newest run of its session created before it
        // that has not ended.
        let after_run = match (&mode, &record.session_id) {
            (Mode::Fresh(_), Some(session)) => {
                match self.inner.previous_in_session(session, &record.id).await {
                    Ok(prev) => prev,
                    Err(e) => {
                        tracing::error!(run_id = %record.id, error = %e, "could not read its session's runs during recovery; it is left for the next start");
                        slot.leave_queue();
                        out.requeued -= 1;
                        out.errors += 1;
                        return true;
                    }
                }
            }
            _ => None,
        };
        // A queued run takes its place in the queue here, so the queue keeps the order of
        // `to_resume` whichever driver the runtime runs first.
        let in_line = match (&mode, &after_run) {
            (Mode::Fresh(_), None) => Some(crate::run::get_in_line(&slot).await),
            _ => None,
        };
        let (tx, rx) = mpsc::channel(CONTROL_CHANNEL);
        self.inner.active().insert(record.id.clone(), tx);
        let mut driver = Driver::new(self.inner.clone(), slot.clone(), record, rx);
        driver.after_run = after_run;
        driver.permit = permit;
        driver.in_line = in_line;
        self.inner.tracker.spawn(driver.run(mode));
        true
    }

    /// One page of runs to recover, trying a few times; `None` (counted as an error) when the
    /// store keeps failing.
    async fn list_for_recovery(
        &self,
        filter: &RunFilter,
        out: &mut Recovered,
    ) -> Option<sluice_store::RunPage> {
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=LIST_ATTEMPTS {
            match self.inner.store.list_runs(filter).await {
                Ok(page) => return Some(page),
                Err(e) => {
                    tracing::error!(attempt, error = %e, source = ?std::error::Error::source(&e), "could not list runs to recover");
                    out.errors += 1;
                    if attempt < LIST_ATTEMPTS {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
        tracing::error!(
            "runs after this point are not recovered; they are left for the next start"
        );
        None
    }

    async fn interrupt(&self, mut record: RunRecord, why: &str) -> Result<()> {
        let seq = self.inner.store.last_seq(&record.id).await? + 1;
        let error = sluice_protocol::payload::ErrorInfo {
            code: ErrorCode::Interrupted,
            message: format!("the run cannot continue after a restart: {why}"),
            details: None,
        };
        let data = serde_json::to_string(&sluice_protocol::payload::ChainError {
            error: error.clone(),
            usage: None,
        })?;
        let now = sluice_protocol::Timestamp::now();
        let terminal = RawEvent::encode(
            seq,
            &record.id,
            sluice_protocol::kind::CHAIN_ERROR,
            now,
            None,
            &data,
        );
        record.status = RunStatus::Failed;
        record.error = Some(error);
        record.finished_at = Some(now);
        record.last_seq = seq;
        self.inner.store.finish(&record, &terminal).await?;
        Ok(())
    }

    /// Stops the engine: refuses new work, lets every active run reach a checkpoint (their
    /// in-flight steps are cancelled and will run again on recovery) and waits up to `grace`.
    /// Returns whether every driver finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.token.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_ok()
    }

    /// A token cancelled when the engine shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// Events appended since the engine started.
    pub fn events_appended(&self) -> u64 {
        self.inner.events.load(Ordering::Relaxed)
    }

    /// Runs with a driver task (running, queued, or just woken).
    pub fn active_runs(&self) -> usize {
        self.inner.active().len()
    }

    /// Per-workflow counters: runs holding a slot, queued, and waiting. O(workflows): no store
    /// access.
    pub fn stats(&self) -> Vec<WorkflowStats> {
        let mut out: Vec<WorkflowStats> = self
            .inner
            .slots
            .values()
            .map(|s| WorkflowStats {
                name: s.wf.name().to_owned(),
                running: s
                    .wf
                    .max_concurrent_runs()
                    .saturating_sub(s.semaphore.available_permits()),
                queued: s.queued.load(Ordering::Relaxed),
                waiting: s.waiting.load(Ordering::Relaxed),
                started: s.started.load(Ordering::Relaxed),
                completed: s.ended[0].load(Ordering::Relaxed),
                failed: s.ended[1].load(Ordering::Relaxed),
                cancelled: s.ended[2].load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The error of a step of `start` or of a wake that ran on a task of its own and panicked.
fn task_failed(what: &str, e: &tokio::task::JoinError) -> Error {
    Error::Store(sluice_store::Error::Backend {
        message: format!("{what} failed: {e}"),
        source: None,
    })
}

/// Which finished runs [`Engine::sweep`] removes (with their logs, checkpoints and inboxes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove runs that finished longer ago than this.
    pub ttl: Option<Duration>,
    /// Keep at most this many finished runs (the newest).
    pub max_finished_runs: Option<usize>,
}

const FINISHED: [RunStatus; 3] = [
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
];

impl Engine {
    /// Removes finished runs beyond the retention policy; returns how many. Active, queued and
    /// waiting runs are never touched.
    ///
    /// # Errors
    /// A store error (runs removed before it stay removed).
    pub async fn sweep(&self, policy: &Retention) -> Result<usize> {
        let store = &self.inner.store;
        let mut removed = 0;
        if let Some(ttl) = policy.ttl {
            let cutoff = sluice_protocol::Timestamp::from_micros(
                sluice_protocol::Timestamp::now().as_micros()
                    - i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX),
            );
            loop {
                let filter = RunFilter {
                    statuses: FINISHED.to_vec(),
                    finished_before: Some(cutoff),
                    limit: 1000,
                    ..RunFilter::default()
                };
                let page = store.list_runs(&filter).await?;
                if page.runs.is_empty() {
                    break;
                }
                for r in &page.runs {
                    store.delete_run(&r.id).await?;
                    removed += 1;
                }
            }
        }
        if let Some(max) = policy.max_finished_runs {
            let mut kept = 0usize;
            let mut cursor = None;
            loop {
                let filter = RunFilter {
                    statuses: FINISHED.to_vec(),
                    limit: 1000,
                    cursor: cursor.take(),
                    ..RunFilter::default()
                };
                let page = store.list_runs(&filter).await?;
                for r in &page.runs {
                    if kept < max {
                        kept += 1;
                    } else {
                        store.delete_run(&r.id).await?;
                        removed += 1;
                    }
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(removed)
    }
}

/// A fresh, time-ordered run id: `run_` and a UUIDv7 in hex.
pub fn new_run_id() -> String {
    format!("run_{}", uuid::Uuid::now_v7().simple())
}

/// A handle on one run: follow its events, await its end, send events in, cancel it.
#[derive(Clone, Debug)]
pub struct RunHandle {
    id: String,
    engine: Engine,
}

impl RunHandle {
    /// The run's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run's events with `seq > after` in their log form: history, then live, ending after
    /// the terminal event. Any number of followers may read one run at once.
    pub fn events(
        &self,
        after: u64,
    ) -> impl Stream<Item = sluice_store::Result<RawEvent>> + Send + 'static {
        sluice_store::follow(self.engine.inner.store.clone(), self.id.clone(), after)
    }

    /// Like [`events`](RunHandle::events), parsed into envelopes.
    pub fn envelopes(&self, after: u64) -> impl Stream<Item = Result<Event>> + Send + 'static {
        self.events(after)
            .map(|r| r.map_err(Error::from).and_then(|raw| Ok(raw.parse()?)))
    }

    /// The current record. While the run is active, its `last_seq` is the log's live last seq
    /// (the stored record's is only brought up to date at pauses and at the end).
    ///
    /// # Errors
    /// [`Error::UnknownRun`] or a store error.
    pub async fn record(&self) -> Result<RunRecord> {
        let store = &self.engine.inner.store;
        let mut record = self.stored_record().await?;
        if !record.status.is_terminal() {
            record.last_seq = record.last_seq.max(store.last_seq(&self.id).await?);
        }
        Ok(record)
    }

    async fn stored_record(&self) -> Result<RunRecord> {
        self.engine
            .inner
            .store
            .get_run(&self.id)
            .await?
            .ok_or_else(|| Error::UnknownRun(self.id.clone()))
    }

    /// Waits for the run to end and returns its final record. It reads no history: it waits
    /// for the log to grow and looks at its last event only.
    ///
    /// # Errors
    /// [`Error::UnknownRun`] or a store error; also [`Error::Store`] when the run's driver in
    /// this process gave up on it after a store failure (the run is then left `running` for
    /// recovery at the next start).
    pub async fn wait(&self) -> Result<RunRecord> {
        let inner = &self.engine.inner;
        let store = &inner.store;
        let record = self.stored_record().await?;
        if record.status.is_terminal() {
            return Ok(record);
        }
        loop {
            let abandoned = inner.abandon_notify.notified();
            let mut abandoned = std::pin::pin!(abandoned);
            abandoned.as_mut().enable();
            inner.check_abandoned(&self.id)?;
            // The record is final before its terminal event is visible, so a terminal last
            // event means the record can be read.
            let last = store.last_seq(&self.id).await?;
            if last > 0 {
                let tail = store.read(&self.id, last - 1, 1).await?;
                if tail.first().is_some_and(RawEvent::is_terminal) {
                    return self.stored_record().await;
                }
            }
            tokio::select! {
                r = store.wait_for(&self.id, last) => r?,
                () = &mut abandoned => {}
            }
        }
    }

    /// Sends an event into the run; see [`Engine::send`].
    ///
    /// # Errors
    /// As [`Engine::send`].
    pub async fn send(&self, event_type: &str, data: Value) -> Result<()> {
        self.engine.send(&self.id, event_type, data).await
    }

    /// Cancels the run; see [`Engine::cancel`].
    ///
    /// # Errors
    /// As [`Engine::cancel`].
    pub async fn cancel(&self) -> Result<()> {
        self.engine.cancel(&self.id, None).await
    }
}
