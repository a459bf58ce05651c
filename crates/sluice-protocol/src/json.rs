//! Limits on the nesting of JSON that comes from outside the server.
//!
//! Run records, checkpoints and events wrap what clients, models and tools send a few levels
//! deeper, and are read back by parsers that stop at 128 levels (serde_json's default), so a
//! value nested close to that would make them unreadable. What enters from outside (request
//! bodies and WebSocket messages, a model's tool-call arguments, an HTTP tool's output) is
//! therefore held to [`MAX_DEPTH`].

use serde_json::Value;

/// The deepest nesting of arrays and objects accepted from outside.
pub const MAX_DEPTH: usize = 64;

/// How deeply `v` nests arrays and objects (a scalar is 0, `[]` and `{}` are 1), without
/// recursion.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(v, 0usize)];
    while let Some((v, d)) = todo.pop() {
        match v {
            Value::Array(a) => todo.extend(a.iter().map(|c| (c, d + 1))),
            Value::Object(o) => todo.extend(o.values().map(|c| (c, d + 1))),
            _ => continue,
        }
        deepest = deepest.max(d + 1);
    }
    deepest
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn depths() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!([])), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        let mut deep = json!(null);
        for _ in 0..1_000 {
            deep = json!([deep]);
        }
        assert_eq!(depth(&deep), 1_000);
    }
}
