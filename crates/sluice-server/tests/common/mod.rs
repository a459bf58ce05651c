//! A real server on an ephemeral port, and an SSE / NDJSON reader.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice_engine::{Emit, Engine, StartEvent, Step, StopEvent, Workflow, builtin};
use sluice_server::config::ServerOptions;
use sluice_store::Store;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub engine: Engine,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Where a SQLite store keeps its file, for as long as the server lives.
    pub dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with(
            ServerOptions::default(),
            vec![builtin::ticker(), builtin::ask_human()],
        )
        .await
    }

    pub async fn with(mut options: ServerOptions, workflows: Vec<Workflow>) -> Self {
        options.shutdown_grace = Duration::from_secs(5);
        let store = Arc::new(sluice_store_memory::MemoryStore::new());
        Self::with_store(options, workflows, store).await
    }

    /// The built-in workflows on a SQLite store in a fresh directory.
    pub async fn sqlite(mut options: ServerOptions) -> Self {
        options.shutdown_grace = Duration::from_secs(5);
        let dir = tempfile::tempdir().unwrap();
        let store = sluice_store_sqlite::SqliteStore::open(
            dir.path().join("sluice.db"),
            sluice_store_sqlite::SqliteOptions::default(),
        )
        .unwrap();
        let mut s = Self::with_store(
            options,
            vec![builtin::ticker(), builtin::ask_human()],
            Arc::new(store),
        )
        .await;
        s.dir = Some(dir);
        s
    }

    /// Any store; `options` as given (grace included).
    pub async fn with_store(
        options: ServerOptions,
        workflows: Vec<Workflow>,
        store: Arc<dyn Store>,
    ) -> Self {
        let engine = Engine::new(store, workflows).unwrap();
        let listener =
            sluice_server::bind("127.0.0.1:0".parse().unwrap(), options.listen_backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = sluice_server::App::new(engine.clone(), options);
        let task = tokio::spawn(sluice_server::serve(listener, app, shutdown.clone()));
        Self {
            base: format!("http://{addr}"),
            addr,
            client: reqwest::Client::new(),
            shutdown,
            engine,
            task,
            dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Starts a run and returns its id.
    pub async fn start_run(&self, workflow: &str, input: Value) -> String {
        let resp = self
            .client
            .post(self.url(&format!("/v1/workflows/{workflow}/runs")))
            .json(&serde_json::json!({ "input": input }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
        let rec: Value = resp.json().await.unwrap();
        rec["id"].as_str().unwrap().to_owned()
    }

    /// Sends `body` (`{"type", "data"}`) into run `id`: the raw response.
    pub async fn send_event(&self, id: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/runs/{id}/events")))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn wait_status(&self, id: &str, status: &str) {
        for _ in 0..500 {
            let (_, rec) = self.get_json(&format!("/v1/runs/{id}")).await;
            if rec["status"] == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("run {id} never reached {status}");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server did not stop");
    }

    /// The whole `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of a metric line (`name{labels}` exactly as rendered).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
}

/// A workflow `gate` whose one step waits for a permit of `gate`, then completes with `null`:
/// runs that stay running until the test lets them go.
pub fn gate_workflow(gate: Arc<tokio::sync::Semaphore>) -> Workflow {
    Workflow::builder("gate")
        .step(
            Step::new("wait", move |_ctx, _start: StartEvent| {
                let gate = gate.clone();
                async move {
                    let _permit = gate.acquire().await;
                    Ok(Emit::stop(Value::Null))
                }
            })
            .emits::<StopEvent>(),
        )
        .build()
        .unwrap()
}

/// One SSE frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: Option<Value>,
    pub comment: bool,
    pub retry: Option<u64>,
}

/// Parses SSE frames from a byte stream as they arrive.
pub struct SseReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next frame, or `None` at the end of the body.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                assert!(!raw.contains('\r'), "SSE must use \\n line endings only");
                let mut f = Frame {
                    id: None,
                    event: None,
                    data: None,
                    comment: false,
                    retry: None,
                };
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        f.id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        f.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        f.data = Some(serde_json::from_str(v).unwrap());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        f.retry = Some(v.parse().unwrap());
                    } else if line.starts_with(':') {
                        f.comment = true;
                    }
                }
                return Some(f);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(e)) => panic!("stream broke: {e}"),
                None => return None,
            }
        }
    }

    /// The next frame carrying an event.
    pub async fn next_event(&mut self) -> Option<Value> {
        while let Some(f) = self.next().await {
            if let Some(d) = f.data {
                assert_eq!(f.id, d["seq"].as_u64(), "id: matches seq");
                assert_eq!(
                    f.event.as_deref(),
                    d["type"].as_str(),
                    "event: matches type"
                );
                return Some(d);
            }
        }
        None
    }

    /// All remaining events.
    pub async fn rest(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await {
            out.push(e);
        }
        out
    }
}

