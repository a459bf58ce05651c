//! The conformance suite every [`Store`] backend passes.
//!
//! A backend crate runs it with [`store_conformance_tests!`](crate::store_conformance_tests),
//! giving an async expression that makes a fresh, empty store:
//!
//! ```ignore
//! sluice_store::store_conformance_tests!(async { std::sync::Arc::new(MemoryStore::new()) });
//! ```
//!
//! Each case is a public async function so a backend can also call them one by one.

// The cases are tests: a failed expectation panics, with the value that broke it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use sluice_protocol::{
    IdempotencyKey, RawEvent, RunRecord, RunStatus, SessionRecord, Timestamp, kind,
};

use crate::{Error, RunFilter, Store, follow};

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh store made by `$make`.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@cases $make;
            run_records, list_runs_filters_and_pages, append_and_read, append_rejects_gaps_and_duplicates,
            append_unknown_run, append_empty_batch_is_a_no_op, append_rejects_terminal_before_the_end,
            finish_closes_log_and_updates_record, finish_checks_its_terminal_event, follow_history_then_live,
            follow_many_readers_identical, follow_join_mid_run, follow_finished_run_ends,
            follow_unknown_run, follow_ends_when_the_run_is_deleted,
            follow_ends_when_the_run_is_deleted_behind_it, slow_reader_does_not_block_writer,
            large_events_are_followed_in_batches_of_about_a_mebibyte, concurrent_runs_append,
            checkpoints, inbox, sessions, delete_run_removes_everything, list_runs_finished_before_and_limits,
            list_runs_pages_are_bounded_in_bytes);
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store: ::std::sync::Arc<dyn $crate::Store> = $make.await;
                $crate::conformance::$case(store).await;
            }
        )*
    };
}

