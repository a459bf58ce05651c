//! A real server on an ephemeral port, a connection-killing TCP proxy, and a scripted HTTP
//! server for stream edge cases.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_engine::{Engine, Workflow, builtin};
use sluice_server::config::ServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub base: String,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = sluice_server::App::new(engine, options);
        let task = tokio::spawn(sluice_server::serve(listener, app, shutdown.clone()));
        Self {
            base: format!("http://{addr}"),
            addr,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server did not stop");
    }
}

/// Forwards TCP connections to `target`, answers throttled to `rate` bytes a second, and drops
/// every open connection each `every`.
pub struct Proxy {
    pub base: String,
    /// Kill rounds that found at least one connection open.
    pub kills: Arc<AtomicU64>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr, every: Duration, rate: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let kills = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (kill_tx, _) = tokio::sync::watch::channel(0u64);
        let kill_tx = Arc::new(kill_tx);
        {
            let (stop, kill_tx, kills, open) =
                (stop.clone(), kill_tx.clone(), kills.clone(), open.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {
                            if open.load(Ordering::SeqCst) > 0 {
                                kills.fetch_add(1, Ordering::SeqCst);
                            }
                            kill_tx.send_modify(|n| *n += 1);
                        }
                    }
                }
            });
        }
        {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            tokio::spawn(async move {
                loop {
                    let (client, _) = tokio::select! {
                        () = stop.cancelled() => return,
                        c = listener.accept() => match c { Ok(c) => c, Err(_) => return },
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut killed = kill_tx.subscribe();
                    let (stop, open) = (stop.clone(), open.clone());
                    tokio::spawn(async move {
                        let Ok(upstream) = TcpStream::connect(target).await else {
                            return;
                        };
                        open.fetch_add(1, Ordering::SeqCst);
                        let (mut up_read, mut up_write) = upstream.into_split();
                        let (mut down_read, mut down_write) = client.into_split();
                        // Requests go up as they come; answers come down throttled to `rate`
                        // bytes a second, so little is buffered downstream when a kill lands.
                        let up = tokio::io::copy(&mut down_read, &mut up_write);
                        let down = async {
                            let mut buf = vec![0u8; 4096];
                            loop {
                                let n = match up_read.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if down_write.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                                let pause = Duration::from_secs_f64(n as f64 / rate as f64);
                                tokio::time::sleep(pause).await;
                            }
                        };
                        tokio::select! {
                            _ = up => {}
                            () = down => {}
                            _ = killed.changed() => {}
                            () = stop.cancelled() => {}
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
        Self {
            base,
            kills,
            accepted,
            stop,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Answers each connection with the next scripted raw HTTP response, then closes it; records
/// each request's head.
pub struct Scripted {
    pub base: String,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl Scripted {
    pub async fn start(responses: Vec<String>) -> Self {
        Self::start_with(responses.into_iter().map(|r| (r, false)).collect()).await
    }

    /// Like [`start`](Self::start); a response paired with `true` is written and its
    /// connection then held open, silent, until the script is dropped.
    pub async fn start_with(responses: Vec<(String, bool)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (reqs, token) = (requests.clone(), stop.clone());
        tokio::spawn(async move {
            for (response, hold) in responses {
                let (mut sock, _) = tokio::select! {
                    () = token.cancelled() => return,
                    c = listener.accept() => c.unwrap(),
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                reqs.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                // The client may have given up on this connection already.
                if sock.write_all(response.as_bytes()).await.is_err() {
                    continue;
                }
                if hold {
                    let token = token.clone();
                    tokio::spawn(async move {
                        token.cancelled().await;
                        drop(sock);
                    });
                } else {
                    sock.shutdown().await.ok();
                }
            }
        });
        Self {
            base,
            requests,
            stop,
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An SSE answer carrying events with these (seq, type).
pub fn sse_response(events: &[(u64, &str)]) -> String {
    sse_response_with_tail(events, "")
}

/// An SSE answer carrying events with these (seq, type), then `tail` (e.g. half a frame).
pub fn sse_response_with_tail(events: &[(u64, &str)], tail: &str) -> String {
    let mut body = String::from("retry: 1000\n\n");
    for (seq, ty) in events {
        body.push_str(&format!(
            "id: {seq}\nevent: {ty}\ndata: {{\"seq\":{seq},\"run_id\":\"run_x\",\"type\":\"{ty}\",\"ts\":\"2026-01-01T00:00:00.000000Z\",\"data\":{{\"n\":{seq}}}}}\n\n"
        ));
    }
    body.push_str(tail);
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The head and first events of an SSE answer with no length (it lasts until the connection
/// closes): for a connection that then goes silent.
pub fn sse_open_response(events: &[(u64, &str)]) -> String {
    let full = sse_response(events);
    let body = &full[full.find("\r\n\r\n").unwrap() + 4..];
    format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}")
}

/// An error answer with a `Retry-After` header.
pub fn retry_after_response(status: &str, retry_after: &str) -> String {
    let body = r#"{"error":{"code":"queue_full","message":"busy"}}"#;
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

pub fn status_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
