//! [`Provider`]: one configured provider, with its pooled HTTP client, its concurrency limit and
//! the streaming call (timeouts, retries, cancellation).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt, stream};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::assemble::Assembler;
use crate::error::{BODY_EXCERPT_LIMIT, from_reqwest};
use crate::providers::{Flow, Parser, RAW_EXCERPT_LIMIT, anthropic, excerpt, openai, truncate};
use crate::sse::SseDecoder;
use crate::{
    ChatChunk, ChatRequest, ChatResponse, ChatStream, Error, ProviderConfig, ProviderKind, Result,
};
use sluice_protocol::without_userinfo;

/// A configured model provider: cheap to clone, shared by every call to it.
///
/// It owns one pooled HTTP client (keep-alive connections are reused across calls) and a
/// semaphore of `max_concurrent_requests` permits; each call holds a permit while its request is
/// in flight and its response streams.
///
/// ```no_run
/// # async fn demo() -> sluice_llm::Result<()> {
/// use futures_util::StreamExt;
/// use sluice_llm::{ChatChunk, ChatRequest, Message, Provider, ProviderConfig, ProviderKind};
///
/// let provider = Provider::new(ProviderConfig::new(
///     "local", ProviderKind::OpenAi, "http://127.0.0.1:11434/v1"))?;
/// let mut stream = provider.stream_chat(&ChatRequest::new("qwen3:8b", vec![Message::user("Hi")]));
/// while let Some(chunk) = stream.next().await {
///     match chunk? {
///         ChatChunk::TextDelta(text) => print!("{text}"),
///         ChatChunk::Finished { usage, .. } => println!("\n{} tokens", usage.total_tokens),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProviderConfig,
    client: reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    permits: Arc<Semaphore>,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("config", &self.inner.config)
            .field("available_permits", &self.inner.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Builds the provider: validates the config, builds its HTTP client.
    ///
    /// # Errors
    /// [`Error::Config`] for a base URL that does not parse or is not `http`/`https` (`https`
    /// needs the `tls` feature), a zero concurrency limit or attempt count, a zero idle or
    /// connect timeout, or an API key or header that cannot be sent as a header value. (A
    /// `user:pass@` in the base URL is never shown in these messages.)
    pub fn new(config: ProviderConfig) -> Result<Self> {
        if config.max_concurrent_requests == 0
            || config.max_concurrent_requests > Semaphore::MAX_PERMITS
        {
            return Err(Error::Config(format!(
                "provider {}: max_concurrent_requests must be between 1 and {}",
                config.name,
                Semaphore::MAX_PERMITS
            )));
        }
        if config.retry.max_attempts == 0 {
            return Err(Error::Config(format!(
                "provider {}: retry.max_attempts must be at least 1",
                config.name
            )));
        }
        if config.idle_timeout.is_zero() {
            return Err(Error::Config(format!(
                "provider {}: idle_timeout must be more than zero",
                config.name
            )));
        }
        if config.connect_timeout.is_zero() {
            return Err(Error::Config(format!(
                "provider {}: connect_timeout must be more than zero",
                config.name
            )));
        }
        if config.output_timeout.is_zero() {
            return Err(Error::Config(format!(
                "provider {}: output_timeout must be more than zero",
                config.name
            )));
        }
        if config.max_output == 0 {
            return Err(Error::Config(format!(
                "provider {}: max_output must be more than zero",
                config.name
            )));
        }
        let path = match config.kind {
            ProviderKind::OpenAi => openai::PATH,
            ProviderKind::Anthropic => anthropic::PATH,
        };
        let raw_url = format!("{}{path}", config.base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&raw_url).map_err(|e| {
            Error::Config(format!(
                "provider {}: invalid base_url {:?}: {e}",
                config.name,
                without_userinfo(&config.base_url)
            ))
        })?;
        match url.scheme() {
            "http" => {}
            "https" if cfg!(feature = "tls") => {}
            "https" => {
                return Err(Error::Config(format!(
                    "provider {}: https base_url needs sluice-llm's `tls` feature",
                    config.name
                )));
            }
            other => {
                return Err(Error::Config(format!(
                    "provider {}: unsupported URL scheme {other:?}",
                    config.name
                )));
            }
        }
        let headers = build_headers(&config)?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.max_concurrent_requests)
            .tcp_nodelay(true)
            .no_proxy()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                Error::Config(format!(
                    "provider {}: cannot build the HTTP client: {e}",
                    config.name
                ))
            })?;
        let permits = Arc::new(Semaphore::new(config.max_concurrent_requests));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                url,
                headers,
                permits,
            }),
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// Its wire format.
    pub fn kind(&self) -> ProviderKind {
        self.inner.config.kind
    }

    /// Its config.
    pub fn config(&self) -> &ProviderConfig {
        &self.inner.config
    }

    /// The full URL requests go to.
    pub fn endpoint(&self) -> &str {
        self.inner.url.as_str()
    }

    /// Free concurrency slots right now (for metrics).
    pub fn available_permits(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// Starts a streaming call. Nothing is sent until the stream is first polled.
    ///
    /// The stream waits for a concurrency permit, sends the request, and yields the deltas as
    /// they arrive, then [`ChatChunk::Finished`]. Failures before the first chunk that may pass
    /// (see [`Error::is_retryable`]) are retried with jittered exponential backoff, honouring
    /// `Retry-After`, up to the policy's `max_attempts`; after the first chunk nothing is
    /// retried and a failure is the stream's last item. No bytes for the idle timeout ends the
    /// stream with [`Error::Stalled`]. Dropping the stream aborts the request.
    pub fn stream_chat(&self, request: &ChatRequest) -> ChatStream {
        let body = match self.inner.config.kind {
            ProviderKind::OpenAi => openai::request_body(request),
            ProviderKind::Anthropic => anthropic::request_body(request),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                let error = Error::Config(format!("cannot encode the request: {e}"));
                return ChatStream::new(stream::iter([Err(error)]));
            }
        };
        let call = Call {
            inner: self.inner.clone(),
            body,
            started: None,
            attempts: 0,
            state: State::Start,
            asm: Assembler::new(self.inner.config.max_output),
        };
        ChatStream::new(stream::unfold(call, |mut call| async move {
            let item = call.next().await?;
            Some((item, call))
        }))
    }

    /// Runs a call to its end and returns the assembled response.
    ///
    /// # Errors
    /// Whatever ended the stream; see [`Provider::stream_chat`].
    pub async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse> {
        self.stream_chat(request).into_response().await
    }
}

