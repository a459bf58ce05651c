//! Append throughput of the SQLite store.
//!
//! ```text
//! cargo run --release -p sluice-store-sqlite --example append_throughput [DIR]
//! ```
//!
//! Three workloads on fresh databases (in `DIR`, default a temporary directory), each 1,000,000
//! small `text-delta` events (a 16-byte text payload) built with `RawEvent::encode` beforehand:
//! - one run, appended in batches of 256, each append awaited before the next;
//! - 1,000 runs appended concurrently by 1,000 Tokio tasks, in batches of 16;
//! - 1,000 runs appended concurrently one event at a time (how model tokens arrive).
//!
//! Set `SLUICE_BENCH_ONLY=single`, `=many` or `=tokens` to run one of them, and
//! `SLUICE_BENCH_INLINE=1` to have the appending tasks journal small appends themselves
//! ([`SqliteOptions::inline_appends`]). After the single run it prints the sizes of the WAL and
//! database files.

use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_protocol::{RawEvent, RunRecord, Timestamp, kind};
use sluice_store::Store;
use sluice_store_sqlite::{SqliteOptions, SqliteStore};

const TOTAL: u64 = 1_000_000;

fn batches(run: &str, events: u64, batch: u64) -> Vec<Vec<RawEvent>> {
    let ts = Timestamp::now();
    let payload = r#"{"text":"0123456789abcdef"}"#;
    (0..events.div_ceil(batch))
        .map(|b| {
            let first = b * batch + 1;
            let last = (first + batch - 1).min(events);
            (first..=last)
                .map(|seq| RawEvent::encode(seq, run, kind::TEXT_DELTA, ts, Some(1), payload))
                .collect()
        })
        .collect()
}

async fn open(dir: &Path, name: &str) -> Result<Arc<SqliteStore>, Box<dyn Error>> {
    let path = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let options = SqliteOptions {
        inline_appends: std::env::var_os("SLUICE_BENCH_INLINE").is_some_and(|v| v == "1"),
        ..SqliteOptions::default()
    };
    Ok(Arc::new(SqliteStore::open(path, options)?))
}

fn report(label: &str, events: u64, elapsed: Duration) {
    let rate = events as f64 / elapsed.as_secs_f64();
    println!(
        "{label}: {events} events in {:.3} s = {rate:.0} events/s",
        elapsed.as_secs_f64()
    );
}

async fn single_run(dir: &Path) -> Result<(), Box<dyn Error>> {
    let store = open(dir, "single.db").await?;
    let run = "run_0000000000000000000000000001";
    store
        .create_run(&RunRecord::new(run, "bench", json!(null)))
        .await?;
    let work = batches(run, TOTAL, 256);
    let started = Instant::now();
    for batch in &work {
        store.append(run, batch).await?;
    }
    report("1 run, batches of 256", TOTAL, started.elapsed());
    let wal = std::fs::metadata(format!("{}-wal", store.path().display()))
        .map(|m| m.len())
        .unwrap_or(0);
    let db = std::fs::metadata(store.path())
        .map(|m| m.len())
        .unwrap_or(0);
    println!("  wal {} MB, db {} MB", wal >> 20, db >> 20);
    Ok(())
}

async fn many_runs(dir: &Path, batch: u64) -> Result<(), Box<dyn Error>> {
    const RUNS: u64 = 1_000;
    let store = open(dir, &format!("many-{batch}.db")).await?;
    let mut work = Vec::new();
    for r in 0..RUNS {
        let run = format!("run_{r:032}");
        store
            .create_run(&RunRecord::new(&run, "bench", json!(null)))
            .await?;
        let b = batches(&run, TOTAL / RUNS, batch);
        work.push((run, b));
    }
    let started = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(run, batches)| {
            let store = store.clone();
            tokio::spawn(async move {
                for batch in &batches {
                    store.append(&run, batch).await?;
                }
                Ok::<_, sluice_store::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let label = if batch == 1 {
        "1,000 runs concurrently, one event per append".to_owned()
    } else {
        format!("1,000 runs concurrently, batches of {batch}")
    };
    report(&label, TOTAL, started.elapsed());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let temp = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| temp.path().to_path_buf(), Into::into);
    std::fs::create_dir_all(&dir)?;
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    if only != "many" {
        single_run(&dir).await?;
    }
    if only.is_empty() || only == "many" {
        many_runs(&dir, 16).await?;
    }
    if only.is_empty() || only == "tokens" {
        many_runs(&dir, 1).await?;
    }
    Ok(())
}