fn ev(run: &str, seq: u64, t: &str) -> RawEvent {
    RawEvent::encode(
        seq,
        run,
        t,
        Timestamp::now(),
        Some(1),
        &format!(r#"{{"i":{seq}}}"#),
    )
}

fn events(run: &str, from: u64, to: u64) -> Vec<RawEvent> {
    (from..=to).map(|s| ev(run, s, "tick")).collect()
}

async fn new_run(store: &Arc<dyn Store>, id: &str) -> RunRecord {
    let mut rec = RunRecord::new(id, "wf", json!({"x": 1}));
    rec.status = RunStatus::Running;
    store.create_run(&rec).await.unwrap();
    rec
}

async fn finish(store: &Arc<dyn Store>, rec: &mut RunRecord) {
    let seq = store.last_seq(&rec.id).await.unwrap() + 1;
    rec.status = RunStatus::Completed;
    rec.last_seq = seq;
    rec.result = Some(json!({"ok": true}));
    rec.finished_at = Some(Timestamp::now());
    let term = RawEvent::encode(
        seq,
        &rec.id,
        kind::CHAIN_COMPLETED,
        Timestamp::now(),
        None,
        "{}",
    );
    store.finish(rec, &term).await.unwrap();
}

fn seqs(evs: &[RawEvent]) -> Vec<u64> {
    evs.iter().map(RawEvent::seq).collect()
}

/// Run records: create, get, replace, and the errors for a taken or a missing id.
pub async fn run_records(store: Arc<dyn Store>) {
    assert!(store.get_run("run_a").await.unwrap().is_none());
    let mut rec = new_run(&store, "run_a").await;
    assert_eq!(store.get_run("run_a").await.unwrap(), Some(rec.clone()));
    assert!(matches!(
        store.create_run(&rec).await,
        Err(Error::AlreadyExists { .. })
    ));
    rec.status = RunStatus::Waiting;
    rec.metadata = Some(json!({"k": "v"}));
    store.put_run(&rec).await.unwrap();
    assert_eq!(store.get_run("run_a").await.unwrap(), Some(rec.clone()));
    // Every field survives, the server's own ones too, in reads and listings alike.
    rec.owner = Some("k_1234".into());
    rec.idempotency = Some(IdempotencyKey {
        key: "order-17".into(),
        fingerprint: u64::MAX,
    });
    store.put_run(&rec).await.unwrap();
    assert_eq!(store.get_run("run_a").await.unwrap(), Some(rec.clone()));
    let listed = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(listed.runs, [rec.clone()]);
    let missing = RunRecord::new("run_missing", "wf", json!(null));
    assert!(matches!(
        store.put_run(&missing).await,
        Err(Error::NotFound { .. })
    ));
}

/// `list_runs`: newest first, every filter, and pages that join up without gaps or repeats.
pub async fn list_runs_filters_and_pages(store: Arc<dyn Store>) {
    for i in 0..7 {
        let mut rec = RunRecord::new(
            format!("run_{i:02}"),
            if i % 2 == 0 { "even" } else { "odd" },
            json!(i),
        );
        rec.status = if i < 3 {
            RunStatus::Completed
        } else {
            RunStatus::Running
        };
        rec.session_id = (i == 4).then(|| "ses_1".to_owned());
        rec.owner = Some(if i == 6 { "k2" } else { "k1" }.to_owned());
        store.create_run(&rec).await.unwrap();
    }
    let all = store.list_runs(&RunFilter::default()).await.unwrap();
    let ids: Vec<_> = all.runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "run_06", "run_05", "run_04", "run_03", "run_02", "run_01", "run_00"
        ]
    );
    assert_eq!(all.next_cursor, None);

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_runs(&RunFilter {
                limit: 3,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.runs.len() <= 3);
        seen.extend(page.runs.iter().map(|r| r.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let even = store
        .list_runs(&RunFilter {
            workflow: Some("even".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(even.runs.len(), 4);
    let done = store
        .list_runs(&RunFilter {
            statuses: vec![RunStatus::Completed],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        done.runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["run_02", "run_01", "run_00"]
    );
    let ses = store
        .list_runs(&RunFilter {
            session_id: Some("ses_1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ses.runs.len(), 1);
    assert_eq!(ses.runs[0].id, "run_04");
    let k2 = store
        .list_runs(&RunFilter {
            owner: Some("k2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        k2.runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["run_06"]
    );
}

/// Appended batches read back byte for byte, in order, from any cursor and with any limit.
pub async fn append_and_read(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    assert_eq!(store.last_seq("run_a").await.unwrap(), 0);
    assert!(store.read("run_a", 0, 10).await.unwrap().is_empty());
    let first = events("run_a", 1, 5);
    let second = events("run_a", 6, 6);
    store.append("run_a", &first).await.unwrap();
    store.append("run_a", &second).await.unwrap();
    assert_eq!(store.last_seq("run_a").await.unwrap(), 6);
    let all = store.read("run_a", 0, 100).await.unwrap();
    assert_eq!(seqs(&all), [1, 2, 3, 4, 5, 6]);
    let written: Vec<RawEvent> = first.iter().chain(&second).cloned().collect();
    assert_eq!(all, written, "the log holds exactly the appended events");
    for (got, sent) in all.iter().zip(&written) {
        assert_eq!(
            got.json(),
            sent.json(),
            "envelope bytes are stored as given"
        );
    }
    assert_eq!(all[2].event_type(), "tick");
    assert_eq!(all[2].parse().unwrap().data, json!({"i": 3}));
    assert_eq!(seqs(&store.read("run_a", 2, 2).await.unwrap()), [3, 4]);
    assert!(store.read("run_a", 6, 10).await.unwrap().is_empty());
    assert!(store.read("run_nope", 0, 10).await.unwrap().is_empty());
    assert_eq!(store.last_seq("run_nope").await.unwrap(), 0);
}

/// Appends that skip or repeat a seq are refused whole with `SeqConflict`.
pub async fn append_rejects_gaps_and_duplicates(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 3)).await.unwrap();
    let gap = store.append("run_a", &events("run_a", 5, 6)).await;
    assert!(
        matches!(
            gap,
            Err(Error::SeqConflict {
                expected: 4,
                got: 5,
                ..
            })
        ),
        "{gap:?}"
    );
    let dup = store.append("run_a", &events("run_a", 3, 4)).await;
    assert!(
        matches!(
            dup,
            Err(Error::SeqConflict {
                expected: 4,
                got: 3,
                ..
            })
        ),
        "{dup:?}"
    );
    let inner_gap = vec![ev("run_a", 4, "tick"), ev("run_a", 6, "tick")];
    assert!(matches!(
        store.append("run_a", &inner_gap).await,
        Err(Error::SeqConflict { .. })
    ));
    assert_eq!(
        store.last_seq("run_a").await.unwrap(),
        3,
        "a rejected batch leaves nothing behind"
    );
}

/// Appending to a run that does not exist is `NotFound`.
pub async fn append_unknown_run(store: Arc<dyn Store>) {
    let r = store.append("run_ghost", &events("run_ghost", 1, 1)).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
}

/// An empty batch writes nothing: `Ok` on an open log, and the errors of any append otherwise.
pub async fn append_empty_batch_is_a_no_op(store: Arc<dyn Store>) {
    let mut rec = new_run(&store, "run_a").await;
    store.append("run_a", &[]).await.unwrap();
    assert_eq!(store.last_seq("run_a").await.unwrap(), 0);
    store.append("run_a", &events("run_a", 1, 2)).await.unwrap();
    store.append("run_a", &[]).await.unwrap();
    assert_eq!(store.last_seq("run_a").await.unwrap(), 2);
    store.append("run_a", &events("run_a", 3, 3)).await.unwrap();
    assert_eq!(seqs(&store.read("run_a", 0, 10).await.unwrap()), [1, 2, 3]);
    let ghost = store.append("run_ghost", &[]).await;
    assert!(matches!(ghost, Err(Error::NotFound { .. })), "{ghost:?}");
    finish(&store, &mut rec).await;
    let closed = store.append("run_a", &[]).await;
    assert!(matches!(closed, Err(Error::LogClosed { .. })), "{closed:?}");
    assert_eq!(store.last_seq("run_a").await.unwrap(), 4);
}

/// A terminal event may only be the last of a batch; otherwise the whole batch is refused.
pub async fn append_rejects_terminal_before_the_end(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 1)).await.unwrap();
    let batch = vec![
        ev("run_a", 2, "tick"),
        ev("run_a", 3, kind::CHAIN_COMPLETED),
        ev("run_a", 4, "tick"),
    ];
    let r = store.append("run_a", &batch).await;
    assert!(matches!(r, Err(Error::LogClosed { .. })), "{r:?}");
    assert_eq!(
        store.last_seq("run_a").await.unwrap(),
        1,
        "a rejected batch leaves nothing behind"
    );
    // The log is still open.
    store.append("run_a", &events("run_a", 2, 3)).await.unwrap();
    assert_eq!(store.last_seq("run_a").await.unwrap(), 3);
}

/// `finish` takes a terminal event whose seq is the record's `last_seq`, or changes nothing.
pub async fn finish_checks_its_terminal_event(store: Arc<dyn Store>) {
    let rec = new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 2)).await.unwrap();
    let mut done = rec.clone();
    done.status = RunStatus::Completed;
    done.finished_at = Some(Timestamp::now());

    // Not a terminal event.
    done.last_seq = 3;
    let not_terminal = ev("run_a", 3, "tick");
    let r = store.finish(&done, &not_terminal).await;
    assert!(r.is_err(), "finish with a non-terminal event: {r:?}");

    // The record's last_seq disagrees with the terminal event's seq.
    done.last_seq = 7;
    let terminal = RawEvent::encode(
        3,
        "run_a",
        kind::CHAIN_COMPLETED,
        Timestamp::now(),
        None,
        "{}",
    );
    let r = store.finish(&done, &terminal).await;
    assert!(
        matches!(r, Err(Error::SeqConflict { .. })),
        "record.last_seq 7 with a terminal event at seq 3: {r:?}"
    );

    // Nothing changed.
    assert_eq!(store.get_run("run_a").await.unwrap(), Some(rec));
    assert_eq!(store.last_seq("run_a").await.unwrap(), 2);
    store.append("run_a", &events("run_a", 3, 3)).await.unwrap();

    // And the right call still works.
    done.last_seq = 4;
    let terminal = RawEvent::encode(
        4,
        "run_a",
        kind::CHAIN_COMPLETED,
        Timestamp::now(),
        None,
        "{}",
    );
    store.finish(&done, &terminal).await.unwrap();
    assert_eq!(store.get_run("run_a").await.unwrap(), Some(done));
    assert_eq!(store.last_seq("run_a").await.unwrap(), 4);
}

/// `finish` writes the final record and the terminal event; the log then refuses appends.
pub async fn finish_closes_log_and_updates_record(store: Arc<dyn Store>) {
    let mut rec = new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 2)).await.unwrap();
    finish(&store, &mut rec).await;
    let got = store.get_run("run_a").await.unwrap().unwrap();
    assert_eq!(got.status, RunStatus::Completed);
    assert_eq!(got.last_seq, 3);
    assert_eq!(got.result, Some(json!({"ok": true})));
    let log = store.read("run_a", 0, 10).await.unwrap();
    assert_eq!(seqs(&log), [1, 2, 3]);
    assert!(log[2].is_terminal());
    let after = store.append("run_a", &events("run_a", 4, 4)).await;
    assert!(matches!(after, Err(Error::LogClosed { .. })), "{after:?}");
}

async fn collect(store: Arc<dyn Store>, run: impl Into<String>, after: u64) -> Vec<u64> {
    let evs: Vec<_> = follow(store, run.into(), after).collect().await;
    evs.into_iter().map(|e| e.unwrap().seq()).collect()
}

async fn write_run(
    store: Arc<dyn Store>,
    run: impl Into<String>,
    n: u64,
    chunk: u64,
    pause: Duration,
) {
    let run = run.into();
    let run = run.as_str();
    let mut rec = store.get_run(run).await.unwrap().unwrap();
    let mut next = store.last_seq(run).await.unwrap() + 1;
    while next <= n {
        let end = (next + chunk - 1).min(n);
        store.append(run, &events(run, next, end)).await.unwrap();
        next = end + 1;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    finish(&store, &mut rec).await;
}

/// A follower gets the stored history from its cursor, then live events, without gap or repeat.
pub async fn follow_history_then_live(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    store
        .append("run_a", &events("run_a", 1, 100))
        .await
        .unwrap();
    let reader = tokio::spawn(collect(store.clone(), "run_a", 40));
    tokio::time::sleep(Duration::from_millis(20)).await;
    write_run(store.clone(), "run_a", 300, 7, Duration::from_millis(1)).await;
    let got = reader.await.unwrap();
    assert_eq!(got, (41..=301).collect::<Vec<_>>());
}

/// Three followers of one run see the identical contiguous sequence.
pub async fn follow_many_readers_identical(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    let readers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(collect(store.clone(), "run_a", 0)))
        .collect();
    write_run(store.clone(), "run_a", 2_000, 13, Duration::ZERO).await;
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=2_001).collect::<Vec<_>>());
    }
}

