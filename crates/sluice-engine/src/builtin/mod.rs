//! Workflows every server ships: `ticker` (demo and benchmark workload) and `ask-human`.

mod ask_human;
mod ticker;

pub use ask_human::ask_human;
pub use ticker::{TICK, ticker};

use serde_json::Value;

/// Reads an optional non-negative integer field of an object input, at most `max`.
pub(crate) fn opt_uint(input: &Value, field: &str, max: u64) -> Result<Option<u64>, String> {
    match input.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(format!("input.{field}: must be an integer from 0 to {max}")),
        },
    }
}

/// Checks the input is an object with no fields beyond `allowed`.
pub(crate) fn object_with(input: &Value, allowed: &[&str]) -> Result<(), String> {
    let Some(obj) = input.as_object() else {
        return Err("input: must be a JSON object".into());
    };
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "input.{k}: unknown field (expected one of {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}
