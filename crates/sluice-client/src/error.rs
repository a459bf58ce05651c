//! The SDK's one error type and the kind callers match on.

use std::time::Duration;

use sluice_protocol::api::ErrorBody;

/// `Result` of every SDK call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form to match on; see [`Error::kind`].
///
/// ```
/// # fn demo(err: sluice_client::Error) {
/// use sluice_client::ErrorKind;
/// match err.kind() {
///     ErrorKind::NotFound => eprintln!("no such run"),
///     ErrorKind::Rejected { retry_after } => eprintln!("busy, retry in {retry_after:?}"),
///     _ => eprintln!("{err}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// 404: no such workflow, run or session (or not visible to this key).
    NotFound,
    /// 401 or 403: a missing, unknown or insufficient API key.
    Unauthorized,
    /// 429: the workflow is at capacity; retry after the given time when the server named one.
    Rejected {
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// 409: the resource's state forbids the request (e.g. the run has already ended).
    Conflict,
    /// 400, 413, 415 or 422: the request is not acceptable; the message says why.
    Invalid,
    /// 408: the server stopped waiting for the request's body (it arrived too slowly); the
    /// same request sent again may succeed.
    Timeout,
    /// 5xx: the server failed or is shutting down.
    Server,
    /// The server could not be reached, the connection broke, or an answer timed out.
    Transport,
    /// An event stream skipped a `seq`: events were lost.
    Gap,
    /// The server answered something that is not the protocol (bad JSON, bad stream framing,
    /// an event larger than [`max_event_size`](crate::ClientBuilder::max_event_size)).
    Decode,
    /// The client was configured wrongly (bad base URL, API key with invalid characters).
    Config,
}

/// Every error of the SDK. Match on [`Error::kind`] rather than on the text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error status and the protocol's error body.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The body's machine-readable `error.code` (`run_not_found`, `queue_full`, …).
        code: String,
        /// The body's human-readable `error.message`.
        message: String,
        /// The `Retry-After` header, when present.
        retry_after: Option<Duration>,
    },
    /// The request or stream failed below HTTP.
    #[error("{message}")]
    Transport {
        /// What failed, with the root cause.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// An event stream skipped a `seq`.
    #[error("event stream of run {run_id} skipped from seq {last} to {got}: events were lost")]
    Gap {
        /// The run.
        run_id: String,
        /// The last seq received.
        last: u64,
        /// The seq that arrived instead of `last + 1`.
        got: u64,
    },
    /// The server sent something that does not decode.
    #[error("cannot decode {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        message: String,
        /// The JSON error, when there is one.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// The client is configured wrongly.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    /// What went wrong, to match on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Api {
                status,
                retry_after,
                ..
            } => match status {
                401 | 403 => ErrorKind::Unauthorized,
                404 => ErrorKind::NotFound,
                408 => ErrorKind::Timeout,
                409 => ErrorKind::Conflict,
                429 => ErrorKind::Rejected {
                    retry_after: *retry_after,
                },
                s if *s >= 500 => ErrorKind::Server,
                _ => ErrorKind::Invalid,
            },
            Self::Transport { .. } => ErrorKind::Transport,
            Self::Gap { .. } => ErrorKind::Gap,
            Self::Decode { .. } => ErrorKind::Decode,
            Self::Config(_) => ErrorKind::Config,
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's error code (`run_not_found`, `queue_full`, `invalid_input`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// For an error answer, the server's message alone (for 422 it names the field).
    pub fn server_message(&self) -> Option<&str> {
        match self {
            Self::Api { message, .. } => Some(message),
            _ => None,
        }
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the same request may succeed later: transport failures, 5xx, 429 and 408.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Transport
                | ErrorKind::Server
                | ErrorKind::Rejected { .. }
                | ErrorKind::Timeout
        )
    }

    /// A transport error without an underlying `reqwest` error.
    pub(crate) fn transport(message: impl Into<String>) -> Self {
        Self::Transport {
            message: message.into(),
            source: None,
        }
    }

    /// A transport error from `reqwest`, described with its root cause.
    pub(crate) fn from_reqwest(doing: &str, e: reqwest::Error) -> Self {
        let what = if e.is_connect() {
            "cannot connect"
        } else if e.is_timeout() {
            "timed out"
        } else if e.is_body() || e.is_decode() {
            "connection broke"
        } else {
            "request failed"
        };
        let root = root_cause(&e);
        Self::Transport {
            message: format!("{doing}: {what}: {root}"),
            source: Some(e),
        }
    }

    pub(crate) fn decode_json(what: impl Into<String>, e: serde_json::Error) -> Self {
        Self::Decode {
            what: what.into(),
            message: e.to_string(),
            source: Some(e),
        }
    }

    pub(crate) fn decode(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Decode {
            what: what.into(),
            message: message.into(),
            source: None,
        }
    }

    /// Builds the error of a non-success answer from its status, `Retry-After` and body.
    pub(crate) fn from_answer(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) => Self::Api {
                status,
                code: b.error.code,
                message: b.error.message,
                retry_after,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let reason = reqwest::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("error");
                let message = if text.is_empty() {
                    reason.to_owned()
                } else {
                    let short: String = text.chars().take(200).collect();
                    format!("{reason}: {short}")
                };
                Self::Api {
                    status,
                    code: format!("http_{status}"),
                    message,
                    retry_after,
                }
            }
        }
    }
}

/// The innermost error's text (for `reqwest`, the OS error such as "Connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_status() {
        let body = br#"{"error":{"code":"queue_full","message":"busy"}}"#;
        let e = Error::from_answer(429, Some(Duration::from_secs(2)), body);
        assert_eq!(
            e.kind(),
            ErrorKind::Rejected {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(e.code(), Some("queue_full"));
        assert!(e.is_retryable());
        for (status, kind) in [
            (400, ErrorKind::Invalid),
            (401, ErrorKind::Unauthorized),
            (403, ErrorKind::Unauthorized),
            (404, ErrorKind::NotFound),
            (408, ErrorKind::Timeout),
            (409, ErrorKind::Conflict),
            (413, ErrorKind::Invalid),
            (422, ErrorKind::Invalid),
            (500, ErrorKind::Server),
            (503, ErrorKind::Server),
        ] {
            assert_eq!(
                Error::from_answer(status, None, b"").kind(),
                kind,
                "{status}"
            );
        }
        let e = Error::from_answer(502, None, b"<html>bad gateway</html>");
        assert_eq!(e.code(), Some("http_502"));
        assert_eq!(
            e.to_string(),
            "Bad Gateway: <html>bad gateway</html> (HTTP 502, http_502)"
        );
        assert!(!Error::from_answer(404, None, b"").is_retryable());
        assert!(!Error::from_answer(422, None, b"").is_retryable());
        assert!(Error::from_answer(408, None, b"").is_retryable());
        assert!(Error::from_answer(503, None, b"").is_retryable());
    }
}
