//! The Sluice HTTP server.
//!
//! Implements `docs/protocol.md`: the run API under `/v1`, event streams (SSE, NDJSON,
//! WebSocket) read from the durable log with cursors, admission control answers (429 with
//! `Retry-After`), bearer-key auth with per-key run visibility, connection and stream limits,
//! graceful shutdown, `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.
//!
//! Layout:
//! - `config.rs`: `sluice.toml` and its layers.
//! - `error.rs`: [`ApiError`], the one error shape.
//! - `extract.rs`: JSON and query extractors answering in that shape, and the request body's
//!   deadline (`server.body_timeout`).
//! - `auth.rs`: keys, principals, visibility; `hash.rs`: the stable hash of key labels.
//! - `stream.rs`: the SSE / NDJSON encoders over the log.
//! - `routes.rs`: the handlers, and the router built from `openapi.rs`'s route table.
//! - `ws.rs`: the WebSocket transport.
//! - `idempotency.rs`: `Idempotency-Key`s. (Per-session locks are the engine's:
//!   `Engine::lock_session`.)
//! - `conn.rs`: the TCP connection limit, and the timers of the header read and idle
//!   timeouts.
//! - `metrics.rs`, `openapi.rs` (the document, generated from the route table and the body
//!   types).
//!
//! ```no_run
//! # async fn demo(engine: sluice_engine::Engine) -> std::io::Result<()> {
//! let options = sluice_server::config::ServerOptions::default();
//! let listener = sluice_server::bind("127.0.0.1:0".parse().unwrap(), options.listen_backlog)?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let app = sluice_server::App::new(engine, options);
//! sluice_server::serve(listener, app, shutdown).await
//! # }
//! ```

pub mod auth;
pub mod config;
mod conn;
mod error;
mod extract;
mod hash;
mod idempotency;
mod metrics;
mod openapi;
mod routes;
pub mod stream;
mod ws;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener as _;
use sluice_engine::Engine;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::error::{ApiError, ApiResult};
pub use crate::metrics::Metrics;
use crate::metrics::Rejection;
pub use crate::openapi::{openapi, routes};

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub(crate) struct AppState {
    inner: Arc<AppInner>,
}

pub(crate) struct AppInner {
    pub(crate) engine: Engine,
    pub(crate) options: config::ServerOptions,
    pub(crate) keys: auth::Keys,
    pub(crate) metrics: Metrics,
    pub(crate) draining: CancellationToken,
    /// (owner, workflow, Idempotency-Key) → the run created first; rebuilt from the store when
    /// [`serve`] starts.
    pub(crate) idempotency: idempotency::Idempotency,
    /// Serialises changes of one session (one active run per session).
    /// Open TCP connections.
    pub(crate) connections: Arc<conn::Connections>,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.inner
    }
}

/// A listening socket on `addr` whose listen backlog has room for `backlog` connections not
/// accepted yet (`server.listen_backlog`; the kernel caps it at `net.core.somaxconn`).
///
/// The standard library's and tokio's `bind` ask for 128. A burst of clients connecting at
/// once (a thousand agents' streams, a retry storm), or connections waiting while the server
/// is at `server.max_connections`, overflow that; the kernel then drops the new connection
/// attempts, and their clients try again only after a second or more.
///
/// Must be called within a tokio runtime.
///
/// # Errors
/// The socket could not be created, bound (the address is in use, say) or put to listen.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library does on Unix: a restarted server can bind again at once while
    // its previous connections sit in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A configured server, ready to [`serve`].
pub struct App {
    state: AppState,
}

impl App {
    /// A server for `engine` with `options`.
    pub fn new(engine: Engine, options: config::ServerOptions) -> Self {
        let keys = auth::Keys::new(&options.api_keys, &options.admin_keys);
        let inner = AppInner {
            engine,
            options,
            keys,
            metrics: Metrics::default(),
            draining: CancellationToken::new(),
            idempotency: idempotency::Idempotency::new(idempotency::TTL, idempotency::CAPACITY),
            connections: Arc::default(),
        };
        Self {
            state: AppState {
                inner: Arc::new(inner),
            },
        }
    }

    /// The router (for tests that drive it without a socket).
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        routes::router(state.clone())
            .layer(middleware::from_fn_with_state(state.clone(), guard))
            .with_state(state)
    }
}

