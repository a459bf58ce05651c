//! [`MockServer`]: the HTTP side: routes, request recording, turn selection, counters.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::stream;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::script::{Options, Predicate, Step, Turn};
use crate::wire::Emitter;
use crate::{RecordedRequest, Script, WireFormat};

/// Connections the kernel may complete before the server accepts them.
const LISTEN_BACKLOG: u32 = 4096;

/// State shared by the handlers and the [`MockServer`] handle.
pub(crate) struct Shared {
    rules: Vec<(Predicate, Arc<Turn>)>,
    queue: Vec<Arc<Turn>>,
    fallback: Option<Arc<Turn>>,
    pub(crate) options: Options,
    next_in_queue: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicUsize,
    pub(crate) active: AtomicUsize,
    pub(crate) max_active: AtomicUsize,
    pub(crate) completed: AtomicUsize,
    pub(crate) client_disconnects: AtomicUsize,
    pub(crate) server_closes: AtomicUsize,
    pub(crate) notify: Notify,
}

/// A scripted model server on a real TCP port.
///
/// Serves `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic), also
/// without the `/v1` prefix; every answer streams (the `stream` field is ignored). Dropping the
/// handle stops accepting connections.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("requests", &self.request_count.load(Ordering::SeqCst))
            .field("active", &self.active.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl MockServer {
    /// Starts on `127.0.0.1` on a free port.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(script: Script) -> io::Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    /// Starts on `addr`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn bind(addr: SocketAddr, script: Script) -> io::Result<Self> {
        // A provider takes a thousand agents' requests at once; a backlog of 128 (what
        // `TcpListener::bind` asks for) would drop the connections beyond it for a second.
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            rules: script.rules,
            queue: script.queue,
            fallback: script.fallback,
            options: script.options,
            next_in_queue: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            request_count: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            client_disconnects: AtomicUsize::new(0),
            server_closes: AtomicUsize::new(0),
            notify: Notify::new(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .route("/messages", post(anthropic))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            // Tokens go out as they are produced, as a real model server streams them (no
            // Nagle delay on a small write while the previous one is unacknowledged).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // The accept loop only ends on a listener failure; the handle's drop aborts it.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`: the base URL for either API.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The requests received so far (empty when recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many requests arrived (recorded or not, answered or not).
    pub fn request_count(&self) -> usize {
        self.shared.request_count.load(Ordering::SeqCst)
    }

    /// Streams that were dropped before their end: the client closed the connection.
    pub fn client_disconnects(&self) -> usize {
        self.shared.client_disconnects.load(Ordering::SeqCst)
    }

    /// Streams written to their end.
    pub fn completed_streams(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }

    /// Connections the script aborted ([`Step::CloseConnection`]).
    pub fn server_closes(&self) -> usize {
        self.shared.server_closes.load(Ordering::SeqCst)
    }

    /// Streams being written right now.
    pub fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The most streams written at once so far.
    pub fn max_active_streams(&self) -> usize {
        self.shared.max_active.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` client disconnects were seen, or `timeout` passes; returns
    /// whether they were.
    pub async fn wait_for_disconnects(&self, n: usize, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.shared.notify.notified();
                if self.client_disconnects() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn openai(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, WireFormat::OpenAi, uri, headers, body).await
}

async fn anthropic(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, WireFormat::Anthropic, uri, headers, body).await
}

fn json_error(status: StatusCode, message: &str, request_id: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error"}});
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    insert_request_id(&mut response, request_id);
    response
}

fn insert_request_id(response: &mut Response, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value.clone());
        response.headers_mut().insert("request-id", value);
    }
}

async fn handle(
    shared: Arc<Shared>,
    format: WireFormat,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let number = shared.request_count.fetch_add(1, Ordering::SeqCst) + 1;
    let request_id = format!("req_mock_{number}");
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON: {e}"),
                &request_id,
            );
        }
    };
    let request = RecordedRequest {
        format,
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    if shared.options.record
        && let Ok(mut requests) = shared.requests.lock()
    {
        requests.push(request.clone());
    }
    if let Some(key) = &shared.options.api_key {
        let sent = match format {
            WireFormat::OpenAi => request
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer ")),
            WireFormat::Anthropic => request.header("x-api-key"),
        };
        if sent != Some(key.as_str()) {
            return json_error(StatusCode::UNAUTHORIZED, "invalid API key", &request_id);
        }
    }
    let Some(turn) = pick(&shared, &request) else {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "mock script exhausted: no turn for this request",
            &request_id,
        );
    };
    let mut pos = 0;
    while let Some(Step::Delay(pause)) = turn.steps.get(pos) {
        tokio::time::sleep(*pause).await;
        pos += 1;
    }
    if let Some(Step::HttpError {
        status,
        body,
        retry_after,
    }) = turn.steps.get(pos)
    {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.clone(),
        )
            .into_response();
        insert_request_id(&mut response, &request_id);
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if after.subsec_nanos() > 0 {
                let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
                response
                    .headers_mut()
                    .insert("retry-after-ms", HeaderValue::from(ms));
            }
        }
        return response;
    }
    let model = request.model().unwrap_or("mock-model").to_owned();
    let include_usage = request.include_usage();
    let emitter = Emitter::new(shared, format, turn, pos, model, number, include_usage);
    let body = stream::unfold(emitter, |mut emitter| async move {
        let frame = emitter.next_frame().await?;
        Some((frame, emitter))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    insert_request_id(&mut response, &request_id);
    response
}

/// The turn for a request: a matching rule, the next queued turn, or the fallback.
fn pick(shared: &Shared, request: &RecordedRequest) -> Option<Arc<Turn>> {
    if let Some((_, turn)) = shared
        .rules
        .iter()
        .find(|(predicate, _)| predicate(request))
    {
        return Some(turn.clone());
    }
    let next = shared.next_in_queue.fetch_add(1, Ordering::SeqCst);
    if let Some(turn) = shared.queue.get(next) {
        return Some(turn.clone());
    }
    shared.fallback.clone()
}
