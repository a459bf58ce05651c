//! A real Sluice server in-process on an ephemeral port, the scripted model server, a tiny tool
//! server, and readers and checks for event logs.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sluice_agent::{AgentOptions, Tool, agent};
use sluice_engine::{Engine, Workflow};
use sluice_llm::{Provider, ProviderConfig, ProviderKind, RetryPolicy};
use sluice_mock_llm::MockServer;
use sluice_server::config::ServerOptions;
use sluice_store::Store;
use tokio_util::sync::CancellationToken;

pub const MODEL: &str = "test-model";

/// A provider on the mock with quick retries and a short idle timeout.
pub fn provider(mock: &MockServer) -> Provider {
    provider_with(mock, Duration::from_secs(5), 3)
}

pub fn provider_with(mock: &MockServer, idle: Duration, attempts: u32) -> Provider {
    let config = ProviderConfig::new("mock", ProviderKind::OpenAi, mock.base_url())
        .with_idle_timeout(idle)
        .with_retry(RetryPolicy {
            max_attempts: attempts,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(5),
        });
    Provider::new(config).unwrap()
}

pub fn options(mock: &MockServer) -> AgentOptions {
    AgentOptions::new(provider(mock), MODEL).with_system("Be brief.")
}

pub fn assistant(options: AgentOptions) -> Workflow {
    agent("assistant", options).unwrap()
}

pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    pub engine: Engine,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// On a fresh in-memory store.
    pub async fn start(workflows: Vec<Workflow>) -> Self {
        Self::with_store(Arc::new(sluice_store_memory::MemoryStore::new()), workflows).await
    }

    /// On `store`, recovering what it holds first (as `sluice serve` does).
    pub async fn with_store(store: Arc<dyn Store>, workflows: Vec<Workflow>) -> Self {
        let engine = Engine::new(store, workflows).unwrap();
        engine.recover().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let options = ServerOptions {
            shutdown_grace: Duration::from_secs(5),
            ..ServerOptions::default()
        };
        let app = sluice_server::App::new(engine.clone(), options);
        let task = tokio::spawn(sluice_server::serve(listener, app, shutdown.clone()));
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            engine,
            shutdown,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Starts a run answering with its event stream (SSE); returns its id and the reader.
    pub async fn start_streaming(&self, workflow: &str, body: Value) -> (String, SseReader) {
        let resp = self
            .client
            .post(self.url(&format!("/v1/workflows/{workflow}/runs")))
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "starting a run");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let id = location.strip_prefix("/v1/runs/").unwrap().to_owned();
        (id, SseReader::new(resp))
    }

    /// Starts a run and waits for its end (`?wait=true`); returns the record.
    pub async fn run_to_end(&self, workflow: &str, body: Value) -> Value {
        let resp = self
            .client
            .post(self.url(&format!("/v1/workflows/{workflow}/runs?wait=true")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// The whole log of a run, read to its terminal event (NDJSON).
    pub async fn log(&self, id: &str) -> Vec<Value> {
        let resp = self
            .client
            .get(self.url(&format!("/v1/runs/{id}/events")))
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
            .await
            .expect("the run never ended")
            .unwrap();
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        for _ in 0..500 {
            let (_, rec) = self.get_json(&format!("/v1/runs/{id}")).await;
            if rec["status"] == status {
                return rec;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("run {id} never reached {status}");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    }
}

/// Parses SSE frames from a response body as they arrive.
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

    /// The next event, or `None` at the end of the body. Fails the test after 20 s of silence.
    pub async fn next_event(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, None);
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse::<u64>().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(v).unwrap());
                    }
                }
                if let Some(d) = data {
                    assert_eq!(id, d["seq"].as_u64(), "id: matches seq");
                    assert_eq!(event.as_deref(), d["type"].as_str(), "event: matches type");
                    return Some(d);
                }
                continue;
            }
            let next = tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("no event for 20 s: the run hangs");
            match next {
                Some(Ok(chunk)) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(e)) => panic!("the stream broke: {e}"),
                None => return None,
            }
        }
    }

    /// Events up to and including the first of type `until`.
    pub async fn until(&mut self, until: &str) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await {
            let done = e["type"] == until;
            out.push(e);
            if done {
                return out;
            }
        }
        panic!("the stream ended before {until}: {:#?}", summary(&out));
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

const TERMINAL: [&str; 3] = ["chain-completed", "chain-error", "chain-cancelled"];

