//! The crate's error type.

use std::time::Duration;

use sluice_protocol::payload::ErrorCode;

/// Everything a provider call can fail with.
///
/// Upstream failures keep the HTTP status, an excerpt of the body and the provider's request id.
/// No variant ever holds the API key: bodies and messages from the provider are scrubbed of it
/// before they are stored. Nor does any hold the provider's URL: connection and transport
/// errors drop it, so neither their text nor that of their sources names the endpoint (or
/// credentials in its `user:pass@`). Match on [`Error::kind`] rather than on the text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The provider answered with a non-success status (other than 429).
    #[error("provider answered HTTP {status}{}: {body_excerpt}", noted(None, .request_id.as_deref()))]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The start of the response body (at most [`BODY_EXCERPT_LIMIT`] bytes).
        body_excerpt: String,
        /// The provider's request id (`x-request-id` or `request-id` header), when sent.
        request_id: Option<String>,
        /// The delay the provider asked for in `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// The provider answered 429 Too Many Requests, after the retries allowed.
    #[error("provider rate limited the request{}: {body_excerpt}", noted(*.retry_after, .request_id.as_deref()))]
    RateLimited {
        /// The delay the provider asked for in `Retry-After`, when sent.
        retry_after: Option<Duration>,
        /// The start of the response body (at most [`BODY_EXCERPT_LIMIT`] bytes).
        body_excerpt: String,
        /// The provider's request id, when sent.
        request_id: Option<String>,
    },
    /// No response head arrived in time: within `connect_timeout + idle_timeout` of the send
    /// (a connect that takes too long is an [`Error::Connect`] instead).
    #[error("no response from the provider within {after:?}")]
    Timeout {
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The response stream started, then no bytes arrived within the idle timeout.
    #[error("provider stream stalled: no bytes for {idle:?}")]
    Stalled {
        /// The idle timeout that elapsed.
        idle: Duration,
    },
    /// The response stream kept the connection alive (keep-alive comments, `ping` events, empty
    /// chunks) but produced no output (text, reasoning, tool-call data or its end) within the
    /// output timeout.
    #[error("provider stream produced no output for {after:?}")]
    NoOutput {
        /// The output timeout that elapsed.
        after: Duration,
    },
    /// The answer went past a limit of the provider's config: more than `max_output` bytes of
    /// text, reasoning and tool-call arguments, or more than [`MAX_TOOL_CALLS`] tool calls.
    #[error("the model's answer is too large: {0}")]
    TooLarge(String),
    /// Connecting to the provider failed (refused, DNS, TLS, connect timeout).
    #[error("cannot connect to the provider")]
    Connect(#[source] reqwest::Error),
    /// The connection broke while the request or the response was in flight.
    #[error("connection to the provider broke")]
    Transport(#[source] reqwest::Error),
    /// The provider sent something that is not a valid stream of its wire format.
    #[error("malformed provider stream: {0}")]
    Protocol(String),
    /// The provider reported an error inside the stream (an `error` payload).
    #[error("provider error: {message}")]
    Provider {
        /// The provider's message (with its error type, when given).
        message: String,
    },
    /// The provider configuration or the request cannot be used.
    #[error("invalid provider configuration: {0}")]
    Config(String),
}

/// What a provider's answer said of itself, for a message: ` (retry after 1s, request id X)`,
/// each part only when sent, nothing when neither was.
fn noted(retry_after: Option<Duration>, request_id: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(d) = retry_after {
        parts.push(format!("retry after {d:?}"));
    }
    if let Some(id) = request_id {
        parts.push(format!("request id {id}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// The largest body excerpt kept in an error, in bytes. Provider messages in errors (in-stream
/// error payloads, bodies of non-JSON answers) are cut to it too.
pub const BODY_EXCERPT_LIMIT: usize = 2048;

/// The most tool calls one answer may hold; a stream with more fails with
/// [`Error::TooLarge`].
pub const MAX_TOOL_CALLS: usize = 128;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kind of an [`Error`], for matching without its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// [`Error::Http`].
    Http,
    /// [`Error::RateLimited`].
    RateLimited,
    /// [`Error::Timeout`].
    Timeout,
    /// [`Error::Stalled`].
    Stalled,
    /// [`Error::NoOutput`].
    NoOutput,
    /// [`Error::TooLarge`].
    TooLarge,
    /// [`Error::Connect`].
    Connect,
    /// [`Error::Transport`].
    Transport,
    /// [`Error::Protocol`].
    Protocol,
    /// [`Error::Provider`].
    Provider,
    /// [`Error::Config`].
    Config,
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Http { .. } => ErrorKind::Http,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Stalled { .. } => ErrorKind::Stalled,
            Self::NoOutput { .. } => ErrorKind::NoOutput,
            Self::TooLarge(_) => ErrorKind::TooLarge,
            Self::Connect(_) => ErrorKind::Connect,
            Self::Transport(_) => ErrorKind::Transport,
            Self::Protocol(_) => ErrorKind::Protocol,
            Self::Provider { .. } => ErrorKind::Provider,
            Self::Config(_) => ErrorKind::Config,
        }
    }

    /// The HTTP status the provider answered, for [`Error::Http`] and [`Error::RateLimited`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            Self::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// The provider's request id, when the failure came with one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::Http { request_id, .. } | Self::RateLimited { request_id, .. } => {
                request_id.as_deref()
            }
            _ => None,
        }
    }

    /// The delay the provider asked for, when it sent `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Http { retry_after, .. } | Self::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the failure may go away on a new attempt: 408, 429 and 5xx answers, connection
    /// failures. Timeouts, stalls, malformed streams and in-stream provider errors are not
    /// retried (a slow model would only get the same prompt twice).
    ///
    /// The provider retries only failures that happen before the first chunk was produced.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http { status, .. } => *status == 408 || (500..=599).contains(status),
            Self::RateLimited { .. } | Self::Connect(_) | Self::Transport(_) => true,
            _ => false,
        }
    }

    /// The `chain-error` code a run failing with this error ends with: `rate_limited` for
    /// [`Error::RateLimited`], `provider_error` otherwise.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            _ => ErrorCode::ProviderError,
        }
    }
}

