//! The WebSocket transport of `GET /v1/runs/{id}/events`: one text frame per envelope; client
//! text frames `{type, data}` are handled as `POST /v1/runs/{id}/events`, answered with
//! `{"accepted": true}` or the error shape.

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use sluice_protocol::api::{ErrorBody, SendEvent};

use crate::AppState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::{ReaderGuard, deliver};
use crate::stream::TypeFilter;

pub(crate) fn upgrade(
    state: AppState,
    who: Principal,
    run_id: String,
    after: u64,
    types: TypeFilter,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade.on_upgrade(move |socket| async move {
        let Ok(guard) = ReaderGuard::new(&state) else {
            return;
        };
        run(state, who, run_id, after, types, socket).await;
        drop(guard);
    })
}

fn error_frame(e: &ApiError) -> Message {
    let body = ErrorBody::new(format!("{}", e.status().as_u16()), e.to_string());
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(&body).unwrap_or_default(),
    ))
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
    let filter = |ev: &sluice_protocol::RawEvent| types_pass(&types, ev);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            frame = rx.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let reply = match serde_json::from_str::<SendEvent>(text.as_str()) {
                        Err(e) => error_frame(&ApiError::BadRequest(format!("frame: {e}"))),
                        Ok(ev) => match deliver(&state, &who, &run_id, ev).await {
                            Ok(()) => Message::Text(Utf8Bytes::from_static("{\"accepted\":true}")),
                            Err(e) => error_frame(&e),
                        },
                    };
                    if tx.send(reply).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    if !filter(&ev) {
                        continue;
                    }
                    let terminal = ev.is_terminal();
                    let text = String::from_utf8_lossy(ev.json()).into_owned();
                    if tx.send(Message::Text(Utf8Bytes::from(text))).await.is_err() {
                        break;
                    }
                    if terminal {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(run_id = %run_id, error = %e, "websocket stream ended by a store error");
                    break;
                }
                None => break,
            },
        }
    }
    let _ = tx.send(Message::Close(None)).await;
}

fn types_pass(types: &TypeFilter, ev: &sluice_protocol::RawEvent) -> bool {
    types.passes(ev)
}
