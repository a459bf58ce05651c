//! Runs the `review` workflow in-process and prints its event stream, answering the approval.
//!
//! `cargo run -p example-review`

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use sluice_engine::{Engine, StartRun};
use sluice_store_memory::MemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new(Arc::new(MemoryStore::new()), [example_review::review()?])?;
    let text =
        "Sluice streams every event.\n\nIt never loses one.\n\nReaders resume where they left off.";
    let run = engine
        .start(
            "review",
            StartRun {
                input: json!({ "text": text }),
                ..Default::default()
            },
        )
        .await?;
    let mut events = std::pin::pin!(run.envelopes(0));
    while let Some(event) = events.next().await {
        let event = event?;
        println!("{:>3} {:<16} {}", event.seq, event.event_type, event.data);
        if event.event_type == "input-requested" {
            run.send("input", json!("yes")).await?;
        }
    }
    println!("result: {}", run.record().await?.result.unwrap_or_default());
    Ok(())
}
