//! Property test: arbitrary requests (methods, paths, queries, headers, bodies, mutations of
//! valid requests) against the real server never get a 5xx, and every 4xx carries the protocol's
//! error shape.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::OnceLock;

use common::TestServer;
use proptest::prelude::*;
use serde_json::Value;

struct Shared {
    rt: tokio::runtime::Runtime,
    server: TestServer,
    run_id: String,
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (server, run_id) = rt.block_on(async {
            let opts = sluice_server::config::ServerOptions {
                max_body: 16 * 1024,
                ..Default::default()
            };
            let s = TestServer::with(
                opts,
                vec![
                    sluice_engine::builtin::ticker(),
                    sluice_engine::builtin::ask_human(),
                ],
            )
            .await;
            let id = s
                .start_run("ask-human", serde_json::json!({"prompt": "?"}))
                .await;
            (s, id)
        });
        Shared { rt, server, run_id }
    })
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ticker".to_owned()),
        Just("ask-human".to_owned()),
        Just("RUN".to_owned()),
        Just("run_nope".to_owned()),
        Just("%FF%00".to_owned()),
        Just("..".to_owned()),
        "[a-zA-Z0-9_.~%-]{0,40}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (0usize..12, segment(), segment()).prop_map(|(t, a, b)| match t {
        0 => "/v1/workflows".to_owned(),
        1 => format!("/v1/workflows/{a}/runs"),
        2 => "/v1/runs".to_owned(),
        3 => format!("/v1/runs/{a}"),
        4 => format!("/v1/runs/{a}/events"),
        5 => format!("/v1/runs/{a}/cancel"),
        6 => "/v1/sessions".to_owned(),
        7 => format!("/v1/sessions/{a}"),
        8 => format!("/{a}/{b}"),
        9 => "/healthz".to_owned(),
        10 => "/openapi.json".to_owned(),
        _ => format!("/v1/{a}"),
    })
}

fn query() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            prop_oneof![
                Just("after"),
                Just("types"),
                Just("limit"),
                Just("cursor"),
                Just("status"),
                Just("wait"),
                Just("if_busy"),
                Just("workflow"),
                Just("session_id"),
                Just("x")
            ],
            prop_oneof![
                Just("-7".to_owned()),
                Just("abc".to_owned()),
                Just("0".to_owned()),
                Just("99999999999999999999".to_owned()),
                Just("tick,text-delta".to_owned()),
                Just("true".to_owned()),
                Just("enqueue".to_owned()),
                "[ -~]{0,12}"
            ],
        ),
        0..4,
    )
    .prop_map(|kv| {
        if kv.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = kv
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace([' ', '#', '&'], "%20")))
            .collect();
        format!("?{}", parts.join("&"))
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(br#"{"input":{"n":1}}"#.to_vec()),
        Just(br#"{"type":"input","data":"x"}"#.to_vec()),
        Just(br#"{"type":"tool-results","data":{"results":[{"id":1}]}}"#.to_vec()),
        Just(br#"{"input":{"n":1e400}}"#.to_vec()),
        Just(br#"{"input":{"n":18446744073709551616}}"#.to_vec()),
        Just(format!("{{\"input\":{}}}", "[".repeat(200)).into_bytes()),
        Just(vec![b'x'; 20_000]),
        proptest::collection::vec(any::<u8>(), 0..200),
        "\\{[ -~]{0,80}\\}".prop_map(String::into_bytes),
    ]
}

fn method() -> impl Strategy<Value = reqwest::Method> {
    prop_oneof![
        Just(reqwest::Method::GET),
        Just(reqwest::Method::POST),
        Just(reqwest::Method::DELETE),
        Just(reqwest::Method::PUT),
        Just(reqwest::Method::PATCH),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_input_gets_a_5xx(
        m in method(),
        p in path(),
        q in query(),
        b in body(),
        json_ct in any::<bool>(),
        accept in prop_oneof![Just(""), Just("text/event-stream"), Just("application/x-ndjson"), Just("*/*")],
        last_event_id in proptest::option::of("[ -~]{0,6}"),
    ) {
        let s = shared();
        let path = p.replace("RUN", &s.run_id);
        let url = s.server.url(&format!("{path}{q}"));
        let status_and_body = s.rt.block_on(async {
            let mut req = s.server.client.request(m.clone(), &url).body(b.clone());
            if json_ct {
                req = req.header("content-type", "application/json");
            }
            if !accept.is_empty() {
                req = req.header("accept", accept);
            }
            if let Some(id) = &last_event_id {
                req = req.header("last-event-id", id.as_str());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            // Streams of a live run never end by themselves: read the head only.
            let head = if ct.starts_with("text/event-stream") || ct.starts_with("application/x-ndjson") {
                Vec::new()
            } else {
                tokio::time::timeout(std::time::Duration::from_secs(10), resp.bytes()).await.unwrap().unwrap().to_vec()
            };
            (status, ct, head)
        });
        let (status, ct, head) = status_and_body;
        prop_assert!(status < 500, "{m} {url} -> {status}: {}", String::from_utf8_lossy(&head));
        if status >= 400 {
            prop_assert!(ct.starts_with("application/json"), "{m} {url} -> {status} with {ct}");
            let v: Value = serde_json::from_slice(&head).unwrap();
            prop_assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "{v}");
        }
    }
}
