//! An incremental `text/event-stream` parser: bytes in as they arrive, frames out.

use bytes::{Buf, BytesMut};

use crate::error::{Error, Result};

/// One dispatched SSE item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// An event: its `data` lines joined with `\n`.
    Event {
        /// The `id:` field.
        id: Option<String>,
        /// The `event:` field.
        event: Option<String>,
        /// The data.
        data: String,
    },
    /// A `:` comment (the server's keep-alive `: ping`).
    Comment,
    /// A `retry:` hint in milliseconds.
    Retry(u64),
}

/// Parses frames from a byte stream; lines end with `\n` (a preceding `\r` is dropped).
///
/// Memory is bounded: a line, or an event's data, longer than `max` bytes is an error rather
/// than a buffer that grows for as long as the server sends without a newline.
#[derive(Debug)]
pub(crate) struct Parser {
    buf: BytesMut,
    /// Bytes of `buf` known to hold no `\n`.
    scanned: usize,
    max: usize,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new(crate::client::DEFAULT_MAX_EVENT_SIZE)
    }
}

impl Parser {
    /// A parser accepting lines and events of up to `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max,
            id: None,
            event: None,
            data: None,
        }
    }

    /// Appends received bytes.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Forgets everything buffered (a new connection starts a new stream).
    pub(crate) fn reset(&mut self) {
        *self = Self::new(self.max);
    }

    fn too_large(&self) -> Error {
        Error::decode(
            "the event stream",
            format!(
                "an event or line exceeds the maximum event size of {} bytes (ClientBuilder::max_event_size)",
                self.max
            ),
        )
    }

    /// The next complete frame, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// [`Error::Decode`] for a line that is not UTF-8, or a line or event's data longer than
    /// the maximum.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            let Some(nl) = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + self.scanned)
            else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(self.too_large());
                }
                return Ok(None);
            };
            self.scanned = 0;
            if nl > self.max {
                return Err(self.too_large());
            }
            let mut line = self.buf.split_to(nl + 1);
            line.truncate(nl);
            if line.last() == Some(&b'\r') {
                line.truncate(nl - 1);
            }
            let line = std::str::from_utf8(line.chunk())
                .map_err(|e| Error::decode("the event stream", e.to_string()))?;
            if line.is_empty() {
                let id = self.id.take();
                let event = self.event.take();
                if let Some(data) = self.data.take() {
                    return Ok(Some(Frame::Event { id, event, data }));
                }
                continue;
            }
            if line.starts_with(':') {
                return Ok(Some(Frame::Comment));
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => match &mut self.data {
                    Some(d) => {
                        if d.len() + 1 + value.len() > self.max {
                            return Err(self.too_large());
                        }
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                "id" => self.id = Some(value.to_owned()),
                "event" => self.event = Some(value.to_owned()),
                // As the SSE specification says: ASCII digits only, or the field is ignored
                // (so is a number too large to hold).
                "retry" => {
                    if !value.is_empty()
                        && value.bytes().all(|b| b.is_ascii_digit())
                        && let Ok(ms) = value.parse()
                    {
                        return Ok(Some(Frame::Retry(ms)));
                    }
                }
                // Unknown fields are ignored, as the SSE specification says.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn all(p: &mut Parser) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = p.next_frame().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn frames_split_anywhere() {
        let text = "retry: 1000\n\nid: 7\nevent: tick\ndata: {\"a\":1}\n\n: ping\n\nid: 8\ndata: x\r\ndata: y\r\n\r\n";
        let expected = vec![
            Frame::Retry(1000),
            Frame::Event {
                id: Some("7".into()),
                event: Some("tick".into()),
                data: "{\"a\":1}".into(),
            },
            Frame::Comment,
            Frame::Event {
                id: Some("8".into()),
                event: None,
                data: "x\ny".into(),
            },
        ];
        let bytes = text.as_bytes();
        for split in 0..bytes.len() {
            let mut p = Parser::default();
            p.push(&bytes[..split]);
            let mut got = all(&mut p);
            p.push(&bytes[split..]);
            got.extend(all(&mut p));
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn incomplete_frame_waits_and_bad_input_fails() {
        let mut p = Parser::default();
        p.push(b"id: 1\ndata: {}\n");
        assert_eq!(p.next_frame().unwrap(), None);
        p.push(b"\n");
        assert!(matches!(p.next_frame().unwrap(), Some(Frame::Event { .. })));
        // A `retry:` that is not ASCII digits, or too large, is ignored, as the SSE
        // specification says.
        p.push(b"retry: soon\nretry: 99999999999999999999999\nretry: -1\nretry: 250\n");
        assert_eq!(p.next_frame().unwrap(), Some(Frame::Retry(250)));
        p.reset();
        p.push(b"data: \xff\n\n");
        assert!(p.next_frame().is_err());
    }

    #[test]
    fn memory_is_bounded() {
        // A line that never ends: an error once it is longer than the maximum, however it is
        // split into chunks.
        let mut p = Parser::new(64);
        p.push(b"data: ");
        for _ in 0..7 {
            p.push(b"xxxxxxxx");
            assert_eq!(p.next_frame().unwrap(), None);
        }
        p.push(b"xxxxxxxx");
        let err = p.next_frame().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Decode);
        assert!(
            err.to_string().contains("maximum event size of 64 bytes"),
            "{err}"
        );
        // An event of many short data lines.
        let mut p = Parser::new(64);
        for _ in 0..30 {
            p.push(b"data: abc\n");
        }
        assert!(p.next_frame().is_err());
        // At the limit is fine, and the limit survives a reset.
        let mut p = Parser::new(64);
        p.reset();
        let data = "y".repeat(58);
        p.push(format!("data: {data}\n\n").as_bytes());
        assert_eq!(
            p.next_frame().unwrap(),
            Some(Frame::Event {
                id: None,
                event: None,
                data
            })
        );
        p.push(&[b'z'; 65]);
        assert!(p.next_frame().is_err());
    }
}