/// Maps a reqwest failure to [`Error::Timeout`], [`Error::Connect`] or [`Error::Transport`].
///
/// The URL is dropped from the error first: reqwest's text would otherwise end in
/// " for url (…)", showing the provider's internal address (and the path) to whoever reads
/// the error, e.g. a client reading a run's `chain-error`.
pub(crate) fn from_reqwest(err: reqwest::Error, timeout: Duration) -> Error {
    let err = err.without_url();
    if err.is_connect() {
        Error::Connect(err)
    } else if err.is_timeout() {
        Error::Timeout { after: timeout }
    } else {
        Error::Transport(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_retryability() {
        let http = |status| Error::Http {
            status,
            body_excerpt: String::new(),
            request_id: Some("req_1".into()),
            retry_after: None,
        };
        assert!(http(503).is_retryable());
        assert!(http(500).is_retryable());
        assert!(http(408).is_retryable());
        assert!(!http(400).is_retryable());
        assert!(!http(401).is_retryable());
        assert_eq!(http(503).kind(), ErrorKind::Http);
        assert_eq!(http(503).status(), Some(503));
        assert_eq!(http(503).request_id(), Some("req_1"));
        assert!(http(502).to_string().contains("req_1"));
        let limited = Error::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
            body_excerpt: String::new(),
            request_id: None,
        };
        assert!(limited.is_retryable());
        assert_eq!(limited.code(), ErrorCode::RateLimited);
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(2)));
        // Messages say what the provider sent, in words, and nothing of what it did not.
        assert_eq!(
            limited.to_string(),
            "provider rate limited the request (retry after 2s): "
        );
        let bare = Error::RateLimited {
            retry_after: None,
            body_excerpt: "slow down".into(),
            request_id: None,
        };
        assert_eq!(
            bare.to_string(),
            "provider rate limited the request: slow down"
        );
        assert_eq!(
            http(500).to_string(),
            "provider answered HTTP 500 (request id req_1): "
        );
        let stalled = Error::Stalled {
            idle: Duration::from_millis(200),
        };
        assert!(!stalled.is_retryable());
        assert_eq!(stalled.code(), ErrorCode::ProviderError);
        assert!(!Error::Protocol("x".into()).is_retryable());
        assert!(
            !Error::Provider {
                message: "x".into()
            }
            .is_retryable()
        );
    }
}
