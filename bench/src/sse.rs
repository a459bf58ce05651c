//! An incremental SSE scanner and a fast reader of the few envelope fields the bench checks.
//!
//! The scanner takes whatever bytes arrived (any split: mid-line, mid-event), dispatches every
//! complete event (`id`, `event`, `data` lines up to a blank line) to a callback, and keeps the
//! incomplete tail for the next call. It never copies an event unless it has several `data:`
//! lines. [`envelope`] then pulls `seq` (and for ticks `data.i`, `data.t`) out of the JSON with a
//! byte search, without building a JSON tree.

use std::sync::LazyLock;

use memchr::{memchr, memmem};

/// Whether the scanner goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep dispatching.
    Continue,
    /// Stop here; the bytes after this event stay unconsumed.
    Stop,
}

/// One dispatched SSE event, borrowing the scanner's buffer.
#[derive(Debug)]
pub struct Event<'a> {
    /// The `id:` field, if any.
    pub id: Option<&'a [u8]>,
    /// The `event:` field (`message` when absent).
    pub kind: &'a [u8],
    /// The `data:` lines joined by `\n`.
    pub data: &'a [u8],
}

enum Data {
    None,
    Range(usize, usize),
    Scratch,
}

/// The incremental scanner. Feed it by appending to a buffer and calling [`SseParser::parse`].
#[derive(Debug, Default)]
pub struct SseParser {
    /// Comment lines (`: ping`) seen in complete blocks.
    pub comments: u64,
    scratch: Vec<u8>,
}

impl SseParser {
    /// Dispatches every complete event at the front of `buf` to `on_event`, then removes the
    /// bytes consumed. Returns [`Flow::Stop`] when `on_event` asked to stop.
    pub fn parse(
        &mut self,
        buf: &mut Vec<u8>,
        mut on_event: impl FnMut(&Event<'_>) -> Flow,
    ) -> Flow {
        let mut consumed = 0;
        let mut pos = 0;
        let mut id: Option<(usize, usize)> = None;
        let mut kind: Option<(usize, usize)> = None;
        let mut data = Data::None;
        let mut comments = 0;
        let mut flow = Flow::Continue;
        while let Some(nl) = memchr(b'\n', &buf[pos..]) {
            let start = pos;
            let mut end = pos + nl;
            pos = end + 1;
            if end > start && buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end == start {
                // Blank line: the block ends.
                let payload: Option<&[u8]> = match data {
                    Data::None => None,
                    Data::Range(s, e) => Some(&buf[s..e]),
                    Data::Scratch => Some(&self.scratch),
                };
                if let Some(payload) = payload {
                    let ev = Event {
                        id: id.map(|(s, e)| &buf[s..e]),
                        kind: kind.map_or(b"message".as_slice(), |(s, e)| &buf[s..e]),
                        data: payload,
                    };
                    flow = on_event(&ev);
                }
                self.comments += comments;
                comments = 0;
                id = None;
                kind = None;
                data = Data::None;
                consumed = pos;
                if flow == Flow::Stop {
                    break;
                }
                continue;
            }
            if buf[start] == b':' {
                comments += 1;
                continue;
            }
            let line = &buf[start..end];
            let (name_end, value_start) = match memchr(b':', line) {
                Some(c) if line.get(c + 1) == Some(&b' ') => (start + c, start + c + 2),
                Some(c) => (start + c, start + c + 1),
                None => (end, end),
            };
            let value = (value_start, end);
            match &buf[start..name_end] {
                b"id" => id = Some(value),
                b"event" => kind = Some(value),
                b"data" => {
                    data = match data {
                        Data::None => Data::Range(value.0, value.1),
                        Data::Range(s, e) => {
                            self.scratch.clear();
                            self.scratch.extend_from_slice(&buf[s..e]);
                            self.scratch.push(b'\n');
                            self.scratch.extend_from_slice(&buf[value.0..value.1]);
                            Data::Scratch
                        }
                        Data::Scratch => {
                            self.scratch.push(b'\n');
                            self.scratch.extend_from_slice(&buf[value.0..value.1]);
                            Data::Scratch
                        }
                    }
                }
                _ => {}
            }
        }
        buf.drain(..consumed);
        flow
    }
}

/// The envelope fields the bench checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// `seq`.
    pub seq: u64,
    /// `data.i` (ticks only).
    pub i: Option<u64>,
    /// `data.t` (ticks only): creation time in Unix nanoseconds.
    pub t: Option<u64>,
}

static SEQ_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"seq\":"));
static DATA_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"data\":"));
static I_KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"i\":"));
static T_KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"t\":"));
static STAMP_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"text\":\"t"));

/// Reads `seq` from an envelope, and with `tick` also `data.i` and `data.t`. `None` when the
/// data is not an object with a numeric `seq`.
pub fn envelope(json: &[u8], tick: bool) -> Option<Envelope> {
    if json.first() != Some(&b'{') {
        return None;
    }
    // Sluice writes `seq` first; anything else is searched for.
    let after_seq = if json.starts_with(b"{\"seq\":") {
        7
    } else {
        SEQ_KEY.find(json)? + 6
    };
    let (seq, _) = number(&json[after_seq..])?;
    let mut env = Envelope {
        seq,
        i: None,
        t: None,
    };
    if tick {
        let d = DATA_KEY.find(&json[after_seq..])? + after_seq + 7;
        let data = &json[d..];
        env.i = I_KEY
            .find(data)
            .and_then(|p| number(&data[p + 4..]))
            .map(|n| n.0);
        env.t = T_KEY
            .find(data)
            .and_then(|p| number(&data[p + 4..]))
            .map(|n| n.0);
    }
    Some(env)
}

