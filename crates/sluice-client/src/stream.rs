//! [`EventStream`]: a run's events over SSE that resumes by itself after a dropped connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header;
use reqwest::{Method, Response, StatusCode};
use sluice_protocol::{Event, RawEvent};
use tokio::time::Instant;

use crate::client::{Client, is_event_stream};
use crate::error::{Error, ErrorKind, Result};
use crate::sse::{Frame, Parser};

/// How long a connection must have stayed up before a keep-alive on it counts as health
/// (resetting the failures that limit reconnects).
const STABLE: Duration = Duration::from_secs(2);

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;
type Items = Pin<Box<dyn Stream<Item = Result<(Event, Bytes)>> + Send>>;

#[derive(Debug, Default)]
struct Stats {
    reconnects: AtomicU64,
    last_seq: AtomicU64,
    /// Between a failure (a dropped connection, a refused attempt) and the next connection.
    reconnecting: std::sync::atomic::AtomicBool,
}

/// A run's events in `seq` order, from [`Client::events`] or [`Client::start_and_stream`].
///
/// It reconnects by itself with `Last-Event-ID` after a dropped connection or a silence longer
/// than the [idle timeout](crate::ClientBuilder::idle_timeout) (with jittered backoff, for up to
/// the [reconnect timeout](crate::ClientBuilder::reconnect_timeout)), yields no event twice,
/// ends after the run's terminal event (or at once when the server answers `204 No Content`),
/// and ends with an error on a `seq` gap or when it gives up.
/// `T` is [`Event`]; [`raw`](EventStream::raw) gives [`RawEvent`]s holding the envelope bytes
/// exactly as the server sent them.
pub struct EventStream<T = Event> {
    run_id: String,
    stats: Arc<Stats>,
    inner: Items,
    map: fn(Event, Bytes) -> T,
    /// Set once `inner` has ended: it must not be polled again.
    ended: bool,
}

impl<T> std::fmt::Debug for EventStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("run_id", &self.run_id)
            .field("last_seq", &self.last_seq())
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl EventStream<Event> {
    pub(crate) fn new(
        client: Client,
        run_id: String,
        after: u64,
        types: Option<String>,
        initial: Option<Response>,
    ) -> Self {
        let stats = Arc::new(Stats::default());
        stats.last_seq.store(after, Ordering::Relaxed);
        let parser = Parser::new(client.inner.max_event_size);
        let follower = Follower {
            client,
            run_id: run_id.clone(),
            types,
            cursor: after,
            body: None,
            initial,
            parser,
            failures: 0,
            failing_since: None,
            opened_at: None,
            connected: false,
            answered: false,
            retry_after: None,
            last_error: None,
            stats: stats.clone(),
            done: false,
        };
        let inner = futures_util::stream::unfold(follower, |mut f| async move {
            let item = f.next().await?;
            Some((item, f))
        });
        Self {
            run_id,
            stats,
            inner: Box::pin(inner),
            map: |event, _| event,
            ended: false,
        }
    }

    /// The same stream yielding [`RawEvent`]s: the envelope bytes as received, for relaying
    /// (the CLI's `--json` prints them verbatim).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut raw = client.events("run_0193…", 0).raw();
    /// while let Some(ev) = raw.next().await {
    ///     println!("{}", String::from_utf8_lossy(ev?.json()));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn raw(self) -> EventStream<RawEvent> {
        EventStream {
            run_id: self.run_id,
            stats: self.stats,
            inner: self.inner,
            map: |event, json| RawEvent::from_parts(event.seq, &event.event_type, json),
            ended: self.ended,
        }
    }
}

