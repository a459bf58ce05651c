//! End-to-end: agent runs through the real HTTP server, against the scripted model server and a
//! tiny tool server, each run's whole event sequence checked in order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use sluice_agent::{AgentOptions, Tool};
use sluice_mock_llm::{FinishReason, MockServer, Script, Step, ToolCallSpec, Turn};

fn lines(expected: &[&str]) -> Vec<String> {
    expected.iter().map(|s| (*s).to_owned()).collect()
}

fn count(evs: &[Value], ty: &str) -> usize {
    evs.iter().filter(|e| e["type"] == ty).count()
}

#[tokio::test]
async fn text_only_answer() {
    let mock = MockServer::start(Script::new().turn(Turn::text("Hello there")))
        .await
        .unwrap();
    let server = Server::start(vec![assistant(options(&mock))]).await;

    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Hi"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Hello there",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed Hello there",
        ])
    );
    assert_eq!(count(&evs, "text-delta"), 3, "one event per model delta");
    let done = &evs.last().unwrap()["data"];
    assert_eq!(
        done["result"],
        json!({"message": {"role": "assistant", "content": "Hello there"}})
    );
    assert_eq!(done["usage"]["total_tokens"], 15);
    let completed = evs
        .iter()
        .find(|e| e["type"] == "provider-completed")
        .unwrap();
    assert_eq!(
        completed["data"]["message"],
        json!({"role": "assistant", "content": "Hello there"})
    );

    let (_, rec) = server.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["usage"]["total_tokens"], 15);
    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(transcript(&requests[0]), ["system: Be brief.", "user: Hi"]);
    assert_eq!(requests[0].model(), Some(MODEL));
    assert!(requests[0].include_usage());

    // Listed with its schema.
    let (_, list) = server.get_json("/v1/workflows").await;
    let wf = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "assistant")
        .unwrap();
    assert_eq!(wf["kind"], "agent");
    assert_eq!(wf["input_schema"]["type"], "object");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_before_a_run_exists() {
    let mock = MockServer::start(Script::new()).await.unwrap();
    let server = Server::start(vec![assistant(options(&mock))]).await;
    for (input, field) in [
        (json!(null), "input:"),
        (json!({"msg": "hi"}), "input.msg"),
        (json!({"message": 3}), "input.message"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "input.messages[0].role",
        ),
    ] {
        let (status, body) = server
            .post_json("/v1/workflows/assistant/runs", json!({"input": input}))
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "invalid_input");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    let (_, runs) = server.get_json("/v1/runs").await;
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(0), "{runs}");
    assert_eq!(mock.request_count(), 0);

    // The messages form is accepted as given.
    let rec = server
        .run_to_end(
            "assistant",
            json!({"input": {"messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
            ]}}),
        )
        .await;
    // The script is empty: the mock answers 500 "exhausted" on every attempt.
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error"]["code"], "provider_error");
    assert_eq!(
        transcript(&mock.requests()[0]),
        [
            "system: Be brief.",
            "user: Hi",
            "assistant: Hello",
            "user: Again"
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn http_tool_round_trip() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::tool_call(
                "call_1",
                "get_weather",
                r#"{"city":"Paris"}"#,
            ))
            .turn(Turn::text("It is 21C in Paris.")),
    )
    .await
    .unwrap();
    let server = Server::start(vec![assistant(
        options(&mock).with_tool(tools.tool("get_weather", "/weather")),
    )])
    .await;

    let (_, mut sse) = server
        .start_streaming(
            "assistant",
            json!({"input": {"message": "Weather in Paris?"}}),
        )
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            r#"tool-call-delta call_1:get_weather{"city":"Paris"}"#,
            "provider-completed tool_calls 10+5",
            "step-completed model",
            "step-started tools",
            r#"tools-started call_1:get_weather{"city":"Paris"}"#,
            r#"tool-completed call_1:get_weather ok {"city":"Paris","temp_c":21}"#,
            "step-completed tools",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta It is 21C in Paris.",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed It is 21C in Paris.",
        ])
    );
    assert!(
        count(&evs, "tool-call-delta") > 3,
        "argument fragments streamed as they came"
    );
    assert_eq!(evs.last().unwrap()["data"]["usage"]["total_tokens"], 30);
    assert_eq!(
        *tools.bodies.lock().unwrap(),
        [("/weather".to_owned(), json!({"city": "Paris"}))]
    );
    let requests = mock.requests();
    assert_eq!(requests[0].tools()[0]["function"]["name"], "get_weather");
    assert_eq!(
        transcript(&requests[1]),
        [
            "system: Be brief.",
            "user: Weather in Paris?",
            r#"assistant calls call_1:get_weather{"city":"Paris"}"#,
            r#"tool call_1: {"city":"Paris","temp_c":21}"#,
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn two_parallel_tool_calls_run_concurrently() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                // Each call first waits (up to 5 s) for the other to be in flight too.
                Step::ParallelToolCalls(vec![
                    ToolCallSpec::new("call_a", "slow", r#"{"ms":400,"together":2}"#),
                    ToolCallSpec::new("call_b", "fast", r#"{"ms":20,"together":2}"#),
                ]),
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("Both done.")),
    )
    .await
    .unwrap();
    let options = options(&mock)
        .with_tool(tools.tool("slow", "/sleep"))
        .with_tool(tools.tool("fast", "/sleep"));
    let server = Server::start(vec![assistant(options)]).await;

    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Go"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            r#"tool-call-delta call_a:slow{"ms":400,"together":2} call_b:fast{"ms":20,"together":2}"#,
            "provider-completed tool_calls 0+0",
            "step-completed model",
            "step-started tools",
            r#"tools-started call_a:slow{"ms":400,"together":2} call_b:fast{"ms":20,"together":2}"#,
            // Each as it finishes: the fast one first.
            r#"tool-completed call_b:fast ok {"slept":20}"#,
            r#"tool-completed call_a:slow ok {"slept":400}"#,
            "step-completed tools",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Both done.",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed Both done.",
        ])
    );
    // Concurrent: the tool server had both calls in flight at once (run one after the other,
    // each would have waited 5 s for the other in vain).
    assert_eq!(tools.calls.max(), 2, "the calls overlapped");
    // The model gets the results in the order of its calls, not of completion.
    let t = transcript(&mock.requests()[1]);
    assert_eq!(
        t[3..],
        [
            r#"tool call_a: {"slept":400}"#,
            r#"tool call_b: {"slept":20}"#
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn failing_tool_calls_become_error_results_for_the_model() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                Step::ParallelToolCalls(vec![
                    ToolCallSpec::new("c1", "nope", "{}"),
                    ToolCallSpec::new("c2", "get_weather", r#"{"city":"#),
                    ToolCallSpec::new("c3", "fail", "{}"),
                    ToolCallSpec::new("c4", "big", "{}"),
                    ToolCallSpec::new("c5", "hang", "{}"),
                    ToolCallSpec::new("c6", "gone", "{}"),
                    ToolCallSpec::new("c7", "bigfail", "{}"),
                    ToolCallSpec::new("c8", "moved", "{}"),
                    ToolCallSpec::new("c9", "bigfail2", "{}"),
                ]),
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("Sorry.")),
    )
    .await
    .unwrap();
    let options = options(&mock)
        .with_tool(tools.tool("get_weather", "/weather"))
        .with_tool(tools.tool("fail", "/fail"))
        .with_tool(tools.tool("big", "/big").with_max_response_bytes(10))
        .with_tool(
            tools
                .tool("hang", "/hang")
                .with_timeout(Duration::from_millis(400)),
        )
        .with_tool(Tool::http("gone", "http://127.0.0.1:1/secret-path"))
        .with_tool(
            tools
                .tool("bigfail", "/bigfail")
                .with_max_response_bytes(10),
        )
        .with_tool(tools.tool("moved", "/redirect"))
        .with_tool(tools.tool("bigfail2", "/bigfail"));
    let server = Server::start(vec![assistant(options)]).await;

    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Go"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    let s = summary(&evs);
    assert_eq!(
        s[8..10],
        lines(&[
            "step-started tools",
            r#"tools-started c1:nope{} c2:get_weather"{\"city\":" c3:fail{} c4:big{} c5:hang{} c6:gone{} c7:bigfail{} c8:moved{} c9:bigfail2{}"#,
        ])
    );
    assert_eq!(s[19], "step-completed tools");
    // One `tool-completed` per call, in the order they finish (timing: compared as a set).
    let mut completed = s[10..19].to_vec();
    completed.sort();
    let mut expected = lines(&[
        r#"tool-completed c1:nope error "unknown tool \"nope\"; the tools are: get_weather, fail, big, hang, gone, bigfail, moved, bigfail2""#,
        r#"tool-completed c2:get_weather error "the arguments are not valid JSON: {\"city\":""#,
        r#"tool-completed c3:fail error {"body":"database on fire","error":"the tool answered HTTP 500 Internal Server Error","status":500}"#,
        r#"tool-completed c4:big error "the tool's response is larger than its limit of 10 bytes""#,
        r#"tool-completed c5:hang error "the tool did not answer within 400 ms""#,
        r#"tool-completed c6:gone error "the tool could not be reached: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)""#,
        // An oversized error answer still shows its status, and the start of its body.
        r#"tool-completed c7:bigfail error {"body":"overloaded","error":"the tool answered HTTP 503 Service Unavailable","status":503,"truncated":true}"#,
        // A redirect is an error result: it is not followed.
        r#"tool-completed c8:moved error {"body":"moved","error":"the tool answered HTTP 302 Found (redirects are not followed)","status":302}"#,
    ]);
    let c9 = completed.pop().unwrap();
    expected.sort();
    assert_eq!(completed, expected);
    // With the default limit, an error body is cut at 2 KiB.
    let c9_event = evs
        .iter()
        .find(|e| e["type"] == "tool-completed" && e["data"]["id"] == "c9")
        .unwrap();
    let output = &c9_event["data"]["output"];
    assert!(c9.starts_with("tool-completed c9:bigfail2 error "), "{c9}");
    assert_eq!(output["status"], 503);
    assert_eq!(output["truncated"], true);
    assert_eq!(output["body"].as_str().unwrap().len(), 2048);
    assert!(
        output["body"]
            .as_str()
            .unwrap()
            .starts_with("overloaded overloaded")
    );

    assert_eq!(s.last().unwrap(), "chain-completed Sorry.");
    let t = transcript(&mock.requests()[1]);
    assert_eq!(t.len(), 2 + 1 + 9);
    assert!(t[3].starts_with("tool c1: unknown tool"), "{t:?}");
    assert!(
        t[7].starts_with("tool c5: the tool did not answer"),
        "{t:?}"
    );
    assert!(t[9].starts_with("tool c7: {"), "{t:?}");
    // Neither the unknown tool nor the unparsable call reached a tool server, and the redirect
    // was not followed to /weather.
    let mut called = tools.paths();
    called.sort();
    assert_eq!(
        called,
        [
            "/big",
            "/bigfail",
            "/bigfail",
            "/fail",
            "/hang",
            "/redirect"
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn client_tool_pause_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sluice.db");
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::tool_call(
                "call_c",
                "confirm",
                r#"{"action":"deploy"}"#,
            ))
            .turn(Turn::text("Deployed.")),
    )
    .await
    .unwrap();
    let workflow = |mock: &MockServer| {
        assistant(
            options(mock)
                .with_tool(Tool::client("confirm").with_description("Ask the user to confirm")),
        )
    };
    let open = || -> Arc<dyn sluice_store::Store> {
        Arc::new(sluice_store_sqlite::SqliteStore::open(&db, Default::default()).unwrap())
    };

    let first = Server::with_store(open(), vec![workflow(&mock)]).await;
    let (id, mut sse) = first
        .start_streaming("assistant", json!({"input": {"message": "Deploy it"}}))
        .await;
    let before = sse.until("tools-requested").await;
    let rec = first.wait_status(&id, "waiting").await;
    assert_eq!(
        rec["last_seq"],
        before.len() as u64 + 1,
        "step-completed follows"
    );
    // Not waiting for human input.
    let (status, body) = first
        .post_json(
            &format!("/v1/runs/{id}/events"),
            json!({"type": "input", "data": "yes"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    drop(sse);
    first.stop().await;

    // A new engine and server on the same database.
    let second = Server::with_store(open(), vec![workflow(&mock)]).await;
    let (_, rec) = second.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(
        rec["status"], "waiting",
        "a waiting run stays waiting across the restart"
    );
    let (status, body) = second
        .post_json(
            &format!("/v1/runs/{id}/events"),
            json!({"type": "tool-results", "data": {"results": [{"id": "call_c", "output": {"confirmed": true}}]}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let evs = second.log(&id).await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            r#"tool-call-delta call_c:confirm{"action":"deploy"}"#,
            "provider-completed tool_calls 10+5",
            "step-completed model",
            "step-started tools",
            r#"tools-requested call_c:confirm{"action":"deploy"}"#,
            "step-completed tools",
            "chain-resumed",
            "step-started client-results",
            r#"tool-completed call_c:confirm ok {"confirmed":true}"#,
            "step-completed client-results",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Deployed.",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed Deployed.",
        ])
    );
    assert_eq!(
        evs[..before.len()],
        before[..],
        "the log before the pause is unchanged"
    );
    assert_eq!(
        evs.last().unwrap()["data"]["usage"]["total_tokens"],
        30,
        "usage survives the restart"
    );
    assert_eq!(
        transcript(&mock.requests()[1])[2..],
        [
            r#"assistant calls call_c:confirm{"action":"deploy"}"#,
            r#"tool call_c: {"confirmed":true}"#
        ]
    );
    let (status, _) = second
        .post_json(
            &format!("/v1/runs/{id}/events"),
            json!({"type": "tool-results", "data": {"results": []}}),
        )
        .await;
    assert_eq!(status, 409, "the run is over");
    second.stop().await;
}

#[tokio::test]
async fn mixed_server_and_client_tools_with_missing_and_unknown_ids() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                Step::Text("Checking.".into()),
                Step::ParallelToolCalls(vec![
                    ToolCallSpec::new("c1", "get_weather", r#"{"city":"Rome"}"#),
                    ToolCallSpec::new("c2", "confirm", r#"{"action":"a"}"#),
                    ToolCallSpec::new("c3", "confirm", r#"{"action":"b"}"#),
                ]),
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("OK.")),
    )
    .await
    .unwrap();
    let options = options(&mock)
        .with_tool(tools.tool("get_weather", "/weather"))
        .with_tool(Tool::client("confirm"));
    let server = Server::start(vec![assistant(options)]).await;

    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Go"}}))
        .await;
    sse.until("tools-requested").await;
    server.wait_status(&id, "waiting").await;
    let (status, _) = server
        .post_json(
            &format!("/v1/runs/{id}/events"),
            json!({"type": "tool-results", "data": {"results": [
                {"id": "bogus", "output": 1},
                {"id": "c3", "output": "no", "is_error": true},
            ]}}),
        )
        .await;
    assert_eq!(status, 202);
    let evs = sse.rest().await;
    let all = server.log(&id).await;
    check_log(&all);
    assert_eq!(
        all[all.len() - evs.len()..],
        evs[..],
        "the open stream continues with the run"
    );
    assert_eq!(
        summary(&all),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Checking.",
            r#"tool-call-delta c1:get_weather{"city":"Rome"} c2:confirm{"action":"a"} c3:confirm{"action":"b"}"#,
            "provider-completed tool_calls 0+0",
            "step-completed model",
            "step-started tools",
            r#"tools-started c1:get_weather{"city":"Rome"}"#,
            r#"tool-completed c1:get_weather ok {"city":"Rome","temp_c":21}"#,
            r#"tools-requested c2:confirm{"action":"a"} c3:confirm{"action":"b"}"#,
            "step-completed tools",
            "chain-resumed",
            "step-started client-results",
            r#"tool-completed c2:confirm error "no result supplied""#,
            r#"tool-completed c3:confirm error "no""#,
            "step-completed client-results",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta OK.",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed OK.",
        ])
    );
    assert_eq!(
        transcript(&mock.requests()[1])[2..],
        [
            r#"assistant calls c1:get_weather{"city":"Rome"} c2:confirm{"action":"a"} c3:confirm{"action":"b"}"#,
            r#"tool c1: {"city":"Rome","temp_c":21}"#,
            "tool c2: no result supplied",
            "tool c3: no",
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn retries_on_429_and_503_before_the_first_token() {
    let mock = MockServer::start(
        Script::new()
            // Retry-After 400 ms: far longer than the test's backoff (20 to 100 ms).
            .turn(Turn::http_error(
                429,
                r#"{"error":{"message":"slow down"}}"#,
                Some(Duration::from_millis(400)),
            ))
            .turn(Turn::http_error(
                503,
                r#"{"error":{"message":"overloaded"}}"#,
                None,
            ))
            .turn(Turn::text("Finally.")),
    )
    .await
    .unwrap();
    let server = Server::start(vec![assistant(options(&mock))]).await;
    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Hi"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Finally.",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed Finally.",
        ])
    );
    assert_eq!(mock.request_count(), 3);
    let completed = evs
        .iter()
        .find(|e| e["type"] == "provider-completed")
        .unwrap();
    // A lower bound only (a loaded machine makes calls slower, never faster): the first retry
    // waited the 400 ms asked for, where the backoff alone would have waited at most 100 ms.
    let latency = completed["data"]["latency_ms"].as_u64().unwrap();
    assert!(latency >= 400, "Retry-After honoured: {latency} ms");
    server.stop().await;
}

#[tokio::test]
async fn rate_limited_beyond_the_retries() {
    let limited = || Turn::http_error(429, r#"{"error":{"message":"quota"}}"#, None);
    let mock = MockServer::start(Script::new().turn(limited()).turn(limited()))
        .await
        .unwrap();
    let opts = AgentOptions::new(provider_with(&mock, Duration::from_secs(5), 2), MODEL);
    let server = Server::start(vec![assistant(opts)]).await;
    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Hi"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            "chain-error rate_limited",
        ])
    );
    let error = &evs.last().unwrap()["data"]["error"];
    assert_eq!(error["details"]["details"]["status"], 429);
    assert_eq!(error["details"]["details"]["request_id"], "req_mock_2");
    let (_, rec) = server.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["error"]["code"], "rate_limited");
    server.stop().await;
}

