//! The real binary deploys agents: from `[providers]` and `kind = "agent"` in a config file, and
//! `assistant` from the `OPENAI_*` variables without one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};
use sluice_mock_llm::{MockServer, Script, Turn};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("serve")
            .args(args)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OPENAI_MODEL")
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sluice");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected: {line:?}"))
            .to_owned();
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn workflows(c: &reqwest::Client, s: &Server) -> Vec<(String, String)> {
    let list: Value = c
        .get(s.url("/v1/workflows"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