/// The log's invariants: `seq` contiguous from 1, one run id, exactly one terminal event and
/// it is last, step-level events inside their step (between its `step-started` and
/// `step-completed`), run-level events without a step.
pub fn check_log(evs: &[Value]) {
    assert!(!evs.is_empty());
    let run_id = &evs[0]["run_id"];
    let mut open: Option<u64> = None;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "seq contiguous from 1: {e}");
        assert_eq!(&e["run_id"], run_id);
        let ty = e["type"].as_str().unwrap();
        let step = e["step"].as_u64();
        match ty {
            "step-started" => {
                assert_eq!(open, None, "one step at a time: {e}");
                open = step;
            }
            "step-completed" => {
                assert_eq!(step, open, "completes the open step: {e}");
                open = None;
            }
            t if t.starts_with("chain-") => {
                assert_eq!(step, None, "run-level event without a step: {e}");
                assert_eq!(
                    TERMINAL.contains(&t),
                    i + 1 == evs.len(),
                    "terminal last: {e}"
                );
            }
            _ => {
                assert!(step.is_some() && step == open, "inside its step: {e}");
            }
        }
    }
}

/// A readable digest of a log, deltas of one kind in a row joined into one line.
pub fn summary(evs: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < evs.len() {
        let e = &evs[i];
        let d = &e["data"];
        let ty = e["type"].as_str().unwrap_or_default();
        let line = match ty {
            "text-delta" | "reasoning-delta" => {
                let mut text = String::new();
                while i < evs.len() && evs[i]["type"] == ty {
                    text.push_str(evs[i]["data"]["text"].as_str().unwrap());
                    i += 1;
                }
                out.push(format!("{ty} {text}"));
                continue;
            }
            "tool-call-delta" => {
                let mut calls: Vec<(String, String, String)> = Vec::new();
                while i < evs.len() && evs[i]["type"] == ty {
                    let d = &evs[i]["data"];
                    let index = d["index"].as_u64().unwrap() as usize;
                    if calls.len() <= index {
                        calls.resize(index + 1, Default::default());
                    }
                    let c = &mut calls[index];
                    if let Some(id) = d["id"].as_str() {
                        c.0 = id.to_owned();
                    }
                    if let Some(name) = d["name"].as_str() {
                        c.1 = name.to_owned();
                    }
                    c.2.push_str(d["arguments"].as_str().unwrap());
                    i += 1;
                }
                let calls: Vec<String> = calls
                    .iter()
                    .map(|(id, name, args)| format!("{id}:{name}{args}"))
                    .collect();
                out.push(format!("{ty} {}", calls.join(" ")));
                continue;
            }
            "step-started" | "step-completed" => format!("{ty} {}", d["name"].as_str().unwrap()),
            "provider-started" => format!(
                "{ty} {}/{}",
                d["provider"].as_str().unwrap(),
                d["model"].as_str().unwrap()
            ),
            "provider-completed" => format!(
                "{ty} {} {}+{}",
                d["finish_reason"].as_str().unwrap(),
                d["usage"]["input_tokens"],
                d["usage"]["output_tokens"]
            ),
            "tools-started" | "tools-requested" => {
                let tools: Vec<String> = d["tools"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| {
                        format!(
                            "{}:{}{}",
                            t["id"].as_str().unwrap(),
                            t["name"].as_str().unwrap(),
                            t["arguments"]
                        )
                    })
                    .collect();
                format!("{ty} {}", tools.join(" "))
            }
            "tool-completed" => format!(
                "{ty} {}:{} {} {}",
                d["id"].as_str().unwrap(),
                d["name"].as_str().unwrap(),
                if d["is_error"] == true { "error" } else { "ok" },
                d["output"]
            ),
            "chain-completed" => format!(
                "{ty} {}",
                d["result"]["message"]["content"].as_str().unwrap()
            ),
            "chain-error" => format!("{ty} {}", d["error"]["code"].as_str().unwrap()),
            other => other.to_owned(),
        };
        out.push(line);
        i += 1;
    }
    out
}

