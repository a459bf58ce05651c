//! The mock's bytes on the wire, its turn selection and its counters, read with a plain HTTP
//! client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_mock_llm::{
    FinishReason, MockServer, Script, Step, ToolCallSpec, Turn, Usage, WireFormat,
};

async fn post(mock: &MockServer, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{}{path}", mock.addr()))
        .header("authorization", "Bearer k")
        .header("x-api-key", "k")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The SSE events of a body: `(event name, data)`.
async fn events(response: reqwest::Response) -> Vec<(Option<String>, String)> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                } else if line.starts_with(':') {
                    data.push_str(line);
                }
            }
            (name, data)
        })
        .collect()
}

fn turn() -> Turn {
    Turn::new(vec![
        Step::Text("Hi".into()),
        Step::ParallelToolCalls(vec![
            ToolCallSpec::new("a", "f", r#"{"x":1}"#),
            ToolCallSpec::new("b", "g", "{}"),
        ]),
        Step::Usage(Usage {
            input_tokens: 9,
            output_tokens: 4,
            total_tokens: 0,
            reasoning_tokens: None,
            cached_input_tokens: Some(2),
        }),
        Step::Finish(FinishReason::ToolCalls),
    ])
}

#[tokio::test]
async fn openai_wire_sequence() {
    let mock = MockServer::start(Script::new().fallback(turn()).tool_call_split(3))
        .await
        .unwrap();
    let response = post(
        &mock,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-request-id"], "req_mock_1");
    let events = events(response).await;
    let deltas: Vec<Value> = events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
        .collect();
    let delta = |i: usize| deltas[i]["choices"][0]["delta"].clone();
    assert_eq!(delta(0), json!({"role": "assistant", "content": ""}));
    assert_eq!(delta(1), json!({"content": "Hi"}));
    assert_eq!(delta(2)["tool_calls"][0]["id"], "a");
    assert_eq!(delta(3)["tool_calls"][0]["id"], "b");
    // Fragments interleave: a[0], b[0], a[1], a[2].
    let fragments: Vec<(u64, String)> = (4..8)
        .map(|i| {
            let call = &delta(i)["tool_calls"][0];
            (
                call["index"].as_u64().unwrap(),
                call["function"]["arguments"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        fragments,
        [
            (0, "{\"x".into()),
            (1, "{}".into()),
            (0, "\":1".into()),
            (0, "}".into())
        ]
    );
    assert_eq!(deltas[8]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(deltas[9]["choices"], json!([]));
    assert_eq!(
        deltas[9]["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
               "prompt_tokens_details": {"cached_tokens": 2}})
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    assert_eq!(deltas.len(), 10);
    assert_eq!(mock.completed_streams(), 1);
    assert_eq!(mock.requests()[0].format, WireFormat::OpenAi);
}

#[tokio::test]
async fn openai_without_include_usage_sends_no_usage_chunk() {
    let mock = MockServer::start(Script::new().fallback(turn()))
        .await
        .unwrap();
    let response = post(
        &mock,
        "/chat/completions",
        json!({"model": "m", "messages": []}),
    )
    .await;
    let events = events(response).await;
    assert!(events.iter().all(|(_, d)| !d.contains("usage")));
}

#[tokio::test]
async fn anthropic_wire_sequence() {
    let script = Script::new()
        .fallback(turn().then(Step::Text("ignored after finish".into())))
        .tool_call_split(100);
    let mock = MockServer::start(script).await.unwrap();
    let response = post(&mock, "/v1/messages", json!({"model": "m", "messages": []})).await;
    let events = events(response).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        data[0]["message"]["usage"],
        json!({"input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": 2})
    );
    assert_eq!(data[4]["content_block"]["type"], "tool_use");
    assert_eq!(
        data[5]["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"x\":1}"})
    );
    assert_eq!(data[7]["index"], 2);
    assert_eq!(data[10]["delta"]["stop_reason"], "tool_use");
    assert_eq!(data[10]["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn turn_selection_order_and_refusals() {
    let script = Script::new()
        .when(|r| r.model() == Some("special"), Turn::text("rule"))
        .turn(Turn::text("first"))
        .turn(Turn::text("second"))
        .require_api_key("k");
    let mock = MockServer::start(script).await.unwrap();
    let text = |events: Vec<(Option<String>, String)>| -> String {
        events
            .iter()
            .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    };
    let ask = |model: &'static str| {
        post(
            &mock,
            "/v1/chat/completions",
            json!({"model": model, "messages": []}),
        )
    };
    assert_eq!(text(events(ask("any").await).await), "first");
    assert_eq!(text(events(ask("special").await).await), "rule");
    assert_eq!(text(events(ask("any").await).await), "second");
    let exhausted = ask("any").await;
    assert_eq!(exhausted.status(), 500);
    assert!(exhausted.text().await.unwrap().contains("exhausted"));

    let bad_json = reqwest::Client::new()
        .post(format!("{}/messages", mock.base_url()))
        .header("x-api-key", "k")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    let no_key = reqwest::Client::new()
        .post(format!("{}/messages", mock.base_url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    assert_eq!(mock.request_count(), 6);
    assert_eq!(
        mock.requests().len(),
        5,
        "the malformed body is counted, not recorded"
    );
}

#[tokio::test]
async fn http_errors_carry_retry_after_and_request_id() {
    let script = Script::new()
        .turn(Turn::http_error(
            429,
            "{}",
            Some(Duration::from_millis(1500)),
        ))
        .turn(Turn::new(vec![
            Step::Delay(Duration::from_millis(50)),
            Step::HttpError {
                status: 503,
                body: "busy".into(),
                retry_after: Some(Duration::from_secs(2)),
            },
        ]));
    let mock = MockServer::start(script).await.unwrap();
    let first = post(&mock, "/v1/messages", json!({})).await;
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["retry-after"], "2");
    assert_eq!(first.headers()["retry-after-ms"], "1500");
    assert_eq!(first.headers()["request-id"], "req_mock_1");
    let started = Instant::now();
    let second = post(&mock, "/v1/messages", json!({})).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "2");
    assert!(second.headers().get("retry-after-ms").is_none());
    assert_eq!(second.text().await.unwrap(), "busy");
}

#[tokio::test]
async fn paced_streams_keep_their_rate() {
    let mock = MockServer::start(Script::paced(6, 50.0).record(false))
        .await
        .unwrap();
    let started = Instant::now();
    let events = events(post(&mock, "/v1/chat/completions", json!({"model": "m"})).await).await;
    // 6 deltas at 50/s: the last one 100 ms after the first.
    assert!(started.elapsed() >= Duration::from_millis(100));
    let deltas = events
        .iter()
        .filter(|(_, d)| d.contains("\"tok \""))
        .count();
    assert_eq!(deltas, 6);
    assert!(mock.requests().is_empty());
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn stamped_deltas_carry_the_time_they_were_written() {
    let mock = MockServer::start(Script::paced_stamped(3, 100.0).record(false))
        .await
        .unwrap();
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    };
    let before = now_ns();
    let events = events(post(&mock, "/v1/chat/completions", json!({"model": "m"})).await).await;
    let after = now_ns();
    let stamps: Vec<u128> = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|text| !text.is_empty())
        .map(|text| {
            let digits = text.strip_prefix('t').unwrap().strip_suffix(' ').unwrap();
            digits.parse().unwrap()
        })
        .collect();
    assert_eq!(stamps.len(), 3, "{events:?}");
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert!(stamps[0] >= before && stamps[2] <= after, "{stamps:?}");
}
