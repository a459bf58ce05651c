//! A scripted model server for tests and benchmarks.
//!
//! [`MockServer`] listens on a real TCP port and speaks both streaming wire formats Sluice's
//! providers use, OpenAI Chat Completions (`POST /v1/chat/completions`) and Anthropic Messages
//! (`POST /v1/messages`), writing server-sent events chunk by chunk as a real model server does.
//! What it answers is a [`Script`]: [`Turn`]s picked per request (by predicate, per
//! conversation step, in order, or a fallback), each a list of [`Step`]s: text, reasoning, tool
//! calls (arguments split into fragments at awkward boundaries; parallel calls interleaved),
//! usage, finish reasons, HTTP errors with `Retry-After`, mid-stream error payloads, stalls,
//! malformed lines, pings, aborted connections, and paced token streams for benchmarks.
//! It records the requests it received and counts the streams clients closed early.
//!
//! Layout: `script.rs` ([`Script`], [`Turn`], [`Step`]), `request.rs` ([`RecordedRequest`]),
//! `server.rs` ([`MockServer`]: routes, turn selection, counters), `wire.rs` (steps → bytes of
//! either format). The binary `sluice-mock-llm` serves a paced script for benchmarks.
//!
//! ```
//! use sluice_mock_llm::{MockServer, Script, Step, Turn};
//! use sluice_protocol::payload::FinishReason;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let mock = MockServer::start(
//!     Script::new()
//!         .turn(Turn::tool_call("call_1", "get_weather", r#"{"city":"Paris"}"#))
//!         .turn(Turn::new(vec![
//!             Step::Text("It is ".into()),
//!             Step::Text("sunny.".into()),
//!             Step::Finish(FinishReason::Stop),
//!         ])),
//! )
//! .await?;
//! // Point a provider at mock.base_url() ("http://127.0.0.1:PORT/v1"), then check:
//! assert_eq!(mock.request_count(), 0);
//! # Ok(()) }
//! ```

mod request;
mod script;
mod server;
mod wire;

pub use request::{RecordedRequest, WireFormat};
pub use script::{Predicate, Script, Step, ToolCallSpec, Turn};
pub use server::MockServer;
pub use sluice_protocol::Usage;
pub use sluice_protocol::payload::FinishReason;
