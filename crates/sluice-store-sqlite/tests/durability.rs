//! What the SQLite store adds to the conformance suite: data outlives the store, and commands
//! grouped into one transaction succeed or fail on their own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use sluice_protocol::{RawEvent, RunRecord, RunStatus, SessionRecord, Timestamp, kind};
use sluice_store::{Error, RunFilter, Store};
use sluice_store_sqlite::{SqliteOptions, SqliteStore};

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, SqliteOptions::default()).unwrap()
}

/// With small appends journaled by the caller's task instead of the writer thread.
fn open_inline(path: &Path) -> SqliteStore {
    let options = SqliteOptions {
        inline_appends: true,
        ..SqliteOptions::default()
    };
    SqliteStore::open(path, options).unwrap()
}

fn ev(run: &str, seq: u64, data: &str) -> RawEvent {
    RawEvent::encode(seq, run, kind::TEXT_DELTA, Timestamp::now(), Some(1), data)
}

/// Events in the database's log (rows of `batches`, each `first..=last`).
fn logged(conn: &rusqlite::Connection) -> i64 {
    conn.query_row(
        "SELECT coalesce(sum(last - first + 1), 0) FROM batches",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// The seqs of a run's events in the database's log, in order.
fn stored_seqs(conn: &rusqlite::Connection, run: &str) -> Vec<u64> {
    conn.prepare("SELECT first, last FROM batches WHERE run_id = ?1 ORDER BY last")
        .unwrap()
        .query_map([run], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .flat_map(|r| {
            let (first, last) = r.unwrap();
            first as u64..=last as u64
        })
        .collect()
}

async fn new_run(store: &SqliteStore, id: &str) -> RunRecord {
    let mut rec = RunRecord::new(id, "wf", json!({"q": "why?"}));
    rec.status = RunStatus::Running;
    store.create_run(&rec).await.unwrap();
    rec
}

#[tokio::test]
async fn everything_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/sluice.db");
    let store = open(&path);
    let mut done = new_run(&store, "run_done").await;
    let open_run = new_run(&store, "run_open").await;
    let written: Vec<RawEvent> = (1..=100)
        .map(|s| {
            ev(
                "run_done",
                s,
                &serde_json::to_string(&json!({"text": format!("é\"ß {s}\n")})).unwrap(),
            )
        })
        .collect();
    for chunk in written.chunks(7) {
        store.append("run_done", chunk).await.unwrap();
    }
    done.status = RunStatus::Completed;
    done.last_seq = 101;
    done.result = Some(json!({"answer": 42}));
    done.finished_at = Some(Timestamp::now());
    let terminal = RawEvent::encode(
        101,
        "run_done",
        kind::CHAIN_COMPLETED,
        Timestamp::now(),
        None,
        "{}",
    );
    store.finish(&done, &terminal).await.unwrap();
    store
        .append(
            "run_open",
            &[ev("run_open", 1, "1"), ev("run_open", 2, "2")],
        )
        .await
        .unwrap();
    store
        .put_checkpoint("run_open", Bytes::from_static(b"\x00cp\xff"))
        .await
        .unwrap();
    let session = SessionRecord {
        id: "ses_1".into(),
        created_at: Timestamp::now(),
        updated_at: Timestamp::now(),
        state: json!({"messages": ["hi"]}),
        active_run: Some("run_open".into()),
        owner: Some("k1".into()),
    };
    store.create_session(&session).await.unwrap();
    store.close().await.unwrap();

    let store = open(&path);
    let log = store.read("run_done", 0, 1000).await.unwrap();
    assert_eq!(log.len(), 101);
    assert_eq!(log[..100], written[..], "identical bytes, seqs and types");
    assert_eq!(log[100], terminal);
    assert_eq!(store.get_run("run_done").await.unwrap(), Some(done.clone()));
    assert_eq!(store.get_run("run_open").await.unwrap(), Some(open_run));
    assert_eq!(store.last_seq("run_done").await.unwrap(), 101);
    assert_eq!(store.last_seq("run_open").await.unwrap(), 2);
    assert_eq!(
        store.get_checkpoint("run_open").await.unwrap(),
        Some(Bytes::from_static(b"\x00cp\xff"))
    );
    assert_eq!(store.get_session("ses_1").await.unwrap(), Some(session));
    // The writer relearns each log's state from the database.
    let closed = store.append("run_done", &[ev("run_done", 102, "1")]).await;
    assert!(matches!(closed, Err(Error::LogClosed { .. })), "{closed:?}");
    let gap = store.append("run_open", &[ev("run_open", 4, "4")]).await;
    assert!(
        matches!(
            gap,
            Err(Error::SeqConflict {
                expected: 3,
                got: 4,
                ..
            })
        ),
        "{gap:?}"
    );
    store
        .append("run_open", &[ev("run_open", 3, "3")])
        .await
        .unwrap();
    let finished = RunFilter {
        statuses: vec![RunStatus::Completed],
        ..Default::default()
    };
    assert_eq!(store.list_runs(&finished).await.unwrap().runs, [done]);
}

#[tokio::test]
async fn the_inbox_counter_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = open(&path);
    new_run(&store, "run_a").await;
    assert_eq!(
        store.inbox_push("run_a", "input", &json!(1)).await.unwrap(),
        1
    );
    assert_eq!(
        store.inbox_push("run_a", "input", &json!(2)).await.unwrap(),
        2
    );
    store.inbox_ack("run_a", 2).await.unwrap();
    store.close().await.unwrap();

    let store = open(&path);
    assert!(store.inbox_read("run_a").await.unwrap().is_empty());
    assert_eq!(
        store
            .inbox_push("run_a", "tool-results", &json!({"r": []}))
            .await
            .unwrap(),
        3
    );
    let inbox = store.inbox_read("run_a").await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        (inbox[0].id, inbox[0].event_type.as_str(), &inbox[0].data),
        (3, "tool-results", &json!({"r": []}))
    );
}

