//! End-to-end tests of both providers against the scripted model server on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use sluice_llm::{
    ApiKey, ChatChunk, ChatRequest, ChatStream, Error, ErrorKind, FinishReason, Message, Provider,
    ProviderConfig, ProviderKind, RetryPolicy, ToolSpec, Usage,
};
use sluice_mock_llm::{MockServer, Script, Step, ToolCallSpec, Turn};

const KEY: &str = "sk-test-SECRET-4242";

fn config(mock: &MockServer, kind: ProviderKind) -> ProviderConfig {
    ProviderConfig::new("mock", kind, mock.base_url())
        .with_api_key(ApiKey::new(KEY))
        .with_idle_timeout(Duration::from_secs(5))
        .with_retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(5),
        })
}

fn provider(mock: &MockServer, kind: ProviderKind) -> Provider {
    Provider::new(config(mock, kind)).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest::new(
        "test-model",
        vec![Message::system("Be brief."), Message::user("Hi")],
    )
}

/// All items until the end: the chunks, and the error that ended the stream, if any.
async fn drain(mut stream: ChatStream) -> (Vec<ChatChunk>, Option<Error>) {
    let mut chunks = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => chunks.push(chunk),
            Err(error) => {
                assert!(stream.next().await.is_none(), "items after an error");
                return (chunks, Some(error));
            }
        }
    }
    (chunks, None)
}

