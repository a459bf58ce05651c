use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sluice_protocol::{Timestamp, Usage};

use crate::event::AnyEvent;

/// An outstanding request for outside input: the run sleeps until an event of type `reply`
/// arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Wait {
    pub reply: String,
    pub step: u32,
}

/// One event routed to one step: the input of a step instance, queued or running.
///
/// `id` is unique within the run and stays the same when the instance is retried or, after a
/// restart, runs again; `collect_events` keys its buffer by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    #[serde(flatten)]
    pub event: AnyEvent,
    /// 0 in checkpoints of version 1, which had no delivery ids (one is assigned on restore).
    #[serde(default, rename = "delivery")]
    pub id: u64,
}

/// One step's `collect_events` state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct CollectBuf {
    /// Events waiting for their set to complete, with the delivery that brought each.
    pub pending: Vec<(u64, AnyEvent)>,
    /// Sets handed out, by the delivery that completed them: given again to a retry of that
    /// delivery, dropped when its instance ends.
    pub done: Vec<(u64, Vec<AnyEvent>)>,
}

/// What a run needs to continue after a pause or a restart, written at step boundaries.
///
/// Deliveries in `queues` include the inputs of step instances that were running when the
/// checkpoint was taken: on a restart they run again (steps are at-least-once across crashes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub version: u32,
    pub state: Map<String, Value>,
    /// `collect_events` buffers by step name.
    #[serde(default)]
    pub collect: HashMap<String, CollectBuf>,
    /// Version 1's buffers (events without delivery ids); read, never written.
    #[serde(default, skip_serializing)]
    pub collected: HashMap<String, Vec<AnyEvent>>,
    /// Per step name, the deliveries it has yet to process, in order.
    pub queues: Vec<(String, Vec<Delivery>)>,
    pub waits: Vec<Wait>,
    pub step_counter: u32,
    /// The last delivery id handed out.
    #[serde(default)]
    pub delivery_counter: u64,
    pub usage: Usage,
    /// Milliseconds the run spent waiting for input before its last wait: they do not count
    /// toward its `run_timeout`.
    #[serde(default)]
    pub waited_ms: u64,
    /// When the run went waiting, while it is waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Timestamp>,
}

/// 2: deliveries carry ids; collect buffers are keyed by them.
pub(crate) const CHECKPOINT_VERSION: u32 = 2;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_a_version_1_checkpoint() {
        let v1 = serde_json::json!({
            "version": 1,
            "state": {"k": 1},
            "collected": {"join": [{"name": "found", "data": 1}]},
            "queues": [["join", [{"name": "found", "data": 2}]]],
            "waits": [],
            "step_counter": 4,
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        });
        let cp: Checkpoint = serde_json::from_value(v1).unwrap();
        assert_eq!(cp.collected["join"][0].data, 1);
        assert_eq!(cp.queues[0].1[0].event.data, 2);
        assert_eq!(cp.queues[0].1[0].id, 0);
        assert_eq!(cp.delivery_counter, 0);
        let again = serde_json::to_value(&cp).unwrap();
        assert!(
            again.get("collected").is_none(),
            "version 1 buffers are not written"
        );
        assert_eq!(again["queues"][0][1][0]["delivery"], 0);
    }
}
