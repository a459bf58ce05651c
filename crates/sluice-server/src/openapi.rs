//! The OpenAPI 3.1 document of the HTTP API, served at `/openapi.json`, generated from the code:
//! - the operations are [`OPERATIONS`], the table the router itself is built from
//!   (`routes::router`), so every route is documented and every documented operation is routed;
//! - request and response bodies are JSON Schemas derived with `schemars` from the serde types
//!   the handlers actually read and write (`sluice_protocol::api`, `sluice_protocol::record`):
//!   requests with the deserialisation contract, responses with the serialisation one.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};
use sluice_protocol::api::{
    Accepted, CancelRun, CreateRun, CreateSession, ErrorBody, EventEnvelope, Health, RunList,
    SendEvent, WorkflowInfo,
};
use sluice_protocol::{RunRecord, SessionRecord};

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    /// The lower-case name, as OpenAPI spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Delete => "delete",
        }
    }

    pub(crate) fn filter(self) -> axum::routing::MethodFilter {
        match self {
            Self::Get => axum::routing::MethodFilter::GET,
            Self::Post => axum::routing::MethodFilter::POST,
            Self::Delete => axum::routing::MethodFilter::DELETE,
        }
    }
}

/// Every operation of the API; each has one handler (`routes::handler`) and one description
/// ([`describe`]), both chosen by an exhaustive `match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    ListWorkflows,
    CreateRun,
    ListRuns,
    GetRun,
    RunEvents,
    SendEvent,
    CancelRun,
    CreateSession,
    GetSession,
    DeleteSession,
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
}

/// One row of the route table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operation {
    pub(crate) op: Op,
    pub(crate) method: Method,
    /// The path, in the syntax both OpenAPI and axum use (`/v1/runs/{id}`).
    pub(crate) path: &'static str,
}

const fn op(op: Op, method: Method, path: &'static str) -> Operation {
    Operation { op, method, path }
}

/// The route table: the router is built from it, and so is the document.
pub(crate) const OPERATIONS: [Operation; 14] = [
    op(Op::ListWorkflows, Method::Get, "/v1/workflows"),
    op(Op::CreateRun, Method::Post, "/v1/workflows/{name}/runs"),
    op(Op::ListRuns, Method::Get, "/v1/runs"),
    op(Op::GetRun, Method::Get, "/v1/runs/{id}"),
    op(Op::RunEvents, Method::Get, "/v1/runs/{id}/events"),
    op(Op::SendEvent, Method::Post, "/v1/runs/{id}/events"),
    op(Op::CancelRun, Method::Post, "/v1/runs/{id}/cancel"),
    op(Op::CreateSession, Method::Post, "/v1/sessions"),
    op(Op::GetSession, Method::Get, "/v1/sessions/{id}"),
    op(Op::DeleteSession, Method::Delete, "/v1/sessions/{id}"),
    op(Op::Healthz, Method::Get, "/healthz"),
    op(Op::Readyz, Method::Get, "/readyz"),
    op(Op::Metrics, Method::Get, "/metrics"),
    op(Op::OpenApi, Method::Get, "/openapi.json"),
];

/// `(method, path)` of every route the server answers, as in the document.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    OPERATIONS
        .iter()
        .map(|o| (o.method.as_str(), o.path))
        .collect()
}

/// Schema generators for request bodies (deserialisation contract) and response bodies
/// (serialisation contract); both put their definitions under `#/components/schemas`.
struct Schemas {
    req: SchemaGenerator,
    res: SchemaGenerator,
}

impl Schemas {
    fn new() -> Self {
        let base = SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "#/components/schemas".into();
            s.meta_schema = None;
        });
        Self {
            req: base.clone().for_deserialize().into_generator(),
            res: base.for_serialize().into_generator(),
        }
    }

    fn req<T: JsonSchema>(&mut self) -> Value {
        self.req.subschema_for::<T>().to_value()
    }

    fn res<T: JsonSchema>(&mut self) -> Value {
        self.res.subschema_for::<T>().to_value()
    }

    /// All definitions; a name defined differently by the two contracts is listed in the
    /// second value (a test keeps it empty).
    fn into_definitions(mut self) -> (Map<String, Value>, Vec<String>) {
        let mut all = self.req.take_definitions(true);
        let mut conflicts = Vec::new();
        for (name, schema) in self.res.take_definitions(true) {
            match all.get(&name) {
                Some(existing) if existing != &schema => conflicts.push(name.clone()),
                _ => {}
            }
            all.insert(name, schema);
        }
        (all, conflicts)
    }
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description,
        "schema": {"type": "string"}})
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description,
        "schema": schema})
}

