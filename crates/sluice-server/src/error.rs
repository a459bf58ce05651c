use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_protocol::api::ErrorBody;

/// Every error the HTTP API answers, mapped to a status and the protocol's error shape
/// `{"error": {"code", "message"}}`. 5xx bodies reveal nothing internal.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed request (syntax, cursor, query).
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or unknown API key.
    #[error("a valid API key is required: send Authorization: Bearer <key>")]
    Unauthorized,
    /// 403: a request the server refuses whoever sends it (a browser page of another site
    /// calling a server without keys).
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such resource (or not visible to this key).
    #[error("{what} {id:?} not found")]
    NotFound {
        /// `run`, `workflow`, `session`, `route`.
        what: &'static str,
        /// What was asked for.
        id: String,
    },
    /// 405: the route exists with other methods.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 408: the request body did not arrive in full within `server.body_timeout`; the
    /// connection is closed after this answer.
    #[error("the request body did not arrive in full within {0:?} (server.body_timeout)")]
    RequestTimeout(Duration),
    /// 409: the resource's state forbids the request.
    #[error("{0}")]
    Conflict(String),
    /// 413: a body (or an event's `data`, which `what` names) over its limit of `limit` bytes.
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large ("the request body", "the event's data").
        what: &'static str,
        /// The limit, in bytes.
        limit: usize,
    },
    /// 415: not JSON.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// 422: valid JSON that is not acceptable; the message names the field.
    #[error("{0}")]
    Unprocessable(String),
    /// 429: at capacity.
    #[error("workflow {workflow:?} is at capacity; retry after {} s", retry_after.as_secs())]
    QueueFull {
        /// The workflow.
        workflow: String,
        /// Suggested wait.
        retry_after: Duration,
    },
    /// 422: an `Idempotency-Key` seen before, sent with a different body.
    #[error(
        "Idempotency-Key: this key was used for a different request body; use a new key for a new request"
    )]
    IdempotencyKeyReused,
    /// 503: shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// 503: shutting down while a `?wait=true` create waited for its run, which exists.
    #[error(
        "the server is shutting down; run {0} was started and goes on at the next start: follow it rather than retrying the create"
    )]
    ShuttingDownAfterStart(String),
    /// 503: a server-wide limit (open event streams) is reached.
    #[error("{what}; retry after {} s", retry_after.as_secs())]
    Overloaded {
        /// Which limit, for the message.
        what: &'static str,
        /// Suggested wait.
        retry_after: Duration,
    },
    /// 500: something failed inside; logged, not shown.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound { what: "run", .. } => (StatusCode::NOT_FOUND, "run_not_found"),
            Self::NotFound {
                what: "workflow", ..
            } => (StatusCode::NOT_FOUND, "workflow_not_found"),
            Self::NotFound {
                what: "session", ..
            } => (StatusCode::NOT_FOUND, "session_not_found"),
            Self::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            Self::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            Self::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            Self::ShuttingDown | Self::ShuttingDownAfterStart(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
            }
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The protocol's error `code` (`invalid_request`, `run_not_found`, …).
    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    /// The `Retry-After` this error suggests, if any.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::QueueFull { retry_after, .. } | Self::Overloaded { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// The error shape of the protocol, as sent in a body or a WebSocket frame.
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }

    pub(crate) fn not_found(what: &'static str, id: &str) -> Self {
        Self::NotFound {
            what,
            id: id.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if let Self::Internal(source) = &self {
            tracing::error!(error = %source, "request failed");
        }
        let body = ErrorBody::new(code, self.to_string());
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(retry_after) = self.retry_after()
            && let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let Self::Unauthorized = self {
            // RFC 9110 §11.6.1: a 401 names the scheme it wants.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        if let Self::RequestTimeout(_) = self {
            // The rest of the body may still be on its way: the connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<sluice_engine::Error> for ApiError {
    fn from(e: sluice_engine::Error) -> Self {
        use sluice_engine::Error as E;
        match e {
            E::UnknownWorkflow(name) => Self::NotFound {
                what: "workflow",
                id: name,
            },
            E::UnknownRun(id) => Self::NotFound { what: "run", id },
            E::InvalidInput(m) => Self::Unprocessable(m),
            e @ E::RunFinished { .. } => Self::Conflict(e.to_string()),
            e @ E::NotWaiting { .. } => Self::Unprocessable(e.to_string()),
            E::QueueFull {
                workflow,
                retry_after,
            } => Self::QueueFull {
                workflow,
                retry_after,
            },
            E::ShuttingDown => Self::ShuttingDown,
            E::Store(sluice_store::Error::NotFound { what, id }) => Self::NotFound { what, id },
            other => Self::Internal(Box::new(other)),
        }
    }
}

impl From<sluice_store::Error> for ApiError {
    fn from(e: sluice_store::Error) -> Self {
        match e {
            sluice_store::Error::NotFound { what, id } => Self::NotFound { what, id },
            other => Self::Internal(Box::new(other)),
        }
    }
}

/// `Result` of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn prefix(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
