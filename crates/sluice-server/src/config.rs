//! `sluice.toml`: one [`Config`] of per-subsystem options, every field with a default.
//!
//! Layers, later wins: defaults → file → `SLUICE_<SECTION>__<KEY>` environment variables →
//! command-line flags. The library never reads the environment itself: the binary passes the
//! variables to [`Config::apply_env`]. [`Config::validate`] checks everything once and names the
//! offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML or a value has the wrong type or an unknown key.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `server.listen`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerOptions,
    /// `[providers.NAME]`.
    pub providers: BTreeMap<String, ProviderOptions>,
    /// `[workflows.NAME]`; empty means the built-in defaults.
    pub workflows: BTreeMap<String, WorkflowOptions>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerOptions {
    /// Address to listen on.
    pub listen: String,
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// `sqlite` (embedded, default) or `memory` (nothing persists).
    pub store: String,
    /// Keep-alive interval of event streams.
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Duration,
    /// Bearer keys; none means no auth, and then only a loopback address may be bound.
    pub api_keys: Vec<String>,
    /// Keys that may see and act on every run.
    pub admin_keys: Vec<String>,
    /// Largest request body.
    #[serde(deserialize_with = "size")]
    pub max_body: usize,
    /// Largest `data` of one event sent into a run.
    #[serde(deserialize_with = "size")]
    pub max_event: usize,
    /// Requests (streams included) served at once; beyond, 503.
    pub max_connections: usize,
    /// How long shutdown waits for runs to reach a checkpoint and streams to close.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Finished runs older than this are removed with their logs (`"0s"`: keep forever).
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// Keep at most this many finished runs (0: no limit).
    pub max_finished_runs: usize,
    /// How often the retention sweeper runs.
    #[serde(deserialize_with = "duration")]
    pub sweep_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from(".sluice"),
            store: "sqlite".into(),
            heartbeat: Duration::from_secs(15),
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            max_body: 1 << 20,
            max_event: 256 << 10,
            max_connections: 20_000,
            shutdown_grace: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 86_400),
            max_finished_runs: 0,
            sweep_interval: Duration::from_secs(60),
        }
    }
}

