use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Timestamp;
use crate::kind;

/// One entry of a run's event log, as every transport carries it.
///
/// `seq` is per run, starts at 1 and is contiguous; `step` is the step instance the event belongs
/// to (absent for run-level events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the run's log, from 1, without gaps.
    pub seq: u64,
    /// The run this event belongs to.
    pub run_id: String,
    /// Event type: a reserved type of [`kind`] or a workflow's own kebab-case name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the event was created.
    pub ts: Timestamp,
    /// The step instance (1-based, unique within the run); absent for run-level events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// The event's payload; see [`crate::payload`] for the reserved types.
    #[serde(default)]
    pub data: Value,
}

impl Event {
    /// Whether this is one of the terminal event types.
    pub fn is_terminal(&self) -> bool {
        kind::is_terminal(&self.event_type)
    }
}

/// An event in its log form: `seq`, type and the serialised envelope.
///
/// The log stores, and the encoders write, the envelope bytes exactly as produced once when the
/// event was appended; nothing on the read path re-serialises it. Cloning is cheap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    seq: u64,
    event_type: Bytes,
    json: Bytes,
}

impl RawEvent {
    /// Builds the envelope JSON from its parts. `data_json` must be one valid JSON value
    /// (callers produce it with `serde_json`); `event_type` a valid event name.
    pub fn encode(
        seq: u64,
        run_id: &str,
        event_type: &str,
        ts: Timestamp,
        step: Option<u32>,
        data_json: &str,
    ) -> Self {
        let mut out = Vec::with_capacity(96 + run_id.len() + data_json.len());
        out.extend_from_slice(b"{\"seq\":");
        push_u64(&mut out, seq);
        out.extend_from_slice(b",\"run_id\":");
        push_json_str(&mut out, run_id);
        out.extend_from_slice(b",\"type\":");
        push_json_str(&mut out, event_type);
        out.extend_from_slice(b",\"ts\":\"");
        ts.write_rfc3339(&mut out);
        out.push(b'"');
        if let Some(step) = step {
            out.extend_from_slice(b",\"step\":");
            push_u64(&mut out, u64::from(step));
        }
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(data_json.as_bytes());
        out.push(b'}');
        Self {
            seq,
            event_type: Bytes::copy_from_slice(event_type.as_bytes()),
            json: Bytes::from(out),
        }
    }

    /// Rebuilds a raw event from stored parts (`json` must be the envelope with this `seq`).
    pub fn from_parts(seq: u64, event_type: &str, json: Bytes) -> Self {
        Self {
            seq,
            event_type: Bytes::copy_from_slice(event_type.as_bytes()),
            json,
        }
    }

    /// Serialises a typed envelope.
    ///
    /// # Errors
    /// When `event.data` cannot be serialised (it always can for a `serde_json::Value`).
    pub fn from_event(event: &Event) -> Result<Self, serde_json::Error> {
        let data = serde_json::to_string(&event.data)?;
        Ok(Self::encode(
            event.seq,
            &event.run_id,
            &event.event_type,
            event.ts,
            event.step,
            &data,
        ))
    }

    /// Position in the run's log.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        std::str::from_utf8(&self.event_type).unwrap_or_default()
    }

    /// The serialised envelope (one JSON object, no trailing newline).
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// Whether this is one of the terminal event types.
    pub fn is_terminal(&self) -> bool {
        kind::is_terminal(self.event_type())
    }

    /// Parses the envelope.
    ///
    /// # Errors
    /// When the stored bytes are not a valid envelope.
    pub fn parse(&self) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(&self.json)
    }
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if let Ok(quoted) = serde_json::to_string(s) {
        out.extend_from_slice(quoted.as_bytes());
    }
}

/// A workflow event name that does not follow the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    /// The name does not match `[a-z][a-z0-9._-]{0,63}`.
    #[error("event type {0:?} must match [a-z][a-z0-9._-]{{0,63}}")]
    Invalid(String),
    /// The name is one of the protocol's reserved types.
    #[error("event type {0:?} is reserved by the protocol")]
    Reserved(String),
}

/// Checks a workflow's own event name: `[a-z][a-z0-9._-]{0,63}` and not reserved.
///
/// # Errors
/// [`EventNameError`] naming the problem.
pub fn validate_custom_name(name: &str) -> Result<(), EventNameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b[1..].iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        });
    if !ok {
        return Err(EventNameError::Invalid(name.to_owned()));
    }
    if kind::is_reserved(name) {
        return Err(EventNameError::Reserved(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_serde_and_parses_back() {
        let raw = RawEvent::encode(
            7,
            "run_0193",
            kind::TEXT_DELTA,
            Timestamp::parse("2026-11-22T05:00:00.123456Z").unwrap(),
            Some(2),
            r#"{"text":"Hel\"lo"}"#,
        );
        assert_eq!(
            std::str::from_utf8(raw.json()).unwrap(),
            r#"{"seq":7,"run_id":"run_0193","type":"text-delta","ts":"2026-11-22T05:00:00.123456Z","step":2,"data":{"text":"Hel\"lo"}}"#
        );
        let ev = raw.parse().unwrap();
        assert_eq!(ev.step, Some(2));
        assert_eq!(ev.data["text"], "Hel\"lo");
        assert_eq!(RawEvent::from_event(&ev).unwrap(), raw);
    }

    #[test]
    fn run_level_events_have_no_step_and_odd_ids_are_escaped() {
        let raw = RawEvent::encode(
            1,
            "a\"b",
            kind::CHAIN_STARTED,
            Timestamp::from_micros(0),
            None,
            "{}",
        );
        let ev = raw.parse().unwrap();
        assert_eq!(ev.run_id, "a\"b");
        assert_eq!(ev.step, None);
        assert!(!std::str::from_utf8(raw.json()).unwrap().contains("step"));
    }

    #[test]
    fn custom_names() {
        assert!(validate_custom_name("tick").is_ok());
        assert!(validate_custom_name("my.event_v2-x").is_ok());
        assert!(validate_custom_name(&"a".repeat(64)).is_ok());
        assert!(matches!(
            validate_custom_name(&"a".repeat(65)),
            Err(EventNameError::Invalid(_))
        ));
        for bad in ["", "Tick", "1x", "a b", "é"] {
            assert!(
                matches!(validate_custom_name(bad), Err(EventNameError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            validate_custom_name("text-delta"),
            Err(EventNameError::Reserved(_))
        ));
    }
}
