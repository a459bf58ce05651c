//! The example behaves as documented.

#![allow(clippy::unwrap_used, clippy::panic)]

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

#[tokio::test]
async fn input_without_text_is_refused_before_a_run_exists() {
    let engine = Engine::new(
        Arc::new(sluice_store_memory::MemoryStore::new()),
        [example_review::review().unwrap()],
    )
    .unwrap();
    for bad in [
        json!({}),
        json!(null),
        json!({"text": 7}),
        json!("just text"),
    ] {
        let started = engine
            .start(
                "review",
                StartRun {
                    input: bad.clone(),
                    ..Default::default()
                },
            )
            .await;
        match started {
            Err(sluice_engine::Error::InvalidInput(m)) => {
                assert!(m.starts_with("input"), "{bad}: {m}")
            }
            other => panic!("{bad}: expected InvalidInput, got {other:?}"),
        }
    }
    let runs = engine.store().list_runs(&Default::default()).await.unwrap();
    assert!(runs.runs.is_empty(), "no run was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_without_paragraphs_still_asks_for_approval() {
    let engine = Engine::new(
        Arc::new(sluice_store_memory::MemoryStore::new()),
        [example_review::review().unwrap()],
    )
    .unwrap();
    let run = engine
        .start(
            "review",
            StartRun {
                input: json!({"text": " \n\n  \n\n"}),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut events = std::pin::pin!(run.envelopes(0));
    let mut asked = false;
    let drive = async {
        while let Some(e) = events.next().await {
            let e = e.unwrap();
            if e.event_type == "input-requested" {
                assert_eq!(
                    e.data["prompt"],
                    "0 words in 0 paragraphs. Publish? (yes/no)"
                );
                asked = true;
                run.send("input", json!("no")).await.unwrap();
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), drive)
        .await
        .unwrap();
    assert!(asked);
    let rec = run.record().await.unwrap();
    assert_eq!(
        rec.result,
        Some(json!({"published": false, "summary": {"words": 0, "paragraphs": 0}})),
        "{:?}",
        rec.error
    );
}