/// A follower joining while the run writes still gets everything from seq 1.
pub async fn follow_join_mid_run(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    let writer = tokio::spawn(write_run(
        store.clone(),
        "run_a",
        500,
        5,
        Duration::from_millis(1),
    ));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let got = collect(store.clone(), "run_a", 0).await;
    writer.await.unwrap();
    assert_eq!(got, (1..=501).collect::<Vec<_>>());
}

/// Following a finished run replays it and ends; a cursor at its end yields nothing.
pub async fn follow_finished_run_ends(store: Arc<dyn Store>) {
    let mut rec = new_run(&store, "run_a").await;
    store
        .append("run_a", &events("run_a", 1, 10))
        .await
        .unwrap();
    finish(&store, &mut rec).await;
    assert_eq!(
        collect(store.clone(), "run_a", 0).await,
        (1..=11).collect::<Vec<_>>()
    );
    assert_eq!(collect(store.clone(), "run_a", 9).await, [10, 11]);
    assert!(collect(store.clone(), "run_a", 11).await.is_empty());
}

/// Following a run that does not exist yields one `NotFound` and ends.
pub async fn follow_unknown_run(store: Arc<dyn Store>) {
    let got: Vec<_> = follow(store, "run_ghost".into(), 0).collect().await;
    assert_eq!(got.len(), 1);
    assert!(matches!(got[0], Err(Error::NotFound { .. })));
}