#[tokio::test]
async fn a_stall_mid_stream_ends_with_provider_error_without_hanging() {
    // The stall outlasts the test: only the idle timeout can end the call.
    let mock = MockServer::start(Script::new().turn(Turn::new(vec![
        Step::Text("Hel".into()),
        Step::Stall(Duration::from_secs(600)),
    ])))
    .await
    .unwrap();
    let opts = AgentOptions::new(provider_with(&mock, Duration::from_millis(300), 3), MODEL);
    let server = Server::start(vec![assistant(opts)]).await;
    let t0 = Instant::now();
    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Hi"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    // Generous: the idle timeout is 300 ms, the stall 600 s (and the reader gives up after
    // 20 s without an event). The kind below says what ended the call.
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Hel",
            "chain-error provider_error",
        ])
    );
    let error = &evs.last().unwrap()["data"]["error"];
    assert!(
        error["message"].as_str().unwrap().contains("stalled"),
        "{error}"
    );
    assert_eq!(error["details"]["details"]["kind"], "Stalled");
    assert_eq!(
        mock.request_count(),
        1,
        "never retried after the first token"
    );
    assert!(
        mock.wait_for_disconnects(1, Duration::from_secs(10)).await,
        "the stalled request is closed"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_mid_stream_error_ends_with_provider_error() {
    let mock = MockServer::start(Script::new().turn(Turn::new(vec![
        Step::Text("Hel".into()),
        Step::MidStreamError("the model is overloaded".into()),
    ])))
    .await
    .unwrap();
    let server = Server::start(vec![assistant(options(&mock))]).await;
    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Hi"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
            "text-delta Hel",
            "chain-error provider_error",
        ])
    );
    let error = &evs.last().unwrap()["data"]["error"];
    assert!(
        error["message"].as_str().unwrap().contains("overloaded"),
        "{error}"
    );
    assert_eq!(mock.request_count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn max_steps_limits_model_calls() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(Script::new().fallback(Turn::tool_call(
        "call_x",
        "get_weather",
        r#"{"city":"Oslo"}"#,
    )))
    .await
    .unwrap();
    let opts = options(&mock)
        .with_max_steps(2)
        .with_tool(tools.tool("get_weather", "/weather"));
    let server = Server::start(vec![assistant(opts)]).await;
    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Loop"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    let one_round = [
        "step-started model",
        "provider-started mock/test-model",
        r#"tool-call-delta call_x:get_weather{"city":"Oslo"}"#,
        "provider-completed tool_calls 10+5",
        "step-completed model",
        "step-started tools",
        r#"tools-started call_x:get_weather{"city":"Oslo"}"#,
        r#"tool-completed call_x:get_weather ok {"city":"Oslo","temp_c":21}"#,
        "step-completed tools",
    ];
    let mut expected = lines(&[
        "chain-started",
        "step-started start",
        "step-completed start",
    ]);
    expected.extend(lines(&one_round));
    expected.extend(lines(&one_round));
    expected.extend(lines(&["step-started model", "chain-error max_steps"]));
    assert_eq!(summary(&evs), expected);
    assert_eq!(mock.request_count(), 2);
    let (_, rec) = server.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["error"]["code"], "max_steps");
    assert_eq!(rec["usage"]["total_tokens"], 30);
    server.stop().await;
}

