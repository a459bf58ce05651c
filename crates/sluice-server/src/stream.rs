//! Encoders of a run's event log: SSE and NDJSON bodies, with cursors, type filters and
//! heartbeats. Every encoder reads from the durable log through `sluice_store::follow_batches`,
//! so a slow client only falls behind in the log, never in server memory.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use sluice_protocol::{RawEvent, kind};
use sluice_store::Store;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::error::ApiError;

/// Wire format of an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/event-stream`.
    Sse,
    /// `application/x-ndjson`: one envelope per line, blank lines as keep-alive.
    Ndjson,
}

impl Format {
    /// Chooses by `Accept`: NDJSON when the client prefers it, SSE otherwise (the default).
    pub fn negotiate(headers: &HeaderMap) -> Self {
        match preferred(headers, &[Self::SSE, Self::NDJSON]) {
            Some(Self::NDJSON) => Self::Ndjson,
            _ => Self::Sse,
        }
    }

    /// Whether the client asked for a stream rather than the JSON record, and which: the
    /// media type among `text/event-stream`, `application/x-ndjson` and `application/json` that
    /// `Accept` names with the highest `q` (the first named on a tie). Wildcards ask for
    /// nothing here: `*/*` gets the record.
    pub fn requested(headers: &HeaderMap) -> Option<Self> {
        match preferred(headers, &[Self::SSE, Self::NDJSON, "application/json"]) {
            Some(Self::SSE) => Some(Self::Sse),
            Some(Self::NDJSON) => Some(Self::Ndjson),
            _ => None,
        }
    }

    const SSE: &'static str = "text/event-stream";
    const NDJSON: &'static str = "application/x-ndjson";

    /// The response content type.
    pub fn content_type(self) -> HeaderValue {
        match self {
            Self::Sse => HeaderValue::from_static("text/event-stream"),
            Self::Ndjson => HeaderValue::from_static("application/x-ndjson"),
        }
    }

    fn keep_alive(self) -> Bytes {
        match self {
            Self::Sse => Bytes::from_static(b": ping\n\n"),
            Self::Ndjson => Bytes::from_static(b"\n"),
        }
    }

    fn encode(self, out: &mut BytesMut, ev: &RawEvent) {
        match self {
            Self::Sse => {
                out.put_slice(b"id: ");
                out.put_slice(itoa::Buffer::new().format(ev.seq()).as_bytes());
                out.put_slice(b"\nevent: ");
                out.put_slice(ev.event_type().as_bytes());
                out.put_slice(b"\ndata: ");
                out.put_slice(ev.json());
                out.put_slice(b"\n\n");
            }
            Self::Ndjson => {
                out.put_slice(ev.json());
                out.put_u8(b'\n');
            }
        }
    }
}

/// Of `choices` (lowercase media types), the one `Accept` prefers: named (case-insensitively,
/// parameters aside) with the highest `q`, the first named on a tie; `q=0` means "not this".
/// `None` when `Accept` names none of them. A `q` that is not a number counts as 1.
fn preferred(headers: &HeaderMap, choices: &[&'static str]) -> Option<&'static str> {
    let mut best: Option<(&'static str, f32)> = None;
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let Some(&choice) = choices.iter().find(|c| c.eq_ignore_ascii_case(media)) else {
            continue;
        };
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(1.0));
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((choice, q));
        }
    }
    best.map(|(c, _)| c)
}

/// Where a reader starts: `Last-Event-ID` (a reconnecting EventSource) or `?after=`.
///
/// Both are checked whenever given. When both are, the header wins: an EventSource that
/// reconnects sends the seq it saw last in the header while its URL still carries the `after`
/// it was opened with.
///
/// # Errors
/// 400 for anything but a non-negative integer, in either, or for `Last-Event-ID` given more
/// than once.
pub fn cursor(headers: &HeaderMap, after: Option<&str>) -> Result<u64, ApiError> {
    let after = after.map(|a| parse_seq(a, "after")).transpose()?;
    let mut ids = headers.get_all("last-event-id").iter();
    let Some(v) = ids.next() else {
        return Ok(after.unwrap_or(0));
    };
    if ids.next().is_some() {
        return Err(ApiError::BadRequest(
            "Last-Event-ID: given more than once".into(),
        ));
    }
    let text = v.to_str().map_err(|_| {
        ApiError::BadRequest("Last-Event-ID: must be a non-negative integer".into())
    })?;
    parse_seq(text.trim(), "Last-Event-ID")
}

