use bytes::{BufMut, Bytes, BytesMut};
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
        let json = Self::envelope(seq, run_id, event_type, ts, step, data_json);
        Self {
            seq,
            event_type: Bytes::copy_from_slice(event_type.as_bytes()),
            json,
        }
    }

    /// Like [`encode`](RawEvent::encode) for a `'static` type name, which is then shared rather
    /// than copied (no allocation for it, and clones touch no reference count for it).
    pub fn encode_static(
        seq: u64,
        run_id: &str,
        event_type: &'static str,
        ts: Timestamp,
        step: Option<u32>,
        data_json: &str,
    ) -> Self {
        let json = Self::envelope(seq, run_id, event_type, ts, step, data_json);
        Self {
            seq,
            event_type: Bytes::from_static(event_type.as_bytes()),
            json,
        }
    }

    fn envelope(
        seq: u64,
        run_id: &str,
        event_type: &str,
        ts: Timestamp,
        step: Option<u32>,
        data_json: &str,
    ) -> Bytes {
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
        Bytes::from(out)
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

/// Encodes the envelopes of one run, fast: the run id is quoted once, and envelopes are carved
/// out of shared chunks, so encoding an event usually allocates nothing and the resulting
/// [`RawEvent`]s share their chunk.
///
/// Chunks start at [`MIN_CHUNK`](EnvelopeWriter::MIN_CHUNK) bytes and double with each new one
/// up to [`CHUNK`](EnvelopeWriter::CHUNK): a run that writes a few events holds a small buffer
/// (thousands of runs stream at once), one that writes many allocates once per ~18 events of
/// S1's size.
#[derive(Debug)]
pub struct EnvelopeWriter {
    run_id_json: Vec<u8>,
    buf: BytesMut,
    next_chunk: usize,
}

impl EnvelopeWriter {
    /// The largest chunk allocated at a time (a run's newest events, which the store keeps in
    /// memory for live readers, pin at most about two of them). 4 KiB rather than 16: S2's
    /// server RSS was 6–8 KiB lower per run, S1's events/s the same.
    pub const CHUNK: usize = 4 * 1024;

    /// The first chunk's size.
    pub const MIN_CHUNK: usize = 1024;

    /// A writer for the events of `run_id`.
    pub fn new(run_id: &str) -> Self {
        let mut run_id_json = Vec::with_capacity(run_id.len() + 2);
        push_json_str(&mut run_id_json, run_id);
        Self {
            run_id_json,
            buf: BytesMut::new(),
            next_chunk: Self::MIN_CHUNK,
        }
    }

    /// Encodes one event whose type name is `'static` (shared, not copied). `data_json` must be
    /// one valid JSON value.
    pub fn encode_static(
        &mut self,
        seq: u64,
        event_type: &'static str,
        ts: Timestamp,
        step: Option<u32>,
        data_json: &[u8],
    ) -> RawEvent {
        let json = self.envelope(seq, event_type, ts, step, data_json);
        RawEvent {
            seq,
            event_type: Bytes::from_static(event_type.as_bytes()),
            json,
        }
    }

    /// Encodes one event.
    pub fn encode(
        &mut self,
        seq: u64,
        event_type: &str,
        ts: Timestamp,
        step: Option<u32>,
        data_json: &[u8],
    ) -> RawEvent {
        let json = self.envelope(seq, event_type, ts, step, data_json);
        RawEvent {
            seq,
            event_type: Bytes::copy_from_slice(event_type.as_bytes()),
            json,
        }
    }

    fn envelope(
        &mut self,
        seq: u64,
        event_type: &str,
        ts: Timestamp,
        step: Option<u32>,
        data_json: &[u8],
    ) -> Bytes {
        let need = 96 + self.run_id_json.len() + event_type.len() + data_json.len();
        if self.buf.capacity() < need {
            // A fresh chunk (the old one stays alive as long as its events do).
            self.buf = BytesMut::with_capacity(need.max(self.next_chunk));
            self.next_chunk = (self.next_chunk * 2).min(Self::CHUNK);
        }
        let out = &mut self.buf;
        out.put_slice(b"{\"seq\":");
        put_u64(out, seq);
        out.put_slice(b",\"run_id\":");
        out.put_slice(&self.run_id_json);
        out.put_slice(b",\"type\":");
        if event_type
            .bytes()
            .all(|b| b >= 0x20 && b != b'"' && b != b'\\')
        {
            out.put_u8(b'"');
            out.put_slice(event_type.as_bytes());
            out.put_u8(b'"');
        } else {
            let mut quoted = Vec::new();
            push_json_str(&mut quoted, event_type);
            out.put_slice(&quoted);
        }
        out.put_slice(b",\"ts\":\"");
        let mut stamp = [0u8; 27];
        ts.write_rfc3339_into(&mut stamp);
        out.put_slice(&stamp);
        out.put_u8(b'"');
        if let Some(step) = step {
            out.put_slice(b",\"step\":");
            put_u64(out, u64::from(step));
        }
        out.put_slice(b",\"data\":");
        out.put_slice(data_json);
        out.put_u8(b'}');
        out.split().freeze()
    }
}

fn put_u64(out: &mut BytesMut, v: u64) {
    out.put_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
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
    fn envelope_writer_matches_encode() {
        for run_id in ["run_0193", "we\"ird\\id"] {
            let mut w = EnvelopeWriter::new(run_id);
            let mut all = Vec::new();
            for (i, micros) in [
                0i64,
                999_999,
                1_000_000,
                1_000_001,
                86_399_999_999,
                1_795_323_600_123_456,
            ]
            .into_iter()
            .enumerate()
            {
                let ts = Timestamp::from_micros(micros);
                let seq = i as u64 + 1;
                let a = w.encode_static(seq, kind::TEXT_DELTA, ts, Some(3), br#"{"text":"x"}"#);
                let b = RawEvent::encode(
                    seq,
                    run_id,
                    kind::TEXT_DELTA,
                    ts,
                    Some(3),
                    r#"{"text":"x"}"#,
                );
                assert_eq!(a, b);
                let c = w.encode(seq, "my.event", ts, None, b"[1,2]");
                assert_eq!(
                    c,
                    RawEvent::encode(seq, run_id, "my.event", ts, None, "[1,2]")
                );
                assert_eq!(c.parse().unwrap().ts, ts);
                all.push(a);
            }
            // Earlier events are untouched by later ones sharing the buffer.
            assert_eq!(all[0].parse().unwrap().seq, 1);
            assert_eq!(
                all[5].parse().unwrap().ts.to_string(),
                "2026-11-22T05:00:00.123456Z"
            );
        }
        let mut w = EnvelopeWriter::new("r");
        let big = format!("\"{}\"", "z".repeat(100_000));
        let e = w.encode_static(
            1,
            kind::TEXT_DELTA,
            Timestamp::from_micros(0),
            None,
            big.as_bytes(),
        );
        assert_eq!(
            e.parse().unwrap().data.as_str().map(str::len),
            Some(100_000)
        );
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