/// `[providers.NAME]`: a model provider (used by `agent` workflows).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderOptions {
    /// `openai` (any compatible server) or `anthropic`.
    pub kind: String,
    /// Base URL of the API.
    pub base_url: String,
    /// Environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Concurrent requests to this provider.
    #[serde(default = "default_provider_concurrency")]
    pub max_concurrent_requests: usize,
    /// Connect and idle-read timeout.
    #[serde(default = "default_provider_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_provider_concurrency() -> usize {
    64
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `[workflows.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowOptions {
    /// `ticker`, `ask-human` or `agent`.
    pub kind: String,
    /// Runs executing at once; beyond, runs queue.
    #[serde(default)]
    pub max_concurrent_runs: Option<usize>,
    /// Runs allowed to queue; beyond, 429.
    #[serde(default)]
    pub queue: Option<usize>,
    /// Time limit of a run.
    #[serde(default, deserialize_with = "opt_duration")]
    pub run_timeout: Option<Duration>,
    /// Step budget of a run.
    #[serde(default)]
    pub max_steps: Option<u32>,
    /// Agent: provider name.
    #[serde(default)]
    pub provider: Option<String>,
    /// Agent: model name.
    #[serde(default)]
    pub model: Option<String>,
    /// Agent: system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Agent: tools.
    #[serde(default)]
    pub tools: Vec<toml::Table>,
    /// Shown by `GET /v1/workflows`.
    #[serde(default)]
    pub description: Option<String>,
}

impl Config {
    /// Parses a TOML document over the defaults.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] naming the key and line.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Re-parses with `SLUICE_<SECTION>__<KEY>` (or `SLUICE_<SECTION>__<NAME>__<KEY>`) variables
    /// layered over `text`. Values are read as TOML when they parse (numbers, booleans, arrays),
    /// else as strings.
    ///
    /// # Errors
    /// As [`from_toml`](Config::from_toml), and for variables naming no key.
    pub fn from_toml_and_env(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("SLUICE_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.len() < 2 || path.iter().any(String::is_empty) {
                continue;
            }
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            let mut table = &mut doc;
            for key in &path[..path.len() - 1] {
                let entry = table
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry.as_table_mut().ok_or_else(|| {
                    invalid(
                        path.join("."),
                        format!("{name} names a key that is not a table"),
                    )
                })?;
            }
            if let Some(last) = path.last() {
                table.insert(last.clone(), parsed);
            }
        }
        Self::deserialize(doc).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks ranges and consistency.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<SocketAddr, ConfigError> {
        let s = &self.server;
        let addr: SocketAddr = s.listen.parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("{:?} is not an address like 127.0.0.1:8080", s.listen),
            )
        })?;
        if s.api_keys.is_empty() && s.admin_keys.is_empty() && !addr.ip().is_loopback() {
            return Err(invalid(
                "server.listen",
                "without api_keys the server only binds a loopback address",
            ));
        }
        for (i, k) in s.api_keys.iter().chain(&s.admin_keys).enumerate() {
            if k.len() < 16 {
                return Err(invalid(
                    "server.api_keys",
                    format!("key #{} is shorter than 16 characters", i + 1),
                ));
            }
        }
        if !matches!(s.store.as_str(), "sqlite" | "memory") {
            return Err(invalid(
                "server.store",
                format!("{:?}: expected \"sqlite\" or \"memory\"", s.store),
            ));
        }
        if s.heartbeat < Duration::from_millis(100) {
            return Err(invalid("server.heartbeat", "must be at least 100ms"));
        }
        if s.max_body < 1024 {
            return Err(invalid("server.max_body", "must be at least 1KiB"));
        }
        if s.sweep_interval < Duration::from_secs(1) {
            return Err(invalid("server.sweep_interval", "must be at least 1s"));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        for (name, p) in &self.providers {
            if !matches!(p.kind.as_str(), "openai" | "anthropic") {
                return Err(invalid(
                    format!("providers.{name}.kind"),
                    format!("{:?}: expected \"openai\" or \"anthropic\"", p.kind),
                ));
            }
        }
        for (name, w) in &self.workflows {
            let key = |k: &str| format!("workflows.{name}.{k}");
            match w.kind.as_str() {
                "ticker" | "ask-human" => {
                    if w.provider.is_some()
                        || w.model.is_some()
                        || w.system.is_some()
                        || !w.tools.is_empty()
                    {
                        return Err(invalid(
                            key("kind"),
                            "provider, model, system and tools belong to kind \"agent\"",
                        ));
                    }
                }
                "agent" => {
                    return Err(invalid(
                        key("kind"),
                        "kind \"agent\" needs the model providers, which this build does not include yet",
                    ));
                }
                other => {
                    return Err(invalid(
                        key("kind"),
                        format!("{other:?}: expected \"ticker\", \"ask-human\" or \"agent\""),
                    ));
                }
            }
            if w.max_concurrent_runs == Some(0) {
                return Err(invalid(key("max_concurrent_runs"), "must be at least 1"));
            }
        }
        Ok(addr)
    }
}

/// Parses `"250ms"`, `"15s"`, `"10m"`, `"2h"`, `"1d"` (a bare number is seconds).
///
/// # Errors
/// A message naming the expected form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like \"15s\""))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{text:?}: unknown unit (ms, s, m, h, d)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `"1MiB"`, `"512KiB"`, `"2MB"`, `"100"` (bytes).
///
/// # Errors
/// A message naming the expected form.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"1MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit (B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("{text:?} is out of range"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => Ok(Duration::from_secs(n)),
        NumOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        NumOrText::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn protocol_example_parses_up_to_the_agent() {
        let text = r#"
[server]
listen = "127.0.0.1:9090"
heartbeat = "2s"
max_body = "64KiB"

[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:11434/v1"
api_key_env = "OPENAI_API_KEY"

[workflows.ticker]
kind = "ticker"
max_concurrent_runs = 10
queue = 5
run_timeout = "10m"
"#;
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.validate().unwrap().port(), 9090);
        assert_eq!(c.server.heartbeat, Duration::from_secs(2));
        assert_eq!(c.server.max_body, 64 << 10);
        assert_eq!(
            c.workflows["ticker"].run_timeout,
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[server]\nlisten = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        let e = Config::from_toml("[server]\nlistn = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listn"), "{e}");
        let e = Config::from_toml("[server]\nheartbeat = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon"), "{e}");
        let c = Config::from_toml("[server]\nlisten = \"0.0.0.0:80\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server.listen")
        );
        let c = Config::from_toml("[workflows.x]\nkind = \"nope\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("workflows.x.kind")
        );
    }

    #[test]
    fn env_overrides_file() {
        let vars = [
            (
                "SLUICE_SERVER__LISTEN".to_owned(),
                "127.0.0.1:7000".to_owned(),
            ),
            (
                "SLUICE_SERVER__API_KEYS".to_owned(),
                "[\"0123456789abcdef\"]".to_owned(),
            ),
            ("SLUICE_WORKFLOWS__TICKER__QUEUE".to_owned(), "3".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let c = Config::from_toml_and_env(
            "[server]\nlisten = \"127.0.0.1:1\"\n[workflows.ticker]\nkind = \"ticker\"\n",
            vars,
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:7000");
        assert_eq!(c.server.api_keys, ["0123456789abcdef"]);
        assert_eq!(c.workflows["ticker"].queue, Some(3));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("10"), Ok(10));
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
    }
}
