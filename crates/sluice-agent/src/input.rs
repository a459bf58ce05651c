//! The agent's input: `{"message": "…"}` or `{"messages": [{"role", "content"}…]}`.

use serde_json::{Value, json};
use sluice_llm::Message;

/// The most messages one input may carry.
const MAX_MESSAGES: usize = 10_000;

/// Reads an input into the messages to append to the conversation. `Err` names the field.
pub(crate) fn parse(input: &Value) -> Result<Vec<Message>, String> {
    let Some(obj) = input.as_object() else {
        return Err(
            "input: must be an object, {\"message\": \"…\"} or {\"messages\": [{\"role\", \"content\"}…]}"
                .into(),
        );
    };
    if let Some(key) = obj.keys().find(|k| *k != "message" && *k != "messages") {
        return Err(format!(
            "input.{key}: unknown field (expected message or messages)"
        ));
    }
    match (obj.get("message"), obj.get("messages")) {
        (Some(_), Some(_)) => Err("input: give either message or messages, not both".into()),
        (None, None) => Err("input.message: required (or input.messages)".into()),
        (Some(Value::String(text)), None) => Ok(vec![Message::user(text.clone())]),
        (Some(_), None) => Err("input.message: must be a string".into()),
        (None, Some(Value::Array(items))) => {
            if items.is_empty() {
                return Err("input.messages: must hold at least one message".into());
            }
            if items.len() > MAX_MESSAGES {
                return Err(format!("input.messages: at most {MAX_MESSAGES} messages"));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| message(i, item))
                .collect()
        }
        (None, Some(_)) => Err("input.messages: must be an array".into()),
    }
}

fn message(i: usize, item: &Value) -> Result<Message, String> {
    let at = |field: &str| format!("input.messages[{i}]{field}");
    let Some(obj) = item.as_object() else {
        return Err(format!(
            "{}: must be an object {{\"role\", \"content\"}}",
            at("")
        ));
    };
    if let Some(key) = obj.keys().find(|k| *k != "role" && *k != "content") {
        return Err(format!(
            "{}: unknown field (expected role and content)",
            at(&format!(".{key}"))
        ));
    }
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(format!("{}: must be a string", at(".content"))),
        None => return Err(format!("{}: required", at(".content"))),
    };
    match obj.get("role").and_then(Value::as_str) {
        Some("user") => Ok(Message::user(content)),
        Some("assistant") => Ok(Message::assistant(content)),
        Some("system") => Ok(Message::system(content)),
        Some(_) | None => Err(format!(
            "{}: must be \"user\", \"assistant\" or \"system\"",
            at(".role")
        )),
    }
}

/// JSON Schema of the input, shown by `GET /v1/workflows`.
pub(crate) fn schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "oneOf": [
            {
                "required": ["message"],
                "properties": {"message": {"type": "string"}}
            },
            {
                "required": ["messages"],
                "properties": {
                    "messages": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": false,
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"enum": ["user", "assistant", "system"]},
                                "content": {"type": "string"}
                            }
                        }
                    }
                }
            }
        ]
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accepts_both_forms() {
        assert_eq!(
            parse(&json!({"message": "hi"})).unwrap(),
            vec![Message::user("hi")]
        );
        assert_eq!(
            parse(&json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]}))
            .unwrap(),
            vec![
                Message::system("be brief"),
                Message::user("hi"),
                Message::assistant("hello")
            ]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let err = |v: Value| parse(&v).unwrap_err();
        assert!(err(Value::Null).starts_with("input:"));
        assert!(err(json!({})).starts_with("input.message:"));
        assert!(err(json!({"message": 1})).starts_with("input.message:"));
        assert!(err(json!({"message": "a", "messages": []})).starts_with("input:"));
        assert!(err(json!({"mesage": "a"})).starts_with("input.mesage:"));
        assert!(err(json!({"messages": []})).starts_with("input.messages:"));
        assert!(err(json!({"messages": "x"})).starts_with("input.messages:"));
        assert!(err(json!({"messages": [1]})).starts_with("input.messages[0]:"));
        assert!(
            err(json!({"messages": [{"role": "tool", "content": "x"}]}))
                .starts_with("input.messages[0].role:")
        );
        assert!(
            err(json!({"messages": [{"role": "user"}]})).starts_with("input.messages[0].content:")
        );
        assert!(
            err(json!({"messages": [{"role": "user", "content": "a", "x": 1}]}))
                .starts_with("input.messages[0].x:")
        );
    }
}