fn parse_seq(text: &str, what: &str) -> Result<u64, ApiError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!(
            "{what}: must be a non-negative integer, got {text:?}"
        )));
    }
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{what}: out of range: {text:?}")))
}

/// A server-side `?types=a,b` filter. The terminal event always passes, so a filtered stream
/// still ends visibly.
#[derive(Debug, Clone, Default)]
pub struct TypeFilter(Option<HashSet<String>>);

impl TypeFilter {
    /// Parses the comma-separated list.
    ///
    /// # Errors
    /// 400 for an empty list or an entry that is not a valid event type name.
    pub fn parse(types: Option<&str>) -> Result<Self, ApiError> {
        let Some(list) = types else {
            return Ok(Self(None));
        };
        let mut set = HashSet::new();
        for t in list.split(',').map(str::trim) {
            let valid = kind::is_reserved(t) || sluice_protocol::validate_custom_name(t).is_ok();
            if !valid {
                return Err(ApiError::BadRequest(format!(
                    "types: {t:?} is not an event type (reserved types or [a-z][a-z0-9._-]{{0,63}})"
                )));
            }
            set.insert(t.to_owned());
        }
        Ok(Self(Some(set)))
    }

    /// Checks that the run's workflow can write every type named: a reserved one or one it
    /// declares. A filter of a type no event of the run can have is a typo, and would only
    /// show the terminal event.
    ///
    /// # Errors
    /// 400 naming the first such type and the workflow's own types.
    pub fn check_written_by(&self, wf: &sluice_engine::Workflow) -> Result<(), ApiError> {
        let Some(set) = &self.0 else {
            return Ok(());
        };
        let mut names: Vec<&String> = set.iter().collect();
        names.sort();
        match names.into_iter().find(|t| !wf.writes(t)) {
            None => Ok(()),
            Some(t) => {
                let own: Vec<&str> = wf.stream_events().collect();
                let own = if own.is_empty() {
                    String::from("none")
                } else {
                    own.join(", ")
                };
                Err(ApiError::BadRequest(format!(
                    "types: {t:?} is not an event type of workflow {:?} (the reserved types, and its own: {own})",
                    wf.name()
                )))
            }
        }
    }

    /// Whether `ev` goes through the filter.
    pub fn passes(&self, ev: &RawEvent) -> bool {
        self.0
            .as_ref()
            .is_none_or(|s| s.contains(ev.event_type()) || ev.is_terminal())
    }
}

/// Options of one event stream response.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// SSE or NDJSON.
    pub format: Format,
    /// Events with `seq > after`.
    pub after: u64,
    /// Server-side filter.
    pub types: TypeFilter,
    /// Keep-alive interval.
    pub heartbeat: Duration,
}

/// The body of an event stream: the `retry:` hint (SSE), then the run's events from the cursor
/// in batches, keep-alives while idle; ends after the terminal event or on shutdown.
///
/// A live stream sends an event every few milliseconds, so nothing here is set up per event:
/// the shutdown wait and the keep-alive timer live as long as the stream, and the timer is
/// re-armed only when it fires (a ping goes out once `heartbeat` has passed since the last
/// write), not reset at every batch.
pub fn body(
    store: Arc<dyn Store>,
    run_id: String,
    opts: StreamOptions,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let now = tokio::time::Instant::now();
    let state = Body {
        events: Box::pin(sluice_store::follow_batches(
            store,
            run_id.clone(),
            opts.after,
        )),
        shutdown: Box::pin(shutdown.cancelled_owned()),
        keep_alive: Box::pin(tokio::time::sleep_until(now + opts.heartbeat)),
        last_write: now,
        hello: opts.format == Format::Sse,
        opts,
        run_id,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.hello {
            st.hello = false;
            return Some((Ok(Bytes::from_static(b"retry: 1000\n\n")), st));
        }
        loop {
            tokio::select! {
                biased;
                () = &mut st.shutdown => return None,
                batch = st.events.next() => match batch {
                    Some(Ok(batch)) => {
                        let size = batch.iter().map(|e| e.json().len() + 48).sum();
                        let mut out = BytesMut::with_capacity(size);
                        for ev in batch.iter().filter(|e| st.opts.types.passes(e)) {
                            st.opts.format.encode(&mut out, ev);
                        }
                        if out.is_empty() {
                            continue;
                        }
                        st.last_write = tokio::time::Instant::now();
                        return Some((Ok(out.freeze()), st));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(run_id = %st.run_id, error = %e, "event stream ended by a store error");
                        return None;
                    }
                    None => return None,
                },
                () = &mut st.keep_alive => {
                    let now = tokio::time::Instant::now();
                    let due = st.last_write + st.opts.heartbeat;
                    if now < due {
                        st.keep_alive.as_mut().reset(due);
                        continue;
                    }
                    st.last_write = now;
                    st.keep_alive.as_mut().reset(now + st.opts.heartbeat);
                    return Some((Ok(st.opts.format.keep_alive()), st));
                }
            }
        }
    })
}