pub fn seqs(evs: &[Value]) -> Vec<u64> {
    evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// A store that, once [`armed`](GatedStore::arm), holds every checkpoint write until the test
/// [`release`](GatedStore::release)s it: a shutdown (whose runs checkpoint) then stays in its
/// draining phase for as long as the test needs. With `fail_put_session`, session updates fail;
/// with `slow_put_session_ms`, they wait that long before they store the session.
pub struct GatedStore {
    inner: sluice_store_memory::MemoryStore,
    armed: std::sync::atomic::AtomicBool,
    gate: tokio::sync::Semaphore,
    /// Whether `put_session` fails.
    pub fail_put_session: std::sync::atomic::AtomicBool,
    /// Milliseconds each `put_session` waits before it stores the session.
    pub slow_put_session_ms: std::sync::atomic::AtomicU64,
    /// `put_session` calls begun.
    pub put_sessions_begun: std::sync::atomic::AtomicU64,
}

impl GatedStore {
    pub fn new() -> Self {
        Self {
            inner: sluice_store_memory::MemoryStore::new(),
            armed: std::sync::atomic::AtomicBool::new(false),
            gate: tokio::sync::Semaphore::new(0),
            fail_put_session: std::sync::atomic::AtomicBool::new(false),
            slow_put_session_ms: std::sync::atomic::AtomicU64::new(0),
            put_sessions_begun: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.gate.add_permits(1_000);
    }
}

#[async_trait::async_trait]
impl Store for GatedStore {
    async fn create_run(&self, r: &sluice_protocol::RunRecord) -> sluice_store::Result<()> {
        self.inner.create_run(r).await
    }
    async fn get_run(&self, id: &str) -> sluice_store::Result<Option<sluice_protocol::RunRecord>> {
        self.inner.get_run(id).await
    }
    async fn put_run(&self, r: &sluice_protocol::RunRecord) -> sluice_store::Result<()> {
        self.inner.put_run(r).await
    }
    async fn list_runs(
        &self,
        f: &sluice_store::RunFilter,
    ) -> sluice_store::Result<sluice_store::RunPage> {
        self.inner.list_runs(f).await
    }
    async fn delete_run(&self, id: &str) -> sluice_store::Result<()> {
        self.inner.delete_run(id).await
    }
    async fn append(
        &self,
        run_id: &str,
        events: &[sluice_protocol::RawEvent],
    ) -> sluice_store::Result<()> {
        self.inner.append(run_id, events).await
    }
    fn groups_appends(&self) -> bool {
        self.inner.groups_appends()
    }
    async fn finish(
        &self,
        r: &sluice_protocol::RunRecord,
        terminal: &sluice_protocol::RawEvent,
    ) -> sluice_store::Result<()> {
        self.inner.finish(r, terminal).await
    }
    async fn read(
        &self,
        run_id: &str,
        after: u64,
        limit: usize,
    ) -> sluice_store::Result<Vec<sluice_protocol::RawEvent>> {
        self.inner.read(run_id, after, limit).await
    }
    async fn last_seq(&self, run_id: &str) -> sluice_store::Result<u64> {
        self.inner.last_seq(run_id).await
    }
    async fn wait_for(&self, run_id: &str, after: u64) -> sluice_store::Result<()> {
        self.inner.wait_for(run_id, after).await
    }
    async fn put_checkpoint(&self, run_id: &str, cp: bytes::Bytes) -> sluice_store::Result<()> {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            let _permit = self.gate.acquire().await;
        }
        self.inner.put_checkpoint(run_id, cp).await
    }
    async fn get_checkpoint(&self, run_id: &str) -> sluice_store::Result<Option<bytes::Bytes>> {
        self.inner.get_checkpoint(run_id).await
    }
    async fn inbox_push(&self, run_id: &str, t: &str, data: &Value) -> sluice_store::Result<u64> {
        self.inner.inbox_push(run_id, t, data).await
    }
    async fn inbox_read(
        &self,
        run_id: &str,
    ) -> sluice_store::Result<Vec<sluice_store::InboxEntry>> {
        self.inner.inbox_read(run_id).await
    }
    async fn inbox_ack(&self, run_id: &str, up_to: u64) -> sluice_store::Result<()> {
        self.inner.inbox_ack(run_id, up_to).await
    }
    async fn create_session(&self, s: &sluice_protocol::SessionRecord) -> sluice_store::Result<()> {
        self.inner.create_session(s).await
    }
    async fn get_session(
        &self,
        id: &str,
    ) -> sluice_store::Result<Option<sluice_protocol::SessionRecord>> {
        self.inner.get_session(id).await
    }
    async fn put_session(&self, s: &sluice_protocol::SessionRecord) -> sluice_store::Result<()> {
        if self
            .fail_put_session
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(sluice_store::Error::Backend {
                message: "injected put_session failure".into(),
                source: None,
            });
        }
        self.put_sessions_begun
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let slow = self
            .slow_put_session_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        self.inner.put_session(s).await
    }
    async fn delete_session(&self, id: &str) -> sluice_store::Result<bool> {
        self.inner.delete_session(id).await
    }
}
