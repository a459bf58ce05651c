//! Sluice model providers: streaming chat calls to OpenAI-compatible Chat Completions servers
//! (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio…) and to Anthropic Messages, with tool
//! calls, reasoning, usage and finish reasons mapped to the Sluice protocol.
//!
//! A [`Provider`] is built once from a [`ProviderConfig`] and shared: it owns one pooled HTTP
//! client, a limit of concurrent requests, connect and idle-read timeouts, and a retry policy
//! (jittered exponential backoff on 408/429/5xx and connection failures, honouring
//! `Retry-After`, only before the first chunk of a response). [`Provider::stream_chat`] turns a
//! provider-neutral [`ChatRequest`] into a [`ChatStream`] of [`ChatChunk`]s: text, reasoning and
//! tool-call deltas as they arrive, then one [`ChatChunk::Finished`] with the assembled
//! [`Message`], the [`Usage`] and the [`FinishReason`]. Dropping the stream aborts the request.
//! Failures are one [`Error`] enum with a matchable [`ErrorKind`]; the API key ([`ApiKey`])
//! never appears in errors, `Debug` output or logs.
//!
//! Layout:
//! - `config.rs`: [`ProviderConfig`], [`ProviderKind`], [`RetryPolicy`].
//! - `provider.rs`: [`Provider`]: the client, the permits, the call loop (timeouts, retries).
//! - `message.rs`: [`ChatRequest`], [`Message`], [`ToolSpec`].
//! - `chunk.rs`: [`ChatChunk`], [`ChatStream`], [`ChatResponse`].
//! - [`providers`]: one module per wire format (`openai`, `anthropic`): request bodies, stream
//!   parsers, finish-reason mapping.
//! - `sse.rs`: the incremental server-sent-events decoder; `assemble.rs`: deltas → message.
//! - `error.rs`, `secret.rs`: [`Error`], [`ApiKey`].
//!
//! Features: `tls` (off by default) enables rustls for `https://` base URLs, which the hosted
//! OpenAI and Anthropic APIs need. Without it the crate compiles quickly and talks plain HTTP
//! (local model servers, tests); an `https://` base URL is then a configuration error.
//!
//! ```
//! use futures_util::StreamExt;
//! use sluice_llm::{ChatChunk, ChatRequest, Message, Provider, ProviderConfig, ProviderKind};
//! use sluice_mock_llm::{MockServer, Script, Step, Turn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A scripted OpenAI-compatible server on 127.0.0.1.
//! let mock = MockServer::start(Script::new().turn(Turn::text("Hello there"))).await?;
//! let provider = Provider::new(ProviderConfig::new("mock", ProviderKind::OpenAi, mock.base_url()))?;
//!
//! let mut stream = provider.stream_chat(&ChatRequest::new("any", vec![Message::user("Hi")]));
//! let mut text = String::new();
//! while let Some(chunk) = stream.next().await {
//!     match chunk? {
//!         ChatChunk::TextDelta(delta) => text.push_str(&delta),
//!         ChatChunk::Finished { message, .. } => assert_eq!(message.text(), "Hello there"),
//!         _ => {}
//!     }
//! }
//! assert_eq!(text, "Hello there");
//! # Ok(()) }
//! ```

mod assemble;
mod chunk;
mod config;
mod error;
mod message;
mod provider;
pub mod providers;
mod secret;
mod sse;

pub use chunk::{ChatChunk, ChatResponse, ChatStream};
pub use config::{
    DEFAULT_MAX_OUTPUT, DEFAULT_OUTPUT_TIMEOUT, ProviderConfig, ProviderKind, RetryPolicy,
};
pub use error::{BODY_EXCERPT_LIMIT, Error, ErrorKind, MAX_TOOL_CALLS, Result};
pub use message::{ChatRequest, Message, ToolCall, ToolSpec};
pub use provider::Provider;
pub use secret::ApiKey;
pub use sluice_protocol::Usage;
pub use sluice_protocol::payload::FinishReason;
