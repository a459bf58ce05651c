//! The SDK follows a 10,000-event run through a proxy that kills every open connection every
//! 50 ms, and receives every event exactly once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Proxy, TestServer};
use futures_util::StreamExt;
use serde_json::json;
use sluice_client::{Client, CreateRun, kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_10k_events_through_a_connection_killing_proxy() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr, Duration::from_millis(50), 2_000_000).await;
    let direct = Client::new(&server.base).unwrap();
    let client = Client::builder()
        .base_url(&proxy.base)
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(100))
        .max_reconnect_attempts(100)
        .build()
        .unwrap();

    const N: u64 = 10_000;
    let run = direct
        .start(
            "ticker",
            CreateRun {
                input: json!({"n": N, "text_len": 32}),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let t0 = Instant::now();
    let mut events = client.events(run.id(), 0);
    let mut seqs = Vec::new();
    let mut ticks = Vec::new();
    let mut last_type = String::new();
    let follow = async {
        while let Some(ev) = events.next().await {
            let ev = ev.unwrap_or_else(|e| panic!("after {} events: {e}", seqs.len()));
            assert_eq!(ev.run_id, run.id());
            seqs.push(ev.seq);
            if ev.event_type == "tick" {
                ticks.push(ev.data["i"].as_u64().unwrap());
            }
            last_type = ev.event_type.clone();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), follow)
        .await
        .expect("the stream did not finish in time");

    let total = N + 4; // chain-started, step-started, ticks, step-completed, chain-completed
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert_eq!(ticks, (0..N).collect::<Vec<_>>());
    assert_eq!(last_type, kind::CHAIN_COMPLETED);
    let reconnects = events.reconnects();
    assert!(
        reconnects >= 3,
        "expected several reconnects, got {reconnects} (proxy kill rounds: {})",
        proxy.kills.load(Ordering::SeqCst)
    );
    assert_eq!(events.last_seq(), total);
    assert!(proxy.accepted.load(Ordering::SeqCst) > reconnects);
    eprintln!(
        "{total} events in {:?} with {reconnects} reconnects",
        t0.elapsed()
    );
    // The stream stays ended.
    assert!(events.next().await.is_none());
    let rec = direct.run(run.id()).await.unwrap();
    assert_eq!(rec.status.as_str(), "completed");
    drop(proxy);
    server.stop().await;
}