/// The send time in a stamped model token: the number in `"text":"t<unix-ns> "` of a
/// `text-delta` envelope (see `sluice-mock-llm --stamp`).
pub fn stamped_text(json: &[u8]) -> Option<u64> {
    let at = STAMP_KEY.find(json)? + STAMP_KEY.needle().len();
    number(&json[at..]).map(|n| n.0)
}

/// A non-negative integer at the start of `b` (after optional spaces), and where it ended.
pub fn number(b: &[u8]) -> Option<(u64, usize)> {
    let mut i = 0;
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    let start = i;
    let mut v: u64 = 0;
    while let Some(&c) = b.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        i += 1;
    }
    (i > start).then_some((v, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_tokens() {
        let env = br#"{"seq":9,"run_id":"r","type":"text-delta","ts":"x","step":2,"data":{"text":"t1733000000123456789 "}}"#;
        assert_eq!(stamped_text(env), Some(1_733_000_000_123_456_789));
        assert_eq!(stamped_text(br#"{"seq":9,"data":{"text":"tok "}}"#), None);
        assert_eq!(stamped_text(br#"{"seq":9,"data":{"text":"hello"}}"#), None);
    }
    use sluice_protocol::{RawEvent, Timestamp};

    fn sse(ev: &RawEvent) -> Vec<u8> {
        let mut out = format!("id: {}\nevent: {}\ndata: ", ev.seq(), ev.event_type()).into_bytes();
        out.extend_from_slice(ev.json());
        out.extend_from_slice(b"\n\n");
        out
    }

    fn stream(n: u64) -> Vec<u8> {
        let mut all = b"retry: 1000\n\n".to_vec();
        for seq in 1..=n {
            let data = format!(
                r#"{{"i":{},"t":{},"text":"abcdefghijklmnop"}}"#,
                seq - 1,
                1_000 + seq
            );
            let ev = RawEvent::encode(
                seq,
                "run_0193",
                "tick",
                Timestamp::from_micros(1_700_000_000_000_000),
                Some(1),
                &data,
            );
            all.extend(sse(&ev));
            if seq % 3 == 0 {
                all.extend_from_slice(b": ping\n\n");
            }
        }
        all
    }

    /// Feeds `bytes` in pieces of `step` and collects (id, kind, seq, i, t).
    fn scan(bytes: &[u8], step: usize) -> (Vec<(u64, String, Envelope)>, u64) {
        let mut p = SseParser::default();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(step) {
            buf.extend_from_slice(piece);
            p.parse(&mut buf, |ev| {
                let id = number(ev.id.unwrap_or_default()).map_or(0, |n| n.0);
                let kind = String::from_utf8_lossy(ev.kind).into_owned();
                let env = envelope(ev.data, ev.kind == b"tick").unwrap();
                got.push((id, kind, env));
                Flow::Continue
            });
        }
        assert!(buf.is_empty(), "nothing left over");
        (got, p.comments)
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let bytes = stream(7);
        let (whole, pings) = scan(&bytes, bytes.len());
        assert_eq!(whole.len(), 7);
        assert_eq!(pings, 2);
        for (k, (id, kind, env)) in whole.iter().enumerate() {
            let seq = k as u64 + 1;
            assert_eq!((*id, kind.as_str()), (seq, "tick"));
            assert_eq!(
                *env,
                Envelope {
                    seq,
                    i: Some(seq - 1),
                    t: Some(1_000 + seq)
                }
            );
        }
        for step in 1..40 {
            assert_eq!(scan(&bytes, step), (whole.clone(), 2), "split every {step}");
        }
    }

    #[test]
    fn crlf_multiline_data_and_stop() {
        let mut p = SseParser::default();
        let mut buf =
            b"event: x\r\ndata: {\"seq\":1,\r\ndata: \"a\":2}\r\n\r\ndata:{\"seq\":2}\n\n: c\n\ndata: {\"seq\":3}\n\n"
                .to_vec();
        let mut seen = Vec::new();
        let flow = p.parse(&mut buf, |ev| {
            seen.push((ev.kind.to_vec(), ev.data.to_vec()));
            if seen.len() == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        assert_eq!(flow, Flow::Stop);
        assert_eq!(seen[0], (b"x".to_vec(), b"{\"seq\":1,\n\"a\":2}".to_vec()));
        assert_eq!(seen[1], (b"message".to_vec(), b"{\"seq\":2}".to_vec()));
        assert_eq!(buf, b": c\n\ndata: {\"seq\":3}\n\n", "the rest stays");
        assert_eq!(envelope(b"{\"seq\":2}", false).map(|e| e.seq), Some(2));
        assert_eq!(
            envelope(b"{\"a\":1, \"seq\": 9}", false).map(|e| e.seq),
            Some(9)
        );
        assert_eq!(envelope(b"{\"seq\":\"x\"}", false), None);
        assert_eq!(envelope(b"[1]", false), None);
        assert_eq!(number(b"99999999999999999999999"), None);
    }
}
