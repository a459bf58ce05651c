use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, on};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::StartRun;
use sluice_protocol::api::{
    Accepted, CancelRun, CreateRun, CreateSession, Health, RunList, SendEvent, WorkflowInfo,
};
use sluice_protocol::{IdempotencyKey, RunRecord, RunStatus};
use sluice_store::RunFilter;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiBytes, ApiJson, ApiPath, ApiQuery, check_body, is_json};
use crate::idempotency::{Claim, fingerprint};
use crate::metrics::Rejection;
use crate::openapi::{OPERATIONS, Op, Operation};
use crate::stream::{self, Format, StreamOptions, TypeFilter};
use crate::{AppState, ws};

/// The `Retry-After` of a refused stream (streams are long-lived: one second is a guess that
/// keeps reconnecting clients from hammering).
const STREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The router, built from the route table [`OPERATIONS`] (which `/openapi.json` documents).
pub(crate) fn router(state: AppState) -> Router<AppState> {
    let mut v1 = Router::new();
    let mut ops = Router::new();
    for o in OPERATIONS {
        match o.path.strip_prefix("/v1") {
            Some(path) => v1 = v1.route(path, handler(&o)),
            None => ops = ops.route(o.path, handler(&o)),
        }
    }
    let v1 = v1.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        crate::auth::authenticate,
    ));
    ops.nest("/v1", v1)
        .fallback(|uri: axum::extract::OriginalUri| async move { unknown_route(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(state.options.max_body))
        .layer(axum::middleware::from_fn_with_state(state, request_body))
}

/// The `404` of a path no route serves; it names the path (its first 200 bytes).
fn unknown_route(path: &str) -> ApiError {
    ApiError::NotFound {
        what: "route",
        id: crate::error::prefix(path, 200).to_owned(),
    }
}

/// The handler of one operation, for its method.
fn handler(o: &Operation) -> MethodRouter<AppState> {
    let m = o.method.filter();
    match o.op {
        Op::ListWorkflows => on(m, list_workflows),
        Op::CreateRun => on(m, create_run),
        Op::ListRuns => on(m, list_runs),
        Op::GetRun => on(m, get_run),
        Op::RunEvents => on(m, run_events),
        Op::SendEvent => on(m, send_event),
        Op::CancelRun => on(m, cancel_run),
        Op::CreateSession => on(m, create_session),
        Op::GetSession => on(m, get_session),
        Op::DeleteSession => on(m, delete_session),
        Op::Healthz => on(m, healthz),
        Op::Readyz => on(m, readyz),
        Op::Metrics => on(m, metrics),
        Op::OpenApi => on(m, openapi),
    }
}

/// Every request's body: its size limit (for 413 messages) and its deadline,
/// `server.body_timeout` from now (the head has just been read). A body whose declared
/// `Content-Length` is over the limit is refused at once, before a byte of it is read (so no
/// `100 Continue` invites it, and the client does not wait out the body timeout).
async fn request_body(
    State(state): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = state.options.max_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::TooLarge {
            what: "the request body",
            limit,
        }
        .into_response();
    }
    req.extensions_mut()
        .insert(crate::extract::BodyLimit(limit));
    let req = crate::extract::TimedBody::wrap(req, state.options.body_timeout);
    next.run(req).await
}

/// The record as clients see it: live `last_seq`, no owner label, no idempotency key.
async fn public(state: &AppState, mut rec: RunRecord) -> ApiResult<RunRecord> {
    if !rec.status.is_terminal() {
        rec.last_seq = state.engine.store().last_seq(&rec.id).await?;
    }
    rec.owner = None;
    rec.idempotency = None;
    Ok(rec)
}

/// A run visible to the caller, else 404.
async fn visible_run(state: &AppState, who: &Principal, id: &str) -> ApiResult<RunRecord> {
    match state.engine.store().get_run(id).await? {
        Some(rec) if who.can_see(rec.owner.as_deref()) => Ok(rec),
        _ => Err(ApiError::not_found("run", id)),
    }
}

async fn list_workflows(State(state): State<AppState>) -> Json<Vec<WorkflowInfo>> {
    Json(
        state
            .engine
            .workflows()
            .iter()
            .map(|w| WorkflowInfo {
                name: w.name().to_owned(),
                kind: w.kind().to_owned(),
                description: w.description().to_owned(),
                input_schema: w.input_schema().clone(),
            })
            .collect(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateQuery {
    wait: Option<String>,
    if_busy: Option<String>,
}

fn parse_bool(v: Option<&str>, what: &str) -> ApiResult<bool> {
    match v {
        None => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{what}: expected true or false, got {other:?}"
        ))),
    }
}