/// A follower waiting for a run that is deleted (retention, say) ends with `NotFound` instead
/// of waiting forever.
pub async fn follow_ends_when_the_run_is_deleted(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 3)).await.unwrap();
    let mut stream = Box::pin(follow(store.clone(), "run_a".into(), 0));
    for seq in 1..=3 {
        assert_eq!(stream.next().await.unwrap().unwrap().seq(), seq);
    }
    // The follower is at the head and waits; the run goes away.
    let next = tokio::spawn(async move { stream.next().await.map(|r| r.map(|e| e.seq())) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.delete_run("run_a").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("a follower of a deleted run must not wait forever")
        .unwrap();
    assert!(matches!(got, Some(Err(Error::NotFound { .. }))), "{got:?}");
}

/// A follower still reading a finished run's history when the run is deleted (by retention,
/// say) ends with `NotFound`: it does not wait at a log end that never comes.
pub async fn follow_ends_when_the_run_is_deleted_behind_it(store: Arc<dyn Store>) {
    let mut rec = new_run(&store, "run_a").await;
    store
        .append("run_a", &events("run_a", 1, 50))
        .await
        .unwrap();
    finish(&store, &mut rec).await;
    let mut stream = Box::pin(crate::follow_batches(store.clone(), "run_a".into(), 0));
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        !first.is_empty() && first.len() < 51,
        "a first batch, not the whole log"
    );
    store.delete_run("run_a").await.unwrap();
    let rest = async {
        while let Some(batch) = stream.next().await {
            if let Err(e) = batch {
                return Some(e);
            }
        }
        None
    };
    let got = tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .expect("a follower of a deleted run must not wait forever");
    assert!(matches!(got, Some(Error::NotFound { .. })), "{got:?}");
}