/// The state of one [`body`] stream between writes.
struct Body<E> {
    events: Pin<Box<E>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    keep_alive: Pin<Box<tokio::time::Sleep>>,
    /// When the last bytes (events or a ping) were handed to the connection.
    last_write: tokio::time::Instant,
    /// The SSE `retry:` hint is still to be sent.
    hello: bool,
    opts: StreamOptions,
    run_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors() {
        let mut h = HeaderMap::new();
        assert_eq!(cursor(&h, None).ok(), Some(0));
        assert_eq!(cursor(&h, Some("42")).ok(), Some(42));
        for bad in ["-7", "abc", "", "1.5", "99999999999999999999999"] {
            assert!(cursor(&h, Some(bad)).is_err(), "{bad}");
        }
        h.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(cursor(&h, Some("42")).ok(), Some(9), "Last-Event-ID wins");
        // A bad `after` is refused even where the header would win.
        for bad in ["-7", "abc", "", "99999999999999999999999"] {
            assert!(cursor(&h, Some(bad)).is_err(), "{bad} beside a header");
        }
        h.append("last-event-id", HeaderValue::from_static("6"));
        assert!(cursor(&h, None).is_err(), "two headers");
        h.remove("last-event-id");
        h.insert("last-event-id", HeaderValue::from_static("abc"));
        assert!(cursor(&h, None).is_err());
    }

    #[test]
    fn accept_negotiation() {
        let with = |accept: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            h
        };
        let none = HeaderMap::new();
        assert_eq!(Format::requested(&none), None);
        assert_eq!(Format::negotiate(&none), Format::Sse);
        for (accept, requested, negotiated) in [
            ("text/event-stream", Some(Format::Sse), Format::Sse),
            ("Text/Event-Stream", Some(Format::Sse), Format::Sse),
            ("APPLICATION/X-NDJSON", Some(Format::Ndjson), Format::Ndjson),
            ("*/*", None, Format::Sse),
            ("application/json", None, Format::Sse),
            ("text/event-stream;q=0, application/json", None, Format::Sse),
            (
                "application/x-ndjson;q=0, text/event-stream",
                Some(Format::Sse),
                Format::Sse,
            ),
            (
                "application/json, text/event-stream;q=0.5",
                None,
                Format::Sse,
            ),
            (
                "text/event-stream; charset=utf-8",
                Some(Format::Sse),
                Format::Sse,
            ),
            (
                "text/event-stream, application/x-ndjson",
                Some(Format::Sse),
                Format::Sse,
            ),
            (
                "text/event-stream;q=0.4, application/x-ndjson ; Q=0.9",
                Some(Format::Ndjson),
                Format::Ndjson,
            ),
            ("text/event-stream;q=x", Some(Format::Sse), Format::Sse),
        ] {
            let h = with(accept);
            assert_eq!(Format::requested(&h), requested, "{accept}");
            assert_eq!(Format::negotiate(&h), negotiated, "{accept}");
        }
    }

    #[test]
    fn type_filters() {
        assert!(TypeFilter::parse(Some("tick,text-delta")).is_ok());
        assert!(TypeFilter::parse(Some("")).is_err());
        assert!(TypeFilter::parse(Some("tick,,x")).is_err());
        assert!(TypeFilter::parse(Some("Bad")).is_err());
    }

    #[test]
    fn sse_framing() {
        let ev = RawEvent::encode(
            7,
            "r",
            "tick",
            sluice_protocol::Timestamp::from_micros(0),
            Some(1),
            "{}",
        );
        let mut out = BytesMut::new();
        Format::Sse.encode(&mut out, &ev);
        let text = String::from_utf8(out.to_vec()).unwrap_or_default();
        assert_eq!(
            text,
            "id: 7\nevent: tick\ndata: {\"seq\":7,\"run_id\":\"r\",\"type\":\"tick\",\"ts\":\"1970-01-01T00:00:00.000000Z\",\"step\":1,\"data\":{}}\n\n"
        );
    }
}