fn text_of(chunks: &[ChatChunk]) -> String {
    chunks
        .iter()
        .filter_map(|c| match c {
            ChatChunk::TextDelta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn finished(chunks: &[ChatChunk]) -> (FinishReason, Usage, Message) {
    match chunks.last() {
        Some(ChatChunk::Finished {
            finish_reason,
            usage,
            message,
            ..
        }) => (*finish_reason, *usage, message.clone()),
        other => panic!("last chunk is not Finished: {other:?}"),
    }
}

const BOTH: [ProviderKind; 2] = [ProviderKind::OpenAi, ProviderKind::Anthropic];

#[tokio::test]
async fn text_only_both_formats_with_lines_split_across_reads() {
    for kind in BOTH {
        let turn = Turn::text("Hello, wörld! How are you?").then(Step::Ping);
        let turn = Turn::new(std::iter::once(Step::Ping).chain(turn.steps).collect());
        let mock = MockServer::start(Script::new().turn(turn).write_size(7))
            .await
            .unwrap();
        let (chunks, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        assert!(error.is_none(), "{kind:?}: {error:?}");
        assert_eq!(text_of(&chunks), "Hello, wörld! How are you?");
        assert!(chunks.len() > 3, "deltas arrive one by one");
        let (reason, usage, message) = finished(&chunks);
        assert_eq!(reason, FinishReason::Stop);
        assert_eq!(usage.input_tokens, 10);
        assert_eq!(usage.output_tokens, 5);
        assert_eq!(usage.total_tokens, 15);
        assert_eq!(message, Message::assistant("Hello, wörld! How are you?"));

        let requests = mock.requests();
        assert_eq!(requests.len(), 1);
        let sent = &requests[0];
        assert_eq!(sent.model(), Some("test-model"));
        assert_eq!(sent.body["stream"], true);
        match kind {
            ProviderKind::OpenAi => {
                assert_eq!(sent.path, "/v1/chat/completions");
                assert_eq!(
                    sent.header("authorization"),
                    Some(format!("Bearer {KEY}").as_str())
                );
                assert!(sent.include_usage());
                assert_eq!(
                    sent.messages()[0],
                    json!({"role": "system", "content": "Be brief."})
                );
                assert_eq!(sent.messages()[1], json!({"role": "user", "content": "Hi"}));
            }
            ProviderKind::Anthropic => {
                assert_eq!(sent.path, "/v1/messages");
                assert_eq!(sent.header("x-api-key"), Some(KEY));
                assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
                assert_eq!(sent.body["system"], "Be brief.");
                assert_eq!(sent.messages(), [json!({"role": "user", "content": "Hi"})]);
            }
        }
        assert_eq!(mock.completed_streams(), 1);
    }
}

#[tokio::test]
async fn openai_parallel_tool_calls_with_interleaved_fragments() {
    let turn = Turn::new(vec![
        Step::Text("Checking.".into()),
        Step::ParallelToolCalls(vec![
            ToolCallSpec::new("call_a", "get_weather", r#"{"city":"Paris","unit":"°C"}"#),
            ToolCallSpec::new("call_b", "get_time", r#"{"tz":"Europe/Paris"}"#),
        ]),
        Step::Finish(FinishReason::ToolCalls),
    ]);
    let mock = MockServer::start(Script::new().turn(turn).tool_call_split(2))
        .await
        .unwrap();
    let tools = vec![
        ToolSpec::new("get_weather", "Weather", json!({"type": "object"})),
        ToolSpec::new("get_time", "Time", json!({"type": "object"})),
    ];
    let provider = provider(&mock, ProviderKind::OpenAi);
    let (chunks, error) = drain(provider.stream_chat(&request().with_tools(tools))).await;
    assert!(error.is_none(), "{error:?}");
    let indexes: Vec<u32> = chunks
        .iter()
        .filter_map(|c| match c {
            ChatChunk::ToolCallDelta { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    let switches = indexes.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches > 4,
        "fragments of both calls interleave: {indexes:?}"
    );
    // The first fragment of each call carries its id and name, later ones don't.
    let firsts: Vec<_> = chunks
        .iter()
        .filter_map(|c| match c {
            ChatChunk::ToolCallDelta {
                index,
                id: Some(id),
                name: Some(name),
                ..
            } => Some((*index, id.clone(), name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        firsts,
        [
            (0, "call_a".to_owned(), "get_weather".to_owned()),
            (1, "call_b".to_owned(), "get_time".to_owned())
        ]
    );
    let (reason, _, message) = finished(&chunks);
    assert_eq!(reason, FinishReason::ToolCalls);
    assert_eq!(message.text(), "Checking.");
    let calls = message.tool_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].arguments, json!({"city": "Paris", "unit": "°C"}));
    assert_eq!(calls[1].id, "call_b");
    assert_eq!(calls[1].arguments, json!({"tz": "Europe/Paris"}));
    let sent = &mock.requests()[0];
    assert_eq!(sent.tools()[0]["type"], "function");
    assert_eq!(sent.tools()[1]["function"]["name"], "get_time");
}

#[tokio::test]
async fn anthropic_tool_use_from_input_json_deltas() {
    let turn = Turn::new(vec![
        Step::Text("Let me look.".into()),
        Step::ToolCall {
            id: "toolu_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Zürich", "days": [1, 2]}"#.into(),
        },
        Step::ToolCall {
            id: "toolu_2".into(),
            name: "get_time".into(),
            arguments: String::new(),
        },
        Step::Finish(FinishReason::ToolCalls),
    ]);
    let mock = MockServer::start(Script::new().turn(turn).tool_call_split(1))
        .await
        .unwrap();
    let provider = provider(&mock, ProviderKind::Anthropic);
    let tools = vec![ToolSpec::new(
        "get_weather",
        "Weather",
        json!({"type": "object"}),
    )];
    let (chunks, error) = drain(provider.stream_chat(&request().with_tools(tools))).await;
    assert!(error.is_none(), "{error:?}");
    let fragments = chunks
        .iter()
        .filter(|c| matches!(c, ChatChunk::ToolCallDelta { index: 0, arguments, .. } if !arguments.is_empty()))
        .count();
    assert!(fragments > 20, "one fragment per character");
    let (reason, _, message) = finished(&chunks);
    assert_eq!(reason, FinishReason::ToolCalls);
    assert_eq!(
        message.tool_calls()[0].arguments,
        json!({"city": "Zürich", "days": [1, 2]})
    );
    assert_eq!(message.tool_calls()[1].name, "get_time");
    assert_eq!(message.tool_calls()[1].arguments, json!({}));
    assert_eq!(
        mock.requests()[0].tools()[0]["input_schema"],
        json!({"type": "object"})
    );
}

#[tokio::test]
async fn tool_round_trip_per_conversation_step() {
    for kind in BOTH {
        let script = Script::new()
            .at_step(0, Turn::tool_call("call_1", "lookup", r#"{"q":"x"}"#))
            .at_step(1, Turn::text("Found it."));
        let mock = MockServer::start(script).await.unwrap();
        let provider = provider(&mock, kind);
        let mut request = request();
        let first = provider.chat(&request).await.unwrap();
        assert_eq!(first.finish_reason, FinishReason::ToolCalls);
        request.messages.push(first.message);
        request.messages.push(Message::tool_result("call_1", "42"));
        let second = provider.chat(&request).await.unwrap();
        assert_eq!(second.message.text(), "Found it.");
        assert_eq!(second.finish_reason, FinishReason::Stop);

        let sent = &mock.requests()[1];
        let history = sent.messages();
        match kind {
            ProviderKind::OpenAi => {
                assert_eq!(
                    history[2]["tool_calls"][0]["function"]["arguments"],
                    r#"{"q":"x"}"#
                );
                assert_eq!(
                    history[3],
                    json!({"role": "tool", "tool_call_id": "call_1", "content": "42"})
                );
            }
            ProviderKind::Anthropic => {
                assert_eq!(history[1]["content"][0]["type"], "tool_use");
                assert_eq!(history[1]["content"][0]["input"], json!({"q": "x"}));
                assert_eq!(history[2]["content"][0]["type"], "tool_result");
                assert_eq!(history[2]["content"][0]["tool_use_id"], "call_1");
            }
        }
    }
}

#[tokio::test]
async fn reasoning_deltas_both_formats() {
    for kind in BOTH {
        let turn = Turn::new(vec![
            Step::Reasoning("Let me ".into()),
            Step::Reasoning("think.".into()),
            Step::Text("42".into()),
            Step::Finish(FinishReason::Stop),
        ]);
        let mock = MockServer::start(Script::new().turn(turn)).await.unwrap();
        let (chunks, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(chunks[0], ChatChunk::ReasoningDelta("Let me ".into()));
        assert_eq!(chunks[1], ChatChunk::ReasoningDelta("think.".into()));
        assert_eq!(chunks[2], ChatChunk::TextDelta("42".into()));
        let (_, _, message) = finished(&chunks);
        assert_eq!(message.reasoning(), Some("Let me think."));
        if let (
            ProviderKind::Anthropic,
            Message::Assistant {
                reasoning_signature,
                ..
            },
        ) = (kind, &message)
        {
            assert_eq!(reasoning_signature.as_deref(), Some("mock-signature"));
        }
    }
}

#[tokio::test]
async fn usage_mapping() {
    let usage = Usage {
        input_tokens: 100,
        output_tokens: 20,
        total_tokens: 120,
        reasoning_tokens: Some(7),
        cached_input_tokens: Some(60),
    };
    for kind in BOTH {
        let turn = Turn::new(vec![
            Step::Text("ok".into()),
            Step::Usage(usage),
            Step::Finish(FinishReason::Length),
        ]);
        let mock = MockServer::start(Script::new().turn(turn)).await.unwrap();
        let response = provider(&mock, kind).chat(&request()).await.unwrap();
        assert_eq!(response.finish_reason, FinishReason::Length);
        let expected = match kind {
            ProviderKind::OpenAi => usage,
            // Anthropic reports no reasoning token count.
            ProviderKind::Anthropic => Usage {
                reasoning_tokens: None,
                ..usage
            },
        };
        assert_eq!(response.usage, expected, "{kind:?}");
    }
}

#[tokio::test]
async fn retries_429_honouring_retry_after_then_succeeds() {
    let script = Script::new()
        .turn(Turn::http_error(
            429,
            r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
            Some(Duration::from_secs(1)),
        ))
        .turn(Turn::text("Hello"));
    let mock = MockServer::start(script).await.unwrap();
    let started = Instant::now();
    let response = provider(&mock, ProviderKind::OpenAi)
        .chat(&request())
        .await
        .unwrap();
    assert_eq!(response.message.text(), "Hello");
    assert_eq!(mock.request_count(), 2);
    // The backoff alone is at most 50 ms here: the wait came from Retry-After.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn retries_503_before_the_first_token_then_succeeds() {
    for kind in BOTH {
        let script = Script::new()
            .turn(Turn::http_error(503, "overloaded", None))
            .turn(Turn::new(vec![Step::CloseConnection]))
            .turn(Turn::text("Hello"));
        let mock = MockServer::start(script).await.unwrap();
        let (chunks, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(text_of(&chunks), "Hello");
        assert_eq!(mock.request_count(), 3);
        let requests = mock.requests();
        assert_eq!(
            requests[0].body, requests[2].body,
            "the same request is sent again"
        );
    }
}

#[tokio::test]
async fn retries_are_bounded_and_errors_keep_status_body_and_request_id() {
    let script = Script::new().fallback(Turn::http_error(503, "upstream overloaded", None));
    let mock = MockServer::start(script).await.unwrap();
    let error = provider(&mock, ProviderKind::Anthropic)
        .chat(&request())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Http);
    assert_eq!(mock.request_count(), 3, "max_attempts");
    match &error {
        Error::Http {
            status,
            body_excerpt,
            request_id,
            ..
        } => {
            assert_eq!(*status, 503);
            assert_eq!(body_excerpt, "upstream overloaded");
            assert_eq!(request_id.as_deref(), Some("req_mock_3"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn client_errors_are_not_retried_and_bodies_are_cut() {
    let body = "x".repeat(10_000);
    let mock = MockServer::start(Script::new().fallback(Turn::http_error(400, &body, None)))
        .await
        .unwrap();
    let error = provider(&mock, ProviderKind::OpenAi)
        .chat(&request())
        .await
        .unwrap_err();
    assert_eq!(mock.request_count(), 1);
    assert_eq!(error.status(), Some(400));
    assert_eq!(error.request_id(), Some("req_mock_1"));
    let Error::Http { body_excerpt, .. } = error else {
        panic!()
    };
    assert_eq!(body_excerpt.len(), sluice_llm::BODY_EXCERPT_LIMIT);
}

#[tokio::test]
async fn retry_after_beyond_the_limit_fails_at_once() {
    let script = Script::new()
        .turn(Turn::http_error(
            429,
            "later",
            Some(Duration::from_secs(120)),
        ))
        .turn(Turn::text("never"));
    let mock = MockServer::start(script).await.unwrap();
    let error = provider(&mock, ProviderKind::OpenAi)
        .chat(&request())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RateLimited);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn no_retry_after_the_first_token() {
    for kind in BOTH {
        let script = Script::new()
            .turn(Turn::new(vec![
                Step::Text("Hel".into()),
                Step::MidStreamError("model crashed".into()),
            ]))
            .turn(Turn::text("must not be used"));
        let mock = MockServer::start(script).await.unwrap();
        let (chunks, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        assert_eq!(chunks, [ChatChunk::TextDelta("Hel".into())]);
        let error = error.expect("an error ends the stream");
        assert_eq!(error.kind(), ErrorKind::Provider, "{error:?}");
        assert!(error.to_string().contains("model crashed"));
        assert_eq!(mock.request_count(), 1);

        // A connection dropped after the first token is not retried either.
        let script = Script::new()
            .turn(Turn::new(vec![
                Step::Text("Hel".into()),
                Step::CloseConnection,
            ]))
            .turn(Turn::text("must not be used"));
        let mock = MockServer::start(script).await.unwrap();
        let (chunks, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        assert_eq!(chunks, [ChatChunk::TextDelta("Hel".into())]);
        assert_eq!(error.expect("error").kind(), ErrorKind::Transport);
        assert_eq!(mock.request_count(), 1);
    }
}

#[tokio::test]
async fn a_stall_mid_stream_ends_with_stalled() {
    for kind in BOTH {
        let turn = Turn::new(vec![
            Step::Text("Hel".into()),
            Step::Stall(Duration::from_secs(30)),
            Step::Text("lo".into()),
            Step::Finish(FinishReason::Stop),
        ]);
        let mock = MockServer::start(Script::new().turn(turn)).await.unwrap();
        let provider =
            Provider::new(config(&mock, kind).with_idle_timeout(Duration::from_millis(200)))
                .unwrap();
        let (chunks, error) = drain(provider.stream_chat(&request())).await;
        assert_eq!(chunks, [ChatChunk::TextDelta("Hel".into())]);
        assert!(matches!(error, Some(Error::Stalled { .. })), "{error:?}");
        assert_eq!(mock.request_count(), 1);
    }
}

#[tokio::test]
async fn no_response_head_within_the_idle_timeout_is_a_timeout() {
    let turn = Turn::new(vec![
        Step::Delay(Duration::from_secs(30)),
        Step::Text("late".into()),
    ]);
    let mock = MockServer::start(Script::new().fallback(turn))
        .await
        .unwrap();
    // The head may take connect_timeout + idle_timeout from the send.
    let provider = Provider::new(
        config(&mock, ProviderKind::OpenAi)
            .with_connect_timeout(Duration::from_millis(200))
            .with_idle_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let error = provider.chat(&request()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error:?}");
    assert!(error.to_string().contains("400ms"), "{error}");
    assert_eq!(mock.request_count(), 1, "timeouts are not retried");
}

#[tokio::test]
async fn malformed_and_truncated_streams_are_protocol_errors() {
    for kind in BOTH {
        let cases = [
            vec![
                Step::Text("a".into()),
                Step::Malformed("data: {not json".into()),
            ],
            vec![Step::Text("a".into())],
            vec![Step::Malformed("data: \"just a string\"".into())],
        ];
        for steps in cases {
            let mock = MockServer::start(Script::new().turn(Turn::new(steps.clone())))
                .await
                .unwrap();
            let (_, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
            let error = error.expect("error");
            assert_eq!(
                error.kind(),
                ErrorKind::Protocol,
                "{kind:?} {steps:?}: {error:?}"
            );
            assert_eq!(mock.request_count(), 1);
        }
    }
}

#[tokio::test]
async fn connection_refused_is_a_connect_error_after_retries() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = ProviderConfig::new(
        "down",
        ProviderKind::OpenAi,
        format!("http://127.0.0.1:{port}/v1"),
    )
    .with_api_key(ApiKey::new(KEY))
    .with_retry(RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(10),
        ..RetryPolicy::default()
    });
    let error = Provider::new(config)
        .unwrap()
        .chat(&request())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");
    assert!(error.is_retryable());
    assert!(!format!("{error} {error:?}").contains(KEY));
    // Nothing in the error's text, sources included, names the endpoint.
    let text = chain(&error);
    assert!(text.contains("Connection refused"), "{text}");
    for hidden in [
        format!(":{port}"),
        "/v1".into(),
        "chat/completions".into(),
        "url".into(),
    ] {
        assert!(!text.contains(&hidden), "{hidden} in {text}");
    }
}

/// An error and its sources, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A listener that completes no handshake: its accept queue (backlog 0) is filled by one
/// connection nobody accepts, so the kernel drops every further SYN and a connect hangs.
async fn black_hole() -> (tokio::net::TcpListener, std::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    // The precondition of the test: a further connect does hang.
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(probe.is_err(), "the backlog did not fill: {probe:?}");
    (listener, filler)
}

#[tokio::test]
async fn a_hanging_connect_is_a_retried_connect_error_even_with_a_shorter_idle_timeout() {
    let (listener, _filler) = black_hole().await;
    let port = listener.local_addr().unwrap().port();
    // idle < connect: a head timeout of idle alone would fire first and end the call with a
    // Timeout, which is not retried.
    let config = ProviderConfig::new(
        "hole",
        ProviderKind::OpenAi,
        format!("http://127.0.0.1:{port}/v1"),
    )
    .with_connect_timeout(Duration::from_millis(400))
    .with_idle_timeout(Duration::from_millis(100))
    .with_retry(RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(10),
        ..RetryPolicy::default()
    });
    let t0 = Instant::now();
    let error = Provider::new(config)
        .unwrap()
        .chat(&request())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");
    assert!(error.is_retryable());
    // Two attempts, each waiting out the whole connect timeout (a lower bound: cannot flake).
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    let text = chain(&error);
    assert!(!text.contains(&port.to_string()), "{text}");
}

#[tokio::test]
async fn the_concurrency_limit_holds() {
    let script = Script::new()
        .when(
            |r| r.last_message_text().as_deref() == Some("slow"),
            Turn::new(vec![
                Step::Text("x".into()),
                Step::Stall(Duration::from_secs(60)),
            ]),
        )
        .fallback(Turn::text("fast"));
    let mock = MockServer::start(script).await.unwrap();
    let provider =
        Provider::new(config(&mock, ProviderKind::OpenAi).with_max_concurrent_requests(2)).unwrap();
    let slow = ChatRequest::new("m", vec![Message::user("slow")]);
    let mut a = provider.stream_chat(&slow);
    let mut b = provider.stream_chat(&slow);
    assert!(matches!(a.next().await, Some(Ok(ChatChunk::TextDelta(_)))));
    assert!(matches!(b.next().await, Some(Ok(ChatChunk::TextDelta(_)))));
    assert_eq!(provider.available_permits(), 0);

    let third = tokio::spawn({
        let provider = provider.clone();
        async move {
            provider
                .chat(&ChatRequest::new("m", vec![Message::user("go")]))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mock.request_count(),
        2,
        "the third request waits for a permit"
    );
    assert!(!third.is_finished());

    drop(a);
    let response = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third call proceeds once a permit is free")
        .unwrap()
        .unwrap();
    assert_eq!(response.message.text(), "fast");
    assert_eq!(mock.request_count(), 3);
    drop(b);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_upstream_connection() {
    for kind in BOTH {
        let mock = MockServer::start(Script::paced(10_000, 200.0))
            .await
            .unwrap();
        let provider = provider(&mock, kind);
        let mut stream = provider.stream_chat(&request());
        for _ in 0..3 {
            assert!(matches!(
                stream.next().await,
                Some(Ok(ChatChunk::TextDelta(_)))
            ));
        }
        assert_eq!(mock.active_streams(), 1);
        drop(stream);
        assert!(
            mock.wait_for_disconnects(1, Duration::from_secs(5)).await,
            "the server saw the connection closed"
        );
        assert_eq!(mock.completed_streams(), 0);
        assert_eq!(provider.available_permits(), 64, "the permit is freed");
    }
}

#[tokio::test]
async fn dropping_a_silent_stream_closes_the_upstream_connection() {
    let turn = Turn::new(vec![
        Step::Text("x".into()),
        Step::Stall(Duration::from_secs(60)),
    ]);
    let mock = MockServer::start(Script::new().fallback(turn))
        .await
        .unwrap();
    let provider = provider(&mock, ProviderKind::OpenAi);
    let mut stream = provider.stream_chat(&request());
    assert!(matches!(
        stream.next().await,
        Some(Ok(ChatChunk::TextDelta(_)))
    ));
    drop(stream);
    assert!(mock.wait_for_disconnects(1, Duration::from_secs(5)).await);
}

/// A `MakeWriter` collecting log output.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
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

#[tokio::test]
async fn the_api_key_is_sent_but_never_shown() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    for kind in BOTH {
        let echo = format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}"}}}}"#);
        let script = Script::new()
            .turn(Turn::http_error(503, &echo, None))
            .turn(Turn::http_error(401, &echo, None))
            .turn(Turn::new(vec![Step::MidStreamError(format!(
                "bad key {KEY}"
            ))]))
            .turn(Turn::new(vec![Step::Malformed(format!("data: {{{KEY}"))]))
            .require_api_key(KEY);
        let mock = MockServer::start(script).await.unwrap();
        let provider = provider(&mock, kind);
        assert!(!format!("{provider:?}").contains(KEY));
        assert!(!format!("{:?}", provider.config()).contains(KEY));

        let mut errors = Vec::new();
        for _ in 0..3 {
            errors.push(provider.chat(&request()).await.unwrap_err());
        }
        assert_eq!(errors[0].status(), Some(401), "{:?}", errors[0]);
        assert_eq!(errors[1].kind(), ErrorKind::Provider);
        assert_eq!(errors[2].kind(), ErrorKind::Protocol);
        for error in &errors {
            let shown = format!("{error} | {error:?} | {error:#?}");
            assert!(!shown.contains(KEY), "{shown}");
        }
        assert!(
            errors[0]
                .to_string()
                .contains("Incorrect API key provided: ***")
        );
        // The key went out in the right header on every request.
        assert_eq!(mock.request_count(), 4);
        for sent in mock.requests() {
            let header = match kind {
                ProviderKind::OpenAi => sent.header("authorization").map(str::to_owned),
                ProviderKind::Anthropic => sent.header("x-api-key").map(|k| format!("Bearer {k}")),
            };
            assert_eq!(header, Some(format!("Bearer {KEY}")));
        }
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying"), "the retry was logged: {logs}");
    assert!(!logs.contains(KEY), "{logs}");
}

/// `count` keep-alives, `every` apart.
fn keep_alives(count: usize, every: Duration) -> Vec<Step> {
    (0..count)
        .flat_map(|_| [Step::Ping, Step::Delay(every)])
        .collect()
}

#[tokio::test]
async fn keep_alives_alone_end_with_no_output_and_free_the_slot() {
    for kind in BOTH {
        let mut steps = keep_alives(200, Duration::from_millis(20));
        steps.push(Step::Finish(FinishReason::Stop));
        let script = Script::new()
            .when(
                |r| r.last_message_text().as_deref() == Some("pings"),
                Turn::new(steps),
            )
            .fallback(Turn::text("after"));
        let mock = MockServer::start(script).await.unwrap();
        let config = config(&mock, kind)
            .with_max_concurrent_requests(1)
            .with_output_timeout(Duration::from_millis(300));
        let provider = Provider::new(config).unwrap();
        let pings = ChatRequest::new("m", vec![Message::user("pings")]);
        let (chunks, error) = drain(provider.stream_chat(&pings)).await;
        assert!(chunks.is_empty(), "{chunks:?}");
        assert!(
            matches!(error, Some(Error::NoOutput { after }) if after == Duration::from_millis(300)),
            "{kind:?}: {error:?}"
        );
        assert_eq!(error.unwrap().kind(), ErrorKind::NoOutput);
        assert_eq!(mock.request_count(), 1, "not retried");
        // The slot is free again.
        assert_eq!(provider.available_permits(), 1);
        let response = provider.chat(&request()).await.unwrap();
        assert_eq!(response.message.text(), "after");
    }
}

#[tokio::test]
async fn output_restarts_the_output_timeout_and_keep_alives_do_not() {
    for kind in BOTH {
        // Output every ~200 ms with keep-alives between: within a 400 ms output timeout.
        let mut steps = Vec::new();
        for word in ["a", "b", "c", "d"] {
            steps.push(Step::Text(word.into()));
            steps.extend(keep_alives(4, Duration::from_millis(50)));
        }
        steps.push(Step::Finish(FinishReason::Stop));
        // The same, then keep-alives only.
        let mut stuck = vec![Step::Text("a".into()), Step::Text("b".into())];
        stuck.extend(keep_alives(100, Duration::from_millis(20)));
        let script = Script::new().turn(Turn::new(steps)).turn(Turn::new(stuck));
        let mock = MockServer::start(script).await.unwrap();
        let provider =
            Provider::new(config(&mock, kind).with_output_timeout(Duration::from_millis(400)))
                .unwrap();
        let (chunks, error) = drain(provider.stream_chat(&request())).await;
        assert!(error.is_none(), "{kind:?}: {error:?}");
        assert_eq!(text_of(&chunks), "abcd");

        let (chunks, error) = drain(provider.stream_chat(&request())).await;
        assert_eq!(text_of(&chunks), "ab");
        assert!(matches!(error, Some(Error::NoOutput { .. })), "{error:?}");
    }
}

#[tokio::test]
async fn an_answer_past_max_output_fails_with_too_large() {
    for kind in BOTH {
        let long_text = Turn::text(&"x".repeat(5_000));
        let long_call = Turn::new(vec![
            Step::ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments: format!(r#"{{"a": "{}"}}"#, "y".repeat(5_000)),
            },
            Step::Finish(FinishReason::ToolCalls),
        ]);
        let script = Script::new().turn(long_text).turn(long_call);
        let mock = MockServer::start(script).await.unwrap();
        let provider = Provider::new(config(&mock, kind).with_max_output(1_000)).unwrap();
        for what in ["text", "tool-call arguments"] {
            let (chunks, error) = drain(provider.stream_chat(&request())).await;
            let error = error.unwrap_or_else(|| panic!("{kind:?} {what}: no error"));
            assert_eq!(error.kind(), ErrorKind::TooLarge, "{what}: {error}");
            assert!(error.to_string().contains("1000 bytes"), "{error}");
            assert!(!error.is_retryable());
            let passed: usize = chunks
                .iter()
                .map(|c| match c {
                    ChatChunk::TextDelta(t) => t.len(),
                    ChatChunk::ToolCallDelta { arguments, .. } => arguments.len(),
                    _ => 0,
                })
                .sum();
            assert!(
                passed > 0 && passed <= 1_000,
                "{what}: {passed} bytes passed"
            );
        }
        assert_eq!(mock.request_count(), 2);
    }
}

#[tokio::test]
async fn more_tool_calls_than_the_limit_fail_with_too_large() {
    for kind in BOTH {
        let calls = (0..=sluice_llm::MAX_TOOL_CALLS)
            .map(|i| ToolCallSpec::new(format!("call_{i}"), "f", "{}"))
            .collect();
        let turn = Turn::new(vec![
            Step::ParallelToolCalls(calls),
            Step::Finish(FinishReason::ToolCalls),
        ]);
        let mock = MockServer::start(Script::new().turn(turn)).await.unwrap();
        let (_, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        assert!(
            matches!(&error, Some(Error::TooLarge(m)) if m.contains("tool calls")),
            "{kind:?}: {error:?}"
        );
    }
}

#[tokio::test]
async fn in_stream_error_messages_are_cut_to_the_excerpt_limit() {
    for kind in BOTH {
        let turn = Turn::new(vec![
            Step::Text("a".into()),
            Step::MidStreamError("e".repeat(1 << 20)),
        ]);
        let mock = MockServer::start(Script::new().turn(turn)).await.unwrap();
        let (_, error) = drain(provider(&mock, kind).stream_chat(&request())).await;
        let Some(Error::Provider { message }) = error else {
            panic!("{kind:?}: {error:?}")
        };
        assert!(
            message.len() <= sluice_llm::BODY_EXCERPT_LIMIT,
            "{}",
            message.len()
        );
        assert!(message.ends_with("eeee"), "{}", &message[..40]);
    }
}

#[tokio::test]
async fn the_key_is_removed_before_an_excerpt_is_cut() {
    // The key straddles the 2 KiB cut: scrubbing the cut text would leave its first half.
    let at = sluice_llm::BODY_EXCERPT_LIMIT - KEY.len() / 2;
    let straddling = format!("{}{KEY} and more", "x".repeat(at));
    // A key with characters JSON escapes, as the provider echoes it inside a JSON string.
    let odd_key = "sk-odd/\"quoted\"\\key";
    let echoed =
        serde_json::json!({"error": {"message": format!("bad key {odd_key}")}}).to_string();
    let escaped_slash = echoed.replace('/', "\\/");
    let script = Script::new()
        .turn(Turn::http_error(401, &straddling, None))
        .turn(Turn::http_error(401, &echoed, None))
        .turn(Turn::http_error(401, &escaped_slash, None));
    let mock = MockServer::start(script).await.unwrap();

    let error = provider(&mock, ProviderKind::OpenAi)
        .chat(&request())
        .await
        .unwrap_err();
    let Error::Http { body_excerpt, .. } = &error else {
        panic!("{error:?}")
    };
    assert!(body_excerpt.len() <= sluice_llm::BODY_EXCERPT_LIMIT);
    assert!(
        !body_excerpt.contains(&KEY[..5]),
        "{}",
        &body_excerpt[at - 10..]
    );
    assert!(
        body_excerpt[at - 10..].starts_with("xxxxxxxxxx*** and"),
        "{}",
        &body_excerpt[at - 10..]
    );

    let odd = Provider::new(config(&mock, ProviderKind::OpenAi).with_api_key(ApiKey::new(odd_key)))
        .unwrap();
    for _ in 0..2 {
        let error = odd.chat(&request()).await.unwrap_err();
        let shown = format!("{error} {error:?}");
        assert!(shown.contains("bad key ***"), "{shown}");
        assert!(!shown.contains("quoted"), "{shown}");
    }
}

/// A model server that answers `500` with a body of `len` bytes, sent one byte every `every`.
async fn dripping_server(len: usize, every: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: {len}\r\n\r\n"
                );
                if socket.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..len {
                    tokio::time::sleep(every).await;
                    if socket.write_all(b"z").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn an_error_body_that_trickles_in_is_read_for_one_idle_timeout_only() {
    let base_url = dripping_server(100_000, Duration::from_millis(20)).await;
    let config = ProviderConfig::new("drip", ProviderKind::OpenAi, base_url)
        .with_idle_timeout(Duration::from_millis(500))
        .with_retry(RetryPolicy::none());
    let t0 = Instant::now();
    let error = Provider::new(config)
        .unwrap()
        .chat(&request())
        .await
        .unwrap_err();
    let elapsed = t0.elapsed();
    let Error::Http {
        status,
        body_excerpt,
        ..
    } = &error
    else {
        panic!("{error:?}")
    };
    assert_eq!(*status, 500);
    // What arrived within the idle timeout, no more: reading the limit's 2,048 bytes would
    // take 40 s at this pace (and, with a wait per read, up to 2,048 idle timeouts).
    assert!(
        !body_excerpt.is_empty() && body_excerpt.len() < 100,
        "{}",
        body_excerpt.len()
    );
    assert!(body_excerpt.bytes().all(|b| b == b'z'));
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}
