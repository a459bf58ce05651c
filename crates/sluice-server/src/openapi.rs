//! The OpenAPI 3.1 document of the HTTP API, served at `/openapi.json`.
//!
//! Built from the same definitions the handlers use: the route table below is checked against
//! the router by a test (every route documented, every documented route answering).

use serde_json::{Value, json};

/// `(method, path, summary, request body schema, success status)` of every route.
pub(crate) const ROUTES: [(&str, &str, &str, Option<&str>, &str); 16] = [
    (
        "post",
        "/v1/sessions",
        "Create a session (runs started with its id continue it)",
        Some("CreateSession"),
        "201",
    ),
    ("get", "/v1/sessions/{id}", "A session", None, "200"),
    (
        "delete",
        "/v1/sessions/{id}",
        "Delete a session (409 while a run of it is active)",
        None,
        "204",
    ),
    ("get", "/v1/workflows", "Deployed workflows", None, "200"),
    (
        "post",
        "/v1/workflows/{name}/runs",
        "Start a run (202; with Accept: text/event-stream or application/x-ndjson, its event stream; with ?wait=true, the finished record)",
        Some("CreateRun"),
        "202",
    ),
    (
        "get",
        "/v1/runs",
        "Runs, newest first, paginated",
        None,
        "200",
    ),
    ("get", "/v1/runs/{id}", "A run record", None, "200"),
    (
        "get",
        "/v1/runs/{id}/events",
        "The run's event stream (SSE, NDJSON or WebSocket) from a cursor",
        None,
        "200",
    ),
    (
        "post",
        "/v1/runs/{id}/events",
        "Send an event (tool-results, input) into a waiting run",
        Some("SendEvent"),
        "202",
    ),
    (
        "post",
        "/v1/runs/{id}/cancel",
        "Cancel a run",
        Some("CancelRun"),
        "202",
    ),
    ("get", "/healthz", "Liveness", None, "200"),
    (
        "get",
        "/readyz",
        "Readiness (503 while draining)",
        None,
        "200",
    ),
    ("get", "/metrics", "Prometheus metrics", None, "200"),
    ("get", "/openapi.json", "This document", None, "200"),
    (
        "get",
        "/v1/runs/{id}/events#ws",
        "WebSocket upgrade of the event stream",
        None,
        "101",
    ),
    (
        "post",
        "/v1/workflows/{name}/runs#wait",
        "Start a run and wait for its end (?wait=true)",
        Some("CreateRun"),
        "200",
    ),
];

fn params(path: &str) -> Vec<Value> {
    let mut out: Vec<Value> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    let q = |name: &str, ty: &str, desc: &str| json!({"name": name, "in": "query", "required": false, "schema": {"type": ty}, "description": desc});
    match path {
        "/v1/runs" => {
            out.push(q("workflow", "string", "only this workflow"));
            out.push(q("status", "string", "comma-separated states"));
            out.push(q("session_id", "string", "only this session"));
            out.push(q("limit", "integer", "1 to 1000, default 50"));
            out.push(q("cursor", "string", "next_cursor of the previous page"));
        }
        "/v1/runs/{id}/events" => {
            out.push(q(
                "after",
                "integer",
                "events with seq > after (or the Last-Event-ID header)",
            ));
            out.push(q("types", "string", "comma-separated event types to keep"));
        }
        "/v1/workflows/{name}/runs" => {
            out.push(q("wait", "boolean", "block until the run ends"));
            out.push(q(
                "if_busy",
                "string",
                "reject (default, 409) or enqueue, when the session has an active run",
            ));
        }
        _ => {}
    }
    out
}

/// The document.
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, body, ok) in ROUTES {
        if path.contains('#') {
            continue;
        }
        let mut op = json!({
            "summary": summary,
            "parameters": params(path),
            "responses": {
                ok: {"description": "success"},
                "400": {"$ref": "#/components/responses/Error"},
                "401": {"$ref": "#/components/responses/Error"},
                "404": {"$ref": "#/components/responses/Error"},
                "409": {"$ref": "#/components/responses/Error"},
                "413": {"$ref": "#/components/responses/Error"},
                "422": {"$ref": "#/components/responses/Error"},
                "429": {"$ref": "#/components/responses/Error"},
                "503": {"$ref": "#/components/responses/Error"}
            }
        });
        if let (Some(schema), Some(obj)) = (body, op.as_object_mut()) {
            obj.insert(
                "requestBody".into(),
                json!({"required": false, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
            );
        }
        let entry = paths.entry(path.to_owned()).or_insert_with(|| json!({}));
        if let Some(obj) = entry.as_object_mut() {
            obj.insert(method.to_owned(), op);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Sluice", "version": env!("CARGO_PKG_VERSION"), "description": "Streaming server for LLM agent workflows. See docs/protocol.md."},
        "paths": paths,
        "components": {
            "schemas": {
                "CreateRun": {"type": "object", "additionalProperties": false, "properties": {
                    "input": {}, "session_id": {"type": "string"}, "metadata": {"type": "object"}}},
                "SendEvent": {"type": "object", "additionalProperties": false, "required": ["type"], "properties": {
                    "type": {"type": "string", "maxLength": 64}, "data": {}}},
                "CreateSession": {"type": "object", "additionalProperties": false, "properties": {"state": {}}},
                "CancelRun": {"type": "object", "additionalProperties": false, "properties": {"reason": {"type": "string"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
            },
            "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        }
    })
}
