use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sluice_protocol::Usage;

use crate::event::AnyEvent;

/// An outstanding request for outside input: the run sleeps until an event of type `reply`
/// arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Wait {
    pub reply: String,
    pub step: u32,
}

/// What a run needs to continue after a pause or a restart, written at step boundaries.
///
/// Events in `queues` include the inputs of step instances that were running when the
/// checkpoint was taken: on a restart they run again (steps are at-least-once across crashes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub version: u32,
    pub state: Map<String, Value>,
    pub collected: HashMap<String, Vec<AnyEvent>>,
    /// Per step name, the events it has yet to process, in order.
    pub queues: Vec<(String, Vec<AnyEvent>)>,
    pub waits: Vec<Wait>,
    pub step_counter: u32,
    pub usage: Usage,
}

pub(crate) const CHECKPOINT_VERSION: u32 = 1;