/// Parses an optional JSON body (an empty body is the default value).
fn optional_json<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &axum::body::Bytes,
) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    check_body(body, "body")?;
    let mut de = serde_json::Deserializer::from_slice(body);
    match T::deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
        Ok(v) => Ok(v),
        Err(e) if e.is_data() => Err(ApiError::Unprocessable(format!("body: {e}"))),
        Err(e) => Err(ApiError::BadRequest(format!("body: {e}"))),
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    // Which of two keys is meant is not for the server to guess (a proxy may have added one).
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "Idempotency-Key: given more than once".into(),
        ));
    }
    let key = v
        .to_str()
        .map_err(|_| ApiError::BadRequest("Idempotency-Key: must be visible ASCII".into()))?;
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::BadRequest(
            "Idempotency-Key: must be 1 to 255 characters".into(),
        ));
    }
    Ok(Some(key.to_owned()))
}

async fn create_run(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<CreateQuery>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    let wait = parse_bool(q.wait.as_deref(), "wait")?;
    if state.engine.workflow(&name).is_none() {
        return Err(ApiError::not_found("workflow", &name));
    }
    let enqueue = match q.if_busy.as_deref() {
        None | Some("reject") => false,
        Some("enqueue") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "if_busy: expected reject or enqueue, got {other:?}"
            )));
        }
    };
    let req: CreateRun = optional_json(&headers, &body)?;
    let key = idempotency_key(&headers)?;
    // A stream is admitted before the run is started: a refused stream starts nothing.
    let stream = match Format::requested(&headers) {
        Some(format) => Some((format, StreamGuard::new(&state)?)),
        None => None,
    };
    // From here the request is the server's: the key's claim, the start, the session update and
    // the key's commit run on a task of their own, so a client that goes away cannot stop them
    // halfway (a run started but not in its session, or a key freed while its run exists).
    let (id, replayed) = {
        let (state, who, name) = (state.clone(), who.clone(), name.clone());
        tokio::spawn(async move { start_keyed(&state, &who, &name, req, key, enqueue).await })
            .await
            .map_err(|e| ApiError::Internal(Box::new(e)))??
    };
    let handle = state.engine.handle(&id);
    let location = format!("/v1/runs/{}", handle.id());
    if let Some((format, guard)) = stream {
        let opts = StreamOptions {
            format,
            after: 0,
            types: TypeFilter::default(),
            heartbeat: state.options.heartbeat,
        };
        let mut resp = stream_response(&state, handle.id().to_owned(), opts, guard);
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(resp);
    }
    let (status, rec) = if wait {
        let token = state.engine.shutdown_token();
        let rec = tokio::select! {
            r = handle.wait() => r?,
            () = token.cancelled() => {
                // The run exists: say which, so the client follows it instead of starting another.
                let mut resp = ApiError::ShuttingDownAfterStart(id.clone()).into_response();
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return Ok(resp);
            }
        };
        (StatusCode::OK, rec)
    } else {
        let rec = handle.record().await?;
        (
            if replayed {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            },
            rec,
        )
    };
    let rec = public(&state, rec).await?;
    let mut resp = (status, Json(rec)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Claims an `Idempotency-Key`. A key whose run no longer exists (the retention sweeper removed
/// it) is forgotten and claimed afresh, as it would be after a restart: it starts a new run,
/// not a `404` for the old one.
async fn claim_live<'a>(
    state: &'a AppState,
    key: crate::idempotency::Key,
    print: u64,
) -> ApiResult<Claim<'a>> {
    let claim = state.idempotency.claim(key.clone(), print).await?;
    if let Claim::Existing(id) = &claim
        && state.engine.store().get_run(id).await?.is_none()
    {
        state.idempotency.forget(&key, id);
        return state.idempotency.claim(key, print).await;
    }
    Ok(claim)
}

