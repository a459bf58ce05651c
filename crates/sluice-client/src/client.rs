//! [`Client`], its [`ClientBuilder`], and every call of the HTTP API.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_protocol::api::{CreateRun, RunList, SendEvent, WorkflowInfo};
use sluice_protocol::payload::{ToolResult, ToolResults};
use sluice_protocol::{RunRecord, SessionRecord, kind};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::run::{RunFilter, RunHandle};
use crate::stream::EventStream;

/// The server a client talks to when none is given.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Options of a [`Client`]; [`build`](ClientBuilder::build) checks them.
///
/// Defaults (see each setter): [`DEFAULT_URL`], no API key, 5 s to connect, 30 s per request;
/// an event stream counts as dropped after 45 s without data, reconnects after 100 ms doubling
/// to 5 s (jittered), honours a server's `Retry-After` up to 30 s, and gives up after 2 minutes
/// of failed reconnects in a row (so it rides out a server restart of a minute or so); events up
/// to 16 MiB.
///
/// ```
/// use std::time::Duration;
/// let client = sluice_client::Client::builder()
///     .base_url("http://127.0.0.1:8080")
///     .api_key("my-key")
///     .connect_timeout(Duration::from_secs(2))
///     .request_timeout(Duration::from_secs(10))
///     .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .reconnect_timeout(Duration::from_secs(300))
///     .build()?;
/// # Ok::<(), sluice_client::Error>(())
/// ```
#[derive(Clone)]
pub struct ClientBuilder {
    base_url: String,
    api_key: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    idle_timeout: Duration,
    backoff: Backoff,
    max_reconnect_attempts: Option<u32>,
    reconnect_timeout: Duration,
    max_retry_after: Duration,
    max_event_size: usize,
}

/// The largest event (or SSE line) a stream accepts by default: 16 MiB.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 16 << 20;

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field(
                "base_url",
                &sluice_protocol::without_userinfo(&self.base_url),
            )
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("backoff", &self.backoff)
            .field("max_reconnect_attempts", &self.max_reconnect_attempts)
            .field("reconnect_timeout", &self.reconnect_timeout)
            .field("max_retry_after", &self.max_retry_after)
            .field("max_event_size", &self.max_event_size)
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_URL.to_owned(),
            api_key: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(45),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            max_reconnect_attempts: None,
            reconnect_timeout: Duration::from_secs(120),
            max_retry_after: Duration::from_secs(30),
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
        }
    }
}

impl ClientBuilder {
    /// The default options (listed on [`ClientBuilder`]).
    ///
    /// ```
    /// let client = sluice_client::ClientBuilder::new().build()?;
    /// assert_eq!(client.base_url(), "http://127.0.0.1:8080/");
    /// # Ok::<(), sluice_client::Error>(())
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The defaults, with the base URL from `SLUICE_URL` and the API key from `SLUICE_API_KEY`
    /// when they are set and not empty (the variables the `sluice` command line reads too).
    /// Other options can still be set afterwards.
    ///
    /// ```
    /// use std::time::Duration;
    /// // SLUICE_URL=http://10.0.0.5:8080 SLUICE_API_KEY=… my-program
    /// let client = sluice_client::ClientBuilder::from_env()
    ///     .request_timeout(Duration::from_secs(5))
    ///     .build()?;
    /// println!("talking to {}", client.base_url());
    /// # Ok::<(), sluice_client::Error>(())
    /// ```
    pub fn from_env() -> Self {
        let mut b = Self::default();
        if let Ok(url) = std::env::var("SLUICE_URL")
            && !url.is_empty()
        {
            b.base_url = url;
        }
        if let Ok(key) = std::env::var("SLUICE_API_KEY")
            && !key.is_empty()
        {
            b.api_key = Some(key);
        }
        b
    }