impl<T> EventStream<T> {
    /// The run these events belong to (for [`Client::start_and_stream`], the run it started).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use sluice_client::CreateRun;
    /// let events = client.start_and_stream("ticker", CreateRun::default()).await?;
    /// eprintln!("started {}; follow it elsewhere with: sluice tail {0}", events.run_id());
    /// # Ok(()) }
    /// ```
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// How many times the stream has reconnected after losing its connection (0 while the
    /// first connection holds).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut events = client.events("run_0193…", 0);
    /// while let Some(event) = events.next().await {
    ///     event?;
    /// }
    /// if events.reconnects() > 0 {
    ///     eprintln!("resumed {} times, nothing lost", events.reconnects());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn reconnects(&self) -> u64 {
        self.stats.reconnects.load(Ordering::Relaxed)
    }

    /// Whether the stream has lost its connection (or an attempt failed) and is trying to
    /// connect again, with backoff, for up to the reconnect timeout: a view can say so while
    /// no event comes.
    pub fn reconnecting(&self) -> bool {
        self.stats.reconnecting.load(Ordering::Relaxed)
    }

    /// The `seq` of the last event yielded (the `after` given at first): the cursor a resume
    /// starts after, and what to pass to [`Client::events`] to continue later.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut events = client.events("run_0193…", 0);
    /// if let Some(first) = events.next().await {
    ///     println!("{}", first?.event_type);
    /// }
    /// let cursor = events.last_seq();
    /// drop(events);
    /// // … later, possibly in another process: the events after `cursor`.
    /// let _rest = client.events("run_0193…", cursor);
    /// # Ok(()) }
    /// ```
    pub fn last_seq(&self) -> u64 {
        self.stats.last_seq.load(Ordering::Relaxed)
    }
}

impl<T> Stream for EventStream<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let map = self.map;
        let item = std::task::ready!(self.inner.poll_next_unpin(cx));
        if item.is_none() {
            self.ended = true;
        }
        Poll::Ready(item.map(|r| r.map(|(event, json)| map(event, json))))
    }
}

/// The state machine behind an [`EventStream`].
struct Follower {
    client: Client,
    run_id: String,
    /// Server-side filter; with one, gaps are expected and not checked.
    types: Option<String>,
    /// The last seq yielded.
    cursor: u64,
    body: Option<Body>,
    /// The answer of a streaming start, used as the first connection.
    initial: Option<Response>,
    parser: Parser,
    /// Consecutive failures since the last event (or keep-alive).
    failures: u32,
    /// When the first of those failures happened.
    failing_since: Option<Instant>,
    /// When the current connection opened.
    opened_at: Option<Instant>,
    /// Whether a connection was ever established.
    connected: bool,
    /// Whether the server answered a retryable 408, 429 or 5xx before any connection: it is
    /// there (restarting, say), so what fails after that is retried too.
    answered: bool,
    retry_after: Option<Duration>,
    last_error: Option<Error>,
    stats: Arc<Stats>,
    done: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<(Event, Bytes)>> {
        if self.done {
            return None;
        }
        let item = self.step().await;
        if !matches!(item, Ok(Some(_))) {
            self.done = true;
            self.body = None;
        }
        item.transpose()
    }