/// Claims the `Idempotency-Key` (when there is one) and starts the run, or finds the run the key
/// already names; returns the run's id and whether it was found (a replay).
async fn start_keyed(
    state: &AppState,
    who: &Principal,
    name: &str,
    req: CreateRun,
    key: Option<String>,
    enqueue: bool,
) -> ApiResult<(String, bool)> {
    let (claim, recorded_key) = match key {
        Some(k) => {
            let print = fingerprint(&serde_json::to_value(&req).unwrap_or(Value::Null));
            let recorded = IdempotencyKey {
                key: k.clone(),
                fingerprint: print,
            };
            let claim = claim_live(state, (who.owner.clone(), name.to_owned(), k), print).await?;
            (Some(claim), Some(recorded))
        }
        None => (None, None),
    };
    match claim {
        Some(Claim::Existing(id)) => Ok((id, true)),
        claim => {
            // With a key, the id is fixed before the start, so concurrent duplicates (waiting
            // on the reservation) answer this very run. A failed start drops the reservation,
            // which frees the key.
            let reservation = match claim {
                Some(Claim::New(r)) => Some(r),
                _ => None,
            };
            let start = StartRun {
                input: req.input,
                session_id: req.session_id,
                metadata: req.metadata,
                owner: who.owner.clone(),
                run_id: reservation.as_ref().map(|r| r.run_id().to_owned()),
                after_run: None,
                // In the record, the key outlives a restart (see `idempotency.rs`).
                idempotency: recorded_key,
            };
            // The key is the run's as soon as the run exists (its record holds the key), even
            // if what follows fails or the client goes away.
            let mut reservation = reservation;
            let started = || {
                if let Some(r) = reservation.take() {
                    r.commit();
                }
            };
            let handle = start_in_session(state, who, name, start, enqueue, started).await?;
            Ok((handle.id().to_owned(), false))
        }
    }
}

/// Starts a run, in its session when it names one: one active run per session; a busy session
/// refuses (409) or, with `enqueue`, queues the run behind the active one. `started` is called
/// once the run exists. When the session cannot be pointed at the new run, the run is
/// cancelled (a run its session does not know would break the one-active-run rule) and the
/// error returned.
async fn start_in_session(
    state: &AppState,
    who: &Principal,
    workflow: &str,
    mut start: StartRun,
    enqueue: bool,
    started: impl FnOnce(),
) -> ApiResult<sluice_engine::RunHandle> {
    let Some(session_id) = start.session_id.clone() else {
        let handle = state.engine.start(workflow, start).await?;
        started();
        return Ok(handle);
    };
    let _guard = state.engine.lock_session(&session_id).await;
    let store = state.engine.store();
    let mut session = match store.get_session(&session_id).await? {
        Some(s) if who.can_see(s.owner.as_deref()) => s,
        _ => return Err(ApiError::not_found("session", &session_id)),
    };
    if let Some(active) = active_run_of(state, &session_id).await? {
        if !enqueue {
            return Err(ApiError::Conflict(format!(
                "session {session_id:?} has an active run {active:?} (use ?if_busy=enqueue to queue behind it)"
            )));
        }
        start.after_run = Some(active);
    }
    let handle = state.engine.start(workflow, start).await?;
    started();
    session.active_run = Some(handle.id().to_owned());
    session.updated_at = sluice_protocol::Timestamp::now();
    if let Err(e) = store.put_session(&session).await {
        let reason = format!("its session {session_id:?} could not be updated: {e}");
        if let Err(c) = state.engine.cancel(handle.id(), Some(reason)).await {
            tracing::warn!(run_id = %handle.id(), error = %c, "could not cancel a run whose session update failed");
        }
        return Err(e.into());
    }
    Ok(handle)
}

/// The newest run of session `session_id` that has not ended, if any. A session has one active
/// run at a time; runs queued behind it (`?if_busy=enqueue`) are active too. The session's
/// `active_run` alone would not do: it names the newest run, and when that run was a queued
/// one that got cancelled, the run it was queued behind may still be going.
async fn active_run_of(state: &AppState, session_id: &str) -> ApiResult<Option<String>> {
    let page = state
        .engine
        .store()
        .list_runs(&RunFilter {
            session_id: Some(session_id.to_owned()),
            statuses: vec![RunStatus::Queued, RunStatus::Running, RunStatus::Waiting],
            limit: 1,
            ..RunFilter::default()
        })
        .await?;
    Ok(page.runs.into_iter().next().map(|r| r.id))
}