    /// The server's base URL, such as `http://127.0.0.1:8080` (a path prefix is kept).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// The bearer key sent as `Authorization: Bearer <key>`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Time allowed to open a TCP connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for a whole request and its answer; for an event stream, for the answer's
    /// headers (the stream itself runs as long as the run).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Silence after which an event stream counts as dropped and is resumed. The server sends a
    /// keep-alive every 15 s by default, so keep this well above its `heartbeat`.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Delays between reconnects of an event stream: from `initial`, doubling up to `max`, each
    /// with random jitter over its upper half.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff {
            initial,
            max: max.max(initial),
        };
        self
    }

    /// Consecutive failed reconnects (without an event in between, or a keep-alive on a
    /// connection that stayed up for 2 s) after which an event stream gives up with the last
    /// error. Default: no limit by count; the [`reconnect_timeout`](Self::reconnect_timeout)
    /// applies either way. The server's `Retry-After` can lengthen the wait before a reconnect
    /// (up to [`max_retry_after`](Self::max_retry_after)), never shorten it below the backoff.
    pub fn max_reconnect_attempts(mut self, attempts: u32) -> Self {
        self.max_reconnect_attempts = Some(attempts);
        self
    }

    /// How long an event stream keeps trying to reconnect, counted from the first failure since
    /// it last received an event (or a keep-alive on a connection that stayed up for 2 s),
    /// before it gives up with the last error.
    /// Default 2 minutes: a stream rides out a server restart of a minute or so.
    pub fn reconnect_timeout(mut self, timeout: Duration) -> Self {
        self.reconnect_timeout = timeout;
        self
    }

    /// The longest `Retry-After` (of a 429 or 503 answer) an event stream waits before it
    /// reconnects; a longer one is cut to this. Default 30 s. Both forms of the header are
    /// understood: seconds and an HTTP date.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// The largest event an event stream accepts, in bytes (default
    /// [`DEFAULT_MAX_EVENT_SIZE`], 16 MiB): a longer SSE line or event ends the stream with
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode) instead of buffering without bound.
    /// Keep it above the server's largest event (`server.max_event` bounds what clients send;
    /// a workflow's own events can be larger).
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes.max(1);
        self
    }

    /// Builds the client.
    ///
    /// # Errors
    /// [`Error::Config`] for a base URL that is not `http://…` (this build has no TLS) or an
    /// API key that cannot be sent in a header.
    pub fn build(self) -> Result<Client> {
        let mut base = Url::parse(self.base_url.trim())
            .map_err(|e| Error::Config(format!("base URL {:?}: {e}", self.base_url)))?;
        match base.scheme() {
            "http" => {}
            "https" => {
                return Err(Error::Config(format!(
                    "base URL {:?}: https is not supported by this build (no TLS); use http:// or a local TLS-terminating proxy",
                    self.base_url
                )));
            }
            other => {
                return Err(Error::Config(format!(
                    "base URL {:?}: scheme {other:?} is not http",
                    self.base_url
                )));
            }
        }
        if base.cannot_be_a_base() || base.query().is_some() || base.fragment().is_some() {
            return Err(Error::Config(format!(
                "base URL {:?}: expected http://HOST[:PORT][/PREFIX]",
                self.base_url
            )));
        }
        if let Ok(mut segs) = base.path_segments_mut() {
            segs.pop_if_empty();
        }
        let auth = match &self.api_key {
            None => None,
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                    .map_err(|_| Error::Config("API key: contains invalid characters".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(concat!("sluice-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                auth,
                request_timeout: self.request_timeout,
                idle_timeout: self.idle_timeout,
                backoff: self.backoff,
                max_reconnect_attempts: self.max_reconnect_attempts,
                reconnect_timeout: self.reconnect_timeout,
                max_retry_after: self.max_retry_after,
                max_event_size: self.max_event_size,
            }),
        })
    }
}

pub(crate) struct Inner {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
    request_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) max_reconnect_attempts: Option<u32>,
    pub(crate) reconnect_timeout: Duration,
    pub(crate) max_retry_after: Duration,
    pub(crate) max_event_size: usize,
}

/// How [`Client::start_with`] starts a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Sent as `Idempotency-Key`: a start with a key seen before (for this API key and
    /// workflow, within 24 h) answers the run it created, and starts nothing.
    pub idempotency_key: Option<String>,
    /// With a `session_id` whose session has an active run: queue behind it
    /// (`?if_busy=enqueue`) instead of being refused with a conflict.
    pub enqueue: bool,
}

