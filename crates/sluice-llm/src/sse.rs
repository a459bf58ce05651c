//! An incremental `text/event-stream` decoder: bytes in as they arrive, events out.

use crate::{Error, Result};

/// The largest event (or unterminated line) accepted, in bytes.
const MAX_EVENT_BYTES: usize = 8 << 20;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, when given.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Decodes events from bytes split anywhere (inside lines, inside UTF-8 sequences, between
/// `\r` and `\n`). Comments and unknown fields are skipped, as the SSE spec says.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Bytes after `pos` already known to hold no line end.
    scanned: usize,
    event: Option<String>,
    data: String,
    has_data: bool,
    eof: bool,
}

impl SseDecoder {
    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= self.buf.len() / 2) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Marks the end of the body: a last unterminated line or event is then delivered.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// The next complete event, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// [`Error::Protocol`] on invalid UTF-8 or an event over the size limit.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>> {
        loop {
            let Some(line) = self.next_line()? else {
                if self.eof && self.has_data {
                    return Ok(Some(self.take_event()));
                }
                return Ok(None);
            };
            if line.is_empty() {
                if self.has_data {
                    return Ok(Some(self.take_event()));
                }
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                    if self.data.len() > MAX_EVENT_BYTES {
                        return Err(Error::Protocol(format!(
                            "event larger than {MAX_EVENT_BYTES} bytes"
                        )));
                    }
                }
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        }
    }

    fn take_event(&mut self) -> SseEvent {
        self.has_data = false;
        SseEvent {
            event: self.event.take(),
            data: std::mem::take(&mut self.data),
        }
    }

    fn next_line(&mut self) -> Result<Option<String>> {
        let rest = &self.buf[self.pos..];
        let found = rest[self.scanned..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
            .map(|i| i + self.scanned);
        let (len, consumed) = match found {
            Some(i) if rest[i] == b'\r' => match rest.get(i + 1) {
                Some(b'\n') => (i, i + 2),
                Some(_) => (i, i + 1),
                // A `\r` at the end: a `\n` may follow in the next read.
                None if self.eof => (i, i + 1),
                None => {
                    self.scanned = i;
                    return Ok(None);
                }
            },
            Some(i) => (i, i + 1),
            None if self.eof && !rest.is_empty() => (rest.len(), rest.len()),
            None => {
                if rest.len() > MAX_EVENT_BYTES {
                    return Err(Error::Protocol(format!(
                        "line longer than {MAX_EVENT_BYTES} bytes"
                    )));
                }
                self.scanned = rest.len();
                return Ok(None);
            }
        };
        let line = std::str::from_utf8(&rest[..len])
            .map_err(|_| Error::Protocol("stream is not valid UTF-8".into()))?
            .to_owned();
        self.pos += consumed;
        self.scanned = 0;
        Ok(Some(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        for chunk in input.chunks(piece) {
            decoder.push(chunk);
            while let Some(event) = decoder.next_event().unwrap() {
                events.push(event);
            }
        }
        decoder.finish();
        while let Some(event) = decoder.next_event().unwrap() {
            events.push(event);
        }
        events
    }

    #[test]
    fn events_survive_any_split() {
        let input = "retry: 1000\n: comment\r\nevent: message_start\r\ndata: {\"a\":\"héllo\"}\r\n\r\ndata:x\ndata: y\n\nid: 3\n\n\n\rdata: [DONE]\r\r";
        let expected = vec![
            SseEvent {
                event: Some("message_start".into()),
                data: "{\"a\":\"héllo\"}".into(),
            },
            SseEvent {
                event: None,
                data: "x\ny".into(),
            },
            SseEvent {
                event: None,
                data: "[DONE]".into(),
            },
        ];
        for piece in 1..=input.len() {
            assert_eq!(
                decode_in_pieces(input.as_bytes(), piece),
                expected,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn trailing_event_without_blank_line_is_delivered_at_eof() {
        let events = decode_in_pieces(b"data: [DONE]", 4);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "[DONE]");
    }

    #[test]
    fn invalid_utf8_is_a_protocol_error() {
        let mut decoder = SseDecoder::default();
        decoder.push(b"data: \xff\xfe\n\n");
        assert!(matches!(decoder.next_event(), Err(Error::Protocol(_))));
    }
}
