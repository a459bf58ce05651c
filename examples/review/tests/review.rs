//! The example behaves as documented.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use sluice_engine::{Engine, StartRun};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_asks_for_approval_and_publishes() {
    let engine = Engine::new(
        Arc::new(sluice_store_memory::MemoryStore::new()),
        [example_review::review().unwrap()],
    )
    .unwrap();
    let run = engine
        .start(
            "review",
            StartRun {
                input: json!({"text": "a bb ccc\n\ndddd e\n\nf"}),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut events = std::pin::pin!(run.envelopes(0));
    let mut progress = Vec::new();
    while let Some(e) = events.next().await {
        let e = e.unwrap();
        match e.event_type.as_str() {
            "progress" => progress.push(e.data["i"].as_u64().unwrap()),
            "input-requested" => {
                assert_eq!(
                    e.data["prompt"],
                    "6 words in 3 paragraphs. Publish? (yes/no)"
                );
                run.send("input", json!("yes")).await.unwrap();
            }
            _ => {}
        }
    }
    progress.sort_unstable();
    assert_eq!(progress, [1, 2, 3]);
    let rec = run.record().await.unwrap();
    assert_eq!(
        rec.result,
        Some(json!({"published": true, "summary": {"words": 6, "paragraphs": 3}}))
    );
}
