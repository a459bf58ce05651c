use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};

use super::{object_with, opt_uint};
use crate::{Context, Emit, StartEvent, Step, StepError, StopEvent, Workflow};

/// The stream event type the ticker writes.
pub const TICK: &str = "tick";

const MAX_N: u64 = 100_000_000;
const MAX_DELAY_MS: u64 = 3_600_000;
const MAX_TEXT: u64 = 1 << 20;

#[derive(Serialize)]
struct Tick<'a> {
    i: u64,
    t: u64,
    text: &'a str,
}

#[derive(Debug)]
struct Params {
    n: u64,
    delay_ms: u64,
    text_len: u64,
    fail_at: Option<u64>,
}

fn params(input: &Value) -> Result<Params, String> {
    object_with(input, &["n", "delay_ms", "text_len", "fail_at"])?;
    let n = opt_uint(input, "n", MAX_N)?.ok_or("input.n: required (the number of ticks)")?;
    Ok(Params {
        n,
        delay_ms: opt_uint(input, "delay_ms", MAX_DELAY_MS)?.unwrap_or(0),
        text_len: opt_uint(input, "text_len", MAX_TEXT)?.unwrap_or(16),
        fail_at: opt_uint(input, "fail_at", MAX_N)?,
    })
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn tick(ctx: Context, start: StartEvent) -> Result<Emit, StepError> {
    let p = params(&start.0).map_err(|e| StepError::new(e).no_retry())?;
    let text: String = "abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(p.text_len as usize)
        .collect();
    let t0 = tokio::time::Instant::now();
    for i in 0..p.n {
        if p.fail_at == Some(i) {
            return Err(
                StepError::new(format!("failed at tick {i} as asked (fail_at)")).no_retry(),
            );
        }
        if p.delay_ms > 0 && i > 0 {
            tokio::time::sleep_until(t0 + Duration::from_millis(p.delay_ms * i)).await;
        }
        ctx.write_event_to_stream(
            TICK,
            &Tick {
                i,
                t: unix_nanos(),
                text: &text,
            },
        )
        .await?;
    }
    Ok(Emit::stop(json!({ "count": p.n })))
}

/// `ticker`: input `{n, delay_ms?, text_len?, fail_at?}`; writes `n` `tick` events
/// `{i, t, text}` (`t` = creation time in Unix nanoseconds, `text` of `text_len` chars, default
/// 16), `delay_ms` apart; with `fail_at = k` its step fails at tick `k`. Result `{"count": n}`.
pub fn ticker() -> Workflow {
    let built = Workflow::builder("ticker")
        .kind("ticker")
        .description("Emits n tick events, delay_ms apart: a demo and benchmark workload.")
        .input_schema(json!({
            "type": "object",
            "required": ["n"],
            "additionalProperties": false,
            "properties": {
                "n": {"type": "integer", "minimum": 0, "maximum": MAX_N},
                "delay_ms": {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS},
                "text_len": {"type": "integer", "minimum": 0, "maximum": MAX_TEXT},
                "fail_at": {"type": "integer", "minimum": 0}
            }
        }))
        .validate_input(|input| params(input).map(|_| ()))
        .stream_event(TICK)
        .step(Step::new("tick", tick).emits::<StopEvent>())
        .build();
    // The definition is static and validated by a unit test; a failure here is a programming
    // error caught before release.
    built.unwrap_or_else(|e| unreachable_builtin(&e))
}

pub(crate) fn unreachable_builtin(e: &crate::Error) -> ! {
    tracing::error!(error = %e, "a built-in workflow failed validation");
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_input() {
        assert!(params(&json!({"n": 3})).is_ok());
        assert_eq!(
            params(&json!({})).err().as_deref(),
            Some("input.n: required (the number of ticks)")
        );
        assert!(
            params(&json!({"n": -1}))
                .unwrap_err()
                .starts_with("input.n:")
        );
        assert!(
            params(&json!({"n": 1, "delay_ms": "x"}))
                .unwrap_err()
                .starts_with("input.delay_ms:")
        );
        assert!(
            params(&json!({"n": 1, "bogus": 1}))
                .unwrap_err()
                .starts_with("input.bogus:")
        );
        assert!(params(&json!([1])).is_err());
        ticker();
    }
}
