//! Sluice wire types, shared by the server, the engine, the SDK and the CLI.
//!
//! This crate is the code form of `docs/protocol.md`: the [`Event`] envelope every transport
//! carries, the reserved event types and their payloads ([`kind`], [`payload`]), run and session
//! records ([`record`]), request and response bodies ([`api`]) and timestamps ([`Timestamp`]).
//! It does no I/O; it depends on serde, and on schemars for the JSON Schemas of the request and
//! response bodies (the server publishes them in `/openapi.json`).
//!
//! Layout:
//! - `event.rs`: the envelope, its pre-serialised log form [`RawEvent`], event-name rules.
//! - `kind.rs`: the reserved event types.
//! - `payload.rs`: typed `data` of every reserved event type.
//! - `record.rs`: run status, run and session records, usage.
//! - `api.rs`: HTTP request and response bodies, the error shape.
//! - `time.rs`: RFC 3339 timestamps with microseconds.
//!
//! ```
//! use sluice_protocol::{Event, RawEvent, Timestamp, kind};
//! let raw = RawEvent::encode(7, "run_1", kind::TEXT_DELTA, Timestamp::from_micros(0), Some(2),
//!     r#"{"text":"Hel"}"#);
//! let event: Event = raw.parse().unwrap();
//! assert_eq!(event.seq, 7);
//! assert_eq!(event.data["text"], "Hel");
//! ```

pub mod api;
mod event;
pub mod json;
pub mod kind;
pub mod payload;
pub mod record;
mod time;
mod url;

pub use event::{EnvelopeWriter, Event, EventNameError, RawEvent, validate_custom_name};
pub use record::{IdempotencyKey, RunRecord, RunStatus, SessionRecord, Usage};
pub use time::{Timestamp, TimestampError};
pub use url::without_userinfo;
