//! [`ProviderConfig`]: how to reach one provider, and its limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ApiKey;

/// Which wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio…).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

impl ProviderKind {
    /// The config name: `openai` or `anthropic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    /// The public API's base URL for this kind.
    pub fn default_base_url(self) -> &'static str {
        match self {
            Self::OpenAi => crate::providers::openai::DEFAULT_BASE_URL,
            Self::Anthropic => crate::providers::anthropic::DEFAULT_BASE_URL,
        }
    }
}

/// When and how often a failed call is tried again.
///
/// Only failures before the first chunk was produced are retried, and only those
/// [`Error::is_retryable`](crate::Error::is_retryable) says may pass: 408, 429, 5xx, connection
/// failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry). Default 3.
    pub max_attempts: u32,
    /// The backoff before the first retry; it doubles each retry. Default 500 ms.
    pub initial_backoff: Duration,
    /// The cap of the backoff. Default 8 s.
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured: a provider asking to wait longer gets no retry and
    /// the call fails at once with the delay in the error. Default 60 s.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before retry number `retry` (1-based): exponential backoff with jitter, drawn
    /// uniformly from the upper half of `initial_backoff * 2^(retry-1)` (capped at
    /// `max_backoff`), and never less than `retry_after` when the provider sent one.
    pub fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exp = 2u32.saturating_pow(retry.saturating_sub(1));
        let base = self
            .initial_backoff
            .saturating_mul(exp)
            .min(self.max_backoff);
        let jittered = base.mul_f64(0.5 + 0.5 * random_fraction());
        match retry_after {
            Some(after) => jittered.max(after),
            None => jittered,
        }
    }
}

/// A number in `[0, 1)` from the standard library's randomly keyed hasher: enough for jitter,
/// without a random-number crate.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    hasher.write_u32(nanos);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The default [`ProviderConfig::output_timeout`]: 5 minutes.
pub const DEFAULT_OUTPUT_TIMEOUT: Duration = Duration::from_secs(300);

/// The default [`ProviderConfig::max_output`]: 8 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 8 << 20;

/// How to reach one provider, and its limits.
///
/// ```
/// use std::time::Duration;
/// use sluice_llm::{ApiKey, ProviderConfig, ProviderKind};
/// let config = ProviderConfig::new("local", ProviderKind::OpenAi, "http://127.0.0.1:11434/v1")
///     .with_api_key(ApiKey::new("sk-…"))
///     .with_max_concurrent_requests(8)
///     .with_idle_timeout(Duration::from_secs(30));
/// assert!(!format!("{config:?}").contains("sk-"));
/// ```
#[derive(Clone, PartialEq)]
pub struct ProviderConfig {
    /// The provider's name in the config (`[providers.NAME]`), used in logs and events.
    pub name: String,
    /// Its wire format.
    pub kind: ProviderKind,
    /// The API's base URL, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`;
    /// `/chat/completions` or `/messages` is appended. `https://` needs the crate's `tls`
    /// feature.
    pub base_url: String,
    /// The API key, when the provider needs one: sent as `Authorization: Bearer` (OpenAI) or
    /// `x-api-key` (Anthropic).
    pub api_key: Option<ApiKey>,
    /// The most calls in flight at once; more wait for a slot. Default 64.
    pub max_concurrent_requests: usize,
    /// The limit on establishing a connection (DNS, TCP and TLS). Default 10 s. A connection
    /// that cannot be made within it is an [`Error::Connect`](crate::Error::Connect), which is
    /// retried.
    pub connect_timeout: Duration,
    /// The longest silence allowed: waiting for the response head once the connection is up,
    /// and between two reads of the body. Not a limit on the whole response, which may stream
    /// for as long as bytes keep coming. Default 60 s. (The wait for the response head is
    /// bounded by `connect_timeout + idle_timeout` from the send, so a slow connect always ends
    /// as a connect error, never as a timeout.)
    pub idle_timeout: Duration,
    /// The longest a response may stream without output: text, reasoning or tool-call data, or
    /// its end. Keep-alive comments, `ping` events and empty chunks reset the idle timeout but
    /// not this one, so a stream of keep-alives alone ends with
    /// [`Error::NoOutput`](crate::Error::NoOutput) and frees its slot. Counted from the response
    /// head. Default 5 min.
    pub output_timeout: Duration,
    /// The largest answer, in bytes of text, reasoning and tool-call arguments together; beyond
    /// it the call fails with [`Error::TooLarge`](crate::Error::TooLarge). Default 8 MiB.
    pub max_output: usize,
    /// Retries before the first chunk.
    pub retry: RetryPolicy,
    /// Extra request headers (e.g. `OpenAI-Organization`, `anthropic-beta`), sent as given and
    /// marked sensitive so they never show in debug output of requests.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for ProviderConfig {
    /// Prints the key as `***` and extra headers by name only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field(
                "base_url",
                &sluice_protocol::without_userinfo(&self.base_url),
            )
            .field("api_key", &self.api_key)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("output_timeout", &self.output_timeout)
            .field("max_output", &self.max_output)
            .field("retry", &self.retry)
            .field("headers", &headers)
            .finish()
    }
}

impl ProviderConfig {
    /// A config with the defaults and no API key.
    pub fn new(name: impl Into<String>, kind: ProviderKind, base_url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind,
            base_url: base_url.into(),
            api_key: None,
            max_concurrent_requests: 64,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            output_timeout: DEFAULT_OUTPUT_TIMEOUT,
            max_output: DEFAULT_MAX_OUTPUT,
            retry: RetryPolicy::default(),
            headers: Vec::new(),
        }
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, key: ApiKey) -> Self {
        self.api_key = Some(key);
        self
    }

    /// Sets the concurrency limit.
    pub fn with_max_concurrent_requests(mut self, n: usize) -> Self {
        self.max_concurrent_requests = n;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the idle timeout.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the output timeout.
    pub fn with_output_timeout(mut self, timeout: Duration) -> Self {
        self.output_timeout = timeout;
        self
    }

    /// Sets the largest answer, in bytes.
    pub fn with_max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Adds a request header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            max_retry_after: Duration::from_secs(5),
        };
        for _ in 0..100 {
            let first = policy.backoff(1, None);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let second = policy.backoff(2, None);
            assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
            let capped = policy.backoff(10, None);
            assert!(capped >= Duration::from_millis(150) && capped <= Duration::from_millis(300));
            assert!(policy.backoff(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        }
        let draws: std::collections::HashSet<_> =
            (0..20).map(|_| policy.backoff(3, None)).collect();
        assert!(draws.len() > 1, "no jitter");
    }

    #[test]
    fn debug_output_hides_the_base_url_credentials() {
        let config = ProviderConfig::new("p", ProviderKind::OpenAi, "http://user:hunter2@h:1/v1");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("user"),
            "{shown}"
        );
    }

    #[test]
    fn kinds_parse() {
        let kind: ProviderKind = serde_json::from_str("\"openai\"").unwrap();
        assert_eq!(kind, ProviderKind::OpenAi);
        assert_eq!(ProviderKind::Anthropic.as_str(), "anthropic");
    }
}