fn build_headers(config: &ProviderConfig) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    let bad_key = || {
        Error::Config(format!(
            "provider {}: the API key is not a valid header value",
            config.name
        ))
    };
    match config.kind {
        ProviderKind::OpenAi => {
            if let Some(key) = config.api_key.as_ref().filter(|k| !k.is_empty()) {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| bad_key())?;
                value.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, value);
            }
        }
        ProviderKind::Anthropic => {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(anthropic::API_VERSION),
            );
            if let Some(key) = config.api_key.as_ref().filter(|k| !k.is_empty()) {
                let mut value = HeaderValue::from_str(key.expose()).map_err(|_| bad_key())?;
                value.set_sensitive(true);
                headers.insert(HeaderName::from_static("x-api-key"), value);
            }
        }
    }
    for (name, value) in &config.headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            Error::Config(format!(
                "provider {}: invalid header name {name:?}",
                config.name
            ))
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            Error::Config(format!(
                "provider {}: invalid value for header {name:?}",
                config.name
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}

impl Inner {
    /// Makes provider-supplied text kept in an error fit to show: removes the API key from it
    /// (as sent, and as it reads inside a JSON string), then cuts it to [`BODY_EXCERPT_LIMIT`].
    ///
    /// The text comes in longer than the limit (up to `RAW_EXCERPT_LIMIT`), so a key that starts
    /// inside the kept part is whole and replaced before the cut; a key cut where the text was
    /// read off is removed by [`strip_key_prefix`].
    fn scrub(&self, error: Error) -> Error {
        let key = self
            .config
            .api_key
            .as_ref()
            .map(|k| k.expose())
            .filter(|k| !k.is_empty());
        let clean = |mut s: String| {
            if let Some(key) = key {
                for form in key_forms(key) {
                    if s.contains(form.as_str()) {
                        s = s.replace(form.as_str(), "***");
                    }
                    strip_key_prefix(&mut s, &form);
                }
            }
            truncate(s, BODY_EXCERPT_LIMIT)
        };
        match error {
            Error::Http {
                status,
                body_excerpt,
                request_id,
                retry_after,
            } => Error::Http {
                status,
                body_excerpt: clean(body_excerpt),
                request_id,
                retry_after,
            },
            Error::RateLimited {
                retry_after,
                body_excerpt,
                request_id,
            } => Error::RateLimited {
                retry_after,
                body_excerpt: clean(body_excerpt),
                request_id,
            },
            Error::Protocol(message) => Error::Protocol(clean(message)),
            Error::Provider { message } => Error::Provider {
                message: clean(message),
            },
            other => other,
        }
    }
}

/// The ways `key` can appear in a provider's text: as it is, and escaped inside a JSON string
/// (with `/` escaped or not).
fn key_forms(key: &str) -> Vec<String> {
    let mut forms = vec![key.to_owned()];
    let quoted = serde_json::to_string(key).unwrap_or_default();
    let escaped = quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or_default();
    for form in [escaped.to_owned(), escaped.replace('/', "\\/")] {
        if !form.is_empty() && !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// Removes the end of `s` when it is the start of `key`, four bytes or more: what is left of a
/// key where a text was cut.
fn strip_key_prefix(s: &mut String, key: &str) {
    let longest = key.len().saturating_sub(1).min(s.len());
    for len in (4..=longest).rev() {
        if key.is_char_boundary(len) && s.ends_with(&key[..len]) {
            s.truncate(s.len() - len);
            return;
        }
    }
}

/// The state of one streaming call.
struct Call {
    inner: Arc<Inner>,
    body: Bytes,
    started: Option<Instant>,
    attempts: u32,
    state: State,
    asm: Assembler,
}

enum State {
    /// No request in flight: send one (the first, or a retry).
    Start,
    /// A response is streaming.
    Streaming(Box<Active>),
    /// Complete: yield this, then end.
    Finished(Box<ChatChunk>),
    /// Failed: yield this, then end.
    Failed(Error),
    /// Ended.
    Done,
}

/// A response being read.
struct Active {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    decoder: SseDecoder,
    parser: Parser,
    eof: bool,
    /// The assembler's output count when last seen, and how long reads have waited for bytes
    /// since it last moved (or the response head came): the output timeout counts this, so
    /// time the caller takes between polls is not held against the provider.
    outputs_seen: u64,
    quiet: Duration,
    /// Held while the response streams; dropping it frees the slot.
    _permit: OwnedSemaphorePermit,
}

impl Call {
    async fn next(&mut self) -> Option<Result<ChatChunk>> {
        let started = *self.started.get_or_insert_with(Instant::now);
        loop {
            if let Some(chunk) = self.asm.pop() {
                return Some(Ok(chunk));
            }
            match std::mem::replace(&mut self.state, State::Done) {
                State::Done => return None,
                State::Finished(chunk) => return Some(Ok(*chunk)),
                State::Failed(error) => return Some(Err(error)),
                State::Start => match self.open().await {
                    Ok(active) => self.state = State::Streaming(Box::new(active)),
                    Err(error) => self.state = State::Failed(error),
                },
                State::Streaming(mut active) => {
                    match active.read(&mut self.asm, &self.inner.config).await {
                        Ok(Flow::Continue) => self.state = State::Streaming(active),
                        Ok(Flow::Done) => {
                            active.drain();
                            drop(active);
                            let chunk = self.asm.finish(started.elapsed());
                            tracing::debug!(
                                provider = %self.inner.config.name,
                                latency_ms = started.elapsed().as_millis() as u64,
                                "model call finished"
                            );
                            self.state = State::Finished(Box::new(chunk));
                        }
                        Err(error) => {
                            // Closes the connection and frees the permit before any backoff.
                            drop(active);
                            let error = self.inner.scrub(error);
                            if !self.asm.committed()
                                && let Some(delay) = self.retry_delay(&error)
                            {
                                self.log_retry(&error, delay);
                                tokio::time::sleep(delay).await;
                                self.asm = Assembler::new(self.inner.config.max_output);
                                self.state = State::Start;
                                continue;
                            }
                            tracing::debug!(
                                provider = %self.inner.config.name,
                                error = %error,
                                "model call failed"
                            );
                            self.state = State::Failed(error);
                        }
                    }
                }
            }
        }
    }

    /// Sends the request, retrying failures before a response stream is open.
    async fn open(&mut self) -> Result<Active> {
        loop {
            let permit = self
                .inner
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::Config("the provider's semaphore is closed".into()))?;
            self.attempts += 1;
            match send(&self.inner, self.body.clone()).await {
                Ok(response) => {
                    return Ok(Active {
                        body: Box::pin(response.bytes_stream()),
                        decoder: SseDecoder::default(),
                        parser: Parser::new(self.inner.config.kind),
                        eof: false,
                        outputs_seen: 0,
                        quiet: Duration::ZERO,
                        _permit: permit,
                    });
                }
                Err(error) => {
                    drop(permit);
                    let error = self.inner.scrub(error);
                    match self.retry_delay(&error) {
                        Some(delay) => {
                            self.log_retry(&error, delay);
                            tokio::time::sleep(delay).await;
                        }
                        None => return Err(error),
                    }
                }
            }
        }
    }

    fn log_retry(&self, error: &Error, delay: Duration) {
        tracing::warn!(
            provider = %self.inner.config.name,
            attempt = self.attempts,
            delay_ms = delay.as_millis() as u64,
            error = %error,
            "model call failed before the first token; retrying"
        );
    }

    /// The delay before the next attempt, or `None` if the error is final.
    fn retry_delay(&self, error: &Error) -> Option<Duration> {
        let policy = &self.inner.config.retry;
        if !error.is_retryable() || self.attempts >= policy.max_attempts {
            return None;
        }
        let retry_after = error.retry_after();
        if retry_after.is_some_and(|after| after > policy.max_retry_after) {
            return None;
        }
        Some(policy.backoff(self.attempts, retry_after))
    }
}

/// How long one attempt may wait for the response head, counted from the send: the connect
/// (bounded by the client's own `connect_timeout`), then the idle timeout.
///
/// Both parts are needed: a bound of `idle_timeout` alone could end the attempt while the
/// connection is still being made, turning a connect failure (retried) into a
/// [`Error::Timeout`] (not retried) whenever `idle_timeout <= connect_timeout`. With the sum,
/// the client's connect timeout always fires first, so a connect failure is always an
/// [`Error::Connect`].
fn head_timeout(config: &ProviderConfig) -> Duration {
    config.connect_timeout.saturating_add(config.idle_timeout)
}

/// One attempt: the request, and the response head.
async fn send(inner: &Inner, body: Bytes) -> Result<reqwest::Response> {
    let idle = inner.config.idle_timeout;
    let head = head_timeout(&inner.config);
    let request = inner
        .client
        .post(inner.url.clone())
        .headers(inner.headers.clone())
        .body(body);
    let response = match tokio::time::timeout(head, request.send()).await {
        Err(_) => return Err(Error::Timeout { after: head }),
        Ok(Err(e)) => return Err(from_reqwest(e, head)),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if !status.is_success() {
        return Err(error_from_response(response, idle).await);
    }
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        // Not a stream: an error object, or a server that ignored `stream: true`.
        let text = read_excerpt(response, idle).await;
        let error = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").cloned());
        return Err(match error {
            Some(error) => Error::Provider {
                message: crate::providers::error_message(&error),
            },
            None => Error::Protocol(format!("expected an event stream, got JSON: {text}")),
        });
    }
    Ok(response)
}

impl Active {
    /// Handles one buffered event, or reads more bytes: within the idle timeout, and before the
    /// output timeout runs out.
    async fn read(&mut self, asm: &mut Assembler, config: &ProviderConfig) -> Result<Flow> {
        if asm.outputs() != self.outputs_seen {
            self.outputs_seen = asm.outputs();
            self.quiet = Duration::ZERO;
        }
        if let Some(event) = self.decoder.next_event()? {
            return self.parser.on_event(&event, asm);
        }
        if self.eof {
            return self.parser.on_eof(asm);
        }
        let idle = config.idle_timeout;
        let no_output = Error::NoOutput {
            after: config.output_timeout,
        };
        let left = config.output_timeout.saturating_sub(self.quiet);
        if left.is_zero() {
            return Err(no_output);
        }
        let wait = left.min(idle);
        let t0 = Instant::now();
        let read = tokio::time::timeout(wait, self.body.next()).await;
        self.quiet = self.quiet.saturating_add(t0.elapsed());
        match read {
            Err(_) if wait < idle => Err(no_output),
            Err(_) => Err(Error::Stalled { idle }),
            Ok(None) => {
                self.decoder.finish();
                self.eof = true;
                Ok(Flow::Continue)
            }
            Ok(Some(Err(e))) => Err(from_reqwest(e, idle)),
            Ok(Some(Ok(bytes))) => {
                self.decoder.push(&bytes);
                Ok(Flow::Continue)
            }
        }
    }

    /// Reads the end of the body if it is already there, so the connection can be reused.
    fn drain(&mut self) {
        if !self.eof {
            let _ = self.body.next().now_or_never();
        }
    }
}

/// Reads the start of a body, at most [`RAW_EXCERPT_LIMIT`] bytes (cut to
/// [`BODY_EXCERPT_LIMIT`] once scrubbed), all within `idle`: a body that trickles in is cut
/// where it stands when the time is up.
async fn read_excerpt(response: reqwest::Response, idle: Duration) -> String {
    let mut body = response.bytes_stream();
    let mut bytes = Vec::new();
    let read = async {
        while bytes.len() < RAW_EXCERPT_LIMIT {
            match body.next().await {
                Some(Ok(chunk)) => bytes.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(idle, read).await;
    bytes.truncate(RAW_EXCERPT_LIMIT);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// [`Error::Http`] or [`Error::RateLimited`] from a non-success response.
async fn error_from_response(response: reqwest::Response, idle: Duration) -> Error {
    let status = response.status().as_u16();
    let headers = response.headers();
    let request_id = ["x-request-id", "request-id"]
        .iter()
        .find_map(|name| headers.get(*name))
        .and_then(|v| v.to_str().ok())
        .map(|v| excerpt(v, 200).to_owned());
    let retry_after = parse_retry_after(headers);
    let body_excerpt = read_excerpt(response, idle).await;
    if status == 429 {
        Error::RateLimited {
            retry_after,
            body_excerpt,
            request_id,
        }
    } else {
        Error::Http {
            status,
            body_excerpt,
            request_id,
            retry_after,
        }
    }
}

/// `retry-after-ms` (milliseconds, sent by OpenAI) or `Retry-After` in seconds. The HTTP-date
/// form is not honoured.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    number("retry-after").and_then(|s| Duration::try_from_secs_f64(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;

    #[test]
    fn retry_after_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_retry_after(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(
            parse_retry_after(&headers),
            Some(Duration::from_millis(150))
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("-1"));
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn config_validation() {
        let ok = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1/v1/");
        let provider = Provider::new(ok.clone()).unwrap();
        assert_eq!(
            provider.endpoint(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
        assert!(matches!(
            Provider::new(ok.clone().with_max_concurrent_requests(0)),
            Err(Error::Config(_))
        ));
        let bad = ProviderConfig::new("p", ProviderKind::Anthropic, "not a url");
        assert!(matches!(Provider::new(bad), Err(Error::Config(_))));
        let bad_key = ok.clone().with_api_key(ApiKey::new("sk-line\nbreak"));
        let err = Provider::new(bad_key).unwrap_err();
        assert!(!err.to_string().contains("sk-line"));
        if !cfg!(feature = "tls") {
            let https = ProviderConfig::new("p", ProviderKind::OpenAi, "https://api.openai.com/v1");
            assert!(matches!(Provider::new(https), Err(Error::Config(m)) if m.contains("tls")));
        }
    }

    #[test]
    fn scrubs_the_key() {
        let config = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1")
            .with_api_key(ApiKey::new("sk-secret"));
        let provider = Provider::new(config).unwrap();
        let error = provider.inner.scrub(Error::Http {
            status: 401,
            body_excerpt: "bad key sk-secret".into(),
            request_id: None,
            retry_after: None,
        });
        assert!(!format!("{error} {error:?}").contains("sk-secret"));
        assert!(!format!("{provider:?}").contains("sk-secret"));
    }

    #[test]
    fn scrubbing_removes_escaped_and_cut_keys_then_cuts() {
        let forms = key_forms(r#"k/e"y\z"#);
        assert_eq!(forms, [r#"k/e"y\z"#, r#"k/e\"y\\z"#, r#"k\/e\"y\\z"#]);
        assert_eq!(key_forms("sk-plain"), ["sk-plain"]);

        let mut cut = "the key was sk-secr".to_owned();
        strip_key_prefix(&mut cut, "sk-secret");
        assert_eq!(cut, "the key was ");
        // Three bytes or fewer of a key are left (they are no secret), and the whole key is
        // not a prefix of itself here: `scrub` replaces it first.
        let mut short = "request sk-".to_owned();
        strip_key_prefix(&mut short, "sk-secret");
        assert_eq!(short, "request sk-");

        let config = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1")
            .with_api_key(ApiKey::new("sk-secret"));
        let provider = Provider::new(config).unwrap();
        let long = format!("{}sk-secret{}sk-sec", "a".repeat(2000), "b".repeat(1000));
        let Error::Provider { message } = provider.inner.scrub(Error::Provider { message: long })
        else {
            unreachable!()
        };
        assert_eq!(message.len(), BODY_EXCERPT_LIMIT);
        assert!(message.contains("a***b"), "{message}");
        assert!(!message.contains("sk-s"));
    }

    #[test]
    fn the_head_wait_outlasts_the_connect_timeout() {
        for (connect, idle) in [(10_000, 60_000), (10_000, 5_000), (300, 300), (1, 1)] {
            let config = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1")
                .with_connect_timeout(Duration::from_millis(connect))
                .with_idle_timeout(Duration::from_millis(idle));
            let head = head_timeout(&config);
            assert!(head > config.connect_timeout, "{connect}/{idle}");
            assert!(head >= config.idle_timeout, "{connect}/{idle}");
        }
        let max = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1")
            .with_connect_timeout(Duration::MAX)
            .with_idle_timeout(Duration::MAX);
        assert_eq!(head_timeout(&max), Duration::MAX);
    }

    #[test]
    fn errors_never_show_credentials_of_the_base_url() {
        let bad = ProviderConfig::new("p", ProviderKind::OpenAi, "http://user:hunter2@exa mple/v1");
        let err = Provider::new(bad).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
        let zero = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1")
            .with_connect_timeout(Duration::ZERO);
        assert!(
            matches!(Provider::new(zero), Err(Error::Config(m)) if m.contains("connect_timeout"))
        );
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn streams_and_futures_are_send() {
        let provider = Provider::new(ProviderConfig::new(
            "p",
            ProviderKind::OpenAi,
            "http://127.0.0.1:1",
        ))
        .unwrap();
        let request = ChatRequest::new("m", vec![]);
        let stream = provider.stream_chat(&request);
        assert_send(&stream);
        assert_send(&provider.chat(&request));
        assert_send(&stream.into_response());
    }
}