/// A Sluice client. Cheap to clone: clones share one connection pool.
///
/// ```no_run
/// # async fn demo() -> sluice_client::Result<()> {
/// use futures_util::StreamExt;
/// use sluice_client::{Client, CreateRun};
///
/// let client = Client::new("http://127.0.0.1:8080")?;
/// let run = client.start("ticker", CreateRun { input: serde_json::json!({"n": 3}), ..Default::default() }).await?;
/// let mut events = run.events();
/// while let Some(event) = events.next().await {
///     let event = event?;
///     println!("{} {}", event.seq, event.event_type);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field(
                "base_url",
                &sluice_protocol::without_userinfo(self.inner.base.as_str()),
            )
            .field("api_key", &self.inner.auth.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `base_url` with the default options (listed on [`ClientBuilder`]).
    ///
    /// ```
    /// let client = sluice_client::Client::new("http://127.0.0.1:8080")?;
    /// let same_pool = client.clone(); // cheap: clones share one connection pool
    /// assert_eq!(same_pool.base_url(), "http://127.0.0.1:8080/");
    /// # Ok::<(), sluice_client::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`ClientBuilder::build`]: [`ErrorKind::Config`](crate::ErrorKind::Config) for a URL
    /// that is not `http://HOST[:PORT][/PREFIX]`.
    pub fn new(base_url: impl Into<String>) -> Result<Self> {
        ClientBuilder::new().base_url(base_url).build()
    }

    /// Options to build a client with; the same as [`ClientBuilder::new`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let client = sluice_client::Client::builder()
    ///     .base_url("http://127.0.0.1:8080")
    ///     .api_key("my-key")
    ///     .idle_timeout(Duration::from_secs(60))
    ///     .build()?;
    /// # Ok::<(), sluice_client::Error>(())
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// The server's base URL as parsed: `http://HOST:PORT/`, or with its path prefix (without
    /// a trailing `/`).
    ///
    /// ```
    /// let client = sluice_client::Client::new("http://127.0.0.1:8080/prefix")?;
    /// assert_eq!(client.base_url(), "http://127.0.0.1:8080/prefix");
    /// # Ok::<(), sluice_client::Error>(())
    /// ```
    pub fn base_url(&self) -> &str {
        self.inner.base.as_str()
    }

    /// The deployed workflows (`GET /v1/workflows`).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// for wf in client.workflows().await? {
    ///     println!("{} ({}): {}", wf.name, wf.kind, wf.description);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error`] of the request.
    pub async fn workflows(&self) -> Result<Vec<WorkflowInfo>> {
        let url = self.url(&["v1", "workflows"]);
        self.json(self.request(Method::GET, url)).await
    }

    /// Starts a run of `workflow` (`POST /v1/workflows/{name}/runs`).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use sluice_client::CreateRun;
    /// let run = client
    ///     .start("ticker", CreateRun { input: serde_json::json!({"n": 5}), ..Default::default() })
    ///     .await?;
    /// println!("started {}", run.id());
    /// let finished = run.wait().await?;
    /// println!("{:?}: {:?}", finished.status, finished.result);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) for an unknown workflow,
    /// [`ErrorKind::Invalid`](crate::ErrorKind::Invalid) for input it refuses (the message
    /// names the field), [`ErrorKind::Rejected`](crate::ErrorKind::Rejected) at capacity.
    pub async fn start(&self, workflow: &str, run: CreateRun) -> Result<RunHandle> {
        self.start_with(workflow, run, &StartOptions::default())
            .await
    }

    /// [`start`](Self::start) with [`StartOptions`]: an `Idempotency-Key` (a retry of the same
    /// start answers the run the first one created), or queueing behind a session's active run.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use sluice_client::{CreateRun, StartOptions};
    /// let opts = StartOptions { idempotency_key: Some("order-42".into()), ..Default::default() };
    /// let run = CreateRun { input: serde_json::json!({"n": 5}), ..Default::default() };
    /// let first = client.start_with("ticker", run.clone(), &opts).await?;
    /// let again = client.start_with("ticker", run, &opts).await?;
    /// assert_eq!(first.id(), again.id());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`start`](Self::start); [`ErrorKind::Invalid`](crate::ErrorKind::Invalid) for a key
    /// used before with another body.
    pub async fn start_with(
        &self,
        workflow: &str,
        run: CreateRun,
        opts: &StartOptions,
    ) -> Result<RunHandle> {
        let req = self.start_request(workflow, &run, opts);
        let record: RunRecord = self.json(req).await?;
        Ok(RunHandle::new(self.clone(), record))
    }

    /// The `POST /v1/workflows/{name}/runs` of a start.
    fn start_request(
        &self,
        workflow: &str,
        run: &CreateRun,
        opts: &StartOptions,
    ) -> RequestBuilder {
        let mut url = self.url(&["v1", "workflows", workflow, "runs"]);
        if opts.enqueue {
            url.query_pairs_mut().append_pair("if_busy", "enqueue");
        }
        let mut req = self.request(Method::POST, url).json(run);
        if let Some(key) = &opts.idempotency_key {
            req = req.header("idempotency-key", key);
        }
        req
    }

    /// Starts a run and answers its event stream in the same call (the `POST` with
    /// `Accept: text/event-stream`); the stream resumes on `GET /v1/runs/{id}/events` if the
    /// connection drops.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// use sluice_client::CreateRun;
    /// let mut events = client
    ///     .start_and_stream("ticker", CreateRun { input: serde_json::json!({"n": 5}), ..Default::default() })
    ///     .await?;
    /// println!("run {}", events.run_id());
    /// while let Some(event) = events.next().await {
    ///     println!("{:?}", event?);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`start`](Self::start); [`ErrorKind::Decode`](crate::ErrorKind::Decode) when the
    /// answer is not an event stream naming its run.
    pub async fn start_and_stream(&self, workflow: &str, run: CreateRun) -> Result<EventStream> {
        self.start_and_stream_with(workflow, run, &StartOptions::default())
            .await
    }

    /// [`start_and_stream`](Self::start_and_stream) with [`StartOptions`] (see
    /// [`start_with`](Self::start_with)).
    ///
    /// # Errors
    /// As [`start_and_stream`](Self::start_and_stream).
    pub async fn start_and_stream_with(
        &self,
        workflow: &str,
        run: CreateRun,
        opts: &StartOptions,
    ) -> Result<EventStream> {
        let req = self
            .start_request(workflow, &run, opts)
            .header(header::ACCEPT, "text/event-stream");
        let resp = self.send_stream(req, "starting a run").await?;
        if !is_event_stream(&resp) {
            return Err(Error::decode(
                "the answer to a streaming start",
                "not a text/event-stream",
            ));
        }
        let run_id = run_id_of(&resp).ok_or_else(|| {
            Error::decode(
                "the answer to a streaming start",
                "no X-Sluice-Run-Id or Location header",
            )
        })?;
        Ok(EventStream::new(self.clone(), run_id, 0, None, Some(resp)))
    }

    /// A run's record (`GET /v1/runs/{id}`).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// let rec = client.run("run_0193…").await?;
    /// println!("{} is {}", rec.id, rec.status.as_str());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) for an unknown run.
    pub async fn run(&self, run_id: &str) -> Result<RunRecord> {
        let url = self.url(&["v1", "runs", run_id]);
        self.json(self.request(Method::GET, url)).await
    }

    /// A page of runs, newest first (`GET /v1/runs`).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use sluice_client::{RunFilter, RunStatus};
    /// let page = client
    ///     .list_runs(&RunFilter::new().workflow("ticker").status(RunStatus::Completed).limit(20))
    ///     .await?;
    /// for run in &page.runs {
    ///     println!("{} {}", run.id, run.status.as_str());
    /// }
    /// if let Some(cursor) = page.next_cursor {
    ///     let _next = client.list_runs(&RunFilter::new().cursor(cursor)).await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Invalid`](crate::ErrorKind::Invalid) for a bad limit or cursor.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<RunList> {
        let mut url = self.url(&["v1", "runs"]);
        filter.append_query(&mut url);
        self.json(self.request(Method::GET, url)).await
    }

    /// Sends an event into a run (`POST /v1/runs/{id}/events`): `input` for human input,
    /// `tool-results` for client tool results, or a type the workflow accepts.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// client.send("run_0193…", "input", serde_json::json!("yes")).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) if the run has ended,
    /// [`ErrorKind::Invalid`](crate::ErrorKind::Invalid) if it is not waiting for this type.
    pub async fn send(&self, run_id: &str, event_type: &str, data: Value) -> Result<()> {
        let url = self.url(&["v1", "runs", run_id, "events"]);
        let body = SendEvent {
            event_type: event_type.to_owned(),
            data,
        };
        self.execute(self.request(Method::POST, url).json(&body))
            .await
            .map(drop)
    }

    /// Answers an `input-requested` event: sends `data` as `input`.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// client.send_input("run_0193…", serde_json::json!({"approved": true})).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_input(&self, run_id: &str, data: Value) -> Result<()> {
        self.send(run_id, kind::INPUT, data).await
    }

    /// Answers a `tools-requested` event with one result per requested call.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use sluice_client::ToolResult;
    /// let result = ToolResult { id: "call_1".into(), output: serde_json::json!("confirmed"), is_error: false };
    /// client.send_tool_results("run_0193…", vec![result]).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_tool_results(&self, run_id: &str, results: Vec<ToolResult>) -> Result<()> {
        let data = serde_json::to_value(ToolResults { results })
            .map_err(|e| Error::decode_json("tool results", e))?;
        self.send(run_id, kind::TOOL_RESULTS, data).await
    }

    /// Cancels a run (`POST /v1/runs/{id}/cancel`); it ends with `chain-cancelled`.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// client.cancel("run_0193…").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) if the run has already ended.
    pub async fn cancel(&self, run_id: &str) -> Result<RunRecord> {
        self.cancel_inner(run_id, None).await
    }

    /// Cancels a run, recording `reason` in its `chain-cancelled` event.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// client.cancel_with_reason("run_0193…", "user pressed stop").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`cancel`](Self::cancel).
    pub async fn cancel_with_reason(&self, run_id: &str, reason: &str) -> Result<RunRecord> {
        self.cancel_inner(run_id, Some(reason)).await
    }

    async fn cancel_inner(&self, run_id: &str, reason: Option<&str>) -> Result<RunRecord> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
        }
        let url = self.url(&["v1", "runs", run_id, "cancel"]);
        self.json(self.request(Method::POST, url).json(&Body { reason }))
            .await
    }

    /// A run's events with `seq > after`, in order: history first, then live, until the terminal
    /// event. The stream resumes by itself with `Last-Event-ID` and jittered backoff when the
    /// connection drops, never yielding an event twice; a `seq` gap ends it with
    /// [`ErrorKind::Gap`](crate::ErrorKind::Gap). A finished run whose last event is at or
    /// before `after` gives an empty stream.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut events = client.events("run_0193…", 0);
    /// while let Some(event) = events.next().await {
    ///     let event = event?;
    ///     if event.event_type == "text-delta" {
    ///         print!("{}", event.data["text"].as_str().unwrap_or_default());
    ///     }
    /// }
    /// println!("\n(reconnected {} times)", events.reconnects());
    /// # Ok(()) }
    /// ```
    ///
    /// The first connection fails at once when the server cannot be reached (only 408, 429 and
    /// 5xx are retried then); once connected, the stream keeps reconnecting for up to
    /// [`reconnect_timeout`](ClientBuilder::reconnect_timeout) (default 2 minutes) of failures
    /// in a row, and [`max_reconnect_attempts`](ClientBuilder::max_reconnect_attempts) when set.
    pub fn events(&self, run_id: &str, after: u64) -> EventStream {
        EventStream::new(self.clone(), run_id.to_owned(), after, None, None)
    }

    /// Like [`events`](Self::events), filtered by the server to `types` (the terminal event
    /// always passes). Gaps in `seq` are expected here and not checked; order and
    /// no-duplicates still are.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut text = client.events_filtered("run_0193…", 0, &["text-delta"]);
    /// while let Some(event) = text.next().await {
    ///     print!("{}", event?.data["text"].as_str().unwrap_or_default());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn events_filtered(&self, run_id: &str, after: u64, types: &[&str]) -> EventStream {
        EventStream::new(
            self.clone(),
            run_id.to_owned(),
            after,
            Some(types.join(",")),
            None,
        )
    }

    /// Creates a session (`POST /v1/sessions`): start runs with its id in
    /// [`CreateRun::session_id`] to continue it.
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// use sluice_client::CreateRun;
    /// let session = client.create_session(None).await?;
    /// let input = serde_json::json!({"message": "hi"});
    /// let run = CreateRun { input, session_id: Some(session.id.clone()), ..Default::default() };
    /// client.start("assistant", run).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error`] of the request.
    pub async fn create_session(&self, state: Option<Value>) -> Result<SessionRecord> {
        #[derive(Serialize)]
        struct Body {
            #[serde(skip_serializing_if = "Option::is_none")]
            state: Option<Value>,
        }
        let url = self.url(&["v1", "sessions"]);
        self.json(self.request(Method::POST, url).json(&Body { state }))
            .await
    }

    /// A session's record (`GET /v1/sessions/{id}`).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// let s = client.session("ses_0193…").await?;
    /// println!("active run: {:?}", s.active_run);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) for an unknown session.
    pub async fn session(&self, session_id: &str) -> Result<SessionRecord> {
        let url = self.url(&["v1", "sessions", session_id]);
        self.json(self.request(Method::GET, url)).await
    }

    /// Deletes a session (`DELETE /v1/sessions/{id}`).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice_client::Client) -> sluice_client::Result<()> {
    /// client.delete_session("ses_0193…").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) while a run of it is active.
    pub async fn delete_session(&self, session_id: &str) -> Result<()> {
        let url = self.url(&["v1", "sessions", session_id]);
        self.execute(self.request(Method::DELETE, url))
            .await
            .map(drop)
    }

    // ---- plumbing ----

    /// `base` + percent-encoded path segments.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    pub(crate) fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let req = self.inner.http.request(method, url);
        match &self.inner.auth {
            Some(auth) => req.header(header::AUTHORIZATION, auth.clone()),
            None => req,
        }
    }

    /// Sends a request with the request timeout; a non-success answer becomes its [`Error`].
    async fn execute(&self, req: RequestBuilder) -> Result<Response> {
        let req = req.timeout(self.inner.request_timeout);
        let (client, req) = req.build_split();
        let req = req.map_err(|e| Error::from_reqwest("building the request", e))?;
        let doing = format!("{} {}", req.method(), req.url());
        let resp = client
            .execute(req)
            .await
            .map_err(|e| Error::from_reqwest(&doing, e))?;
        check(resp, &doing, self.inner.request_timeout).await
    }

    /// Sends a request whose answer is a stream: the timeout covers the headers only (and the
    /// body of an error answer).
    pub(crate) async fn send_stream(&self, req: RequestBuilder, doing: &str) -> Result<Response> {
        let (client, req) = req.build_split();
        let req = req.map_err(|e| Error::from_reqwest("building the request", e))?;
        let doing = format!("{doing} ({} {})", req.method(), req.url());
        let resp = match tokio::time::timeout(self.inner.request_timeout, client.execute(req)).await
        {
            Ok(r) => r.map_err(|e| Error::from_reqwest(&doing, e))?,
            Err(_) => {
                return Err(Error::transport(format!(
                    "{doing}: timed out after {:?} waiting for an answer",
                    self.inner.request_timeout
                )));
            }
        };
        check(resp, &doing, self.inner.request_timeout).await
    }

    async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = self.execute(req).await?;
        let doing = format!("the answer of {}", resp.url());
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::from_reqwest(&doing, e))?;
        serde_json::from_slice(&body).map_err(|e| Error::decode_json(doing, e))
    }
}

