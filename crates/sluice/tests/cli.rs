//! The `sluice` binary's client commands against a real server (the binary too, on its SQLite
//! store): each command's output and exit code, `--json` byte for byte against the server's
//! NDJSON log, the human view by its key lines, prompts answered on stdin, Ctrl-C (SIGINT sent
//! with `kill -INT`), a closed stdout, a server restart in the middle of a stream.
//!
//! Exit codes (`cli/mod.rs`): 0 done or completed, 1 the run failed, 2 usage, connection or a
//! refused request, 130 cancelled or Ctrl-C.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
/// Generous: nothing here should take more than a few seconds.
const LIMIT: Duration = Duration::from_secs(30);

// ---- the server ----

struct Server {
    child: Child,
    base: String,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Server {
    /// A server on an ephemeral port with its own data dir, no model provider configured.
    fn start(dir: &Path) -> Self {
        Self::start_at(dir, "127.0.0.1:0", &[])
    }

    fn start_at(dir: &Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir)
            .env("SLUICE_LOG", "warn")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OPENAI_MODEL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sluice serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line of sluice serve: {line:?}"))
            .to_owned();
        let addr = base.strip_prefix("http://").unwrap().parse().unwrap();
        Self {
            child,
            base,
            addr,
            http: reqwest::Client::new(),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// `sluice ARGS` against this server, run to its end.
    fn cli(&self, args: &[&str]) -> Out {
        self.cli_with_stdin(args, None)
    }

    /// `sluice ARGS` with `stdin` written to its standard input (then closed).
    fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut cmd = cli_command(&self.base, args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(text.as_bytes()).unwrap();
        }
        finish(child, args)
    }

    /// `sluice ARGS` running in the background, its stdout read line by line.
    fn spawn(&self, args: &[&str]) -> Running {
        Running::spawn(cli_command(&self.base, args), args, false)
    }

    /// Like [`spawn`](Self::spawn) with stdin a pipe that stays open (and says nothing).
    fn spawn_with_open_stdin(&self, args: &[&str]) -> Running {
        Running::spawn(cli_command(&self.base, args), args, true)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The run's log as the server serves it (NDJSON), events with `seq > after`.
    async fn ndjson(&self, id: &str, after: u64) -> String {
        let r = self
            .http
            .get(self.url(&format!("/v1/runs/{id}/events?after={after}")))
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::timeout(LIMIT, r.text())
            .await
            .expect("the log did not end")
            .unwrap()
    }

    async fn record(&self, id: &str) -> Value {
        let r = self
            .http
            .get(self.url(&format!("/v1/runs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    async fn until_status(&self, id: &str, status: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let rec = self.record(id).await;
            if rec["status"] == status {
                return rec;
            }
            assert!(
                t0.elapsed() < LIMIT,
                "run {id} never became {status}: {rec}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the client commands ----

fn cli_command(base: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("SLUICE_URL", base)
        .env_remove("SLUICE_API_KEY")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A finished command.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    /// The run id of the first envelope (`--json`) or of the first line of the human view.
    fn run_id(&self) -> String {
        run_id_in(self.stdout.lines().next().unwrap_or_default())
    }

    #[track_caller]
    fn expect(self, code: i32) -> Self {
        assert_eq!(self.code, code, "exit code; {self:#?}");
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }
}

/// The run id in an envelope line or in `▶ ticker run_…`.
fn run_id_in(line: &str) -> String {
    if line.starts_with('{') {
        let v: Value = serde_json::from_str(line).unwrap();
        return v["run_id"].as_str().unwrap().to_owned();
    }
    line.split_whitespace()
        .find(|w| w.starts_with("run_"))
        .unwrap_or_else(|| panic!("no run id in {line:?}"))
        .to_owned()
}

/// Reads a pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            p.read_to_string(&mut text).unwrap();
        }
        text
    })
}

/// Waits for the process (killing it after [`LIMIT`]) and collects its output.
fn finish(mut child: Child, args: &[&str]) -> Out {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let code = wait(&mut child, args);
    Out {
        code,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn wait(child: &mut Child, args: &[&str]) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status
                .code()
                .unwrap_or_else(|| panic!("sluice {args:?} was killed by a signal: {status}"));
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("sluice {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A command running in the background.
struct Running {
    child: Child,
    args: Vec<String>,
    lines: mpsc::Receiver<String>,
    seen: String,
    stderr: Option<std::thread::JoinHandle<String>>,
    _stdin: Option<ChildStdin>,
}

impl Running {
    fn spawn(mut cmd: Command, args: &[&str], open_stdin: bool) -> Self {
        cmd.stdin(if open_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let stderr = Some(drain(child.stderr.take()));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            child,
            args: args.iter().map(|a| a.to_string()).collect(),
            lines,
            seen: String::new(),
            stderr,
            _stdin: stdin,
        }
    }

    /// The next stdout line matching `pred` (lines before it are kept for [`finish`]).
    #[track_caller]
    fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let left = LIMIT.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "sluice {:?}: no such line; stdout so far:\n{}",
                    self.args, self.seen
                ),
            }
        }
    }

    /// Ctrl-C, as the terminal sends it: SIGINT to the process.
    fn interrupt(&self) {
        let ok = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -INT failed");
    }

    fn finish(mut self) -> Out {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let code = wait(&mut self.child, &args);
        // The reader thread ends at the end of stdout.
        while let Ok(line) = self.lines.recv_timeout(LIMIT) {
            self.seen.push_str(&line);
        }
        Out {
            code,
            stdout: std::mem::take(&mut self.seen),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An address where nothing listens.
fn dead_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn seqs(evs: &[Value]) -> Vec<u64> {
    evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

// ---- the tests ----

#[tokio::test]
async fn run_follow_json_prints_exactly_the_runs_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out = s
        .cli(&[
            "run",
            "ticker",
            r#"{"n":50,"delay_ms":2}"#,
            "--follow",
            "--json",
        ])
        .expect(0);
    let id = out.run_id();
    // Byte for byte what the server's log holds, and nothing else.
    assert_eq!(out.stdout, s.ndjson(&id, 0).await);
    let evs = out.json_lines();
    assert_eq!(seqs(&evs), (1..=54).collect::<Vec<_>>());
    assert_eq!(evs[0]["type"], "chain-started");
    assert_eq!(evs[53]["type"], "chain-completed");
    assert_eq!(evs[53]["data"]["result"], json!({"count": 50}));
    assert!(evs.iter().all(|e| e["run_id"] == id.as_str()));

    // A failed run: exit 1, the error is the last envelope.
    let out = s
        .cli(&[
            "run",
            "ticker",
            r#"{"n":10,"fail_at":3}"#,
            "--follow",
            "--json",
        ])
        .expect(1);
    let evs = out.json_lines();
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "chain-error");
    assert_eq!(out.stdout, s.ndjson(&out.run_id(), 0).await);
}

#[tokio::test]
async fn run_follow_shows_the_run_for_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out = s
        .cli(&["run", "ticker", r#"{"n":50,"delay_ms":2}"#, "--follow"])
        .expect(0);
    assert!(!out.stdout.contains('\x1b'), "no colours off a terminal");
    let lines = out.lines();
    assert!(lines[0].starts_with("▶ ticker run_"), "{}", out.stdout);
    assert_eq!(lines[1], "  ▸ tick");
    let ticks: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("  · tick "))
        .collect();
    assert_eq!(ticks.len(), 50, "{}", out.stdout);
    for (i, t) in ticks.iter().enumerate() {
        assert!(t.starts_with(&format!("  · tick {{\"i\":{i},")), "{t}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("  ✓ tick ")),
        "{}",
        out.stdout
    );
    let last = lines.last().unwrap();
    assert!(last.starts_with("✓ completed in "), "{last}");
    assert!(last.ends_with(" · result: {\"count\":50}"), "{last}");

    // A failure shows the error and exits 1.
    let out = s
        .cli(&["run", "ticker", r#"{"n":10,"fail_at":3}"#, "--follow"])
        .expect(1);
    let last = *out.lines().last().unwrap();
    assert!(last.starts_with("✗ failed after "), "{last}");
    assert!(last.contains("failed at tick 3 as asked"), "{last}");
    assert_eq!(
        out.lines()
            .iter()
            .filter(|l| l.starts_with("  · tick"))
            .count(),
        3
    );

    // Without --follow: the run id on stdout, how to follow it on stderr.
    let out = s.cli(&["run", "ticker", r#"{"n":1}"#]).expect(0);
    let id = out.stdout.trim();
    assert!(id.starts_with("run_") && out.lines().len() == 1, "{out:?}");
    assert!(out.stderr.contains(&format!("sluice tail {id}")), "{out:?}");
    let out = s.cli(&["run", "ticker", r#"{"n":1}"#, "--json"]).expect(0);
    let rec: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(rec["workflow"], "ticker");
}

#[tokio::test]
async fn a_run_cancelled_by_another_process_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let long = r#"{"n":100000,"delay_ms":5}"#;

    let mut f = s.spawn(&["run", "ticker", long, "--follow"]);
    let id = run_id_in(&f.wait_line(|l| l.starts_with("▶ ticker ")));
    f.wait_line(|l| l.starts_with("  · tick "));
    let c = s.cli(&["cancel", &id]).expect(0);
    assert!(c.stdout.starts_with("cancel"), "{c:?}");
    assert!(c.stdout.contains(&id), "{c:?}");
    let out = f.finish().expect(130);
    let last = *out.lines().last().unwrap();
    assert!(last.starts_with("■ cancelled"), "{last}");

    // --json, with a reason.
    let mut f = s.spawn(&["run", "ticker", long, "--follow", "--json"]);
    let id = run_id_in(&f.wait_line(|l| l.contains("\"type\":\"tick\"")));
    s.cli(&["cancel", &id, "--reason", "enough"]).expect(0);
    let out = f.finish().expect(130);
    let evs = out.json_lines();
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "chain-cancelled");
    assert_eq!(last["data"]["reason"], "enough");
    assert_eq!(out.stdout, s.ndjson(&id, 0).await);
}

#[tokio::test]
async fn ask_human_answered_on_stdin_or_by_send() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());

    // The human view prompts; the answer comes from stdin.
    let out = s
        .cli_with_stdin(
            &["run", "ask-human", r#"{"prompt":"Deploy?"}"#, "--follow"],
            Some("yes\n"),
        )
        .expect(0);
    let lines = out.lines();
    assert!(lines.contains(&"  ? Deploy?"), "{}", out.stdout);
    assert!(lines.contains(&"  > yes"), "{}", out.stdout);
    assert!(lines.contains(&"  ↳ sent \"yes\""), "{}", out.stdout);
    assert!(
        lines
            .last()
            .unwrap()
            .ends_with("result: {\"answer\":\"yes\"}"),
        "{}",
        out.stdout
    );
    let rec = s.record(&out.run_id()).await;
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["result"], json!({"answer": "yes"}));

    // A typed answer that is JSON is sent as JSON.
    let out = s
        .cli_with_stdin(&["run", "ask-human", "--follow"], Some("{\"ok\": true}\n"))
        .expect(0);
    let rec = s.record(&out.run_id()).await;
    assert_eq!(rec["result"], json!({"answer": {"ok": true}}));

    // --json does not prompt: another process answers with `sluice send`.
    let mut f = s.spawn(&["run", "ask-human", "--follow", "--json"]);
    let id = run_id_in(&f.wait_line(|l| l.contains("\"type\":\"input-requested\"")));
    s.until_status(&id, "waiting").await;
    let sent = s.cli(&["send", &id, "input", r#""yes""#]).expect(0);
    assert_eq!(sent.stdout, format!("sent input to {id}\n"));
    let out = f.finish().expect(0);
    assert_eq!(out.stdout, s.ndjson(&id, 0).await);
    let evs = out.json_lines();
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "chain-completed");
    assert_eq!(last["data"]["result"], json!({"answer": "yes"}));

    // The run has ended: send and cancel are refused (exit 2) and say why.
    let again = s.cli(&["send", &id, "input", r#""no""#]).expect(2);
    assert!(again.stdout.is_empty());
    assert!(again.stderr.contains("already completed"), "{again:?}");
    let cancel = s.cli(&["cancel", &id]).expect(2);
    assert!(cancel.stderr.contains("already completed"), "{cancel:?}");
    // A run that is not waiting for input: refused too.
    let running = s
        .cli(&["run", "ticker", r#"{"n":100000,"delay_ms":5}"#])
        .expect(0);
    let busy = s
        .cli(&["send", running.stdout.trim(), "input", "1"])
        .expect(2);
    assert!(busy.stderr.contains("HTTP 422"), "{busy:?}");
}

#[tokio::test]
async fn tail_from_a_cursor_live_and_after_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let done = s
        .cli(&["run", "ticker", r#"{"n":5}"#, "--follow", "--json"])
        .expect(0);
    let id = done.run_id();
    assert_eq!(done.json_lines().len(), 9);

    // Exactly the events with seq > 3.
    let out = s.cli(&["tail", &id, "--after", "3", "--json"]).expect(0);
    assert_eq!(seqs(&out.json_lines()), [4, 5, 6, 7, 8, 9]);
    assert_eq!(out.stdout, s.ndjson(&id, 3).await);
    let tail: String = done
        .stdout
        .lines()
        .skip(3)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(out.stdout, tail);

    // A finished run, from the start, for a person.
    let out = s.cli(&["tail", &id]).expect(0);
    assert!(out.lines()[0].starts_with("▶ ticker "), "{out:?}");
    assert!(out.lines().last().unwrap().starts_with("✓ completed"));
    // Nothing after the end: the run's status.
    let out = s.cli(&["tail", &id, "--after", "9"]).expect(0);
    assert_eq!(
        out.stdout,
        format!("run {id} is completed (no events after seq 9)\n")
    );
    let out = s.cli(&["tail", &id, "--after", "9", "--json"]).expect(0);
    assert_eq!(out.stdout, "");

    // The exit code is the run's outcome.
    let failed = s
        .cli(&[
            "run",
            "ticker",
            r#"{"n":5,"fail_at":0}"#,
            "--follow",
            "--json",
        ])
        .expect(1);
    s.cli(&["tail", &failed.run_id(), "--json"]).expect(1);
    let waiting = s.cli(&["run", "ask-human"]).expect(0);
    let waiting = waiting.stdout.trim();
    s.until_status(waiting, "waiting").await;
    // Past its request, a tail of a waiting run would show nothing: it says why.
    let last = s.record(waiting).await["last_seq"].to_string();
    let f = s.spawn(&["tail", waiting, "--after", &last]);
    std::thread::sleep(Duration::from_millis(800));
    f.interrupt();
    let out = f.finish().expect(130);
    assert!(
        out.stderr
            .contains(&format!("run {waiting} waits for input")),
        "{}",
        out.stderr
    );
    s.cli(&["cancel", waiting]).expect(0);
    s.until_status(waiting, "cancelled").await;
    s.cli(&["tail", waiting]).expect(130);

    // A live run started elsewhere.
    let started = s
        .cli(&["run", "ticker", r#"{"n":30,"delay_ms":10}"#])
        .expect(0);
    let live = started.stdout.trim();
    let out = s.cli(&["tail", live, "--json"]).expect(0);
    assert_eq!(seqs(&out.json_lines()), (1..=34).collect::<Vec<_>>());
    assert_eq!(out.stdout, s.ndjson(live, 0).await);
}

#[tokio::test]
async fn unknown_ids_refusals_and_bad_input_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    for args in [
        vec!["tail", "run_nope"],
        vec!["tail", "run_nope", "--json"],
        vec!["send", "run_nope", "input", "1"],
        vec!["cancel", "run_nope"],
    ] {
        let out = s.cli(&args).expect(2);
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("run \"run_nope\" not found"),
            "{args:?}: {out:?}"
        );
        assert!(out.stderr.contains("sluice runs"), "{args:?}: {out:?}");
    }
    for args in [
        vec!["run", "nope"],
        vec!["run", "nope", "--follow"],
        vec!["run", "nope", "--follow", "--json"],
    ] {
        let out = s.cli(&args).expect(2);
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("workflow \"nope\" not found"),
            "{out:?}"
        );
        assert!(out.stderr.contains("`sluice workflows`"), "{out:?}");
    }
    // Input the workflow refuses (422): the field is named.
    let out = s
        .cli(&["run", "ticker", r#"{"n":"x"}"#, "--follow"])
        .expect(2);
    assert!(out.stderr.contains("input.n"), "{out:?}");
    // Not JSON at all: nothing is sent.
    let out = s.cli(&["run", "ticker", "{n: 1}", "--follow"]).expect(2);
    assert!(
        out.stderr.contains("INPUT_JSON is not valid JSON"),
        "{out:?}"
    );
    let out = s.cli(&["send", "run_x", "input", "yes"]).expect(2);
    assert!(
        out.stderr.contains("DATA_JSON is not valid JSON"),
        "{out:?}"
    );
    let list = s.cli(&["runs", "--json"]).expect(0);
    assert_eq!(
        serde_json::from_str::<Value>(&list.stdout).unwrap()["runs"],
        json!([])
    );
    // Usage errors (clap).
    s.cli(&["send", "run_x"]).expect(2);
    s.cli(&["runs", "--status", "sleeping"]).expect(2);
    s.cli(&["tail", "run_x", "--after", "-1"]).expect(2);
}

#[tokio::test]
async fn a_dead_server_or_a_bad_url_exits_2() {
    let dead = dead_address();
    for args in [
        vec!["runs"],
        vec!["workflows"],
        vec!["run", "ticker", r#"{"n":1}"#],
        vec!["run", "ticker", r#"{"n":1}"#, "--follow"],
        vec!["tail", "run_x", "--json"],
        vec!["send", "run_x", "input", "1"],
        vec!["cancel", "run_x"],
    ] {
        let mut cmd = cli_command(&dead, &args);
        let out = finish(cmd.stdin(Stdio::null()).spawn().unwrap(), &args).expect(2);
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert!(out.stderr.contains("cannot connect"), "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains(&format!("is `sluice serve` running at {dead}?")),
            "{args:?}: {out:?}"
        );
    }
    let args = ["--server", "ftp://example.invalid", "runs"];
    let out = finish(cli_command(&dead, &args).spawn().unwrap(), &args).expect(2);
    assert!(
        out.stderr.contains("--server ftp://example.invalid"),
        "{out:?}"
    );
}

#[tokio::test]
async fn runs_and_workflows() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let out = s.cli(&["runs"]).expect(0);
    assert!(out.stdout.starts_with("no runs yet"), "{out:?}");

    let mut ids = Vec::new();
    for input in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3,"fail_at":1}"#] {
        let out = s.cli(&["run", "ticker", input, "--follow", "--json"]);
        ids.push(out.run_id());
    }
    let waiting = s
        .cli(&["run", "ask-human"])
        .expect(0)
        .stdout
        .trim()
        .to_owned();
    s.until_status(&waiting, "waiting").await;
    ids.push(waiting.clone());
    ids.reverse(); // newest first

    // Human: a table with every run.
    let out = s.cli(&["runs"]).expect(0);
    let lines = out.lines();
    assert!(lines[0].starts_with("RUN "), "{}", out.stdout);
    for w in ["WORKFLOW", "STATUS", "EVENTS", "CREATED (UTC)"] {
        assert!(lines[0].contains(w), "{}", lines[0]);
    }
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    for (line, id) in lines[1..].iter().zip(&ids) {
        assert!(line.starts_with(id.as_str()), "{line}");
    }
    assert!(lines[1].contains(" waiting "), "{}", lines[1]);
    assert!(lines[2].contains(" failed "), "{}", lines[2]);
    assert!(lines[3].contains(" completed "), "{}", lines[3]);

    // --json: the page, next_cursor included.
    let page = |args: &[&str]| -> Value {
        let out = s.cli(args).expect(0);
        assert_eq!(out.lines().len(), 1, "one line: {out:?}");
        serde_json::from_str(&out.stdout).unwrap()
    };
    let ids_of = |page: &Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = page(&["runs", "--json"]);
    assert_eq!(ids_of(&all), ids);
    assert_eq!(all["next_cursor"], Value::Null);
    let first = page(&["runs", "--limit", "3", "--json"]);
    assert_eq!(ids_of(&first), ids[..3]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next_cursor")
        .to_owned();
    let second = page(&["runs", "--limit", "3", "--cursor", &cursor, "--json"]);
    assert_eq!(ids_of(&second), ids[3..]);
    let out = s.cli(&["runs", "--limit", "3"]).expect(0);
    assert_eq!(
        *out.lines().last().unwrap(),
        format!("more: sluice runs --limit 3 --cursor {cursor}")
    );
    // Filters.
    assert_eq!(
        ids_of(&page(&["runs", "--workflow", "ask-human", "--json"])),
        [waiting]
    );
    assert_eq!(
        ids_of(&page(&["runs", "--status", "failed", "--json"])),
        [ids[1].clone()]
    );
    assert_eq!(
        ids_of(&page(&["runs", "--status", "completed,failed", "--json"])),
        ids[1..]
    );
    let session = s.post("/v1/sessions", json!({})).await;
    let session = session["id"].as_str().unwrap();
    let in_session = s
        .cli(&["run", "ticker", r#"{"n":1}"#, "--session", session])
        .expect(0);
    assert_eq!(
        ids_of(&page(&["runs", "--session", session, "--json"])),
        [in_session.stdout.trim().to_owned()]
    );
    let out = s.cli(&["runs", "--workflow", "nope"]).expect(0);
    assert_eq!(out.stdout, "no runs match\n");

    // Workflows: no provider configured, so the view says how to add an agent.
    let out = s.cli(&["workflows"]).expect(0);
    let lines = out.lines();
    assert!(lines[0].starts_with("NAME "), "{}", out.stdout);
    assert!(
        lines[1].starts_with("ask-human  ask-human  "),
        "{}",
        out.stdout
    );
    assert!(
        lines[2].starts_with("ticker     ticker     "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("no agent is configured"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("OPENAI_API_KEY"), "{}", out.stdout);
    let out = s.cli(&["workflows", "--json"]).expect(0);
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ask-human", "ticker"]);
}

#[tokio::test]
async fn workflows_with_a_provider_lists_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing is called at startup; the address only has to be set.
    let s = Server::start_at(
        dir.path(),
        "127.0.0.1:0",
        &[("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")],
    );
    let out = s.cli(&["workflows"]).expect(0);
    assert!(
        out.lines()
            .iter()
            .any(|l| l.starts_with("assistant  agent")),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("no agent is configured"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn a_closed_stdout_is_a_quiet_exit() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let done = s.cli(&["run", "ticker", r#"{"n":3}"#]).expect(0);
    let id = done.stdout.trim().to_owned();
    s.until_status(&id, "completed").await;
    let commands: Vec<Vec<&str>> = vec![
        vec!["runs"],
        vec!["runs", "--json"],
        vec!["workflows"],
        vec!["workflows", "--json"],
        vec!["run", "ticker", r#"{"n":3}"#],
        vec!["run", "ticker", r#"{"n":2000}"#, "--follow"],
        vec!["run", "ticker", r#"{"n":2000}"#, "--follow", "--json"],
        vec!["tail", &id],
        vec!["tail", &id, "--json"],
    ];
    for args in &commands {
        let mut child = cli_command(&s.base, args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // The reader goes away before the command writes anything: every write fails with
        // EPIPE (as with `sluice runs | head -1` once head has exited).
        drop(child.stdout.take());
        let out = finish(child, args).expect(0);
        assert!(!out.stderr.contains("Broken pipe"), "{args:?}: {out:?}");
    }
    // With --cancel-on-exit, the run is cancelled when the output goes away.
    let args = [
        "run",
        "ticker",
        r#"{"n":100000,"delay_ms":5}"#,
        "--follow",
        "--json",
        "--cancel-on-exit",
    ];
    let mut child = cli_command(&s.base, &args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = finish(child, &args).expect(0);
    let id = out
        .stderr
        .split_whitespace()
        .find(|w| w.starts_with("run_"))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(
        out.stderr.contains(&format!("cancelled run {id}")),
        "{out:?}"
    );
    s.until_status(id, "cancelled").await;
}

#[tokio::test]
async fn ctrl_c_leaves_the_run_unless_cancel_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let long = r#"{"n":100000,"delay_ms":5}"#;

    // run --follow: exit 130, the run goes on.
    let mut f = s.spawn(&["run", "ticker", long, "--follow"]);
    let id = run_id_in(&f.wait_line(|l| l.starts_with("▶ ticker ")));
    f.wait_line(|l| l.starts_with("  · tick "));
    f.interrupt();
    let out = f.finish().expect(130);
    assert!(
        out.stderr
            .contains(&format!("interrupted; run {id} continues on the server")),
        "{out:?}"
    );
    let before = s.record(&id).await;
    assert_eq!(before["status"], "running");
    // Still making progress.
    let t0 = Instant::now();
    while s.record(&id).await["last_seq"] == before["last_seq"] {
        assert!(t0.elapsed() < LIMIT, "the run stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // run --follow --json --cancel-on-exit: the run is cancelled.
    let mut f = s.spawn(&[
        "run",
        "ticker",
        long,
        "--follow",
        "--json",
        "--cancel-on-exit",
    ]);
    let id = run_id_in(&f.wait_line(|l| l.contains("\"type\":\"tick\"")));
    f.interrupt();
    let out = f.finish().expect(130);
    assert!(
        out.stderr.contains(&format!("cancelled run {id}")),
        "{out:?}"
    );
    s.until_status(&id, "cancelled").await;

    // tail --cancel-on-exit, on a run started elsewhere.
    let started = s.cli(&["run", "ticker", long]).expect(0);
    let id = started.stdout.trim().to_owned();
    let mut f = s.spawn(&["tail", &id, "--cancel-on-exit"]);
    f.wait_line(|l| l.starts_with("  · tick "));
    f.interrupt();
    f.finish().expect(130);
    s.until_status(&id, "cancelled").await;

    // tail without it: the run goes on.
    let started = s.cli(&["run", "ticker", long]).expect(0);
    let id = started.stdout.trim().to_owned();
    let mut f = s.spawn(&["tail", &id, "--json"]);
    f.wait_line(|l| l.contains("\"type\":\"tick\""));
    f.interrupt();
    f.finish().expect(130);
    assert_eq!(s.record(&id).await["status"], "running");

    // While a prompt waits for stdin: Ctrl-C still ends the command at once.
    let mut f = s.spawn_with_open_stdin(&["run", "ask-human", "--follow"]);
    let id = run_id_in(&f.wait_line(|l| l.starts_with("▶ ask-human ")));
    f.wait_line(|l| l.contains("? What is your answer?"));
    s.until_status(&id, "waiting").await;
    f.interrupt();
    let out = f.finish().expect(130);
    assert!(out.stderr.contains("continues on the server"), "{out:?}");
    assert_eq!(s.record(&id).await["status"], "waiting");
}

#[tokio::test]
async fn ctrl_c_while_the_run_is_starting_exits_130() {
    // A server that accepts the connection and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", hang.local_addr().unwrap());
    let args = ["run", "ticker", r#"{"n":1}"#, "--follow"];
    let f = Running::spawn(cli_command(&base, &args), &args, false);
    // Once it has connected, the start request is on its way (and Ctrl-C is being listened
    // for: that starts before the request).
    let (_conn, _) = hang.accept().unwrap();
    f.interrupt();
    let out = f.finish().expect(130);
    assert!(
        out.stderr
            .contains("interrupted while starting a run of ticker; it may have started"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_follow_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let addr = s.addr;
    let mut f = s.spawn(&[
        "run",
        "ticker",
        r#"{"n":40,"delay_ms":50}"#,
        "--follow",
        "--json",
    ]);
    let id = run_id_in(&f.wait_line(|l| l.contains("\"i\":3,")));
    // kill -9, and back on the same port after a while (long enough to be noticed).
    s.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let s = Server::start_at(dir.path(), &addr.to_string(), &[]);
    let out = f.finish().expect(0);
    assert_eq!(out.stdout, s.ndjson(&id, 0).await, "every event once");
    // Meanwhile it said what was going on (on stderr: stdout holds the envelopes only).
    let lost = out
        .stderr
        .find("connection to the server lost: reconnecting…")
        .unwrap_or_else(|| panic!("no note of the lost connection: {}", out.stderr));
    assert!(
        out.stderr[lost..].contains("reconnected: nothing missed"),
        "{}",
        out.stderr
    );
    let evs = out.json_lines();
    assert!(
        evs.iter().any(|e| e["type"] == "chain-resumed"),
        "{}",
        out.stdout
    );
    assert_eq!(evs.last().unwrap()["type"], "chain-completed");
}

/// A scripted HTTP server: `answer` gets each request's head and gives the whole response, or
/// `None` to hold the connection open without answering. One thread per connection.
fn script_server(answer: fn(&str) -> Option<String>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                match answer(&String::from_utf8_lossy(&head)) {
                    Some(response) => {
                        let _ = conn.write_all(response.as_bytes());
                    }
                    None => std::thread::sleep(Duration::from_secs(60)),
                }
            });
        }
    });
    base
}

/// A complete HTTP/1.1 response.
fn http_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Cancels of `run_gap` seen by [`gap_server`].
static GAP_CANCELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A server for one run, `run_gap`: its event stream skips from seq 1 to 3; a cancel is
/// answered `202` and counted in [`GAP_CANCELS`].
fn gap_server() -> String {
    script_server(|head| {
        let event = |seq: u64, ty: &str| {
            format!(
                "id: {seq}\nevent: {ty}\ndata: {{\"seq\":{seq},\"run_id\":\"run_gap\",\"type\":\"{ty}\",\"ts\":\"2026-01-01T00:00:00.000000Z\",\"data\":{{}}}}\n\n"
            )
        };
        Some(if head.starts_with("POST /v1/runs/run_gap/cancel") {
            GAP_CANCELS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            http_response("202 Accepted", "application/json", "{}")
        } else if head.starts_with("GET /v1/runs/run_gap/events") {
            let body = format!("{}{}", event(1, "chain-started"), event(3, "tick"));
            http_response("200 OK", "text/event-stream", &body)
        } else {
            http_response(
                "404 Not Found",
                "application/json",
                r#"{"error":{"code":"not_found","message":"no"}}"#,
            )
        })
    })
}

#[test]
fn cancel_on_exit_cancels_when_the_stream_breaks_for_good() {
    use std::sync::atomic::Ordering;
    let base = gap_server();
    let cancels = &GAP_CANCELS;
    for args in [
        &["tail", "run_gap", "--cancel-on-exit"][..],
        &["tail", "run_gap", "--json", "--cancel-on-exit"][..],
    ] {
        let before = cancels.load(Ordering::SeqCst);
        let out = finish(cli_command(&base, args).spawn().unwrap(), args).expect(2);
        assert!(out.stderr.contains("from seq 1 to 3"), "{out:?}");
        assert_eq!(cancels.load(Ordering::SeqCst), before + 1, "{out:?}");
    }
    // Without the flag, the run is left alone.
    let args = ["tail", "run_gap", "--json"];
    let before = cancels.load(Ordering::SeqCst);
    finish(cli_command(&base, &args).spawn().unwrap(), &args).expect(2);
    assert_eq!(cancels.load(Ordering::SeqCst), before);
}

#[test]
fn ctrl_c_while_the_end_of_a_stream_is_checked_exits_130() {
    // The stream ends with 204 (nothing after the cursor); the run's record then never comes.
    let base = script_server(|head| {
        head.starts_with("GET /v1/runs/run_quiet/events")
            .then(|| "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".to_owned())
    });
    let args = ["tail", "run_quiet", "--json"];
    let f = Running::spawn(cli_command(&base, &args), &args, false);
    // Give it time to reach the record request (the interrupt is listened for before the
    // stream opens, so an earlier Ctrl-C ends it with 130 too).
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    f.interrupt();
    f.finish().expect(130);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_missing_key_and_a_refused_key_get_different_hints() {
    let dir = tempfile::tempdir().unwrap();
    let key = "cli-key-0123456789abcdef";
    let keys = format!("[\"{key}\"]");
    let s = Server::start_at(
        dir.path(),
        "127.0.0.1:0",
        &[("SLUICE_SERVER__API_KEYS", keys.as_str())],
    );
    let out = s.cli(&["workflows"]).expect(2);
    assert!(
        out.stderr
            .contains("the server wants an API key: set --api-key or SLUICE_API_KEY"),
        "{}",
        out.stderr
    );
    let out = s
        .cli(&["--api-key", "not-the-key-0123456789", "workflows"])
        .expect(2);
    assert!(
        out.stderr.contains("the server refused the API key given"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("wants an API key"), "{}", out.stderr);
    s.cli(&["--api-key", key, "workflows"]).expect(0);
}

#[tokio::test]
async fn run_queues_in_a_busy_session_with_enqueue_and_replays_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let session = s.post("/v1/sessions", json!({})).await;
    let session = session["id"].as_str().unwrap();
    let busy = s
        .cli(&[
            "run",
            "ticker",
            r#"{"n":40,"delay_ms":20}"#,
            "--session",
            session,
        ])
        .expect(0);
    let busy = busy.stdout.trim().to_owned();
    let refused = s
        .cli(&["run", "ticker", r#"{"n":1}"#, "--session", session])
        .expect(2);
    assert!(
        refused
            .stderr
            .contains("`sluice run --enqueue` queues the run behind it"),
        "{}",
        refused.stderr
    );
    let queued = s
        .cli(&[
            "run",
            "ticker",
            r#"{"n":1}"#,
            "--session",
            session,
            "--enqueue",
            "--follow",
            "--json",
        ])
        .expect(0);
    let ahead = s.record(&busy).await;
    let behind = s.record(&queued.run_id()).await;
    assert_eq!(ahead["status"], "completed");
    assert!(behind["started_at"].as_str() >= ahead["finished_at"].as_str());

    let first = s
        .cli(&["run", "ticker", r#"{"n":1}"#, "--idempotency-key", "k-1"])
        .expect(0);
    let again = s
        .cli(&["run", "ticker", r#"{"n":1}"#, "--idempotency-key", "k-1"])
        .expect(0);
    assert_eq!(first.stdout, again.stdout, "the same run");
}
