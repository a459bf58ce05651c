//! In-process cost of one event from a step to a follower: `write_event_to_stream` → driver
//! (seq, envelope JSON) → store append → follower wake-up and read. Memory store, one run,
//! one follower that receives every event.
//!
//! `cargo bench -p sluice-engine --bench append_deliver`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use divan::counter::ItemsCount;
use futures_util::StreamExt;
use serde_json::json;
use sluice_engine::{Engine, StartRun, builtin};
use sluice_protocol::{RawEvent, RunRecord, Timestamp};
use sluice_store::Store;
use sluice_store_memory::MemoryStore;

const N: u64 = 200_000;

fn main() {
    divan::main();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The whole engine path: the `ticker` step writes N events; one follower reads them all.
#[divan::bench(sample_count = 10, sample_size = 1)]
fn engine_step_to_follower(bencher: divan::Bencher) {
    let rt = runtime();
    let engine = Engine::new(Arc::new(MemoryStore::new()), [builtin::ticker()]).unwrap();
    bencher.counter(ItemsCount::new(N)).bench_local(|| {
        let engine = engine.clone();
        rt.block_on(async move {
            let run = engine
                .start(
                    "ticker",
                    StartRun {
                        input: json!({"n": N}),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            // The follower is a task on the runtime's workers, as a server's stream reader is.
            let follower = tokio::spawn({
                let events = run.events(0);
                async move {
                    let mut events = std::pin::pin!(events);
                    let mut ticks = 0u64;
                    while let Some(ev) = events.next().await {
                        if ev.unwrap().event_type() == builtin::TICK {
                            ticks += 1;
                        }
                    }
                    ticks
                }
            });
            assert_eq!(follower.await.unwrap(), N);
            // Retention: the finished run leaves memory, so iterations do not pay for a growing heap.
            engine.store().delete_run(run.id()).await.unwrap();
        })
    });
}

/// The store and follower alone: pre-encoded events appended in batches of 256.
#[divan::bench(sample_count = 10, sample_size = 1)]
fn store_append_to_follower(bencher: divan::Bencher) {
    let rt = runtime();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut round = 0u32;
    bencher.counter(ItemsCount::new(N)).bench_local(|| {
        round += 1;
        let id = format!("run_{round:06}");
        rt.block_on(async {
            store
                .create_run(&RunRecord::new(id.clone(), "bench", json!(null)))
                .await
                .unwrap();
            let reader = tokio::spawn({
                let events = sluice_store::follow(store.clone(), id.clone(), 0);
                async move {
                    events
                        .fold(0u64, |n, e| async move {
                            e.unwrap();
                            n + 1
                        })
                        .await
                }
            });
            let mut seq = 1;
            while seq <= N {
                let batch: Vec<RawEvent> = (seq..(seq + 256).min(N + 1))
                    .map(|s| {
                        RawEvent::encode(
                            s,
                            &id,
                            "tick",
                            Timestamp::now(),
                            Some(1),
                            r#"{"text":"abcdefghijklmnop"}"#,
                        )
                    })
                    .collect();
                seq += batch.len() as u64;
                store.append(&id, &batch).await.unwrap();
            }
            let mut rec = store.get_run(&id).await.unwrap().unwrap();
            rec.last_seq = N + 1;
            let end = RawEvent::encode(N + 1, &id, "chain-completed", Timestamp::now(), None, "{}");
            store.finish(&rec, &end).await.unwrap();
            assert_eq!(reader.await.unwrap(), N + 1);
            store.delete_run(&id).await.unwrap();
        })
    });
}