/// A `Retry-After` value: delay-seconds, or an HTTP date (IMF-fixdate, such as
/// `Sun, 06 Nov 1994 08:49:37 GMT`) taken relative to `now` (a date in the past is zero). The
/// obsolete RFC 850 and asctime date forms are not understood (`None`: the caller's own backoff
/// applies).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long values saturate rather than failing.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_imf_fixdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 IMF-fixdate) as a point in time.
fn parse_imf_fixdate(s: &str) -> Option<SystemTime> {
    // "Sun," "06" "Nov" "1994" "08:49:37" "GMT"
    let mut parts = s.split(' ');
    let weekday = parts.next()?;
    if weekday.len() != 4 || !weekday.ends_with(',') {
        return None;
    }
    let day: u32 = digits(parts.next()?, 2)?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    let year: u32 = digits(parts.next()?, 4)?;
    let mut hms = parts.next()?.split(':');
    let h: u32 = digits(hms.next()?, 2)?;
    let m: u32 = digits(hms.next()?, 2)?;
    let sec: u32 = digits(hms.next()?, 2)?;
    if hms.next().is_some() || parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + u64::from(h * 3600 + m * 60 + sec);
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Exactly `n` ASCII digits.
fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() == n && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year ≥ 1970; Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: u32, month: u32, day: u32) -> u64 {
    let y = u64::from(if month <= 2 { year - 1 } else { year });
    let m = u64::from(month);
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + u64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// The most of an error answer's body read: the protocol's error JSON is far smaller.
const ERROR_BODY_LIMIT: usize = 64 << 10;

/// Passes a success answer through; turns any other into its [`Error`], reading at most
/// [`ERROR_BODY_LIMIT`] bytes of its body within `timeout` (what came by then is used: a body
/// that never ends, or trickles, cannot hold the caller or fill its memory).
async fn check(mut resp: Response, doing: &str, timeout: Duration) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut body = Vec::new();
    let read = async {
        while body.len() < ERROR_BODY_LIMIT {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Err(e)) if body.is_empty() => return Err(Error::from_reqwest(doing, e)),
        Ok(_) | Err(_) => {}
    }
    body.truncate(ERROR_BODY_LIMIT);
    Err(Error::from_answer(status.as_u16(), retry_after, &body))
}