#[tokio::test]
async fn cancelling_while_streaming_closes_the_upstream_request() {
    let mock = MockServer::start(Script::new().turn(Turn::paced(1000, 50.0)))
        .await
        .unwrap();
    let server = Server::start(vec![assistant(options(&mock))]).await;
    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Talk"}}))
        .await;
    let mut evs = Vec::new();
    while count(&evs, "text-delta") < 3 {
        evs.push(sse.next_event().await.unwrap());
    }
    assert_eq!(mock.active_streams(), 1);
    let (status, _) = server
        .post_json(
            &format!("/v1/runs/{id}/cancel"),
            json!({"reason": "user left"}),
        )
        .await;
    assert_eq!(status, 202);
    evs.extend(sse.rest().await);
    check_log(&evs);
    let s = summary(&evs);
    assert_eq!(
        s[..5],
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started mock/test-model",
        ])
    );
    assert!(s[5].starts_with("text-delta tok tok tok "), "{s:?}");
    assert_eq!(s[6..], lines(&["chain-cancelled"]));
    assert_eq!(evs.last().unwrap()["data"]["reason"], "user left");
    assert!(
        mock.wait_for_disconnects(1, Duration::from_secs(10)).await,
        "the model request was closed"
    );
    assert_eq!(mock.completed_streams(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_session_carries_the_conversation() {
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::text("Nice to meet you, Ada."))
            .turn(Turn::text("Your name is Ada."))
            .turn(Turn::text("I don't know.")),
    )
    .await
    .unwrap();
    let server = Server::start(vec![assistant(options(&mock))]).await;
    let (status, session) = server.post_json("/v1/sessions", json!({})).await;
    assert_eq!(status, 201);
    let sid = session["id"].as_str().unwrap();

    let first = server
        .run_to_end(
            "assistant",
            json!({"input": {"message": "My name is Ada."}, "session_id": sid}),
        )
        .await;
    assert_eq!(first["status"], "completed");
    let (_, mut sse) = server
        .start_streaming(
            "assistant",
            json!({"input": {"message": "What is my name?"}, "session_id": sid}),
        )
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs).last().unwrap(),
        "chain-completed Your name is Ada."
    );
    assert_eq!(evs[0]["data"]["session_id"], sid);

    let requests = mock.requests();
    assert_eq!(
        transcript(&requests[0]),
        ["system: Be brief.", "user: My name is Ada."]
    );
    assert_eq!(
        transcript(&requests[1]),
        [
            "system: Be brief.",
            "user: My name is Ada.",
            "assistant: Nice to meet you, Ada.",
            "user: What is my name?",
        ]
    );
    let (_, session) = server.get_json(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(
        session["state"]["messages"],
        json!([
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada."},
            {"role": "user", "content": "What is my name?"},
            {"role": "assistant", "content": "Your name is Ada."},
        ])
    );
    // A run outside the session starts afresh.
    server
        .run_to_end("assistant", json!({"input": {"message": "Who am I?"}}))
        .await;
    assert_eq!(
        transcript(&mock.requests()[2]),
        ["system: Be brief.", "user: Who am I?"]
    );
    server.stop().await;
}

