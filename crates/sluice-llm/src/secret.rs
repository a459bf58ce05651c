//! [`ApiKey`]: a provider credential that never prints itself.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A provider API key.
///
/// Its `Debug` and `Display` print `***`, never the key, so it can sit in configs, errors and
/// logs safely. It is deliberately not `Serialize`. Read it with [`ApiKey::expose`] only where
/// it goes on the wire.
///
/// ```
/// use sluice_llm::ApiKey;
/// let key = ApiKey::new("sk-secret");
/// assert_eq!(format!("{key:?} {key}"), "ApiKey(***) ***");
/// assert_eq!(key.expose(), "sk-secret");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the request header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the key is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        Self(key)
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        Self(key.to_owned())
    }
}

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_key() {
        let key = ApiKey::new("sk-very-secret");
        assert!(!format!("{key:?}").contains("sk-very"));
        assert!(!format!("{key}").contains("sk-very"));
        assert!(!format!("{:#?}", Some(&key)).contains("sk-very"));
        let parsed: ApiKey = serde_json::from_str("\"sk-from-json\"").unwrap();
        assert_eq!(parsed.expose(), "sk-from-json");
    }
}