/// `schema` (often a `$ref`) with a description beside it, as JSON Schema 2020-12 allows: a
/// Media Type Object has no `description` of its own.
fn described(schema: &Value, description: &str) -> Value {
    let mut schema = schema.clone();
    if let Some(m) = schema.as_object_mut() {
        m.insert("description".into(), description.into());
    }
    schema
}

fn header_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

/// The description of one error status.
fn error(s: &mut Schemas, status: &str, description: &str) -> (String, Value) {
    let mut r = json!({"description": description, "content": json_content(s.res::<ErrorBody>())});
    if matches!(status, "429" | "503") {
        r["headers"] = json!({"Retry-After": {"$ref": "#/components/headers/Retry-After"}});
    }
    (status.to_owned(), r)
}

/// The standard text of each error status; `extra` overrides some.
fn errors(s: &mut Schemas, statuses: &[&str], extra: &[(&str, &str)]) -> Vec<(String, Value)> {
    statuses
        .iter()
        .map(|status| {
            let text = extra
                .iter()
                .find(|(st, _)| st == status)
                .map(|(_, t)| *t)
                .unwrap_or(match *status {
                    "400" => "Malformed request (`invalid_request`): syntax, query, header or path",
                    "401" => "Missing or unknown API key (`unauthorized`); only when keys are configured",
                    "404" => "No such resource, or not visible to this key (`run_not_found`, `workflow_not_found`, `session_not_found`)",
                    "405" => "Method not allowed on this path (`method_not_allowed`)",
                    "408" => "The request body did not arrive in full within `server.body_timeout` (`request_timeout`); the connection is closed",
                    "409" => "The resource's state forbids the request (`conflict`)",
                    "413" => "Body over `server.max_body` (`too_large`)",
                    "415" => "A body that is not `application/json` (`unsupported_media_type`)",
                    "422" => "Valid JSON that is not acceptable (`invalid_input`); the message names the field",
                    "429" => "The workflow's queue is full (`queue_full`); retry after `Retry-After` seconds",
                    "500" => "Internal failure (`internal`, e.g. the store); the body reveals nothing",
                    "503" => "The server is shutting down (`shutting_down`)",
                    _ => "Error",
                });
            error(s, status, text)
        })
        .collect()
}

/// Summary, description, parameters, request body (schema, required) and success responses
/// of an operation.
type Described = (
    &'static str,
    &'static str,
    Vec<Value>,
    Option<(Value, bool)>,
    Vec<(String, Value)>,
);

