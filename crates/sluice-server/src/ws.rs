//! The WebSocket transport of `GET /v1/runs/{id}/events`: one text frame per envelope; client
//! text frames `{type, data}` are handled as `POST /v1/runs/{id}/events`, answered with
//! `{"accepted": true}` or the protocol's error shape (with the code the same body would get
//! over HTTP: `invalid_request` for broken JSON, `invalid_input` for the wrong shape); a binary
//! frame is answered `invalid_request`. While no event is sent, the server pings every
//! `server.heartbeat`.
//!
//! A stream is admitted (`server.max_streams`) before the upgrade, so a refused client gets an
//! HTTP `503`, not a socket that closes at once. Messages from the client larger than
//! `server.max_event` plus [`FRAME_OVERHEAD`] are refused by the WebSocket layer itself
//! (nothing that large is buffered), and the socket is closed with code 1008 (policy); a text
//! frame that is not UTF-8 closes it with 1007, any other protocol violation with 1002. A close
//! from the client is answered with a close frame.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use sluice_protocol::api::SendEvent;

use crate::AppState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::{StreamGuard, deliver};
use crate::stream::TypeFilter;

/// Room for the `type` and the JSON around `data` in a client frame.
pub(crate) const FRAME_OVERHEAD: usize = 4096;

pub(crate) fn upgrade(
    state: AppState,
    who: Principal,
    run_id: String,
    after: u64,
    types: TypeFilter,
    upgrade: WebSocketUpgrade,
    guard: StreamGuard,
) -> Response {
    let limit = state.options.max_event.saturating_add(FRAME_OVERHEAD);
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            run(state, who, run_id, after, types, socket).await;
            drop(guard);
        })
}

fn error_frame(e: &ApiError) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(&e.body()).unwrap_or_default(),
    ))
}

/// A client's text frame as a [`SendEvent`], with the codes `POST /v1/runs/{id}/events` gives
/// its body: `invalid_request` for broken JSON, `invalid_input` for JSON of the wrong shape.
fn parse_frame(text: &str) -> Result<SendEvent, ApiError> {
    serde_json::from_str::<SendEvent>(text).map_err(|e| {
        if e.is_data() {
            ApiError::Unprocessable(format!("frame: {e}"))
        } else {
            ApiError::BadRequest(format!("frame: {e}"))
        }
    })
}

/// The close frame a failed read gets: 1008 (policy) for a message over the size limit, 1007
/// for a text frame that is not UTF-8, 1002 for any other protocol violation; `None` when the
/// connection itself failed.
fn read_failure(e: &axum::Error) -> Option<CloseFrame> {
    let inner = std::error::Error::source(e)?.downcast_ref::<tungstenite::Error>()?;
    let (code, reason) = match inner {
        tungstenite::Error::Capacity(_) => (close_code::POLICY, "message too big".to_owned()),
        tungstenite::Error::Utf8(_) => {
            (close_code::INVALID, "a text frame is not UTF-8".to_owned())
        }
        tungstenite::Error::Protocol(p) => (close_code::PROTOCOL, format!("protocol error: {p}")),
        _ => return None,
    };
    // A close frame's reason is at most 123 bytes.
    Some(CloseFrame {
        code,
        reason: crate::error::prefix(&reason, 123).into(),
    })
}

async fn run(
    state: AppState,
    who: Principal,
    run_id: String,
    after: u64,
    types: TypeFilter,
    socket: WebSocket,
) {
    let (mut tx, mut rx) = socket.split();
    let mut events = Box::pin(sluice_store::follow(
        state.engine.store().clone(),
        run_id.clone(),
        after,
    ));
    let shutdown = state.engine.shutdown_token();
    let every = state.options.heartbeat;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut close: Option<CloseFrame> = None;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                close = Some(CloseFrame { code: close_code::AWAY, reason: "the server is shutting down".into() });
                break;
            }
            frame = rx.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let parsed = crate::extract::check_body(text.as_bytes(), "frame")
                        .and_then(|()| parse_frame(text.as_str()));
                    let reply = match parsed {
                        Err(e) => error_frame(&e),
                        Ok(ev) => match deliver(&state, &who, &run_id, ev, "frame").await {
                            Ok(()) => Message::Text(Utf8Bytes::from_static("{\"accepted\":true}")),
                            Err(e) => error_frame(&e),
                        },
                    };
                    if tx.send(reply).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // The client closes: the WebSocket layer has queued the answering close
                    // frame (RFC 6455 5.5.1); flushing sends it, and the handshake is done.
                    let _ = tx.close().await;
                    return;
                }
                None => return,
                Some(Err(e)) => {
                    tracing::debug!(run_id = %run_id, error = %e, "websocket read failed");
                    match read_failure(&e) {
                        Some(frame) => {
                            close = Some(frame);
                            break;
                        }
                        // The connection itself failed: nothing more can be sent.
                        None => return,
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let e = ApiError::BadRequest(
                        "frame: binary frames are not accepted; send {\"type\", \"data\"} as a text frame".into(),
                    );
                    if tx.send(error_frame(&e)).await.is_err() {
                        break;
                    }
                }
                // Pings are answered by the WebSocket layer, which queues the pong; it is sent
                // before anything more is read. A client that pings without reading the answers
                // then meets back-pressure (its frames wait in the socket), where the layer would
                // otherwise buffer pongs without bound.
                Some(Ok(_)) => {
                    tokio::select! {
                        r = tx.flush() => if r.is_err() { break },
                        () = shutdown.cancelled() => {
                            close = Some(CloseFrame { code: close_code::AWAY, reason: "the server is shutting down".into() });
                            break;
                        }
                    }
                }
            },
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    if !types.passes(&ev) {
                        continue;
                    }
                    let terminal = ev.is_terminal();
                    let text = String::from_utf8_lossy(ev.json()).into_owned();
                    if tx.send(Message::Text(Utf8Bytes::from(text))).await.is_err() {
                        break;
                    }
                    ping.reset();
                    if terminal {
                        close = Some(CloseFrame { code: close_code::NORMAL, reason: "the run has ended".into() });
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(run_id = %run_id, error = %e, "websocket stream ended by a store error");
                    close = Some(CloseFrame { code: close_code::ERROR, reason: "internal error".into() });
                    break;
                }
                None => break,
            },
            _ = ping.tick() => {
                if tx.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = tx.send(Message::Close(close)).await;
}