#[tokio::test]
async fn anthropic_provider_with_reasoning_and_a_tool() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                Step::Reasoning("The user wants weather.".into()),
                Step::ToolCall {
                    id: "toolu_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Lima"}"#.into(),
                },
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("Lima: 21C.")),
    )
    .await
    .unwrap();
    let config = sluice_llm::ProviderConfig::new(
        "claude",
        sluice_llm::ProviderKind::Anthropic,
        mock.base_url(),
    );
    let provider = sluice_llm::Provider::new(config).unwrap();
    let opts = AgentOptions::new(provider, "claude-test")
        .with_system("Be brief.")
        .with_max_tokens(256)
        .with_tool(tools.tool("get_weather", "/weather"));
    let server = Server::start(vec![assistant(opts)]).await;
    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Lima?"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started claude/claude-test",
            "reasoning-delta The user wants weather.",
            r#"tool-call-delta toolu_1:get_weather{"city":"Lima"}"#,
            "provider-completed tool_calls 0+0",
            "step-completed model",
            "step-started tools",
            r#"tools-started toolu_1:get_weather{"city":"Lima"}"#,
            r#"tool-completed toolu_1:get_weather ok {"city":"Lima","temp_c":21}"#,
            "step-completed tools",
            "step-started model",
            "provider-started claude/claude-test",
            "text-delta Lima: 21C.",
            "provider-completed stop 10+5",
            "step-completed model",
            "chain-completed Lima: 21C.",
        ])
    );
    let requests = mock.requests();
    assert_eq!(requests[0].format, sluice_mock_llm::WireFormat::Anthropic);
    assert_eq!(requests[0].body["system"], "Be brief.");
    assert_eq!(requests[0].body["max_tokens"], 256);
    // The tool result goes back as a tool_result block.
    let last = requests[1].messages().last().unwrap().clone();
    assert_eq!(last["content"][0]["type"], "tool_result");
    assert_eq!(last["content"][0]["tool_use_id"], "toolu_1");
    server.stop().await;
}