/// The operation object of `op`.
fn describe(op: Op, s: &mut Schemas) -> Value {
    let run_id = || path_param("id", "The run's id (`run_…`)");
    let session_id = || path_param("id", "The session's id (`ses_…`)");
    let api = ["401", "405", "500", "503"];
    let (summary, description, params, body, mut responses): Described = match op {
        Op::ListWorkflows => (
            "Deployed workflows",
            "Every workflow this server serves, by name.",
            vec![],
            None,
            vec![(
                "200".into(),
                json!({"description": "The workflows", "content": json_content(json!({"type": "array", "items": s.res::<WorkflowInfo>()}))}),
            )],
        ),
        Op::CreateRun => {
            let record = s.res::<RunRecord>();
            let event = s.res::<EventEnvelope>();
            (
                "Start a run",
                "Starts a run of the workflow and answers `202` with its record. With `Accept: text/event-stream` or `application/x-ndjson`, the same call answers with the run's event stream (`200`); with `?wait=true`, it waits for the end and answers the finished record (`200`). An `Idempotency-Key` seen before (same key owner, workflow and key, within 24 h, across restarts on a persistent store) answers `200` with the run first created and starts nothing; the same key with a different body is a `422 idempotency_key_reused`.",
                vec![
                    path_param("name", "The workflow's name"),
                    query(
                        "wait",
                        "Block until the run ends and answer the final record",
                        json!({"type": "boolean"}),
                    ),
                    query(
                        "if_busy",
                        "When the session has an active run: `reject` (409, the default) or `enqueue` (queued behind it)",
                        json!({"type": "string", "enum": ["reject", "enqueue"]}),
                    ),
                    header_ref("Idempotency-Key"),
                ],
                Some((s.req::<CreateRun>(), false)),
                vec![
                    (
                        "202".into(),
                        json!({"description": "The run was started (or queued); its record", "headers": {"Location": {"$ref": "#/components/headers/Location"}}, "content": json_content(record.clone())}),
                    ),
                    (
                        "200".into(),
                        json!({"description": "The finished record (`?wait=true`), the run an `Idempotency-Key` created before, or the run's event stream (`Accept`)", "headers": {"Location": {"$ref": "#/components/headers/Location"}}, "content": {
                            "application/json": {"schema": record},
                            "text/event-stream": {"schema": {"type": "string", "description": "SSE frames (see GET /v1/runs/{id}/events)"}},
                            "application/x-ndjson": {"schema": described(&event, "One envelope per line")}
                        }}),
                    ),
                ],
            )
        }
        Op::ListRuns => (
            "List runs",
            "The caller's runs (every run for an admin key), newest first, paginated.",
            vec![
                query("workflow", "Only this workflow", json!({"type": "string"})),
                query(
                    "status",
                    "Only these states, comma-separated (`queued`, `running`, `waiting`, `completed`, `failed`, `cancelled`)",
                    json!({"type": "string"}),
                ),
                query("session_id", "Only this session", json!({"type": "string"})),
                query(
                    "limit",
                    "Page size",
                    json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
                ),
                query(
                    "cursor",
                    "The `next_cursor` of the previous page; anything else is a 400",
                    json!({"type": "string", "pattern": "^run_[A-Za-z0-9_-]{1,96}$"}),
                ),
            ],
            None,
            vec![(
                "200".into(),
                json!({"description": "One page", "content": json_content(s.res::<RunList>())}),
            )],
        ),
        Op::GetRun => (
            "A run",
            "The run's record, with the live `last_seq`.",
            vec![run_id()],
            None,
            vec![(
                "200".into(),
                json!({"description": "The record", "content": json_content(s.res::<RunRecord>())}),
            )],
        ),
        Op::RunEvents => {
            let event = s.res::<EventEnvelope>();
            let send = s.req::<SendEvent>();
            let accepted = s.res::<Accepted>();
            let err = s.res::<ErrorBody>();
            (
                "The run's event stream",
                "The run's events with `seq` greater than the cursor, history then live, ending after the terminal event. Transport by `Accept`: `text/event-stream` (default) or `application/x-ndjson`, or a WebSocket upgrade (`101`). A cursor at or beyond the last event of a finished run answers `204`; a cursor beyond the last event of a live run is a `400`.",
                vec![
                    run_id(),
                    query(
                        "after",
                        "Events with `seq > after` (`Last-Event-ID` wins when both are sent)",
                        json!({"type": "integer", "minimum": 0}),
                    ),
                    query(
                        "types",
                        "Only these event types, comma-separated (the terminal event always passes)",
                        json!({"type": "string"}),
                    ),
                    header_ref("Last-Event-ID"),
                ],
                None,
                vec![
                    (
                        "200".into(),
                        json!({"description": "The stream", "headers": {
                            "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
                            "X-Accel-Buffering": {"schema": {"type": "string", "const": "no"}}
                        }, "content": {
                            "text/event-stream": {"schema": {"type": "string", "description": "`retry: 1000`, then per event `id: <seq>`, `event: <type>`, `data: <envelope JSON>` and a blank line; `: ping` comments while idle; `\\n` line endings"}},
                            "application/x-ndjson": {"schema": described(&event, "One envelope per line; blank lines while idle")}
                        }}),
                    ),
                    (
                        "101".into(),
                        json!({"description": "WebSocket (request with `Upgrade: websocket`): one text frame per envelope, pings while idle. Client text frames are `SendEvent`s, each answered with `Accepted` or an `Error` frame.",
                            "x-websocket": {"server-frames": [event, accepted, err], "client-frames": send}}),
                    ),
                    (
                        "204".into(),
                        json!({"description": "The run has ended and the cursor is at (or beyond) its last event: nothing more to read"}),
                    ),
                ],
            )
        }
        Op::SendEvent => (
            "Send an event into a run",
            "Client tool results (`tool-results`) or human input (`input`); answered once the event is durable in the run. `413` when `data` exceeds `server.max_event`.",
            vec![run_id()],
            Some((s.req::<SendEvent>(), true)),
            vec![(
                "202".into(),
                json!({"description": "Accepted", "content": json_content(s.res::<Accepted>())}),
            )],
        ),
        Op::CancelRun => (
            "Cancel a run",
            "The run ends with `chain-cancelled`.",
            vec![run_id()],
            Some((s.req::<CancelRun>(), false)),
            vec![(
                "202".into(),
                json!({"description": "The record", "content": json_content(s.res::<RunRecord>())}),
            )],
        ),
        Op::CreateSession => (
            "Create a session",
            "Runs started with its id continue it, one active run at a time.",
            vec![],
            Some((s.req::<CreateSession>(), false)),
            vec![(
                "201".into(),
                json!({"description": "The session", "headers": {"Location": {"$ref": "#/components/headers/Location"}}, "content": json_content(s.res::<SessionRecord>())}),
            )],
        ),
        Op::GetSession => (
            "A session",
            "The session's record.",
            vec![session_id()],
            None,
            vec![(
                "200".into(),
                json!({"description": "The session", "content": json_content(s.res::<SessionRecord>())}),
            )],
        ),
        Op::DeleteSession => (
            "Delete a session",
            "`409` while a run of the session is active.",
            vec![session_id()],
            None,
            vec![("204".into(), json!({"description": "Deleted"}))],
        ),
        Op::Healthz => (
            "Liveness",
            "Always `200` while the process serves.",
            vec![],
            None,
            vec![(
                "200".into(),
                json!({"description": "Alive", "content": json_content(s.res::<Health>())}),
            )],
        ),
        Op::Readyz => (
            "Readiness",
            "`503` while the server drains.",
            vec![],
            None,
            vec![(
                "200".into(),
                json!({"description": "Ready", "content": json_content(s.res::<Health>())}),
            )],
        ),
        Op::Metrics => (
            "Prometheus metrics",
            "The text exposition format.",
            vec![],
            None,
            vec![(
                "200".into(),
                json!({"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}),
            )],
        ),
        Op::OpenApi => (
            "This document",
            "The OpenAPI 3.1 description of this API.",
            vec![],
            None,
            vec![(
                "200".into(),
                json!({"description": "The document", "content": json_content(json!({"type": "object"}))}),
            )],
        ),
    };
    let statuses: Vec<&str> = match op {
        Op::ListWorkflows => api.to_vec(),
        Op::CreateRun => [
            "400", "401", "404", "405", "408", "409", "413", "415", "422", "429", "500", "503",
        ]
        .to_vec(),
        Op::ListRuns => ["400", "401", "405", "500", "503"].to_vec(),
        Op::GetRun | Op::GetSession => ["400", "401", "404", "405", "500", "503"].to_vec(),
        Op::RunEvents => ["400", "401", "404", "405", "500", "503"].to_vec(),
        Op::SendEvent => [
            "400", "401", "404", "405", "408", "409", "413", "415", "422", "500", "503",
        ]
        .to_vec(),
        Op::CancelRun => [
            "400", "401", "404", "405", "408", "409", "413", "415", "422", "500", "503",
        ]
        .to_vec(),
        Op::CreateSession => [
            "400", "401", "405", "408", "413", "415", "422", "500", "503",
        ]
        .to_vec(),
        Op::DeleteSession => ["400", "401", "404", "405", "409", "500", "503"].to_vec(),
        Op::Readyz => ["405", "503"].to_vec(),
        Op::OpenApi => ["405", "503"].to_vec(),
        Op::Healthz | Op::Metrics => ["405"].to_vec(),
    };
    let extra: &[(&str, &str)] = match op {
        Op::CreateRun => &[
            (
                "404",
                "No such workflow (`workflow_not_found`) or session (`session_not_found`)",
            ),
            (
                "409",
                "The session has an active run and `if_busy` is `reject` (`conflict`)",
            ),
            (
                "422",
                "The input is not acceptable to the workflow, or an unknown body field (`invalid_input`); an `Idempotency-Key` used before with a different body (`idempotency_key_reused`)",
            ),
            (
                "503",
                "Shutting down (`shutting_down`), or, when a stream is asked for, too many open streams (`overloaded`, with `Retry-After`)",
            ),
        ],
        Op::RunEvents => &[
            (
                "400",
                "A malformed cursor (`Last-Event-ID: abc`, `?after=-7`), a cursor beyond a live run's last event, or an unknown `types` entry (`invalid_request`)",
            ),
            (
                "503",
                "Shutting down (`shutting_down`), or `server.max_streams` streams are open (`overloaded`, with `Retry-After`)",
            ),
        ],
        Op::SendEvent => &[
            ("409", "The run has ended (`conflict`)"),
            (
                "413",
                "`data` over `server.max_event`, or a body over `server.max_body` (`too_large`)",
            ),
            (
                "422",
                "The run does not wait for this event, or a body of the wrong shape (`invalid_input`)",
            ),
        ],
        Op::CancelRun => &[("409", "The run has ended (`conflict`)")],
        Op::DeleteSession => &[("409", "A run of the session is active (`conflict`)")],
        Op::Readyz => &[(
            "503",
            "Draining: the server is shutting down (`shutting_down`)",
        )],
        _ => &[],
    };
    responses.extend(errors(s, &statuses, extra));
    let mut out = json!({
        "operationId": format!("{op:?}"),
        "summary": summary,
        "description": description,
        "parameters": params,
        "responses": responses.into_iter().collect::<Map<String, Value>>(),
    });
    if let Some((schema, required)) = body {
        out["requestBody"] = json!({"required": required, "content": json_content(schema)});
    }
    if !matches!(op, Op::Healthz | Op::Readyz | Op::Metrics | Op::OpenApi) {
        out["security"] = json!([{"bearer": []}]);
    } else {
        out["security"] = json!([]);
    }
    out
}

/// The document, and the names of schemas the two contracts defined differently.
fn build() -> (Value, Vec<String>) {
    let mut s = Schemas::new();
    let mut paths = Map::new();
    for o in OPERATIONS {
        let item = paths.entry(o.path.to_owned()).or_insert_with(|| json!({}));
        item[o.method.as_str()] = describe(o.op, &mut s);
    }
    let (schemas, conflicts) = s.into_definitions();
    let doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Streaming server for LLM agent workflows. Errors are always `{\"error\": {\"code\", \"message\"}}`. See docs/protocol.md."
        },
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "schemas": schemas,
            "parameters": {
                "Idempotency-Key": {"name": "Idempotency-Key", "in": "header", "required": false,
                    "description": "Makes the create idempotent: the same key (per API key and workflow, for 24 h) answers the run it created first",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                "Last-Event-ID": {"name": "Last-Event-ID", "in": "header", "required": false,
                    "description": "Resume after this `seq` (what a reconnecting EventSource sends)",
                    "schema": {"type": "integer", "minimum": 0}}
            },
            "headers": {
                "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}},
                "Location": {"description": "The path of the created resource", "schema": {"type": "string"}}
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "`Authorization: Bearer <key>` when the server has keys configured; a run is visible only to the key that created it (and admin keys)"}}
        }
    });
    (doc, conflicts)
}

