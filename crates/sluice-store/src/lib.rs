//! The Sluice storage contract.
//!
//! The engine and the server know storage only through the [`Store`] trait defined here: run
//! records, the per-run append-only event log, checkpoints, the inbox of events sent into a run,
//! and sessions. Each backend lives in its own crate (`sluice-store-memory`,
//! `sluice-store-sqlite`, …) and passes the same [`conformance`] suite.
//!
//! Layout:
//! - `store.rs`: the [`Store`] trait and its value types.
//! - `error.rs`: the [`Error`] every backend reports.
//! - `follow.rs`: [`follow`], a reader that replays a run's log from a cursor and then follows
//!   it live, built on [`Store::read`] and [`Store::wait_for`] only.
//! - `notify.rs`: [`Notifier`], the in-process "last committed seq" broadcast backends use to
//!   wake followers without polling.
//! - `conformance.rs`: the shared test suite.
//!
//! The trait is shaped so that a NATS JetStream backend fits it: the log append carries the
//! expected last seq (JetStream's expected-last-subject-sequence), records and checkpoints are
//! whole-value puts (KV), and followers wait on "last seq > n" (a per-run subject subscription).
//!
//! ```
//! # async fn demo(store: std::sync::Arc<dyn sluice_store::Store>) -> sluice_store::Result<()> {
//! use futures_util::StreamExt;
//! let mut events = std::pin::pin!(sluice_store::follow(store, "run_1".into(), 0));
//! while let Some(event) = events.next().await {
//!     println!("{}", event?.seq());
//! }
//! # Ok(()) }
//! ```

pub mod conformance;
mod error;
mod follow;
mod notify;
mod store;

pub use error::{Error, Result};
pub use follow::{follow, follow_batches};
pub use notify::{Notifier, Subscription, run_shard};
pub use store::{InboxEntry, PAGE_BYTES, RunFilter, RunPage, Store};

/// A map on the hot path, keyed by run id: hashed with foldhash (seeded afresh in each process)
/// instead of std's SipHash, which cost ~6 % of the server's instructions in S2. Run ids are
/// made by the server, never chosen by a client, so these maps need no more protection
/// against keys picked to collide than a per-process seed.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set counterpart of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
