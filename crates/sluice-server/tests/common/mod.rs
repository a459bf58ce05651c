//! A real server on an ephemeral port, and an SSE / NDJSON reader.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice_engine::{Engine, Workflow, builtin};
use sluice_server::config::ServerOptions;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub engine: Engine,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
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
        let engine = Engine::new(store, workflows).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
