//! What a streaming call yields: [`ChatChunk`]s on a [`ChatStream`], ending with a
//! [`ChatResponse`].

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use sluice_protocol::Usage;
use sluice_protocol::payload::FinishReason;

use crate::{Error, Message, Result};

/// One item of a streaming model call.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatChunk {
    /// Output text (`text-delta`).
    TextDelta(String),
    /// Reasoning text (`reasoning-delta`).
    ReasoningDelta(String),
    /// A fragment of a tool call (`tool-call-delta`).
    ToolCallDelta {
        /// Which tool call of the message (0-based, in the order the model started them).
        index: u32,
        /// The call id, on the call's first fragment.
        id: Option<String>,
        /// The tool name, on the call's first fragment.
        name: Option<String>,
        /// A fragment of the arguments' JSON text (may be empty).
        arguments: String,
    },
    /// The call ended normally; always the last item (`provider-completed`).
    Finished {
        /// Why the model stopped.
        finish_reason: FinishReason,
        /// Tokens of this call.
        usage: Usage,
        /// The assistant message assembled from all the deltas.
        message: Message,
        /// From the first poll of the stream (retries and waiting for a permit included) to the
        /// end of the response.
        latency: Duration,
    },
}

/// The outcome of a whole call: the fields of [`ChatChunk::Finished`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// Why the model stopped.
    pub finish_reason: FinishReason,
    /// Tokens of this call.
    pub usage: Usage,
    /// The assistant message.
    pub message: Message,
    /// See [`ChatChunk::Finished`].
    pub latency: Duration,
}

/// The stream of a model call, from [`Provider::stream_chat`](crate::Provider::stream_chat).
///
/// Yields deltas as they arrive, then exactly one [`ChatChunk::Finished`], or an `Err` as its
/// last item. Nothing is sent until it is first polled. Dropping it aborts the HTTP request
/// (the connection is closed) and frees the provider's concurrency permit.
pub struct ChatStream {
    inner: Pin<Box<dyn Stream<Item = Result<ChatChunk>> + Send>>,
}

impl ChatStream {
    pub(crate) fn new(inner: impl Stream<Item = Result<ChatChunk>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(inner.fuse()),
        }
    }

    /// Consumes the stream and returns the final response, dropping the deltas.
    ///
    /// # Errors
    /// The stream's error, or [`Error::Protocol`] if it ended without a `Finished` item.
    pub async fn into_response(mut self) -> Result<ChatResponse> {
        while let Some(chunk) = self.next().await {
            if let ChatChunk::Finished {
                finish_reason,
                usage,
                message,
                latency,
            } = chunk?
            {
                return Ok(ChatResponse {
                    finish_reason,
                    usage,
                    message,
                    latency,
                });
            }
        }
        Err(Error::Protocol("stream ended without a result".into()))
    }
}

impl Stream for ChatStream {
    type Item = Result<ChatChunk>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatStream").finish_non_exhaustive()
    }
}