async fn create_session(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    let req: CreateSession = optional_json(&headers, &body)?;
    let now = sluice_protocol::Timestamp::now();
    let session = sluice_protocol::SessionRecord {
        id: format!("ses_{}", uuid_like()),
        created_at: now,
        updated_at: now,
        state: req.state.unwrap_or(Value::Null),
        active_run: None,
        owner: who.owner.clone(),
    };
    state.engine.store().create_session(&session).await?;
    let location = format!("/v1/sessions/{}", session.id);
    let mut resp = (StatusCode::CREATED, Json(public_session(session))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

fn uuid_like() -> String {
    sluice_engine::new_run_id()
        .trim_start_matches("run_")
        .to_owned()
}

fn public_session(mut s: sluice_protocol::SessionRecord) -> sluice_protocol::SessionRecord {
    s.owner = None;
    s
}

async fn visible_session(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> ApiResult<sluice_protocol::SessionRecord> {
    match state.engine.store().get_session(id).await? {
        Some(s) if who.can_see(s.owner.as_deref()) => Ok(s),
        _ => Err(ApiError::not_found("session", id)),
    }
}

async fn get_session(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<sluice_protocol::SessionRecord>> {
    let mut session = visible_session(&state, &who, &id).await?;
    // What is active now, not the last run started in the session (which may have ended).
    session.active_run = active_run_of(&state, &id).await?;
    Ok(Json(public_session(session)))
}

async fn delete_session(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let _guard = state.engine.lock_session(&id).await;
    visible_session(&state, &who, &id).await?;
    if let Some(active) = active_run_of(&state, &id).await? {
        return Err(ApiError::Conflict(format!(
            "session {id:?} has an active run {active:?}; cancel it first"
        )));
    }
    state.engine.store().delete_session(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    workflow: Option<String>,
    status: Option<String>,
    session_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_runs(
    State(state): State<AppState>,
    who: Principal,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<RunList>> {
    let limit = match q.limit.as_deref() {
        None => 50,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit: must be an integer from 1 to 1000, got {l:?}"
                )));
            }
        },
    };
    let mut statuses = Vec::new();
    if let Some(list) = q.status.as_deref() {
        for s in list.split(',') {
            statuses.push(RunStatus::parse(s.trim()).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "status: {s:?} is not one of queued, running, waiting, completed, failed, cancelled"
                ))
            })?);
        }
    }
    if let Some(c) = &q.cursor
        && !valid_cursor(c)
    {
        return Err(ApiError::BadRequest(format!(
            "cursor: {c:?} is not a next_cursor returned by this API"
        )));
    }
    let filter = RunFilter {
        workflow: q.workflow,
        statuses,
        session_id: q.session_id,
        owner: if who.admin { None } else { who.owner.clone() },
        finished_before: None,
        limit,
        cursor: q.cursor,
    };
    let page = state.engine.store().list_runs(&filter).await?;
    let mut runs = Vec::with_capacity(page.runs.len());
    for r in page.runs {
        runs.push(public(&state, r).await?);
    }
    Ok(Json(RunList {
        runs,
        next_cursor: page.next_cursor,
    }))
}

