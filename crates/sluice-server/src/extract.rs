//! Extractors answering in the protocol's error shape, and the request body's deadline.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `Json<T>` whose rejections answer in the protocol's error shape: 400 for bad syntax or
/// encoding, 415 for a missing JSON content type, 413 over the size limit, 422 (naming the field)
/// for JSON of the wrong shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| unread_body(&e, limit))?;
        check_body(&body, "body")?;
        match axum::Json::<T>::from_bytes(&body) {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::Unprocessable(clean(&e.body_text())))
            }
            Err(other) => Err(ApiError::BadRequest(clean(&other.body_text()))),
        }
    }
}

/// Whether the request says its body is JSON: `application/json` or `application/*+json`,
/// in any case (media types are case-insensitive).
pub(crate) fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
}

/// The deepest nesting of arrays and objects a client's JSON may have. A run keeps what it is
/// given inside its own records (an event's `data` becomes part of the run's `result`, a few
/// levels further in), and the store reads records back with serde_json's limit of 128
/// levels: a value accepted near that limit would make its run unreadable. Nothing a client
/// sends needs a tenth of this.
pub(crate) const MAX_JSON_DEPTH: usize = sluice_protocol::json::MAX_DEPTH;

/// Checks what the parser would let through in a body that must be one JSON object: refuses
/// (400) JSON nested deeper than [`MAX_JSON_DEPTH`], and (422) a top-level array, which serde
/// would otherwise read as the object's fields by position (`[{"n":1}]` as `{"input":{"n":1}}`).
/// `what` names the body in the message. Looks at the bytes only (brackets outside strings):
/// malformed JSON is left to the parser.
pub(crate) fn check_body(json: &[u8], what: &str) -> Result<(), ApiError> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::Unprocessable(format!(
            "{what}: invalid type: array, expected a JSON object"
        )));
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ApiError::BadRequest(format!(
                        "{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Why a body could not be read: over the size limit (413), past its deadline (408), or
/// broken (400).
fn unread_body(e: &BytesRejection, limit: usize) -> ApiError {
    if let Some(BodyTimedOut(after)) = find_source(e) {
        return ApiError::RequestTimeout(*after);
    }
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::TooLarge {
            what: "the request body",
            limit,
        };
    }
    ApiError::BadRequest(format!("could not read the body: {}", e.body_text()))
}

/// The first error of type `T` in `e`'s source chain.
fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// A request body that fails with [`BodyTimedOut`] when it has not ended by its deadline
/// (`server.body_timeout`, counted from when the request head was handed to the router).
/// The extractors answer that failure with `408 request_timeout`.
///
/// Only reads of the body are timed: a handler that does not read it (a WebSocket upgrade, a
/// `GET`) never meets the deadline, and responses are not affected.
pub(crate) struct TimedBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl TimedBody {
    /// Puts `req`'s body under a deadline of `timeout` from now; a body that is already
    /// complete (none, or `Content-Length: 0`) is left as it is.
    pub(crate) fn wrap(req: Request, timeout: Duration) -> Request {
        if req.body().is_end_stream() {
            return req;
        }
        req.map(|inner| {
            Body::new(Self {
                inner,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                timeout,
            })
        })
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        // What has arrived is taken first; the deadline counts once the body has to wait.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(this.timeout)))))
                }
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body did not end within `server.body_timeout` (the configured value).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub(crate) struct BodyTimedOut(Duration);

/// The configured body limit, put in request extensions so 413 messages can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Drops axum's generic prefix, keeping the part that names the field and the problem.
fn clean(text: &str) -> String {
    let t = text
        .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        .trim_start_matches("Failed to parse the request body as JSON: ");
    format!("body: {t}")
}

/// `Query<T>` answering 400 in the protocol's shape.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::BadRequest(format!(
                    "query: {}",
                    e.body_text()
                        .trim_start_matches("Failed to deserialize query string: ")
                )))
            }
            Err(other) => Err(ApiError::BadRequest(other.body_text())),
        }
    }
}

/// The raw body, with a too-large body answered as 413 in the protocol's shape.
#[derive(Debug)]
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Self(b)),
            Err(e) => Err(unread_body(&e, limit)),
        }
    }
}

/// `Path<T>` answering 400 in the protocol's shape (e.g. a segment that is not UTF-8).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::BadRequest(format!("path: {}", e.body_text()))),
        }
    }
}