/// A reader that stops reading never blocks the writer, and resumes in bounded batches.
pub async fn slow_reader_does_not_block_writer(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    let mut stream = Box::pin(crate::follow_batches(store.clone(), "run_a".into(), 0));
    store.append("run_a", &events("run_a", 1, 1)).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(seqs(&first), [1]);
    // The reader stops polling; the writer must still finish (the guard only catches a hang).
    let writer = write_run(store.clone(), "run_a", 20_000, 100, Duration::ZERO);
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer blocked by a reader that does not read");
    // The reader resumes from its cursor, pulling bounded batches from the log.
    let mut next = 2;
    while let Some(batch) = stream.next().await {
        let batch = batch.unwrap();
        assert!(
            !batch.is_empty() && batch.len() <= 1024,
            "batch of {}",
            batch.len()
        );
        for e in batch {
            assert_eq!(e.seq(), next);
            next += 1;
        }
    }
    assert_eq!(next, 20_002);
}

/// A follower reads large events a few at a time: its batches hold about 1 MiB, not 1,024
/// events (a slow reader of a run of big events would otherwise hold a thousand of them).
pub async fn large_events_are_followed_in_batches_of_about_a_mebibyte(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    let text = "x".repeat(256 << 10);
    let big: Vec<RawEvent> = (1..=40)
        .map(|seq| {
            RawEvent::encode(
                seq,
                "run_a",
                "blob",
                Timestamp::now(),
                Some(1),
                &format!(r#"{{"text":"{text}"}}"#),
            )
        })
        .collect();
    for chunk in big.chunks(8) {
        store.append("run_a", chunk).await.unwrap();
    }
    let mut stream = Box::pin(crate::follow_batches(store.clone(), "run_a".into(), 0));
    let mut next = 1;
    let mut batches = 0;
    while next <= 40 {
        let batch = stream.next().await.unwrap().unwrap();
        let bytes: usize = batch.iter().map(|e| e.json().len()).sum();
        // The first read, before the follower knows the sizes, is 4 events at most.
        let bound = if batches == 0 {
            4 * (300 << 10)
        } else {
            2 << 20
        };
        assert!(
            !batch.is_empty() && bytes <= bound,
            "batch {batches}: {} events, {bytes} bytes",
            batch.len()
        );
        for e in &batch {
            assert_eq!(e.seq(), next);
            next += 1;
        }
        batches += 1;
    }
    assert!(batches >= 6, "40 events of 256 KiB in {batches} batches");
}

/// Fifty runs written and followed at once each keep their own contiguous log.
pub async fn concurrent_runs_append(store: Arc<dyn Store>) {
    let runs: Vec<String> = (0..50).map(|i| format!("run_{i:03}")).collect();
    for r in &runs {
        new_run(&store, r).await;
    }
    let writers: Vec<_> = runs
        .iter()
        .map(|r| tokio::spawn(write_run(store.clone(), r.clone(), 200, 3, Duration::ZERO)))
        .collect();
    let readers: Vec<_> = runs
        .iter()
        .map(|r| tokio::spawn(collect(store.clone(), r.clone(), 0)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=201).collect::<Vec<_>>());
    }
}