/// A `MakeWriter` collecting log output.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

// One thread (the default for tokio tests): the server, the engine and the provider all log to
// this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn the_provider_address_and_credentials_never_reach_clients_or_logs() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let base_url = format!("http://sluice-user:hunter2-secret@127.0.0.1:{port}/internal-path/v1");
    let config =
        sluice_llm::ProviderConfig::new("upstream", sluice_llm::ProviderKind::OpenAi, base_url)
            .with_retry(sluice_llm::RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
                max_retry_after: Duration::from_secs(1),
            });
    let provider = sluice_llm::Provider::new(config).unwrap();
    let server = Server::start(vec![assistant(AgentOptions::new(provider, MODEL))]).await;
    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Hi"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    assert_eq!(
        summary(&evs),
        lines(&[
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started upstream/test-model",
            "chain-error provider_error",
        ])
    );
    let error = &evs.last().unwrap()["data"]["error"];
    let message = error["message"].as_str().unwrap();
    // Still says what happened…
    assert!(
        message.contains("provider upstream: cannot connect to the provider"),
        "{message}"
    );
    assert!(message.contains("Connection refused"), "{message}");
    assert_eq!(error["details"]["details"]["kind"], "Connect");
    // …but not where.
    for hidden in [
        format!("127.0.0.1:{port}"),
        format!(":{port}"),
        "internal-path".to_owned(),
        "chat/completions".to_owned(),
        "for url".to_owned(),
    ] {
        assert!(!message.contains(&hidden), "{hidden:?} in {message}");
    }
    let (_, rec) = server.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(rec["error"]["message"], message);
    let log_text = serde_json::to_string(&server.log(&id).await).unwrap();
    let record_text = rec.to_string();
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("retrying"),
        "the subscriber saw the provider's logs: {logs}"
    );
    for (what, text) in [
        ("events", &log_text),
        ("record", &record_text),
        ("logs", &logs),
    ] {
        for secret in ["hunter2", "sluice-user"] {
            assert!(!text.contains(secret), "{secret} in the {what}: {text}");
        }
    }
    for (what, text) in [("events", &log_text), ("record", &record_text)] {
        assert!(
            !text.contains(&format!(":{port}")),
            "the port in the {what}: {text}"
        );
        assert!(
            !text.contains("internal-path"),
            "the path in the {what}: {text}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_tools_concurrency_limit_is_shared_by_all_runs() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .at_step(0, Turn::tool_call("call_g", "gated", "{}"))
            .at_step(1, Turn::text("Done.")),
    )
    .await
    .unwrap();
    let gated = tools
        .tool("gated", "/gate")
        .with_max_concurrent_calls(1)
        .with_timeout(Duration::from_secs(30));
    let server = Server::start(vec![assistant(options(&mock).with_tool(gated))]).await;
    let (first, mut first_sse) = server
        .start_streaming("assistant", json!({"input": {"message": "One"}}))
        .await;
    let (second, mut second_sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Two"}}))
        .await;
    first_sse.until("tools-started").await;
    second_sse.until("tools-started").await;
    // Both runs are calling the tool; one call holds its only slot at the tool server…
    tools.calls.wait_for(1).await;
    // …and the other waits for it. (Without the limit it would arrive within milliseconds.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tools.calls.now(), 1);
    assert_eq!(tools.paths(), ["/gate"]);

    tools.open_gate();
    for (id, sse) in [(&first, &mut first_sse), (&second, &mut second_sse)] {
        let rest = sse.rest().await;
        assert_eq!(
            summary(&rest),
            lines(&[
                r#"tool-completed call_g:gated ok {"passed":true}"#,
                "step-completed tools",
                "step-started model",
                "provider-started mock/test-model",
                "text-delta Done.",
                "provider-completed stop 10+5",
                "step-completed model",
                "chain-completed Done.",
            ]),
            "{id}"
        );
    }
    assert_eq!(tools.paths(), ["/gate", "/gate"]);
    assert_eq!(tools.calls.max(), 1, "never two calls at once");
    server.stop().await;
}

#[tokio::test]
async fn waiting_for_a_tool_slot_counts_against_the_timeout() {
    let tools = ToolServer::start().await;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                Step::ParallelToolCalls(vec![
                    ToolCallSpec::new("c1", "gated", "{}"),
                    ToolCallSpec::new("c2", "gated", "{}"),
                ]),
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("Too slow.")),
    )
    .await
    .unwrap();
    // The gate never opens: the call holding the slot times out after 1 s, and only then does
    // the other get the slot.
    let gated = tools
        .tool("gated", "/gate")
        .with_max_concurrent_calls(1)
        .with_timeout(Duration::from_secs(1));
    let server = Server::start(vec![assistant(options(&mock).with_tool(gated))]).await;
    let (_, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Go"}}))
        .await;
    let evs = sse.rest().await;
    check_log(&evs);
    let completed: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "tool-completed")
        .collect();
    assert_eq!(completed.len(), 2);
    for e in completed {
        assert_eq!(e["data"]["is_error"], true, "{e}");
        assert_eq!(
            e["data"]["output"],
            "the tool did not answer within 1000 ms"
        );
        // The waiting call's clock started when it asked for a slot, not when it got one
        // (at >= 1 s): had the wait not counted, it would have ended after >= 2 s.
        let took = e["data"]["duration_ms"].as_u64().unwrap();
        assert!((1000..2000).contains(&took), "{e}");
    }
    assert_eq!(tools.calls.max(), 1);
    assert_eq!(summary(&evs).last().unwrap(), "chain-completed Too slow.");
    server.stop().await;
}