#[tokio::test]
async fn dropping_the_store_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = open(&path);
    new_run(&store, "run_a").await;
    store.append("run_a", &[ev("run_a", 1, "1")]).await.unwrap();
    drop(store); // no close(): the writer winds down on its own
    let store = open(&path);
    assert_eq!(store.last_seq("run_a").await.unwrap(), 1);
}

#[tokio::test]
async fn one_store_at_a_time_opens_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = open(&path);
    new_run(&store, "run_a").await;
    let second = SqliteStore::open(&path, SqliteOptions::default());
    let err = second
        .expect_err("a second store opened a database in use")
        .to_string();
    assert!(err.contains("in use by another process"), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    // The first is untouched, and once it is closed the database opens again.
    store.append("run_a", &[ev("run_a", 1, "1")]).await.unwrap();
    store.close().await.unwrap();
    let store = open(&path);
    assert_eq!(store.last_seq("run_a").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_append_does_not_fail_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir.path().join("sluice.db")));
    for i in 0..32 {
        new_run(&store, &format!("run_{i:02}")).await;
    }
    // Keep the writer busy so the appends below queue up and commit together.
    new_run(&store, "run_big").await;
    let big: Vec<_> = (1..=20_000).map(|s| ev("run_big", s, "0")).collect();
    let busy = {
        let store = store.clone();
        tokio::spawn(async move { store.append("run_big", &big).await })
    };
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let run = format!("run_{i:02}");
                let first = if i == 13 { 2 } else { 1 }; // run_13 skips seq 1
                let events: Vec<_> = (first..first + 4).map(|s| ev(&run, s, "0")).collect();
                store.append(&run, &events).await
            })
        })
        .collect();
    busy.await.unwrap().unwrap();
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        if i == 13 {
            assert!(
                matches!(
                    outcome,
                    Err(Error::SeqConflict {
                        expected: 1,
                        got: 2,
                        ..
                    })
                ),
                "{outcome:?}"
            );
        } else {
            outcome.unwrap();
        }
    }
    for i in 0..32 {
        let run = format!("run_{i:02}");
        let want = if i == 13 { 0 } else { 4 };
        assert_eq!(store.last_seq(&run).await.unwrap(), want, "{run}");
        assert_eq!(
            store.read(&run, 0, 10).await.unwrap().len() as u64,
            want,
            "{run}"
        );
    }
}