/// A checkpoint replaces the previous one.
pub async fn checkpoints(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    assert_eq!(store.get_checkpoint("run_a").await.unwrap(), None);
    store
        .put_checkpoint("run_a", Bytes::from_static(b"one"))
        .await
        .unwrap();
    store
        .put_checkpoint("run_a", Bytes::from_static(b"two"))
        .await
        .unwrap();
    assert_eq!(
        store.get_checkpoint("run_a").await.unwrap(),
        Some(Bytes::from_static(b"two"))
    );
}

/// The inbox: ids grow and are never reused, acks drop entries up to an id, unknown runs are `NotFound`.
pub async fn inbox(store: Arc<dyn Store>) {
    new_run(&store, "run_a").await;
    assert!(store.inbox_read("run_a").await.unwrap().is_empty());
    let a = store
        .inbox_push("run_a", "input", &json!({"answer": 1}))
        .await
        .unwrap();
    let b = store
        .inbox_push("run_a", "tool-results", &json!({"results": []}))
        .await
        .unwrap();
    assert!(b > a);
    let got = store.inbox_read("run_a").await.unwrap();
    assert_eq!(
        got.iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["input", "tool-results"]
    );
    assert_eq!(got[0].data, json!({"answer": 1}));
    store.inbox_ack("run_a", a).await.unwrap();
    let rest = store.inbox_read("run_a").await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, b);
    let c = store.inbox_push("run_a", "input", &json!(3)).await.unwrap();
    assert!(c > b, "ids are never reused after an ack");
    assert!(matches!(
        store.inbox_push("run_ghost", "input", &json!(1)).await,
        Err(Error::NotFound { .. })
    ));
}