/// The messages a model request carried, as `role: content` lines (tool calls and results
/// shown by id).
pub fn transcript(request: &sluice_mock_llm::RecordedRequest) -> Vec<String> {
    request
        .messages()
        .iter()
        .map(|m| {
            let role = m["role"].as_str().unwrap();
            let content = m["content"].as_str().unwrap_or_default();
            match role {
                "tool" => format!("tool {}: {content}", m["tool_call_id"].as_str().unwrap()),
                "assistant" if m["tool_calls"].is_array() => {
                    let calls: Vec<String> = m["tool_calls"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| {
                            format!(
                                "{}:{}{}",
                                c["id"].as_str().unwrap(),
                                c["function"]["name"].as_str().unwrap(),
                                c["function"]["arguments"].as_str().unwrap()
                            )
                        })
                        .collect();
                    format!("assistant calls {}", calls.join(" "))
                }
                _ => format!("{role}: {content}"),
            }
        })
        .collect()
}

/// A tiny tool server: `/weather` (echoes the city, 21 °C), `/sleep` (sleeps `ms`; with
/// `together: n`, first waits until `n` calls are in flight, for at most 5 s), `/fail` (500
/// after 50 ms), `/big` (100 bytes after 150 ms), `/bigfail` (503 with 5,000 bytes),
/// `/redirect` (302 to `/weather`), `/gate` (answers once [`ToolServer::open_gate`] is called),
/// `/deep` (JSON arrays nested `levels` deep), `/hang` (10 s). Records every body, and how many calls are in flight.
pub struct ToolServer {
    pub base: String,
    pub bodies: Arc<Mutex<Vec<(String, Value)>>>,
    pub calls: Arc<InFlight>,
    gate: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Calls in flight at the tool server: now, and the most at once.
#[derive(Default)]
pub struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    /// Waits (at most 20 s) until `n` calls are in flight.
    pub async fn wait_for(&self, n: usize) {
        for _ in 0..4000 {
            if self.now() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never {n} calls in flight");
    }
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ToolServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ToolServer {
    pub async fn start() -> Self {
        let bodies: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let calls: Arc<InFlight> = Arc::default();
        let (gate, gate_rx) = tokio::sync::watch::channel(false);
        let record = |path: &'static str| {
            let bodies = bodies.clone();
            let calls = calls.clone();
            let gate = gate_rx.clone();
            move |headers: axum::http::HeaderMap, Json(body): Json<Value>| {
                let bodies = bodies.clone();
                let calls = calls.clone();
                let mut gate = gate.clone();
                async move {
                    assert_eq!(headers["content-type"], "application/json");
                    bodies.lock().unwrap().push((path.to_owned(), body.clone()));
                    let _in_flight = calls.enter();
                    match path {
                        "/weather" => {
                            Json(json!({"city": body["city"], "temp_c": 21})).into_response()
                        }
                        "/sleep" => {
                            if let Some(n) = body["together"].as_u64() {
                                for _ in 0..1000 {
                                    if calls.now() >= n as usize {
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                            }
                            let ms = body["ms"].as_u64().unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            Json(json!({"slept": ms})).into_response()
                        }
                        "/fail" => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            (StatusCode::INTERNAL_SERVER_ERROR, "database on fire").into_response()
                        }
                        "/big" => {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            "x".repeat(100).into_response()
                        }
                        "/bigfail" => (StatusCode::SERVICE_UNAVAILABLE, "overloaded ".repeat(500))
                            .into_response(),
                        "/redirect" => (
                            StatusCode::FOUND,
                            [(axum::http::header::LOCATION, "/weather")],
                            "moved",
                        )
                            .into_response(),
                        "/deep" => {
                            let levels = body["levels"].as_u64().unwrap_or(1) as usize;
                            let nested = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
                            (
                                [(axum::http::header::CONTENT_TYPE, "application/json")],
                                nested,
                            )
                                .into_response()
                        }
                        "/gate" => {
                            let _ = gate.wait_for(|open| *open).await;
                            Json(json!({"passed": true})).into_response()
                        }
                        _ => {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            "late".into_response()
                        }
                    }
                }
            }
        };
        let mut app = axum::Router::new();
        for path in [
            "/weather",
            "/sleep",
            "/fail",
            "/big",
            "/bigfail",
            "/redirect",
            "/gate",
            "/deep",
            "/hang",
        ] {
            app = app.route(path, post(record(path)));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base: format!("http://{addr}"),
            bodies,
            calls,
            gate,
            task,
        }
    }

    pub fn tool(&self, name: &str, path: &str) -> Tool {
        Tool::http(name, format!("{}{path}", self.base))
            .with_description(format!("{name} for tests"))
            .with_parameters(json!({"type": "object"}))
    }

    /// Lets every call of `/gate`, waiting or to come, answer.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// The paths called so far, in order of arrival.
    pub fn paths(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}