/// Many runs appending an event at a time: their small appends wait in the journal (and in
/// memory), yet every reader at any cursor, and the store reopened after a drop, sees every
/// log whole and contiguous. A deleted run's journaled events do not come back.
#[tokio::test]
async fn small_appends_of_many_runs_are_readable_and_survive_reopening() {
    for opener in [open, open_inline] {
        many_runs(opener).await;
    }
}

async fn many_runs(opener: fn(&Path) -> SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = Arc::new(opener(&path));
    let runs: Vec<String> = (0..40).map(|i| format!("run_{i:02}")).collect();
    for id in &runs {
        new_run(&store, id).await;
    }
    // Each run appends 1..=N one event at a time, interleaved with the others, so most of the
    // events are pending in the journal at any moment.
    const N: u64 = 30;
    for seq in 1..=N {
        let mut appends = Vec::new();
        for id in &runs {
            let store = store.clone();
            let id = id.clone();
            appends.push(tokio::spawn(async move {
                store
                    .append(&id, &[ev(&id, seq, r#"{"text":"tok"}"#)])
                    .await
            }));
        }
        for a in appends {
            a.await.unwrap().unwrap();
        }
        // A reader from the start and one from the middle see a contiguous prefix up to now.
        let first = &runs[0];
        let all = store.read(first, 0, 1000).await.unwrap();
        assert_eq!(
            all.iter().map(RawEvent::seq).collect::<Vec<_>>(),
            (1..=seq).collect::<Vec<_>>()
        );
        let mid = store.read(first, seq / 2, 1000).await.unwrap();
        assert_eq!(
            mid.first().map(RawEvent::seq),
            (seq > seq / 2).then_some(seq / 2 + 1)
        );
    }
    store.delete_run("run_39").await.unwrap();
    let before: Vec<Vec<RawEvent>> = {
        let mut v = Vec::new();
        for id in &runs[..39] {
            v.push(store.read(id, 0, 1000).await.unwrap());
        }
        v
    };
    drop(store);
    let store = open(&path);
    for (id, was) in runs[..39].iter().zip(&before) {
        assert_eq!(store.last_seq(id).await.unwrap(), N, "{id}");
        let now = store.read(id, 0, 1000).await.unwrap();
        assert_eq!(&now, was, "{id}");
        // The log goes on where it was.
        store
            .append(id, &[ev(id, N + 1, r#"{"text":"more"}"#)])
            .await
            .unwrap();
    }
    assert_eq!(store.get_run("run_39").await.unwrap(), None);
    assert!(store.read("run_39", 0, 10).await.unwrap().is_empty());
    store.close().await.unwrap();
    // Closing moved what was journaled: everything is in the clustered log, and the old
    // `journal` table (replayed at open for older stores) is empty.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let journal: i64 = conn
        .query_row("SELECT count(*) FROM journal", [], |r| r.get(0))
        .unwrap();
    let logged = logged(&conn);
    assert_eq!(journal, 0);
    assert_eq!(logged, 39 * (N as i64 + 1));
}

/// A finished run's journaled events reach `events` after its terminal event (moved later, as a
/// due run): meanwhile every read sees the whole log, and after the store closes the table
/// holds all of it.
#[tokio::test]
async fn a_finished_runs_journaled_events_follow_its_terminal_event() {
    for opener in [open, open_inline] {
        finished_run(opener).await;
    }
}

/// `run_a`: five journaled events, then `chain-completed` (seq 6).
async fn five_then_completed(store: &SqliteStore) {
    let mut rec = new_run(store, "run_a").await;
    for seq in 1..=5 {
        store
            .append("run_a", &[ev("run_a", seq, r#"{"text":"t"}"#)])
            .await
            .unwrap();
    }
    complete(store, &mut rec, 6).await;
}

/// Finishes `rec` (`run_a`) with `chain-completed` as event `seq`.
async fn complete(store: &SqliteStore, rec: &mut RunRecord, seq: u64) {
    rec.status = RunStatus::Completed;
    rec.last_seq = seq;
    rec.finished_at = Some(Timestamp::now());
    let terminal = RawEvent::encode(
        seq,
        "run_a",
        kind::CHAIN_COMPLETED,
        Timestamp::now(),
        None,
        "{}",
    );
    store.finish(rec, &terminal).await.unwrap();
}

async fn finished_run(opener: fn(&Path) -> SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = opener(&path);
    five_then_completed(&store).await;
    let all = store.read("run_a", 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(RawEvent::seq).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(store.read("run_a", 3, 100).await.unwrap().len(), 3);
    assert_eq!(store.last_seq("run_a").await.unwrap(), 6);
    store.close().await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(stored_seqs(&conn, "run_a"), (1..=6).collect::<Vec<_>>());
}

/// The process dies with appends only in the journal (the store is never closed, so nothing
/// moves them): opening the database again finds every acknowledged event, in order. The
/// process that dies is this test binary again, run for `write_and_die` (a store in this
/// process would hold the database's lock).
#[tokio::test]
async fn journaled_appends_survive_a_store_that_was_never_closed() {
    if let Ok(spec) = std::env::var(NEVER_CLOSED) {
        let (mode, path) = spec.split_once('=').unwrap();
        let opener = if mode == "inline" { open_inline } else { open };
        write_and_die(opener, Path::new(path)).await;
    }
    for mode in ["default", "inline"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "journaled_appends_survive_a_store_that_was_never_closed",
                "--nocapture",
            ])
            .env(NEVER_CLOSED, format!("{mode}={}", path.display()))
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(DIED), "{mode}: the writing process");
        let conn = rusqlite::Connection::open(&path).unwrap();
        let logged = logged(&conn);
        assert!(
            logged < 40,
            "{mode}: most of the events are only journaled: {logged}"
        );
        drop(conn);
        let store = open(&path);
        for id in ["run_a", "run_b"] {
            let got = store.read(id, 0, 1000).await.unwrap();
            assert_eq!(
                got.iter().map(RawEvent::seq).collect::<Vec<_>>(),
                (1..=20).collect::<Vec<_>>(),
                "{mode}: {id}"
            );
            store
                .append(id, &[ev(id, 21, r#"{"text":"after"}"#)])
                .await
                .unwrap();
        }
        assert!(store.read("run_c", 0, 100).await.unwrap().is_empty());
        store.close().await.unwrap();
    }
}

/// Tells the test binary, run again, to be the process that dies: `MODE=PATH`.
const NEVER_CLOSED: &str = "SLUICE_TEST_NEVER_CLOSED";
/// Its exit code.
const DIED: i32 = 17;

async fn write_and_die(opener: fn(&Path) -> SqliteStore, path: &Path) -> ! {
    let store = opener(path);
    let runs = ["run_a", "run_b", "run_c"];
    for id in runs {
        new_run(&store, id).await;
    }
    for seq in 1..=20 {
        for id in runs {
            store
                .append(id, &[ev(id, seq, r#"{"text":"t"}"#)])
                .await
                .unwrap();
        }
    }
    store.delete_run("run_c").await.unwrap();
    // The process dies here: no destructor runs, the writer never gets to close.
    std::process::exit(DIED)
}

/// Events that streamed in one at a time reach the database file while the store is open:
/// their moves out of the journal count toward the background checkpoint, so the WAL does not
/// just grow until SQLite's own checkpoint makes the writer thread copy and sync it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_appends_are_checkpointed_in_the_background() {
    const RUNS: usize = 64;
    const EVENTS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = Arc::new(open(&path));
    for r in 0..RUNS {
        new_run(&store, &format!("run_{r}")).await;
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Text that does not compress (the log's rows are compressed): 600 pseudo-random
            // hex digits an event.
            let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ w as u64;
            let mut text = || {
                let digits: String = (0..600)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from_digit((x % 16) as u32, 16).unwrap_or('0')
                    })
                    .collect();
                serde_json::to_string(&json!({ "text": digits })).unwrap()
            };
            for seq in 1..=EVENTS {
                for r in (w..RUNS).step_by(8) {
                    let run = format!("run_{r}");
                    store.append(&run, &[ev(&run, seq, &text())]).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // About 8 MiB went through the journal; the moves into the log follow at their pace, and
    // every 4 MiB of them nudge the checkpoint thread.
    let db_len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db_len() < 2 << 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        db_len() >= 2 << 20,
        "the database file holds {} bytes: nothing was checkpointed while the store was open",
        db_len()
    );
    // A read answers a prefix (the table's part, then the cache's): read until nothing comes.
    let mut cursor = 0;
    loop {
        let batch = store.read("run_0", cursor, 1000).await.unwrap();
        let Some(last) = batch.last() else { break };
        assert_eq!(batch[0].seq(), cursor + 1);
        cursor = last.seq();
    }
    assert_eq!(cursor, EVENTS);
}

/// `run_a` with five events (and `chain-completed` when `finished`) whose stored log lost event
/// 4: the database written back without the journal it depended on, as after a power failure
/// with `synchronous = normal`.
async fn log_with_a_gap(dir: &Path, finished: bool) -> Arc<dyn Store> {
    let path = dir.join("sluice.db");
    let store = open(&path);
    let mut rec = new_run(&store, "run_a").await;
    for seq in 1..=5 {
        // Event 4 is large: it goes to the log at once, in a row of its own (after 1–3, which
        // the same transaction moves from the journal), so that the row can be lost alone.
        let text = if seq == 4 {
            "t".repeat(8192)
        } else {
            "t".into()
        };
        store
            .append(
                "run_a",
                &[ev("run_a", seq, &json!({ "text": text }).to_string())],
            )
            .await
            .unwrap();
    }
    if finished {
        complete(&store, &mut rec, 6).await;
    }
    store.close().await.unwrap();
    // Without its journal (which would put the event back at the next open).
    std::fs::remove_dir_all(dir.join("sluice.db-events")).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let lost = conn
        .execute(
            "DELETE FROM batches WHERE run_id = 'run_a' AND first = 4 AND last = 4",
            [],
        )
        .unwrap();
    assert_eq!(
        lost,
        1,
        "event 4 has a row of its own: {:?}",
        stored_seqs(&conn, "run_a")
    );
    drop(conn);
    Arc::new(open(&path))
}

/// Follows `run_a` from the start: the seqs it read, and the error it ended with.
async fn follow_to_its_end(store: Arc<dyn Store>) -> (Vec<u64>, Option<Error>) {
    use futures_util::StreamExt;
    let mut stream = Box::pin(sluice_store::follow_batches(store, "run_a".into(), 0));
    let mut seen = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(batch) = stream.next().await {
            match batch {
                Ok(b) => seen.extend(b.iter().map(RawEvent::seq)),
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("a follower stayed at the gap");
    (seen, end)
}

/// A follower of a log with a gap ends with an error there, instead of waiting at it forever
/// (a finished run) or spinning on waits that return at once and reads that find nothing (a
/// live one).
#[tokio::test]
async fn a_follower_of_a_log_with_a_gap_ends_with_an_error() {
    for finished in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = log_with_a_gap(dir.path(), finished).await;
        let (seen, end) = follow_to_its_end(store).await;
        assert_eq!(seen, [1, 2, 3], "finished: {finished}");
        let e = end.expect("the stream ended without an error").to_string();
        assert!(e.contains("no event 4"), "finished: {finished}: {e}");
    }
}

/// Large appends are stored as rows of many events: after a reopen (nothing cached), reads from
/// any cursor — a row's first event, its middle, its last, across rows, with any limit — give
/// exactly the events after the cursor, in order.
#[tokio::test]
async fn a_log_stored_in_rows_reads_whole_from_any_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = open(&path);
    new_run(&store, "run_a").await;
    const N: u64 = 3_000;
    let events: Vec<RawEvent> = (1..=N)
        .map(|seq| {
            ev(
                "run_a",
                seq,
                &json!({ "seq": seq, "text": "t".repeat(seq as usize % 300) }).to_string(),
            )
        })
        .collect();
    for chunk in events.chunks(1_000) {
        store.append("run_a", chunk).await.unwrap();
    }
    store.close().await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert!(rows < 100, "{rows} rows for {N} events");
    assert_eq!(stored_seqs(&conn, "run_a"), (1..=N).collect::<Vec<_>>());
    drop(conn);
    let store = open(&path);
    assert_eq!(store.last_seq("run_a").await.unwrap(), N);
    for after in [0, 1, 2, 333, 999, 1_000, 1_001, 2_047, 2_999, 3_000] {
        for limit in [1, 7, 500, 5_000] {
            let got = store.read("run_a", after, limit).await.unwrap();
            let want: Vec<RawEvent> = events
                .iter()
                .skip(after as usize)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(got, want, "after {after}, limit {limit}");
        }
    }
}