/// Whether `c` has the form of the cursors this API hands out: `next_cursor` is the id of the
/// last run of a page, `run_` and 32 lowercase hex digits (a UUIDv7, so ids sort by creation).
/// A cursor of that form is a position in that order, whether or not its run still exists.
fn valid_cursor(c: &str) -> bool {
    c.strip_prefix("run_").is_some_and(|rest| {
        rest.len() == 32
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

async fn get_run(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<RunRecord>> {
    let rec = visible_run(&state, &who, &id).await?;
    Ok(Json(public(&state, rec).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<String>,
    types: Option<String>,
}

async fn run_events(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
    headers: HeaderMap,
    upgrade: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> ApiResult<Response> {
    let after = stream::cursor(&headers, q.after.as_deref())?;
    let types = TypeFilter::parse(q.types.as_deref())?;
    // A request that asks for a WebSocket gets one or a 400, never an SSE stream instead.
    let upgrade = match upgrade {
        Ok(upgrade) => Some(upgrade),
        Err(e) if wants_websocket(&headers) => {
            return Err(ApiError::BadRequest(format!(
                "WebSocket upgrade: {}",
                e.body_text()
            )));
        }
        Err(_) => None,
    };
    let rec = visible_run(&state, &who, &id).await?;
    if let Some(wf) = state.engine.workflow(&rec.workflow) {
        types.check_written_by(&wf)?;
    }
    if at_end(&state, rec, after).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    // Admitted (or refused with a 503) before a WebSocket upgrade, not after it.
    let guard = StreamGuard::new(&state)?;
    if let Some(upgrade) = upgrade {
        return Ok(ws::upgrade(state, who, id, after, types, upgrade, guard));
    }
    let opts = StreamOptions {
        format: Format::negotiate(&headers),
        after,
        types,
        heartbeat: state.options.heartbeat,
    };
    Ok(stream_response(&state, id, opts, guard))
}

/// Whether the request carries `Upgrade: websocket`.
fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
}

/// Whether a reader at cursor `after` has nothing more to read: the run has ended and the
/// cursor is at or beyond its last event (answered `204`).
///
/// # Errors
/// 400 for a cursor beyond the last event of a live run: no such event exists yet, and one
/// with that seq may never come (the run may end first), so waiting could hang forever.
async fn at_end(state: &AppState, rec: RunRecord, after: u64) -> ApiResult<bool> {
    if rec.status.is_terminal() {
        return Ok(after >= rec.last_seq);
    }
    let last = state.engine.store().last_seq(&rec.id).await?;
    if after <= last {
        return Ok(false);
    }
    // It may have ended just now.
    match state.engine.store().get_run(&rec.id).await? {
        Some(r) if r.status.is_terminal() && after >= r.last_seq => Ok(true),
        _ => Err(ApiError::BadRequest(format!(
            "cursor: {after} is beyond the last event of run {:?} ({last}); resume from a seq you have received",
            rec.id
        ))),
    }
}

/// An admitted event stream: counts toward `server.max_streams` while it lives.
pub(crate) struct StreamGuard(AppState);

impl StreamGuard {
    /// Admits one more stream, or refuses with `503 overloaded` at the limit.
    pub(crate) fn new(state: &AppState) -> ApiResult<Self> {
        let n = state.metrics.stream_readers.fetch_add(1, Ordering::AcqRel);
        if n as usize >= state.options.max_streams {
            state.metrics.stream_readers.fetch_sub(1, Ordering::AcqRel);
            state.metrics.reject(Rejection::TooManyStreams);
            return Err(ApiError::Overloaded {
                what: "too many open event streams (server.max_streams)",
                retry_after: STREAM_RETRY_AFTER,
            });
        }
        Ok(Self(state.clone()))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.metrics.stream_readers.fetch_sub(1, Ordering::AcqRel);
    }
}

fn stream_response(
    state: &AppState,
    run_id: String,
    opts: StreamOptions,
    guard: StreamGuard,
) -> Response {
    let content_type = opts.format.content_type();
    let body = stream::body(
        state.engine.store().clone(),
        run_id.clone(),
        opts,
        state.engine.shutdown_token(),
    )
    .map(move |chunk| {
        let _held = &guard;
        chunk
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(&run_id) {
        h.insert("x-sluice-run-id", v);
    }
    resp
}

/// `POST /v1/runs/{id}/events` (and WebSocket client frames); `what` names the event's
/// container in messages (`body`, `frame`).
pub(crate) async fn deliver(
    state: &AppState,
    who: &Principal,
    id: &str,
    ev: SendEvent,
    what: &str,
) -> ApiResult<()> {
    let size = serde_json::to_vec(&ev.data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > state.options.max_event {
        return Err(ApiError::TooLarge {
            what: "the event's data",
            limit: state.options.max_event,
        });
    }
    if ev.event_type.is_empty() || ev.event_type.len() > 64 {
        return Err(ApiError::Unprocessable(format!(
            "{what}.type: must be an event type such as \"input\" or \"tool-results\""
        )));
    }
    let rec = visible_run(state, who, id).await?;
    if rec.status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "run {id:?} is already {}",
            rec.status.as_str()
        )));
    }
    state.engine.send(id, &ev.event_type, ev.data).await?;
    Ok(())
}

async fn send_event(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(ev): ApiJson<SendEvent>,
) -> ApiResult<Response> {
    deliver(&state, &who, &id, ev, "body").await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })).into_response())
}

async fn cancel_run(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    let req: CancelRun = optional_json(&headers, &body)?;
    let rec = visible_run(&state, &who, &id).await?;
    if rec.status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "run {id:?} is already {}",
            rec.status.as_str()
        )));
    }
    state.engine.cancel(&id, req.reason).await?;
    // The driver ends the run within milliseconds; the answer shows the run cancelled unless
    // that takes longer than CANCEL_WAIT (a shutdown, a store that stalls), when it shows the
    // record as it is: 202 either way, as the end is the driver's to write.
    let handle = state.engine.handle(&id);
    let token = state.engine.shutdown_token();
    let ended = tokio::select! {
        r = tokio::time::timeout(CANCEL_WAIT, handle.wait()) => r.ok().and_then(Result::ok),
        () = token.cancelled() => None,
    };
    let rec = match ended {
        Some(rec) => rec,
        None => visible_run(&state, &who, &id).await?,
    };
    Ok((StatusCode::ACCEPTED, Json(public(&state, rec).await?)).into_response())
}

/// How long a cancel waits for the run's end before it answers with the record as it is.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.is_cancelled() {
        return ApiError::ShuttingDown.into_response();
    }
    Json(Health {
        status: "ready".into(),
    })
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .render(&state.engine, state.connections.open());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi())
}