/// Arrays nested `levels` deep, as JSON text.
fn nested(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn json_nested_too_deeply_is_kept_as_text_and_the_run_goes_on() {
    // Near serde_json's 128 levels: stored as values, they would make the events that carry
    // them, and the checkpoint the paused run resumes from, unreadable.
    let tools = ToolServer::start().await;
    let deep_args = format!(r#"{{"a":{}}}"#, nested(124));
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                Step::ParallelToolCalls(vec![
                    ToolCallSpec::new("h1", "deep", r#"{"levels":125}"#),
                    ToolCallSpec::new("c1", "confirm", &deep_args),
                    ToolCallSpec::new("c2", "confirm", "{}"),
                ]),
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("OK.")),
    )
    .await
    .unwrap();
    let options = options(&mock)
        .with_tool(tools.tool("deep", "/deep"))
        .with_tool(Tool::client("confirm"));
    let server = Server::start(vec![assistant(options)]).await;
    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Go"}}))
        .await;
    let requested = sse.until("tools-requested").await;
    let tools_requested = &requested.last().unwrap()["data"]["tools"];
    assert_eq!(tools_requested.as_array().unwrap().len(), 1);
    assert_eq!(tools_requested[0]["id"], "c2");
    server.wait_status(&id, "waiting").await;
    let (status, body) = server
        .post_json(
            &format!("/v1/runs/{id}/events"),
            json!({"type": "tool-results", "data": {"results": [{"id": "c2", "output": "yes"}]}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let rest = sse.rest().await;
    assert_eq!(rest.last().unwrap()["type"], "chain-completed");
    // Every event parses (`log` reads each one), the record too.
    let all = server.log(&id).await;
    check_log(&all);
    let completed = |call: &str| {
        all.iter()
            .find(|e| e["type"] == "tool-completed" && e["data"]["id"] == call)
            .unwrap_or_else(|| panic!("no tool-completed for {call}"))["data"]
            .clone()
    };
    assert_eq!(completed("h1")["output"], json!(nested(125)));
    let c1 = completed("c1");
    assert_eq!(c1["is_error"], true);
    let message = c1["output"].as_str().unwrap();
    assert!(
        message.starts_with("the arguments must be a JSON object nested at most 64 levels deep"),
        "{message}"
    );
    let (_, record) = server.get_json(&format!("/v1/runs/{id}")).await;
    assert_eq!(record["status"], "completed");
    // The model is sent back what it sent.
    let t = transcript(&mock.requests()[1]);
    assert!(
        t[2].contains(&format!("c1:confirm{deep_args}")),
        "{}",
        &t[2][..80]
    );
    server.stop().await;
}

#[tokio::test]
async fn tool_calls_without_an_id_or_repeating_one_get_ids_of_their_own() {
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::new(vec![
                Step::ParallelToolCalls(vec![
                    ToolCallSpec::new("", "confirm", r#"{"action":"a"}"#),
                    ToolCallSpec::new("", "confirm", r#"{"action":"b"}"#),
                    ToolCallSpec::new("x", "confirm", r#"{"action":"c"}"#),
                    ToolCallSpec::new("x", "confirm", r#"{"action":"d"}"#),
                ]),
                Step::Finish(FinishReason::ToolCalls),
            ]))
            .turn(Turn::text("OK.")),
    )
    .await
    .unwrap();
    let options = options(&mock).with_tool(Tool::client("confirm"));
    let server = Server::start(vec![assistant(options)]).await;
    let (id, mut sse) = server
        .start_streaming("assistant", json!({"input": {"message": "Go"}}))
        .await;
    let requested = sse.until("tools-requested").await;
    let ids: Vec<String> = requested.last().unwrap()["data"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["call_1_0", "call_1_1", "x", "call_1_3"]);
    server.wait_status(&id, "waiting").await;
    let results: Vec<Value> = ids
        .iter()
        .zip(["A", "B", "C", "D"])
        .map(|(id, output)| json!({"id": id, "output": output}))
        .collect();
    let (status, _) = server
        .post_json(
            &format!("/v1/runs/{id}/events"),
            json!({"type": "tool-results", "data": {"results": results}}),
        )
        .await;
    assert_eq!(status, 202);
    sse.rest().await;
    assert_eq!(
        transcript(&mock.requests()[1])[2..],
        [
            r#"assistant calls call_1_0:confirm{"action":"a"} call_1_1:confirm{"action":"b"} x:confirm{"action":"c"} call_1_3:confirm{"action":"d"}"#,
            "tool call_1_0: A",
            "tool call_1_1: B",
            "tool x: C",
            "tool call_1_3: D",
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn arguments_that_are_a_json_string_are_not_called_invalid_and_go_back_as_sent() {
    let tools = ToolServer::start().await;
    let double = r#""{\"city\":\"Rome\"}""#;
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::tool_call("c1", "get_weather", double))
            .turn(Turn::text("OK.")),
    )
    .await
    .unwrap();
    let options = options(&mock).with_tool(tools.tool("get_weather", "/weather"));
    let server = Server::start(vec![assistant(options)]).await;
    let record = server
        .run_to_end("assistant", json!({"input": {"message": "Go"}}))
        .await;
    let all = server.log(record["id"].as_str().unwrap()).await;
    let completed = all.iter().find(|e| e["type"] == "tool-completed").unwrap();
    assert_eq!(completed["data"]["is_error"], true);
    assert_eq!(
        completed["data"]["output"],
        format!("the arguments must be a JSON object, got a string: {double}")
    );
    assert_eq!(
        transcript(&mock.requests()[1])[2],
        format!("assistant calls c1:get_weather{double}")
    );
    assert!(tools.paths().is_empty());
    server.stop().await;
}
