//! A document-review workflow, written the way a Sluice user writes one.
//!
//! Input: `{"text": "…"}` (paragraphs separated by blank lines), checked before the run starts.
//!
//! `split` cuts the text into paragraphs and fans them out; `analyze` (four at a time)
//! measures each and reports progress on the stream; `summarize` joins the analyses with
//! `collect`; `approve` pauses the run for a person (`input-requested`) and the `decide` step
//! turns the answer into the result. A text without paragraphs goes straight to approval.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_engine::protocol_payload::InputRequested;
use sluice_engine::{
    Context, Emit, InputEvent, StartEvent, Step, StepError, StopEvent, Workflow, WorkflowEvent,
};

/// One paragraph to analyse.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paragraph {
    /// Position in the document.
    pub index: usize,
    /// How many paragraphs there are.
    pub of: usize,
    /// Its text.
    pub text: String,
}
impl WorkflowEvent for Paragraph {
    const NAME: &'static str = "paragraph";
}

/// What `analyze` found in one paragraph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Analysis {
    /// Position in the document.
    pub index: usize,
    /// How many paragraphs there are.
    pub of: usize,
    /// Word count.
    pub words: usize,
    /// The longest word.
    pub longest: String,
}
impl WorkflowEvent for Analysis {
    const NAME: &'static str = "analysis";
}

/// The summary waiting for approval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Words in the document.
    pub words: usize,
    /// Paragraphs in the document.
    pub paragraphs: usize,
}
impl WorkflowEvent for Summary {
    const NAME: &'static str = "summary";
}

/// The input's text; `Err` names the field (`Engine::start` answers it as invalid input).
fn text(input: &Value) -> Result<&str, String> {
    let Some(obj) = input.as_object() else {
        return Err("input: must be a JSON object with a \"text\" string".into());
    };
    if let Some(k) = obj.keys().find(|k| k.as_str() != "text") {
        return Err(format!("input.{k}: unknown field (expected text)"));
    }
    match obj.get("text") {
        Some(Value::String(t)) => Ok(t),
        Some(_) => Err("input.text: must be a string".into()),
        None => Err("input.text: required".into()),
    }
}

async fn split(ctx: Context, start: StartEvent) -> Result<Emit, StepError> {
    let text = text(&start.0).map_err(|e| StepError::new(e).no_retry())?;
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    ctx.set("paragraphs", paragraphs.len())?;
    let of = paragraphs.len();
    if of == 0 {
        // Nothing to analyse (and `summarize` would wait for analyses that never come).
        return Ok(Summary {
            words: 0,
            paragraphs: 0,
        }
        .into());
    }
    for (index, p) in paragraphs.into_iter().enumerate() {
        ctx.send_event(Paragraph {
            index,
            of,
            text: p.to_owned(),
        })
        .await?;
    }
    Ok(Emit::none())
}

async fn analyze(ctx: Context, p: Paragraph) -> Result<Emit, StepError> {
    let words: Vec<&str> = p.text.split_whitespace().collect();
    let longest = words
        .iter()
        .max_by_key(|w| w.len())
        .copied()
        .unwrap_or_default()
        .to_owned();
    ctx.write_event_to_stream("progress", &json!({"i": p.index + 1, "of": p.of}))
        .await?;
    Ok(Analysis {
        index: p.index,
        of: p.of,
        words: words.len(),
        longest,
    }
    .into())
}

async fn summarize(ctx: Context, a: Analysis) -> Result<Emit, StepError> {
    let of = a.of;
    let Some(all) = ctx.collect(a, of)? else {
        return Ok(Emit::none());
    };
    Ok(Summary {
        words: all.iter().map(|a| a.words).sum(),
        paragraphs: all.len(),
    }
    .into())
}

async fn approve(ctx: Context, s: Summary) -> Result<Emit, StepError> {
    ctx.set("summary", &s)?;
    let prompt = format!(
        "{} words in {} paragraphs. Publish? (yes/no)",
        s.words, s.paragraphs
    );
    Ok(Emit::none().request_input(InputRequested {
        prompt: Some(prompt),
        schema: None,
    }))
}

async fn decide(ctx: Context, answer: InputEvent) -> Result<Emit, StepError> {
    let summary: Option<Summary> = ctx.get("summary")?;
    let published = answer
        .0
        .as_str()
        .is_some_and(|a| a.eq_ignore_ascii_case("yes"));
    Ok(Emit::stop(
        json!({"published": published, "summary": summary}),
    ))
}

/// The `review` workflow.
///
/// # Errors
/// Only if the definition were inconsistent (it is checked by this crate's test).
pub fn review() -> sluice_engine::Result<Workflow> {
    Workflow::builder("review")
        .description("Analyses a document paragraph by paragraph and asks a person to approve it.")
        .input_schema(json!({
            "type": "object",
            "required": ["text"],
            "additionalProperties": false,
            "properties": {"text": {"type": "string"}}
        }))
        .validate_input(|input| text(input).map(|_| ()))
        .stream_event("progress")
        .step(
            Step::new("split", split)
                .emits::<Paragraph>()
                .emits::<Summary>(),
        )
        .step(
            Step::new("analyze", analyze)
                .emits::<Analysis>()
                .num_workers(4),
        )
        .step(Step::new("summarize", summarize).emits::<Summary>())
        .step(Step::new("approve", approve).requests_input())
        .step(Step::new("decide", decide).emits::<StopEvent>())
        .build()
}
