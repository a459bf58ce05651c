use serde_json::{Value, json};
use sluice_protocol::payload::InputRequested;

use super::object_with;
use super::ticker::unreachable_builtin;
use crate::{Context, Emit, InputEvent, StartEvent, Step, StepError, StopEvent, Workflow};

const DEFAULT_PROMPT: &str = "What is your answer?";

fn prompt(input: &Value) -> Result<String, String> {
    match input {
        Value::Null => Ok(DEFAULT_PROMPT.to_owned()),
        _ => {
            object_with(input, &["prompt"])?;
            match input.get("prompt") {
                None | Some(Value::Null) => Ok(DEFAULT_PROMPT.to_owned()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err("input.prompt: must be a string".into()),
            }
        }
    }
}

async fn ask(_ctx: Context, start: StartEvent) -> Result<Emit, StepError> {
    let prompt = prompt(&start.0).map_err(|e| StepError::new(e).no_retry())?;
    Ok(Emit::none().request_input(InputRequested {
        prompt: Some(prompt),
        schema: None,
    }))
}

async fn answer(_ctx: Context, input: InputEvent) -> Result<Emit, StepError> {
    Ok(Emit::stop(json!({ "answer": input.0 })))
}

/// `ask-human`: writes `input-requested {prompt}` (input `{prompt?}`), waits durably for an
/// `input` event, and completes with `{"answer": <its data>}`.
pub fn ask_human() -> Workflow {
    Workflow::builder("ask-human")
        .kind("ask-human")
        .description("Asks a person for input and completes with the answer.")
        .input_schema(json!({
            "type": ["object", "null"],
            "additionalProperties": false,
            "properties": {"prompt": {"type": "string"}}
        }))
        .validate_input(|input| prompt(input).map(|_| ()))
        .step(Step::new("ask", ask).requests_input())
        .step(Step::new("answer", answer).emits::<StopEvent>())
        .build()
        .unwrap_or_else(|e| unreachable_builtin(&e))
}
