//! `/openapi.json` against the real router: every documented operation answers (not a routing
//! 404 or 405) with one of its documented statuses, the document lists exactly the server's
//! routes, and the published schemas describe the bodies the server really sends.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use common::TestServer;
use serde_json::{Value, json};

/// Checks the keys of a real body against a published object schema: every key is a
/// property, every required property is there.
fn conforms(doc: &Value, schema_name: &str, body: &Value) {
    let schema = &doc["components"]["schemas"][schema_name];
    let props = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{schema_name}: {schema}"));
    let obj = body.as_object().unwrap_or_else(|| panic!("{body}"));
    for key in obj.keys() {
        assert!(props.contains_key(key), "{schema_name}: {key} undocumented");
    }
    for req in schema["required"].as_array().into_iter().flatten() {
        assert!(
            obj.contains_key(req.as_str().unwrap()),
            "{schema_name}: required {req} missing in {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_answers_as_documented() {
    let s = TestServer::start().await;
    let (status, doc) = s.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");

    // The document lists exactly the router's table.
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = sluice_server::routes()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(documented, routed);
    assert_eq!(routed.len(), 14);

    // Real ids to put in the paths: a waiting run (events can be sent to it) and a session.
    let run = s.start_run("ask-human", json!(null)).await;
    s.wait_status(&run, "waiting").await;
    let r = s.client.post(s.url("/v1/sessions")).send().await.unwrap();
    let session = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // In an order that keeps the ids valid: send, then cancel; delete the session last.
    let mut ops: Vec<(String, String)> = documented.into_iter().collect();
    ops.sort_by_key(|(m, p)| (p.contains("cancel"), m == "delete"));
    for (method, path) in ops {
        let url = path.replace("{name}", "ticker").replace(
            "{id}",
            if path.starts_with("/v1/sessions") {
                &session
            } else {
                &run
            },
        );
        let req = match method.as_str() {
            "get" => s.client.get(s.url(&url)),
            "post" => s.client.post(s.url(&url)),
            "delete" => s.client.delete(s.url(&url)),
            other => panic!("{other}"),
        };
        let req = match path.as_str() {
            "/v1/workflows/{name}/runs" => req.json(&json!({"input": {"n": 1}})),
            "/v1/runs/{id}/events" if method == "post" => {
                req.json(&json!({"type": "input", "data": "ok"}))
            }
            "/v1/runs/{id}/events" => req.query(&[("after", "1")]),
            _ => req,
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = if path == "/v1/runs/{id}/events" && method == "get" {
            Value::Null // a stream: the status and headers are what matter
        } else {
            resp.json::<Value>().await.unwrap_or(Value::Null)
        };
        let op = &doc["paths"][&path][&method];
        assert!(
            op["responses"].get(status.to_string()).is_some(),
            "{method} {path}: {status} is not documented: {body}"
        );
        assert!(
            status != 405 && !(status == 404 && body["error"]["code"] == "not_found"),
            "{method} {path}: not routed ({status} {body})"
        );
        assert!(status < 500, "{method} {path}: {status} {body}");
        // A documented content type for that status.
        if let Some(ct) = ct {
            let media = ct.split(';').next().unwrap().trim().to_owned();
            let content = &op["responses"][status.to_string()]["content"];
            assert!(
                content.get(&media).is_some(),
                "{method} {path}: {status} with {media} undocumented"
            );
        }
        // The bodies match their published schemas.
        match (path.as_str(), method.as_str(), status) {
            ("/v1/workflows", "get", 200) => {
                for w in body.as_array().unwrap() {
                    conforms(&doc, "WorkflowInfo", w);
                }
            }
            ("/v1/workflows/{name}/runs", "post", 202)
            | ("/v1/runs/{id}", "get", 200)
            | ("/v1/runs/{id}/cancel", "post", 202) => conforms(&doc, "RunRecord", &body),
            ("/v1/runs", "get", 200) => {
                conforms(&doc, "RunList", &body);
                for r in body["runs"].as_array().unwrap() {
                    conforms(&doc, "RunRecord", r);
                }
            }
            ("/v1/sessions", "post", 201) | ("/v1/sessions/{id}", "get", 200) => {
                conforms(&doc, "SessionRecord", &body)
            }
            ("/v1/runs/{id}/events", "post", 202) => conforms(&doc, "Accepted", &body),
            ("/healthz" | "/readyz", "get", 200) => conforms(&doc, "Health", &body),
            _ => {}
        }
        if status >= 400 {
            conforms(&doc, "Error", &body);
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_covers_headers_media_types_statuses_and_security() {
    let s = TestServer::start().await;
    let (_, doc) = s.get_json("/openapi.json").await;
    let create = &doc["paths"]["/v1/workflows/{name}/runs"]["post"];
    let events = &doc["paths"]["/v1/runs/{id}/events"]["get"];
    let refs = |op: &Value| -> Vec<String> {
        op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["$ref"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(refs(create).contains(&"#/components/parameters/Idempotency-Key".to_owned()));
    // OpenAPI 3.1 has tools ignore header parameters named Accept, Content-Type or
    // Authorization (the media types and the security scheme say those), and a Media Type
    // Object has no `description`.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let p = match p["$ref"].as_str() {
                    Some(r) => &doc["components"]["parameters"][r.rsplit('/').next().unwrap()],
                    None => p,
                };
                let name = p["name"].as_str().unwrap().to_ascii_lowercase();
                assert!(
                    !(p["in"] == "header"
                        && ["accept", "content-type", "authorization"].contains(&name.as_str())),
                    "{method} {path}: header parameter {name}"
                );
            }
            let bodies = op["requestBody"]["content"].as_object().into_iter();
            let answers = op["responses"].as_object().unwrap().values();
            for content in bodies.chain(answers.filter_map(|r| r["content"].as_object())) {
                for (media, obj) in content {
                    for key in obj.as_object().unwrap().keys() {
                        assert!(
                            ["schema", "example", "examples", "encoding"].contains(&key.as_str()),
                            "{method} {path}: {media} has {key:?}"
                        );
                    }
                }
            }
        }
    }
    assert!(refs(events).contains(&"#/components/parameters/Last-Event-ID".to_owned()));
    for media in ["text/event-stream", "application/x-ndjson"] {
        assert!(events["responses"]["200"]["content"].get(media).is_some());
        assert!(create["responses"]["200"]["content"].get(media).is_some());
    }
    assert!(events["responses"].get("204").is_some());
    assert!(events["responses"].get("101").is_some());
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateRun"
    );
    let mut statuses = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            statuses.extend(op["responses"].as_object().unwrap().keys().cloned());
        }
    }
    for st in ["204", "405", "408", "413", "415", "422", "429", "503"] {
        assert!(statuses.contains(st), "{st} documented somewhere");
    }
    assert_eq!(
        create["responses"]["429"]["headers"]["Retry-After"]["$ref"],
        "#/components/headers/Retry-After"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]})
    );
    assert_eq!(create["security"], json!([{"bearer": []}]));
    assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
    s.stop().await;
}