/// The OpenAPI 3.1 document.
pub fn openapi() -> Value {
    build().0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_contracts_agree_and_every_reference_resolves() {
        let (doc, conflicts) = build();
        assert_eq!(conflicts, Vec::<String>::new());
        let text = doc.to_string();
        for (i, _) in text.match_indices("\"$ref\":\"") {
            let rest = &text[i + 8..];
            let target = &rest[..rest.find('"').unwrap()];
            let mut node = &doc;
            for part in target.trim_start_matches("#/").split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "{target} resolves");
        }
        for name in [
            "CreateRun",
            "SendEvent",
            "CreateSession",
            "CancelRun",
            "RunRecord",
            "RunList",
            "WorkflowInfo",
            "SessionRecord",
            "Event",
            "Error",
            "Accepted",
            "Health",
            "ErrorInfo",
            "RunStatus",
            "Usage",
        ] {
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{name} in {}",
                doc["components"]["schemas"]
            );
        }
        // Derived from the serde types: unknown fields refused, renamed fields, optional
        // fields not required.
        let create = &doc["components"]["schemas"]["CreateRun"];
        assert_eq!(create["additionalProperties"], false);
        assert!(create.get("required").is_none());
        let send = &doc["components"]["schemas"]["SendEvent"];
        assert_eq!(send["required"], json!(["type"]));
        let record = &doc["components"]["schemas"]["RunRecord"];
        assert!(record["properties"].get("owner").is_none());
        let required = record["required"].as_array().unwrap();
        assert!(required.contains(&json!("last_seq")));
        assert!(!required.contains(&json!("finished_at")));
        assert_eq!(record["properties"]["created_at"]["format"], "date-time");
    }
}