/// Sessions: create, get, replace, delete, and the errors for a taken or a missing id.
pub async fn sessions(store: Arc<dyn Store>) {
    let now = Timestamp::now();
    let mut s = SessionRecord {
        id: "ses_1".into(),
        created_at: now,
        updated_at: now,
        state: json!({"messages": []}),
        active_run: None,
        owner: None,
    };
    assert!(store.get_session("ses_1").await.unwrap().is_none());
    store.create_session(&s).await.unwrap();
    assert!(matches!(
        store.create_session(&s).await,
        Err(Error::AlreadyExists { .. })
    ));
    s.state = json!({"messages": [{"role": "user", "content": "hi"}]});
    s.active_run = Some("run_x".into());
    store.put_session(&s).await.unwrap();
    assert_eq!(store.get_session("ses_1").await.unwrap(), Some(s.clone()));
    assert!(store.delete_session("ses_1").await.unwrap());
    assert!(!store.delete_session("ses_1").await.unwrap());
    assert!(matches!(
        store.put_session(&s).await,
        Err(Error::NotFound { .. })
    ));
}

/// Deleting a run removes its record, log, checkpoint and inbox, and frees its id.
pub async fn delete_run_removes_everything(store: Arc<dyn Store>) {
    let mut rec = new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 3)).await.unwrap();
    store
        .put_checkpoint("run_a", Bytes::from_static(b"cp"))
        .await
        .unwrap();
    store.inbox_push("run_a", "input", &json!(1)).await.unwrap();
    finish(&store, &mut rec).await;
    store.delete_run("run_a").await.unwrap();
    assert!(store.get_run("run_a").await.unwrap().is_none());
    assert!(store.read("run_a", 0, 10).await.unwrap().is_empty());
    assert_eq!(store.get_checkpoint("run_a").await.unwrap(), None);
    assert!(store.inbox_read("run_a").await.unwrap().is_empty());
    store.delete_run("run_a").await.unwrap();
    // The id can be used again from scratch.
    new_run(&store, "run_a").await;
    store.append("run_a", &events("run_a", 1, 1)).await.unwrap();
}

/// `finished_before` matches finished runs only; a limit of 0 means 50 and pages stop at 1,000.
pub async fn list_runs_finished_before_and_limits(store: Arc<dyn Store>) {
    for i in 0..1_005u32 {
        let mut rec = RunRecord::new(format!("run_{i:05}"), "wf", json!(null));
        if i < 3 {
            rec.status = RunStatus::Completed;
            rec.finished_at = Some(Timestamp::from_micros(1_000 * i64::from(i + 1)));
        }
        store.create_run(&rec).await.unwrap();
    }
    let old = store
        .list_runs(&RunFilter {
            finished_before: Some(Timestamp::from_micros(2_500)),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = old.runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["run_00001", "run_00000"],
        "finished before the instant; unfinished runs never match"
    );
    let default_page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(default_page.runs.len(), 50, "limit 0 means 50");
    assert!(default_page.next_cursor.is_some());
    let capped = store
        .list_runs(&RunFilter {
            limit: 5_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(capped.runs.len(), 1_000, "pages are capped at 1,000");
    let rest = store
        .list_runs(&RunFilter {
            limit: 5_000,
            cursor: capped.next_cursor,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.runs.len(), 5);
    assert_eq!(rest.next_cursor, None);
}

/// A page of large records ends once it holds about [`crate::PAGE_BYTES`] of them, and the
/// next page goes on from there: every run is listed once.
pub async fn list_runs_pages_are_bounded_in_bytes(store: Arc<dyn Store>) {
    let big = "x".repeat(crate::PAGE_BYTES / 3);
    for i in 0..7u32 {
        let rec = RunRecord::new(format!("run_{i:05}"), "wf", json!({"text": big}));
        store.create_run(&rec).await.unwrap();
    }
    let (mut seen, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = store
            .list_runs(&RunFilter {
                limit: 100,
                cursor: cursor.take(),
                ..Default::default()
            })
            .await
            .unwrap();
        pages += 1;
        assert!(
            (1..=3).contains(&page.runs.len()),
            "a page of {} records of a third of the bound",
            page.runs.len()
        );
        seen.extend(page.runs.iter().map(|r| r.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let want: Vec<String> = (0..7u32).rev().map(|i| format!("run_{i:05}")).collect();
    assert_eq!(seen, want, "every run once, newest first");
    assert_eq!(pages, 3);
}
