//! The real binary deploys agents: from `[providers]` and `kind = "agent"` in a config file, and
//! `assistant` from the `OPENAI_*` variables without one; a `kill -9` mid-stream re-runs the
//! model step after the restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use sluice_mock_llm::{MockServer, Script, Turn};

use common::{Server, get_json, ndjson, record};

async fn workflows(c: &reqwest::Client, s: &Server) -> Vec<(String, String)> {
    let list = get_json(c, s, "/v1/workflows").await;
    list.as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap().to_owned(),
                w["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn ask(c: &reqwest::Client, s: &Server, workflow: &str, message: &str) -> Value {
    let r = c
        .post(s.url(&format!("/v1/workflows/{workflow}/runs?wait=true")))
        .json(&json!({"input": {"message": message}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_from_the_config_file() {
    let mock = MockServer::start(
        Script::new()
            .require_api_key("sk-test-key")
            .turn(Turn::text("Hello from the config.")),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
store = "memory"

[providers.local]
kind = "openai"
base_url = "{}"
api_key_env = "MOCK_MODEL_KEY"

[workflows.helper]
kind = "agent"
provider = "local"
model = "tiny"
system = "Be kind."
temperature = 0.5
max_tokens = 64

[[workflows.helper.tools]]
name = "confirm"
kind = "client"
description = "Ask the user"
"#,
            mock.base_url()
        ),
    )
    .unwrap();
    let server = Server::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[("MOCK_MODEL_KEY", "sk-test-key")],
    );
    let c = reqwest::Client::new();
    assert_eq!(
        workflows(&c, &server).await,
        [("helper".to_owned(), "agent".to_owned())]
    );
    let rec = ask(&c, &server, "helper", "Hi").await;
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(
        rec["result"],
        json!({"message": {"role": "assistant", "content": "Hello from the config."}})
    );
    let request = &mock.requests()[0];
    assert_eq!(request.model(), Some("tiny"));
    assert_eq!(request.body["temperature"], 0.5);
    assert_eq!(request.body["max_tokens"], 64);
    assert_eq!(request.messages()[0]["content"], "Be kind.");
    assert_eq!(request.tools()[0]["function"]["name"], "confirm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assistant_only_with_an_openai_provider() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let c = reqwest::Client::new();

    let plain = Server::start(&["--listen", "127.0.0.1:0", "--data-dir", data], &[]);
    assert_eq!(
        workflows(&c, &plain).await,
        [
            ("ask-human".to_owned(), "ask-human".to_owned()),
            ("ticker".to_owned(), "ticker".to_owned())
        ]
    );
    drop(plain);

    let mock = MockServer::start(Script::new().turn(Turn::text("At your service.")))
        .await
        .unwrap();
    let base = mock.base_url();
    let with = Server::start(
        &["--listen", "127.0.0.1:0", "--data-dir", data],
        &[("OPENAI_BASE_URL", &base), ("OPENAI_MODEL", "mini")],
    );
    assert!(
        workflows(&c, &with)
            .await
            .contains(&("assistant".to_owned(), "agent".to_owned()))
    );
    let rec = ask(&c, &with, "assistant", "Hi").await;
    assert_eq!(rec["result"]["message"]["content"], "At your service.");
    assert_eq!(mock.requests()[0].model(), Some("mini"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_name_the_providers_address_even_at_trace() {
    // A provider nothing listens on: the run fails to connect, and every layer logs at trace.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
store = "memory"

[providers.gone]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
max_retries = 0

[workflows.helper]
kind = "agent"
provider = "gone"
model = "tiny"
"#
        ),
    )
    .unwrap();
    let log_path = dir.path().join("sluice.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let s = Server::start_with_stderr(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[("SLUICE_LOG", "trace")],
        log.into(),
    );
    let c = reqwest::Client::new();
    let rec = ask(&c, &s, "helper", "Hi").await;
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["error"]["code"], "provider_error", "{rec}");
    s.stop();
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.contains("sluice listening"), "the log: {text}");
    assert!(
        !text.contains(&format!(":{port}")),
        "the provider's port is in the log:\n{}",
        text.lines()
            .filter(|l| l.contains(&format!(":{port}")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// One line per event, text deltas in a row joined.
fn summary(evs: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut previous = "";
    for e in evs {
        let ty = e["type"].as_str().unwrap();
        let d = &e["data"];
        let line = match ty {
            "text-delta" if previous == "text-delta" => {
                if let Some(last) = out.last_mut() {
                    last.push_str(d["text"].as_str().unwrap());
                }
                continue;
            }
            "text-delta" => format!("{ty} {}", d["text"].as_str().unwrap()),
            "step-started" | "step-completed" => format!("{ty} {}", d["name"].as_str().unwrap()),
            "chain-completed" => format!(
                "{ty} {}",
                d["result"]["message"]["content"].as_str().unwrap()
            ),
            _ => ty.to_owned(),
        };
        previous = ty;
        out.push(line);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_step_cut_by_kill_9_is_asked_again_after_the_restart() {
    // The first answer streams for 50 s (20 deltas a second), so the kill lands mid-stream;
    // the model's second answer is the one the run completes with.
    let mock = MockServer::start(
        Script::new()
            .turn(Turn::paced_text(1000, 20.0, "old "))
            .turn(Turn::text("Fresh answer.")),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[providers.local]
kind = "openai"
base_url = "{}"

[workflows.helper]
kind = "agent"
provider = "local"
model = "tiny"
"#,
            mock.base_url()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let c = reqwest::Client::new();
    let first = Server::start(&args, &[]);
    let r = c
        .post(first.url("/v1/workflows/helper/runs"))
        .json(&json!({"input": {"message": "Talk"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // chain-started, step-started, step-completed, step-started, provider-started, then
    // three deltas: committed to the log.
    let mut streamed = false;
    for _ in 0..2000 {
        if record(&c, &first, &id).await["last_seq"]
            .as_u64()
            .unwrap_or(0)
            >= 8
        {
            streamed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(streamed, "the model never streamed");
    assert_eq!(mock.completed_streams(), 0, "still streaming");
    first.kill9();

    let second = Server::start(&args, &[]);
    let (_, evs) = ndjson(&c, &second, &id).await;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "contiguous from 1: {e}");
    }
    let s = summary(&evs);
    assert!(s[5].starts_with("text-delta old old old "), "{s:#?}");
    assert_eq!(
        s,
        [
            "chain-started",
            "step-started start",
            "step-completed start",
            "step-started model",
            "provider-started",
            // The first attempt's partial answer: no provider-completed, no step-completed.
            s[5].as_str(),
            "chain-resumed",
            // The step again, from its checkpoint: the model is asked again.
            "step-started model",
            "provider-started",
            "text-delta Fresh answer.",
            "provider-completed",
            "step-completed model",
            "chain-completed Fresh answer.",
        ]
    );
    // The cut step started after the checkpoint the run resumed from.
    let cut_step = evs[3]["step"].as_u64().unwrap();
    let resumed = evs.iter().find(|e| e["type"] == "chain-resumed").unwrap();
    assert!(
        resumed["data"]["from_step"].as_u64().unwrap() < cut_step,
        "{resumed}"
    );
    let rec = record(&c, &second, &id).await;
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["last_seq"], evs.len() as u64);
    // Asked again from the checkpoint: the same conversation, the partial answer not in it.
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].messages(), requests[0].messages());
}
