//! The Rust client of the Sluice server.
//!
//! A cheap-`Clone` [`Client`] (built with [`ClientBuilder`]: base URL, API key, timeouts,
//! reconnect backoff) covering the HTTP API of `docs/protocol.md`: start runs ([`RunHandle`]),
//! follow their events as an [`EventStream`] that resumes by itself with `Last-Event-ID` after a
//! dropped or silent connection (no event lost, none twice; a `seq` gap is an error; by default
//! it keeps trying for 2 minutes, enough to ride out a server restart), send events (human
//! input, client tool results), cancel, get and list runs, sessions. Every failure is an
//! [`Error`] whose [`kind`](Error::kind) callers match on. Wire types come from
//! `sluice-protocol`, shared with the server, and are re-exported here.
//!
//! Layout:
//! - `client.rs`: [`Client`], [`ClientBuilder`] and the calls.
//! - `stream.rs`: [`EventStream`], the resuming event stream; `sse.rs`: its SSE parser;
//!   `backoff.rs`: jittered exponential backoff.
//! - `run.rs`: [`RunHandle`], [`RunFilter`].
//! - `error.rs`: [`Error`], [`ErrorKind`].
//!
//! ```no_run
//! # async fn demo() -> sluice_client::Result<()> {
//! use futures_util::StreamExt;
//! use sluice_client::{Client, CreateRun, ErrorKind};
//!
//! let client = Client::builder().base_url("http://127.0.0.1:8080").build()?;
//! let input = serde_json::json!({"n": 50, "delay_ms": 20});
//! let mut events = client.start_and_stream("ticker", CreateRun { input, ..Default::default() }).await?;
//! while let Some(event) = events.next().await {
//!     match event {
//!         Ok(ev) => println!("{:>4} {}", ev.seq, ev.event_type),
//!         Err(e) if e.kind() == ErrorKind::Gap => return Err(e),
//!         Err(e) => return Err(e),
//!     }
//! }
//! let record = client.run(events.run_id()).await?;
//! println!("{} → {:?}", record.status.as_str(), record.result);
//! # Ok(()) }
//! ```
//!
//! The client speaks plain `http://` (this build has no TLS).

mod backoff;
mod client;
mod error;
mod run;
mod sse;
mod stream;

pub use client::{Client, ClientBuilder, DEFAULT_MAX_EVENT_SIZE, DEFAULT_URL, StartOptions};
pub use error::{Error, ErrorKind, Result};
pub use run::{RunFilter, RunHandle};
pub use stream::EventStream;

pub use sluice_protocol::api::{CreateRun, RunList, SendEvent, WorkflowInfo};
pub use sluice_protocol::payload::ToolResult;
pub use sluice_protocol::{
    Event, RawEvent, RunRecord, RunStatus, SessionRecord, Timestamp, Usage, kind,
};
