//! Durability of the real binary on its embedded SQLite store: `kill -9` mid-run and after runs
//! finished, restart on the same data dir, and check what the docs promise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{Server, get_json, ndjson, record, run_ids_of};

async fn post(c: &reqwest::Client, url: String, body: Value) -> Value {
    let r = c.post(url).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

fn assert_contiguous(evs: &[Value]) {
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "contiguous from 1");
    }
    let terminal = ["chain-completed", "chain-error", "chain-cancelled"];
    assert!(terminal.contains(&evs.last().unwrap()["type"].as_str().unwrap()));
}

async fn until(c: &reqwest::Client, s: &Server, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1000 {
        let rec = record(c, s, id).await;
        if pred(&rec) {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {id} never reached the expected state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_finished_logs_resumes_running_runs_and_waiting_runs_wait() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let first = Server::on_data_dir(dir.path());

    let done = post(
        &c,
        first.url("/v1/workflows/ticker/runs?wait=true"),
        json!({"input": {"n": 200}}),
    )
    .await;
    let done_id = done["id"].as_str().unwrap().to_owned();
    assert_eq!(done["status"], "completed");
    let (done_log, done_events) = ndjson(&c, &first, &done_id).await;
    assert_eq!(done_events.len(), 204);

    let waiting = post(
        &c,
        first.url("/v1/workflows/ask-human/runs"),
        json!({"input": {"prompt": "still there?"}}),
    )
    .await;
    let waiting_id = waiting["id"].as_str().unwrap().to_owned();
    until(&c, &first, &waiting_id, |r| r["status"] == "waiting").await;

    let running = post(
        &c,
        first.url("/v1/workflows/ticker/runs"),
        json!({"input": {"n": 150, "delay_ms": 10}}),
    )
    .await;
    let running_id = running["id"].as_str().unwrap().to_owned();
    until(&c, &first, &running_id, |r| {
        r["last_seq"].as_u64().unwrap_or(0) >= 30
    })
    .await;

    first.kill9();
    let second = Server::on_data_dir(dir.path());

    // The finished run: byte for byte the same log, same record.
    let (log_after, _) = ndjson(&c, &second, &done_id).await;
    assert_eq!(log_after, done_log);
    assert_eq!(
        record(&c, &second, &done_id).await["result"],
        json!({"count": 200})
    );

    // The interrupted run resumed from its last checkpoint and completed, its log contiguous.
    let (_, evs) = ndjson(&c, &second, &running_id).await;
    assert_contiguous(&evs);
    let types: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"chain-resumed"), "{types:?}");
    assert_eq!(types.last(), Some(&"chain-completed"));
    let rec = record(&c, &second, &running_id).await;
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["last_seq"], evs.len() as u64);

    // The waiting run is still waiting and completes when its input arrives.
    assert_eq!(record(&c, &second, &waiting_id).await["status"], "waiting");
    let r = c
        .post(second.url(&format!("/v1/runs/{waiting_id}/events")))
        .json(&json!({"type": "input", "data": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (_, evs) = ndjson(&c, &second, &waiting_id).await;
    assert_contiguous(&evs);
    let rec = record(&c, &second, &waiting_id).await;
    assert_eq!(rec["result"], json!({"answer": "yes"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_heavy_appends_leaves_every_log_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let first = Server::on_data_dir(dir.path());
    let mut ids = Vec::new();
    for _ in 0..8 {
        let r = post(
            &c,
            first.url("/v1/workflows/ticker/runs"),
            json!({"input": {"n": 20000}}),
        )
        .await;
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    until(&c, &first, &ids[7], |r| {
        r["last_seq"].as_u64().unwrap_or(0) >= 100
    })
    .await;
    first.kill9();
    let second = Server::on_data_dir(dir.path());
    for id in &ids {
        let (_, evs) = ndjson(&c, &second, id).await;
        assert_contiguous(&evs);
        let rec = record(&c, &second, id).await;
        assert!(
            ["completed", "failed"].contains(&rec["status"].as_str().unwrap()),
            "{rec}"
        );
        if rec["status"] == "failed" {
            assert_eq!(rec["error"]["code"], "interrupted");
        }
    }
}

/// `POST /v1/workflows/{workflow}/runs` with an `Idempotency-Key`: the status and the body.
async fn create_keyed(
    c: &reqwest::Client,
    s: &Server,
    workflow: &str,
    key: &str,
    body: &str,
) -> (u16, Value) {
    let r = c
        .post(s.url(&format!("/v1/workflows/{workflow}/runs")))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The ids of every run of `workflow`.
async fn run_ids(c: &reqwest::Client, s: &Server, workflow: &str) -> Vec<String> {
    let path = format!("/v1/runs?workflow={workflow}&limit=1000");
    run_ids_of(&get_json(c, s, &path).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_answers_its_first_run_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let first = Server::on_data_dir(dir.path());
    let body = r#"{"input": {"n": 3, "text_len": 4}, "metadata": {"order": 17}}"#;
    let (status, created) = create_keyed(&c, &first, "ticker", "order-17", body).await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(created.get("idempotency").is_none(), "not shown: {created}");
    // A waiting run's key comes back too.
    let (status, asked) = create_keyed(&c, &first, "ask-human", "ask-1", "").await;
    assert_eq!(status, 202, "{asked}");
    let asked_id = asked["id"].as_str().unwrap().to_owned();
    until(&c, &first, &id, |r| r["status"] == "completed").await;
    until(&c, &first, &asked_id, |r| r["status"] == "waiting").await;
    first.kill9();

    let second = Server::on_data_dir(dir.path());
    // The same key and body (its object keys in another order): the first run, nothing new.
    let same = r#"{"metadata": {"order": 17}, "input": {"text_len": 4, "n": 3}}"#;
    let (status, again) = create_keyed(&c, &second, "ticker", "order-17", same).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["status"], "completed");
    assert_eq!(again["result"], json!({"count": 3}));
    assert!(again.get("idempotency").is_none(), "not shown: {again}");
    assert_eq!(run_ids(&c, &second, "ticker").await, [id.as_str()]);
    let (status, again) = create_keyed(&c, &second, "ask-human", "ask-1", "").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], asked_id.as_str());
    assert_eq!(again["status"], "waiting");
    // The same key with another body is refused, and starts nothing either.
    let other = r#"{"input": {"n": 4, "text_len": 4}, "metadata": {"order": 17}}"#;
    let (status, refused) = create_keyed(&c, &second, "ticker", "order-17", other).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "idempotency_key_reused");
    assert_eq!(run_ids(&c, &second, "ticker").await, [id.as_str()]);
    // A new key starts a new run, and that key too survives the next restart (a graceful
    // one this time).
    let (status, fresh) = create_keyed(&c, &second, "ticker", "order-18", other).await;
    assert_eq!(status, 202, "{fresh}");
    let fresh_id = fresh["id"].as_str().unwrap().to_owned();
    assert_ne!(fresh_id, id);
    until(&c, &second, &fresh_id, |r| r["status"] == "completed").await;
    second.stop();

    let third = Server::on_data_dir(dir.path());
    let (status, again) = create_keyed(&c, &third, "ticker", "order-18", other).await;
    assert_eq!(
        (status, again["id"].as_str()),
        (200, Some(fresh_id.as_str()))
    );
    let (status, again) = create_keyed(&c, &third, "ticker", "order-17", same).await;
    assert_eq!((status, again["id"].as_str()), (200, Some(id.as_str())));
    let mut ids = run_ids(&c, &third, "ticker").await;
    ids.sort();
    let mut expected = vec![id, fresh_id];
    expected.sort();
    assert_eq!(ids, expected);
}

/// A second server on a data directory in use refuses to start, with a message that says why,
/// and the first keeps its runs; once the first is gone (even by `kill -9`) the directory opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let s = Server::on_data_dir(dir.path());
    let rec = post(
        &c,
        s.url("/v1/workflows/ticker/runs?wait=true"),
        json!({"input": {"n": 5}}),
    )
    .await;
    let id = rec["id"].as_str().unwrap().to_owned();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SLUICE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must give up on its own (the lock is waited for 2 s); one that serves is stopped.
    let mut ended = None;
    for _ in 0..300 {
        ended = second.try_wait().unwrap();
        if ended.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if ended.is_none() {
        second.kill().unwrap();
    }
    let out = second.wait_with_output().unwrap();
    assert!(
        ended.is_some_and(|s| !s.success()),
        "the second server started: {ended:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another process")
            && stderr.contains("one server per data directory")
            && !stderr.contains("would block"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "it printed: {:?}", out.stdout);
    assert_eq!(record(&c, &s, &id).await["status"], "completed");
    s.kill9();
    let s = Server::on_data_dir(dir.path());
    assert_eq!(record(&c, &s, &id).await["status"], "completed");
    s.stop();
}

/// A second SIGTERM (or Ctrl-C) during the drain exits at once, as if killed: nothing the
/// runs wrote is lost, and the next start takes the running run up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_the_drain_exits_at_once_and_loses_nothing() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let d = dir.path().to_str().unwrap();
    let mut s = Server::start(
        &["--listen", "127.0.0.1:0", "--data-dir", d],
        &[
            ("SLUICE_SERVER__SHUTDOWN_GRACE", "60s"),
            ("SLUICE_SERVER__BODY_TIMEOUT", "60s"),
        ],
    );
    let rec = post(
        &c,
        s.url("/v1/workflows/ticker/runs"),
        json!({"input": {"n": 40, "delay_ms": 25}}),
    )
    .await;
    let id = rec["id"].as_str().unwrap().to_owned();
    until(&c, &s, &id, |r| r["last_seq"].as_u64() > Some(5)).await;
    // A request whose body is still on its way keeps the drain going for its grace period.
    let addr = s.url("").trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(
        b"POST /v1/workflows/ticker/runs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    s.signal("-TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.exited().is_none(),
        "the first signal drains, it does not exit"
    );
    s.signal("-TERM");
    let status = loop {
        if let Some(status) = s.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still draining after the second signal"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(143));
    drop(slow);

    let s = Server::on_data_dir(dir.path());
    let done = until(&c, &s, &id, |r| r["status"] != "running").await;
    assert_eq!(done["status"], "completed", "{done}");
    let (_, evs) = ndjson(&c, &s, &id).await;
    assert_contiguous(&evs);
    assert_eq!(done["result"], json!({"count": 40}));
    s.stop();
}

/// A log reader that goes away (stderr a closed pipe) stops nothing: the retention sweeper
/// goes on sweeping (and logging), and SIGTERM still shuts the server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_stops_neither_the_sweeper_nor_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let d = dir.path().to_str().unwrap();
    let mut s = Server::start_with_stderr(
        &["--listen", "127.0.0.1:0", "--data-dir", d],
        &[
            ("SLUICE_LOG", "info"),
            ("SLUICE_SERVER__RETENTION", "1s"),
            ("SLUICE_SERVER__SWEEP_INTERVAL", "1s"),
        ],
        std::process::Stdio::piped(),
    );
    s.close_stderr();
    // Each run is swept (and its sweep logged) in turn: the sweeper outlives a failed write.
    for _ in 0..2 {
        let rec = post(
            &c,
            s.url("/v1/workflows/ticker/runs?wait=true"),
            json!({"input": {"n": 1}}),
        )
        .await;
        let id = rec["id"].as_str().unwrap();
        let mut gone = false;
        for _ in 0..100 {
            let r = c
                .get(s.url(&format!("/v1/runs/{id}")))
                .send()
                .await
                .unwrap();
            if r.status() == 404 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "run {id} was never swept");
    }
    s.stop();
}
