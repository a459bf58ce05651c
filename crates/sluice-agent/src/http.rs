//! Server-side HTTP tools: POST the arguments as JSON, read a bounded response.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// The longest excerpt of a failing response kept in an error result.
const ERROR_EXCERPT: usize = 2048;

/// The HTTP client tools share: pooled, no proxy, no redirects (a tool answers from the URL
/// the configuration names, or not at all).
pub(crate) fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("sluice-agent/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Where and how to call one HTTP tool.
pub(crate) struct Call<'a> {
    /// The configured URL.
    pub url: &'a str,
    /// The limit of the whole call, the wait for a slot included.
    pub timeout: Duration,
    /// The largest response body accepted.
    pub max_response_bytes: usize,
}

/// Calls one HTTP tool once one of its `slots` is free: `(output, is_error)`. The wait for the
/// slot counts against the timeout. Never fails: every problem is an error result the model
/// can read.
pub(crate) async fn call(
    client: &reqwest::Client,
    call: &Call<'_>,
    slots: &Semaphore,
    arguments: &Value,
) -> (Value, bool) {
    let bounded = async {
        // The semaphore is never closed; if it were, the call could not run.
        let _slot = slots
            .acquire()
            .await
            .map_err(|_| Value::String("the tool is shutting down".into()))?;
        call_inner(client, call.url, call.max_response_bytes, arguments).await
    };
    match tokio::time::timeout(call.timeout, bounded).await {
        Ok(Ok(output)) => (output, false),
        Ok(Err(error)) => (error, true),
        Err(_) => (
            Value::String(format!(
                "the tool did not answer within {} ms",
                call.timeout.as_millis()
            )),
            true,
        ),
    }
}

async fn call_inner(
    client: &reqwest::Client,
    url: &str,
    limit: usize,
    arguments: &Value,
) -> Result<Value, Value> {
    let body = serde_json::to_vec(arguments)
        .map_err(|e| Value::String(format!("the arguments cannot be encoded: {e}")))?;
    let mut response = client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json, text/plain;q=0.9, */*;q=0.5")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            // The tool's URL is configuration, not something the model needs to see.
            let e = e.without_url();
            Value::String(format!("the tool could not be reached: {}", chain(&e)))
        })?;
    let status = response.status();
    if !status.is_success() {
        return Err(failure(status, response, limit.min(ERROR_EXCERPT)).await);
    }
    let too_large = || {
        Value::String(format!(
            "the tool's response is larger than its limit of {limit} bytes"
        ))
    };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Value::String(format!(
                    "reading the tool's response failed: {}",
                    chain(&e.without_url())
                )));
            }
        }
    }
    // JSON nested deeper than the run's records can hold is kept as its text, like a body
    // that is not JSON.
    Ok(match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) if sluice_protocol::json::depth(&value) <= sluice_protocol::json::MAX_DEPTH => {
            value
        }
        _ => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    })
}

/// The error result of a non-2xx answer: its status and the start of its body, at most
/// `excerpt` bytes of it (`"truncated": true` when there was more), whatever its size. A 3xx
/// is one too: redirects are not followed.
async fn failure(status: StatusCode, mut response: reqwest::Response, excerpt: usize) -> Value {
    let mut bytes = Vec::new();
    let mut truncated = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = excerpt - bytes.len();
                if chunk.len() > room {
                    bytes.extend_from_slice(&chunk[..room]);
                    truncated = true;
                    break;
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            // What arrived is shown; the rest is missing.
            Err(_) => {
                truncated = true;
                break;
            }
        }
    }
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) if !truncated => value,
        _ => Value::String(utf8_prefix(&bytes)),
    };
    let mut error = format!("the tool answered HTTP {status}");
    if status.is_redirection() {
        error.push_str(" (redirects are not followed)");
    }
    let mut result = json!({
        "error": error,
        "status": status.as_u16(),
        "body": body,
    });
    if truncated {
        result["truncated"] = Value::Bool(true);
    }
    result
}

/// `bytes` as text: a UTF-8 sequence cut at the end is dropped, other invalid bytes replaced.
fn utf8_prefix(bytes: &[u8]) -> String {
    let mut end = bytes.len();
    // The last character's first byte, within its longest length (4 bytes).
    let lead = (bytes.len().saturating_sub(4)..bytes.len())
        .rev()
        .find(|&i| bytes[i] & 0xC0 != 0x80);
    if let Some(i) = lead
        && let Err(e) = std::str::from_utf8(&bytes[i..])
        && e.error_len().is_none()
    {
        end = i;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// An error with its sources, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_prefixes() {
        assert_eq!(utf8_prefix(b"plain"), "plain");
        let e_acute = "é".as_bytes();
        assert_eq!(utf8_prefix(&[b'a', e_acute[0]]), "a");
        assert_eq!(utf8_prefix(&[b'a', 0xff, b'b']), "a\u{FFFD}b");
        let crab = "🦀".as_bytes();
        assert_eq!(utf8_prefix(&[b'a', crab[0], crab[1], crab[2]]), "a");
        assert_eq!(utf8_prefix(crab), "🦀");
        assert_eq!(utf8_prefix(&[0xff, b'x', e_acute[0]]), "\u{FFFD}x");
        assert_eq!(utf8_prefix(b""), "");
    }
}
