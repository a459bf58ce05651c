//! The real `sluice serve` binary for end-to-end tests, and reads of its HTTP API.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `sluice serve`, killed when dropped.
pub struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// `sluice serve ARGS` with these extra environment variables and none of the OpenAI ones
    /// from the test's environment; returns once it printed its address.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_with_stderr(args, envs, Stdio::inherit())
    }

    /// As [`start`](Self::start), its stderr (the log) going to `stderr`.
    pub fn start_with_stderr(args: &[&str], envs: &[(&str, &str)], stderr: Stdio) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("serve")
            .args(args)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OPENAI_MODEL")
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr);
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
            .unwrap_or_else(|| panic!("unexpected first line of sluice serve: {line:?}"))
            .to_owned();
        Self { child, base }
    }

    /// The built-in workflows on an ephemeral port, data in `data_dir`.
    pub fn on_data_dir(data_dir: &Path) -> Self {
        let dir = data_dir.to_str().unwrap();
        Self::start(&["--listen", "127.0.0.1:0", "--data-dir", dir], &[])
    }

    /// `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `kill -TERM`, and waits (at most a minute) for the graceful shutdown to end the
    /// process with status 0.
    pub fn stop(mut self) {
        self.signal("-TERM");
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "sluice serve ended with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("sluice serve did not stop within a minute of SIGTERM");
    }

    /// Closes the reading end of the server's stderr (started with `Stdio::piped()`), as a log
    /// reader that goes away does.
    pub fn close_stderr(&mut self) {
        drop(self.child.stderr.take());
    }

    /// Sends `signal` (`-TERM`, `-INT`) to the server.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} failed");
    }

    /// The server's exit status, once it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path`, its body as JSON.
pub async fn get_json(c: &reqwest::Client, s: &Server, path: &str) -> Value {
    c.get(s.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET /v1/runs/{id}`.
pub async fn record(c: &reqwest::Client, s: &Server, id: &str) -> Value {
    get_json(c, s, &format!("/v1/runs/{id}")).await
}

/// The ids of a page of runs (`{"runs": [...]}`), in its order.
pub fn run_ids_of(page: &Value) -> Vec<String> {
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A run's whole event stream as NDJSON, read to its end (at most a minute): the text and the
/// envelopes.
pub async fn ndjson(c: &reqwest::Client, s: &Server, id: &str) -> (String, Vec<Value>) {
    let r = c
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(60), r.text())
        .await
        .expect("the run never ended")
        .unwrap();
    let evs = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (text, evs)
}
