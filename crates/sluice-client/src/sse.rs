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
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buf: BytesMut,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl Parser {
    /// Appends received bytes.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Forgets everything buffered (a new connection starts a new stream).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// The next complete frame, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// [`Error::Decode`] for a line that is not UTF-8 or a `retry:` that is not a number.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
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
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                "id" => self.id = Some(value.to_owned()),
                "event" => self.event = Some(value.to_owned()),
                "retry" => {
                    let ms = value.trim().parse().map_err(|_| {
                        Error::decode("the event stream", format!("retry: {value:?}"))
                    })?;
                    return Ok(Some(Frame::Retry(ms)));
                }
                // Unknown fields are ignored, as the SSE specification says.
                _ => {}
            }
        }
        Ok(None)
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
        p.push(b"retry: soon\n");
        assert!(p.next_frame().is_err());
        p.reset();
        p.push(b"data: \xff\n\n");
        assert!(p.next_frame().is_err());
    }
}