/// Outermost middleware: 503 while draining, latency metrics.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let ops = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let resp = if state.draining.is_cancelled() && !ops {
        state.metrics.reject(Rejection::ShuttingDown);
        ApiError::ShuttingDown.into_response()
    } else {
        next.run(req).await
    };
    let status = resp.status().as_u16();
    match status {
        401 => state.metrics.reject(Rejection::Unauthorized),
        429 => state.metrics.reject(Rejection::QueueFull),
        _ => {}
    }
    state.metrics.observe(status, t0.elapsed());
    resp
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains, all within
/// `server.shutdown_grace` of the cancellation: new requests get 503 (and `/readyz` too), runs
/// get until the deadline to reach a checkpoint, streams end, the listener closes, in-flight
/// requests may finish; at the deadline, connections still open are closed and the call
/// returns.
///
/// Before the first request is accepted, the `Idempotency-Key`s of the runs created within the
/// last 24 h are read back from the store, so a retried create still answers its first run
/// after a restart.
///
/// At most `server.max_connections` TCP connections are open at once; beyond, new ones wait
/// in the listen backlog. A request head must arrive within `server.header_timeout`, its body
/// within `server.body_timeout` after the head (else `408`, and the connection closes), and a
/// keep-alive connection idle for `server.idle_timeout` between requests is closed.
///
/// # Errors
/// None today (accept errors are retried after a pause); the `Result` is kept for I/O errors
/// of the listener.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = app.state.clone();
    let router = app.router();
    restore_idempotency(&state).await;
    let tasks = TaskTracker::new();
    spawn_sweeper(&state, &tasks);
    let grace = state.options.shutdown_grace;
    let drain = {
        let state = state.clone();
        async move {
            shutdown.cancelled().await;
            state.draining.cancel();
            if !state.engine.shutdown(grace).await {
                tracing::warn!(
                    ?grace,
                    "some runs did not reach a checkpoint within the grace period"
                );
            }
        }
    };
    let listener = conn::LimitedListener::new(
        listener,
        state.options.max_connections,
        state.connections.clone(),
    );
    let timeouts = Timeouts {
        header: state.options.header_timeout,
        idle: state.options.idle_timeout,
    };
    let connections = TaskTracker::new();
    let hard_close = CancellationToken::new();
    let server = accept(listener, router, timeouts, drain, &connections, &hard_close);
    let draining = state.draining.clone();
    tokio::select! {
        () = server => {}
        () = async move {
            // One deadline for everything: the grace counts from the start of the drain.
            draining.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                open = state.connections.open(),
                "connections still open at the end of the grace period; closing them"
            );
            // Upgraded WebSockets (served by their own tasks) see their socket fail; the
            // connection tasks drop theirs.
            state.connections.close_all();
            hard_close.cancel();
        }
    }
    connections.close();
    connections.wait().await;
    // (Already cancelled, unless the server ended on its own: the sweeper stops either way.)
    state.draining.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The most a connection buffers in the server beyond the kernel's own socket buffers: the
/// request head must fit in it (a longer one is hyper's `431`), and a response body is polled
/// for more only while less than this waits to be written. An event stream whose reader stops
/// reading thus holds one read batch of the log (see `sluice_store::follow_batches`), not
/// hyper's default of about 400 KiB on top of it; the kernel's send buffer (up to
/// `net.ipv4.tcp_wmem`'s maximum) is still in front of both.
const CONN_BUFFER: usize = 64 * 1024;

/// The timeouts of a connection waiting for a request head (see `conn.rs`).
#[derive(Clone, Copy)]
struct Timeouts {
    header: std::time::Duration,
    idle: std::time::Duration,
}

/// Accepts connections until `drain` has finished, each served by a task of `connections`;
/// then closes the listener, asks every connection to finish gracefully (idle ones close at
/// once, busy ones after their response) and waits for them.
async fn accept(
    mut listener: conn::LimitedListener,
    router: Router,
    timeouts: Timeouts,
    drain: impl Future<Output = ()>,
    connections: &TaskTracker,
    hard_close: &CancellationToken,
) {
    let graceful = CancellationToken::new();
    let mut drain = std::pin::pin!(drain);
    loop {
        let io = tokio::select! {
            (io, _addr) = listener.accept() => io,
            () = &mut drain => break,
        };
        connections.spawn(serve_connection(
            io,
            router.clone(),
            timeouts,
            graceful.clone(),
            hard_close.clone(),
        ));
    }
    drop(listener);
    graceful.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one connection with hyper's HTTP/1 server (upgrades included) until it closes; on
/// `graceful`, lets it finish its request in progress; on `hard_close`, drops it.
async fn serve_connection(
    io: conn::LimitedIo,
    router: Router,
    timeouts: Timeouts,
    graceful: CancellationToken,
    hard_close: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(io.head_timer(timeouts.header, timeouts.idle))
        .header_read_timeout(timeouts.header)
        .max_buf_size(CONN_BUFFER);
    let conn = http
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(router),
        )
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut finishing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            () = graceful.cancelled(), if !finishing => {
                finishing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = hard_close.cancelled() => return,
        }
    }
}

/// Remembers the `Idempotency-Key`s recorded in recent runs again (see `idempotency.rs`). A
/// store error is logged: the server then serves without the keys it could not read.
async fn restore_idempotency(state: &AppState) {
    let store = state.engine.store().clone();
    match state
        .idempotency
        .restore(store.as_ref(), idempotency::RESTORE_SCAN_LIMIT)
        .await
    {
        Ok(r) if r.truncated => tracing::warn!(
            keys = r.keys,
            scanned = r.scanned,
            "restoring idempotency keys stopped at the scan limit; keys of older runs are forgotten"
        ),
        Ok(r) if r.keys > 0 => {
            tracing::info!(
                keys = r.keys,
                scanned = r.scanned,
                "idempotency keys restored"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "could not restore idempotency keys from the store; those not restored are forgotten"
        ),
    }
}

/// Removes finished runs beyond the retention policy every `sweep_interval`, until shutdown
/// (a sweep in progress stops too: each removal stands on its own). Tracked by `tasks`.
fn spawn_sweeper(state: &AppState, tasks: &TaskTracker) {
    let o = &state.options;
    let policy = sluice_engine::Retention {
        ttl: (!o.retention.is_zero()).then_some(o.retention),
        max_finished_runs: (o.max_finished_runs > 0).then_some(o.max_finished_runs),
    };
    if policy == sluice_engine::Retention::default() {
        return;
    }
    let (engine, every, token) = (
        state.engine.clone(),
        o.sweep_interval,
        state.draining.clone(),
    );
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                () = token.cancelled() => return,
                r = engine.sweep(&policy) => match r {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "retention sweep"),
                    Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
                },
            }
        }
    });
}
