#![allow(missing_docs, clippy::unwrap_used)]
use rusqlite::{Connection, params};
use sluice_protocol::{RawEvent, Timestamp, kind};
use std::time::Instant;

fn run(label: &str, pragmas: &str, savepoint: bool) {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("x.db")).unwrap();
    conn.execute_batch(pragmas).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, json BLOB NOT NULL, PRIMARY KEY (run_id, seq)) WITHOUT ROWID;").unwrap();
    let run = "run_0000000000000000000000000001";
    let ts = Timestamp::now();
    let evs: Vec<RawEvent> = (1..=1_000_000u64)
        .map(|s| {
            RawEvent::encode(
                s,
                run,
                kind::TEXT_DELTA,
                ts,
                Some(1),
                r#"{"text":"0123456789abcdef"}"#,
            )
        })
        .collect();
    let t = Instant::now();
    for chunk in evs.chunks(256) {
        conn.prepare_cached("BEGIN IMMEDIATE")
            .unwrap()
            .execute([])
            .unwrap();
        if savepoint {
            conn.prepare_cached("SAVEPOINT c")
                .unwrap()
                .execute([])
                .unwrap();
        }
        let mut st = conn
            .prepare_cached("INSERT INTO events (run_id, seq, type, json) VALUES (?1, ?2, ?3, ?4)")
            .unwrap();
        for e in chunk {
            st.execute(params![run, e.seq() as i64, e.event_type(), &e.json()[..]])
                .unwrap();
        }
        drop(st);
        if savepoint {
            conn.prepare_cached("RELEASE c")
                .unwrap()
                .execute([])
                .unwrap();
        }
        conn.prepare_cached("COMMIT").unwrap().execute([]).unwrap();
    }
    let el = t.elapsed();
    let size = std::fs::metadata(dir.path().join("x.db")).unwrap().len();
    println!(
        "{label}: {:.0} ev/s  db={} MB",
        1e6 / el.as_secs_f64(),
        size / 1_000_000
    );
}

fn main() {
    let base = "PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536; PRAGMA temp_store=MEMORY;";
    run("base ckpt1000", base, false);
    run("base+savepoint", base, true);
    run(
        "ckpt4000",
        &format!("{base} PRAGMA wal_autocheckpoint=4000;"),
        false,
    );
    run(
        "sync off",
        "PRAGMA synchronous=OFF; PRAGMA cache_size=-65536; PRAGMA temp_store=MEMORY;",
        false,
    );
    run(
        "page 16k",
        &format!("PRAGMA page_size=16384; {base}"),
        false,
    );
    run(
        "page 8k ckpt 2000",
        &format!("PRAGMA page_size=8192; {base} PRAGMA wal_autocheckpoint=2000;"),
        false,
    );
}
