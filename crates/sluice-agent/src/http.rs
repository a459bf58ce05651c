//! Server-side HTTP tools: POST the arguments as JSON, read a bounded response.

use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Value, json};

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

/// Calls one HTTP tool: `(output, is_error)`. Never fails: every problem is an error result
/// the model can read.
pub(crate) async fn call(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    max_response_bytes: usize,
    arguments: &Value,
) -> (Value, bool) {
    match tokio::time::timeout(
        timeout,
        call_inner(client, url, max_response_bytes, arguments),
    )
    .await
    {
        Ok(Ok(output)) => (output, false),
        Ok(Err(error)) => (error, true),
        Err(_) => (
            Value::String(format!(
                "the tool did not answer within {} ms",
                timeout.as_millis()
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
    let output = match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) => value,
        Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    };
    if status.is_success() {
        return Ok(output);
    }
    let body = match output {
        Value::String(text) if text.len() > ERROR_EXCERPT => {
            let mut end = ERROR_EXCERPT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Value::String(text[..end].to_owned())
        }
        other => other,
    };
    Err(json!({
        "error": format!("the tool answered HTTP {status}"),
        "status": status.as_u16(),
        "body": body,
    }))
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
