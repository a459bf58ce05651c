//! The Sluice workflow engine.
//!
//! A workflow is a set of [`Step`]s: async functions that accept one event type and [`Emit`]
//! events, which the engine routes to the steps accepting them, until a step emits a
//! [`StopEvent`]. Each active run has one driver task that owns the run's log: it numbers every
//! event (`seq`), writes lifecycle events (`chain-started`, `step-started`/`step-completed`, one
//! terminal event), appends to the [`Store`](sluice_store::Store) in batches, and checkpoints
//! the run at step boundaries. A run that waits for outside input holds no task: its driver
//! writes a checkpoint and exits, and an inbound event brings it back.
//!
//! Layout:
//! - `event.rs`: [`WorkflowEvent`], [`AnyEvent`] and the built-in events.
//! - `step.rs`: [`Step`], [`Emit`], [`RetryPolicy`].
//! - `workflow.rs`: [`Workflow`] and its validating builder.
//! - `context.rs`: [`Context`], what a step instance sees.
//! - `run.rs`: the per-run driver.
//! - `engine.rs`: [`Engine`] (admission, send, cancel, recovery) and [`RunHandle`].
//! - `checkpoint.rs`: what a run needs to continue.
//! - `builtin/`: the `ticker` and `ask-human` workflows.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use sluice_engine::{Context, Emit, Engine, StartEvent, StartRun, Step, StopEvent, Workflow, WorkflowEvent};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Shout { text: String }
//! impl WorkflowEvent for Shout { const NAME: &'static str = "shout"; }
//!
//! # async fn demo() -> sluice_engine::Result<()> {
//! let wf = Workflow::builder("shouter")
//!     .stream_event("progress")
//!     .step(Step::new("read", |_ctx: Context, start: StartEvent| async move {
//!         let text = start.0["text"].as_str().unwrap_or_default().to_owned();
//!         Ok(Shout { text }.into())
//!     }).emits::<Shout>())
//!     .step(Step::new("shout", |ctx: Context, s: Shout| async move {
//!         ctx.write_event_to_stream("progress", &serde_json::json!({"pct": 50})).await?;
//!         Ok(Emit::stop(s.text.to_uppercase()))
//!     }).emits::<StopEvent>())
//!     .build()?;
//! let engine = Engine::new(std::sync::Arc::new(sluice_store_memory::MemoryStore::new()), [wf])?;
//! let run = engine.start("shouter", StartRun { input: serde_json::json!({"text": "hi"}), ..Default::default() }).await?;
//! assert_eq!(run.wait().await?.result, Some(serde_json::json!("HI")));
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

pub mod builtin;
mod checkpoint;
mod context;
mod engine;
mod error;
mod event;
mod run;
mod sessions;
mod step;
mod workflow;

pub use context::Context;
pub use engine::{Engine, Recovered, Retention, RunHandle, StartRun, WorkflowStats, new_run_id};
pub use error::{Error, Result, StepError};
pub use event::{AnyEvent, InputEvent, StartEvent, StopEvent, ToolResultsEvent, WorkflowEvent};
pub use sessions::SessionGuard;
pub use step::{Emit, RetryPolicy, Step};
pub use workflow::{InputValidator, Limits, Workflow, WorkflowBuilder};

/// The protocol's typed payloads steps use (re-exported so workflows need no extra dependency).
pub use sluice_protocol::payload as protocol_payload;

/// The README's example workflow, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