    async fn step(&mut self) -> Result<Option<(Event, Bytes)>> {
        loop {
            if self.body.is_none() && !self.connect().await? {
                return Ok(None);
            }
            while let Some(frame) = self.parser.next_frame()? {
                match frame {
                    Frame::Event { data, .. } => {
                        if let Some(item) = self.accept(data)? {
                            return Ok(Some(item));
                        }
                    }
                    // A keep-alive proves the connection healthy once it has stayed up a
                    // while: one that sends a keep-alive and closes at once is still failing.
                    Frame::Comment => {
                        if self.opened_at.is_some_and(|t| t.elapsed() >= STABLE) {
                            self.healthy();
                        }
                    }
                    // The client's own backoff applies, not the server's hint.
                    Frame::Retry(_) => {}
                }
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            let idle = self.client.inner.idle_timeout;
            match tokio::time::timeout(idle, body.next()).await {
                Ok(Some(Ok(chunk))) => self.parser.push(&chunk),
                Ok(Some(Err(e))) => {
                    let doing = format!("reading the events of run {}", self.run_id);
                    self.lost(Error::from_reqwest(&doing, e));
                }
                Ok(None) => self.lost(Error::transport(format!(
                    "the server closed the event stream of run {} before its last event",
                    self.run_id
                ))),
                Err(_) => self.lost(Error::transport(format!(
                    "no data for {idle:?} on the event stream of run {}",
                    self.run_id
                ))),
            }
        }
    }

    fn lost(&mut self, e: Error) {
        self.body = None;
        self.failed(e);
    }

    fn failed(&mut self, e: Error) {
        self.stats.reconnecting.store(true, Ordering::Relaxed);
        self.failures += 1;
        self.failing_since.get_or_insert_with(Instant::now);
        self.retry_after = e.retry_after();
        self.last_error = Some(e);
    }

    fn healthy(&mut self) {
        self.failures = 0;
        self.failing_since = None;
    }

    /// Decodes an event, skipping what was already yielded and refusing gaps.
    fn accept(&mut self, data: String) -> Result<Option<(Event, Bytes)>> {
        let event: Event = serde_json::from_str(&data)
            .map_err(|e| Error::decode_json(format!("an event of run {}", self.run_id), e))?;
        if event.seq <= self.cursor {
            return Ok(None);
        }
        if self.types.is_none() && event.seq != self.cursor + 1 {
            return Err(Error::Gap {
                run_id: self.run_id.clone(),
                last: self.cursor,
                got: event.seq,
            });
        }
        self.cursor = event.seq;
        self.stats.last_seq.store(event.seq, Ordering::Relaxed);
        self.healthy();
        if event.is_terminal() {
            self.done = true;
            self.body = None;
        }
        Ok(Some((event, Bytes::from(data))))
    }

    /// Opens a connection, retrying with backoff. `false` when the server says there is nothing
    /// more to read (204).
    ///
    /// Retries stop after `reconnect_timeout` of failures in a row (or `max_reconnect_attempts`
    /// when set); before the first successful connection only 408, 429 and 5xx answers are
    /// retried, and, once one came, any failure after it (a server restarting answers 503, then
    /// refuses connections for a moment).
    async fn connect(&mut self) -> Result<bool> {
        loop {
            if self.failures > 0 {
                let inner = &self.client.inner;
                let early = matches!(
                    self.last_error.as_ref().map(Error::kind),
                    Some(ErrorKind::Rejected { .. } | ErrorKind::Server | ErrorKind::Timeout)
                );
                self.answered |= early;
                let elapsed = self.failing_since.map_or(Duration::ZERO, |t| t.elapsed());
                let left = inner.reconnect_timeout.saturating_sub(elapsed);
                let may_retry = (self.connected || self.answered)
                    && !left.is_zero()
                    && inner
                        .max_reconnect_attempts
                        .is_none_or(|max| self.failures <= max);
                if !may_retry {
                    return Err(self.last_error.take().unwrap_or_else(|| {
                        Error::transport(format!(
                            "gave up following run {} after {} attempts",
                            self.run_id, self.failures
                        ))
                    }));
                }
                // The server's hint can lengthen the wait, never shorten it: a `Retry-After: 0`
                // (or a date in the past, from a skewed clock) must not make a reconnect loop.
                let backoff = inner.backoff.delay(self.failures);
                let delay = match self.retry_after.take() {
                    Some(hint) => hint.min(inner.max_retry_after).max(backoff),
                    None => backoff,
                };
                // The last attempt happens when the time is up, not after it.
                tokio::time::sleep(delay.min(left)).await;
            }
            let opened = match self.initial.take() {
                Some(resp) => Ok(Some(resp)),
                None => self.open().await,
            };
            match opened {
                Ok(Some(resp)) => {
                    if self.connected {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats.reconnecting.store(false, Ordering::Relaxed);
                    self.connected = true;
                    self.opened_at = Some(Instant::now());
                    self.parser.reset();
                    self.body = Some(Box::pin(resp.bytes_stream()));
                    return Ok(true);
                }
                Ok(None) => return Ok(false),
                Err(e) if e.is_retryable() => self.failed(e),
                Err(e) => return Err(e),
            }
        }
    }

    async fn open(&mut self) -> Result<Option<Response>> {
        let mut url = self.client.url(&["v1", "runs", &self.run_id, "events"]);
        if let Some(types) = &self.types {
            url.query_pairs_mut().append_pair("types", types);
        }
        let req = self
            .client
            .request(Method::GET, url)
            .header(header::ACCEPT, "text/event-stream")
            .header("last-event-id", self.cursor.to_string());
        let doing = format!("following run {}", self.run_id);
        let resp = self.client.send_stream(req, &doing).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !is_event_stream(&resp) {
            return Err(Error::decode(
                format!("the event stream of run {}", self.run_id),
                "the answer is not text/event-stream",
            ));
        }
        Ok(Some(resp))
    }
}