pub(crate) fn is_event_stream(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// The run a streaming answer belongs to: `X-Sluice-Run-Id`, else the `Location` path.
fn run_id_of(resp: &Response) -> Option<String> {
    let h = resp.headers();
    if let Some(id) = h.get("x-sluice-run-id").and_then(|v| v.to_str().ok()) {
        return Some(id.to_owned());
    }
    h.get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| l.rsplit('/').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base_urls() {
        let c = Client::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            c.url(&["v1", "runs", "a b/c"]).as_str(),
            "http://127.0.0.1:8080/v1/runs/a%20b%2Fc"
        );
        let c = Client::new("http://h:1/prefix/").unwrap();
        assert_eq!(
            c.url(&["v1", "workflows"]).as_str(),
            "http://h:1/prefix/v1/workflows"
        );
        for bad in [
            "",
            "127.0.0.1:8080",
            "ftp://x",
            "https://x",
            "http://x/?q=1",
        ] {
            let err = Client::new(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config, "{bad}");
        }
        let err = Client::builder().api_key("a\nb").build().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        let c = Client::builder().api_key("secret").build().unwrap();
        assert!(!format!("{c:?}").contains("secret"));
        // Credentials in the base URL are not shown either.
        let b = Client::builder().base_url("http://admin:hunter2@127.0.0.1:1/");
        let c = b.clone().build().unwrap();
        for shown in [format!("{b:?}"), format!("{c:?}")] {
            assert!(
                !shown.contains("hunter2") && !shown.contains("admin"),
                "{shown}"
            );
            assert!(shown.contains("http://***@127.0.0.1:1/"), "{shown}");
        }
    }

    #[test]
    fn retry_after_in_seconds_and_as_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let p = |v: &str| parse_retry_after(v, now);
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(p(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            p("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            p("Sun, 06 Nov 1994 08:50:07 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            p("Mon, 07 Nov 1994 08:49:37 GMT"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            p("Sun, 06 Nov 1994 08:00:00 GMT"),
            Some(Duration::ZERO),
            "in the past"
        );
        // Leap years and the turn of a year.
        let t = |v: &str| {
            parse_imf_fixdate(v)
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        assert_eq!(t("Thu, 01 Jan 1970 00:00:00 GMT"), 0);
        assert_eq!(t("Thu, 29 Feb 2024 12:00:00 GMT"), 1_709_208_000);
        assert_eq!(t("Fri, 01 Jan 2027 00:00:00 GMT"), 1_798_761_600);
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }
}
