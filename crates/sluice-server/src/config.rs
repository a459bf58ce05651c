//! `sluice.toml`: one [`Config`] of per-subsystem options, every field with a default.
//!
//! Layers, later wins: defaults → file → `SLUICE_<SECTION>__<KEY>` environment variables →
//! command-line flags. The library never reads the environment itself: the binary passes the
//! variables to [`Config::from_toml_and_env`]. [`Config::validate`] checks everything once and names the
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
    /// Largest `data` of one event sent into a run (1KiB to 64MiB); over HTTP the whole body
    /// must also fit in `max_body`. A WebSocket message may be up to this plus 4 KiB (for the
    /// `type` and the JSON around `data`); a larger one closes the socket.
    #[serde(deserialize_with = "size")]
    pub max_event: usize,
    /// Open TCP connections at once (API calls, event streams and WebSockets alike); at the
    /// limit, new connections wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Room in the listen backlog: connections the kernel has completed that the server has
    /// not accepted yet (a burst of clients connecting at once, or connections waiting at
    /// `max_connections`). Beyond it the kernel drops new connection attempts, which the
    /// clients retry only after a second or more. 1 to 65535 (default 4096); the kernel caps
    /// it at `net.core.somaxconn`.
    pub listen_backlog: u32,
    /// Open event streams at once (SSE, NDJSON, WebSocket); beyond, `503 overloaded` with
    /// `Retry-After`.
    pub max_streams: usize,
    /// Shutdown ends within this: runs get until then to reach a checkpoint and connections
    /// to finish; whatever is still open then is closed.
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
    /// A request head (request line and headers) must arrive in full within this, counted
    /// from the accept for a connection's first request and from the first byte for later
    /// ones; else the connection is closed (slow clients holding connections: slowloris).
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// A request body must arrive in full within this, counted from the end of its head; else
    /// the server answers `408 request_timeout` and closes the connection (clients that send a
    /// head, then trickle the body or stop). Only the request body: never a response (an event
    /// stream) nor a WebSocket after its upgrade.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// A keep-alive connection idle between requests for this long is closed. Never cuts a
    /// response in progress (an event stream) nor a WebSocket.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// The SQLite store's `synchronous`: `normal` (default: a commit survives a crash of the
    /// process; an OS crash or power loss may lose the last commits), `full` (every commit is
    /// fsynced: it survives power loss, at the cost of one fsync per group commit) or `off`
    /// (scratch data only). See the README's durability section.
    pub sqlite_synchronous: String,
    /// The longest the SQLite writer keeps gathering queued writes into one group commit
    /// (0 to 100 ms; default 2 ms). It never waits on an empty queue.
    #[serde(deserialize_with = "duration")]
    pub sqlite_commit_window: Duration,
    /// Whether a small append is journaled by the task that makes it, instead of by the SQLite
    /// writer thread (default `false`). On: no thread hop per append, lower latency while the
    /// server has CPU to spare. Off: the writer journals many appends with one `write`, which
    /// degrades better when the machine is overloaded. See BENCHMARKS.md.
    pub sqlite_inline_appends: bool,
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
            listen_backlog: 4096,
            max_streams: 10_000,
            shutdown_grace: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 86_400),
            max_finished_runs: 0,
            sweep_interval: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            sqlite_synchronous: "normal".into(),
            sqlite_commit_window: Duration::from_millis(2),
            sqlite_inline_appends: false,
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
    /// The older name of `idle_timeout`, kept as its alias: the idle timeout when
    /// `idle_timeout` is not given (default 60s). It no longer limits the connect.
    #[serde(default = "default_provider_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Limit on establishing a connection (DNS, TCP, TLS); a connection that cannot be made in
    /// time fails the attempt, which is retried. Default 10s.
    #[serde(
        default = "default_provider_connect_timeout",
        deserialize_with = "duration"
    )]
    pub connect_timeout: Duration,
    /// Longest silence allowed once connected: waiting for the response head, and between two
    /// reads of the stream (not a limit on the whole answer). Default: `timeout`. Read it with
    /// [`ProviderOptions::effective_idle_timeout`].
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Longest the answer may stream without output (text, reasoning, tool-call data, or its
    /// end); keep-alives do not count, so a stream of them alone ends and frees its slot.
    /// Default 5m.
    #[serde(
        default = "default_provider_output_timeout",
        deserialize_with = "duration"
    )]
    pub output_timeout: Duration,
    /// Largest answer of one model call: its text, reasoning and tool-call arguments together.
    /// Default 8MiB.
    #[serde(default = "default_provider_max_output", deserialize_with = "size")]
    pub max_output: usize,
    /// Retries of a failed call before its first token (429, 408, 5xx, connection failures);
    /// 0 = none. Default 2 (3 attempts in all).
    #[serde(default = "default_provider_max_retries")]
    pub max_retries: u32,
    /// Backoff before the first retry; it doubles each retry, with jitter, and never waits less
    /// than the provider's `Retry-After`. Default 500ms.
    #[serde(
        default = "default_provider_retry_initial_backoff",
        deserialize_with = "duration"
    )]
    pub retry_initial_backoff: Duration,
    /// Cap of the backoff. Default 8s.
    #[serde(
        default = "default_provider_retry_max_backoff",
        deserialize_with = "duration"
    )]
    pub retry_max_backoff: Duration,
}

impl ProviderOptions {
    /// The idle timeout in force: `idle_timeout`, else `timeout`.
    pub fn effective_idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(self.timeout)
    }
}

/// The most retries a provider may be configured with.
pub const MAX_PROVIDER_RETRIES: u32 = 100;

fn default_provider_concurrency() -> usize {
    64
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_provider_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

// The provider defaults are sluice-llm's (`ProviderConfig::new`); the `sluice` binary's tests
// check that the two agree.

fn default_provider_output_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_provider_max_output() -> usize {
    8 << 20
}

fn default_provider_max_retries() -> u32 {
    2
}

fn default_provider_retry_initial_backoff() -> Duration {
    Duration::from_millis(500)
}

fn default_provider_retry_max_backoff() -> Duration {
    Duration::from_secs(8)
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
    /// Time limit of a run, from its start, not counting time spent waiting for input.
    #[serde(default, deserialize_with = "opt_duration")]
    pub run_timeout: Option<Duration>,
    /// Step budget of a run; for an agent, the number of model calls a run may make
    /// (default 8).
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
    /// Agent: sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Agent: output token limit of one model call.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Agent: tools (`[[workflows.NAME.tools]]`); read them typed with
    /// [`WorkflowOptions::agent_tools`].
    #[serde(default)]
    pub tools: Vec<toml::Table>,
    /// Shown by `GET /v1/workflows`.
    #[serde(default)]
    pub description: Option<String>,
}

/// One `[[workflows.NAME.tools]]` entry of an agent, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOptions {
    /// The name the model calls it by (`^[a-zA-Z0-9_-]{1,64}$`).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON Schema of its arguments (default: an object without properties).
    pub parameters: serde_json::Value,
    /// Where it runs.
    pub kind: ToolKind,
}

/// Where a tool runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolKind {
    /// `kind = "http"`: the server POSTs the arguments as JSON to `url`.
    Http {
        /// The tool's URL (`http://` or `https://`).
        url: String,
        /// Time limit of one call (`timeout`, default 30s).
        timeout: Duration,
        /// Largest response body (`max_response_bytes`, default 1MiB).
        max_response_bytes: usize,
        /// Calls in flight at once across all runs of the agent (`max_concurrent_calls`,
        /// default 64); more wait for a slot, and the wait counts against `timeout`.
        max_concurrent_calls: usize,
    },
    /// `kind = "client"`: the run pauses until the client sends the result.
    Client,
}

/// The raw form of a tool table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    name: String,
    kind: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<toml::Value>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_size")]
    max_response_bytes: Option<usize>,
    #[serde(default)]
    max_concurrent_calls: Option<usize>,
}

/// The most calls in flight an HTTP tool may be configured with.
pub const MAX_TOOL_CONCURRENCY: usize = 1 << 20;

/// Whether `name` is a valid tool name: `^[a-zA-Z0-9_-]{1,64}$`.
fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `url` looks like `http(s)://host…`.
fn http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or_default();
        !host.is_empty() && !host.contains(char::is_whitespace)
    })
}

impl WorkflowOptions {
    /// The agent's tools, typed and checked: each table has a valid, unique `name`, and `kind`
    /// `http` (with an `http(s)` `url`, optional `timeout`, `max_response_bytes` and
    /// `max_concurrent_calls`) or
    /// `client`; `description` and `parameters` (an inline table, JSON Schema) are optional.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `workflows.NAME.tools[i]` and the field.
    pub fn agent_tools(&self, workflow: &str) -> Result<Vec<ToolOptions>, ConfigError> {
        let mut out: Vec<ToolOptions> = Vec::with_capacity(self.tools.len());
        for (i, table) in self.tools.iter().enumerate() {
            let key = |k: &str| format!("workflows.{workflow}.tools[{i}]{k}");
            let raw = RawTool::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| invalid(key(""), e.to_string()))?;
            if !valid_tool_name(&raw.name) {
                return Err(invalid(
                    key(".name"),
                    format!("{:?} must match ^[a-zA-Z0-9_-]{{1,64}}$", raw.name),
                ));
            }
            if out.iter().any(|t| t.name == raw.name) {
                return Err(invalid(
                    key(".name"),
                    format!("{:?} is used by another tool of this agent", raw.name),
                ));
            }
            let parameters = match raw.parameters {
                None => serde_json::json!({"type": "object", "properties": {}}),
                Some(toml::Value::Table(t)) => serde_json::to_value(t)
                    .map_err(|e| invalid(key(".parameters"), e.to_string()))?,
                Some(_) => {
                    return Err(invalid(
                        key(".parameters"),
                        "must be a table (a JSON Schema object)",
                    ));
                }
            };
            let kind = match raw.kind.as_str() {
                "http" => {
                    let Some(url) = raw.url else {
                        return Err(invalid(key(".url"), "required for kind \"http\""));
                    };
                    if !http_url(&url) {
                        return Err(invalid(
                            key(".url"),
                            format!("{url:?} is not an http:// or https:// URL"),
                        ));
                    }
                    let timeout = raw.timeout.unwrap_or(Duration::from_secs(30));
                    if timeout.is_zero() {
                        return Err(invalid(key(".timeout"), "must be more than zero"));
                    }
                    let max_response_bytes = raw.max_response_bytes.unwrap_or(1 << 20);
                    if max_response_bytes == 0 {
                        return Err(invalid(key(".max_response_bytes"), "must be at least 1"));
                    }
                    let max_concurrent_calls = raw.max_concurrent_calls.unwrap_or(64);
                    if !(1..=MAX_TOOL_CONCURRENCY).contains(&max_concurrent_calls) {
                        return Err(invalid(
                            key(".max_concurrent_calls"),
                            format!("must be from 1 to {MAX_TOOL_CONCURRENCY}"),
                        ));
                    }
                    ToolKind::Http {
                        url,
                        timeout,
                        max_response_bytes,
                        max_concurrent_calls,
                    }
                }
                "client" => {
                    if raw.url.is_some()
                        || raw.timeout.is_some()
                        || raw.max_response_bytes.is_some()
                        || raw.max_concurrent_calls.is_some()
                    {
                        return Err(invalid(
                            key(".kind"),
                            "url, timeout, max_response_bytes and max_concurrent_calls belong to kind \"http\"",
                        ));
                    }
                    ToolKind::Client
                }
                other => {
                    return Err(invalid(
                        key(".kind"),
                        format!("{other:?}: expected \"http\" or \"client\""),
                    ));
                }
            };
            out.push(ToolOptions {
                name: raw.name,
                description: raw.description,
                parameters,
                kind,
            });
        }
        Ok(out)
    }
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
            let mut parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            // The key lists also take the form a shell makes easy: `k1,k2` (a key of digits
            // alone would otherwise read as a number).
            let key_list = matches!(
                path.iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .as_slice(),
                ["server", "api_keys" | "admin_keys"]
            );
            if key_list && !parsed.is_array() {
                parsed = toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(|k| toml::Value::String(k.to_owned()))
                        .collect(),
                );
            }
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
        for (list, keys) in [
            ("server.api_keys", &s.api_keys),
            ("server.admin_keys", &s.admin_keys),
        ] {
            for (i, k) in keys.iter().enumerate() {
                // What a client can send in `Authorization: Bearer <key>` (visible ASCII; the
                // server trims spaces around it): any other key could never match.
                if !k.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        list,
                        format!(
                            "key #{} has a character other than visible ASCII (a space, a newline, a non-ASCII letter): no client could send it",
                            i + 1
                        ),
                    ));
                }
                if k.len() < 16 {
                    return Err(invalid(
                        list,
                        format!("key #{} is shorter than 16 characters", i + 1),
                    ));
                }
            }
        }
        if let Some(i) = s.admin_keys.iter().position(|k| s.api_keys.contains(k)) {
            return Err(invalid(
                "server.admin_keys",
                format!(
                    "key #{} is also in server.api_keys: a key is either ordinary or admin",
                    i + 1
                ),
            ));
        }
        if !matches!(s.store.as_str(), "sqlite" | "memory") {
            let not_yet = if s.store.starts_with("nats://") {
                " (the NATS JetStream store is not available yet)"
            } else {
                ""
            };
            return Err(invalid(
                "server.store",
                format!("{:?}: expected \"sqlite\" or \"memory\"{not_yet}", s.store),
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
        if !(1024..=64 << 20).contains(&s.max_event) {
            return Err(invalid("server.max_event", "must be from 1KiB to 64MiB"));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if !(1..=65_535).contains(&s.listen_backlog) {
            return Err(invalid("server.listen_backlog", "must be from 1 to 65535"));
        }
        if s.max_streams == 0 {
            return Err(invalid("server.max_streams", "must be at least 1"));
        }
        if s.shutdown_grace < Duration::from_millis(100)
            || s.shutdown_grace > Duration::from_secs(3600)
        {
            return Err(invalid("server.shutdown_grace", "must be from 100ms to 1h"));
        }
        if s.header_timeout < Duration::from_millis(100) {
            return Err(invalid("server.header_timeout", "must be at least 100ms"));
        }
        if s.body_timeout < Duration::from_millis(100) {
            return Err(invalid("server.body_timeout", "must be at least 100ms"));
        }
        if s.idle_timeout < Duration::from_millis(100) {
            return Err(invalid("server.idle_timeout", "must be at least 100ms"));
        }
        if !matches!(s.sqlite_synchronous.as_str(), "normal" | "full" | "off") {
            return Err(invalid(
                "server.sqlite_synchronous",
                format!(
                    "{:?}: expected \"normal\", \"full\" or \"off\"",
                    s.sqlite_synchronous
                ),
            ));
        }
        if s.sqlite_commit_window > Duration::from_millis(100) {
            return Err(invalid(
                "server.sqlite_commit_window",
                "must be at most 100ms",
            ));
        }
        for (name, p) in &self.providers {
            let key = |k: &str| format!("providers.{name}.{k}");
            if !matches!(p.kind.as_str(), "openai" | "anthropic") {
                return Err(invalid(
                    key("kind"),
                    format!("{:?}: expected \"openai\" or \"anthropic\"", p.kind),
                ));
            }
            if !http_url(&p.base_url) {
                return Err(invalid(
                    key("base_url"),
                    format!("{:?} is not an http:// or https:// URL", p.base_url),
                ));
            }
            if p.max_concurrent_requests == 0 {
                return Err(invalid(
                    key("max_concurrent_requests"),
                    "must be at least 1",
                ));
            }
            if p.timeout.is_zero() {
                return Err(invalid(key("timeout"), "must be more than zero"));
            }
            if p.idle_timeout.is_some_and(|d| d.is_zero()) {
                return Err(invalid(key("idle_timeout"), "must be more than zero"));
            }
            if p.connect_timeout.is_zero() {
                return Err(invalid(key("connect_timeout"), "must be more than zero"));
            }
            if p.output_timeout.is_zero() {
                return Err(invalid(key("output_timeout"), "must be more than zero"));
            }
            if p.max_output < 1024 {
                return Err(invalid(key("max_output"), "must be at least 1KiB"));
            }
            if p.max_retries > MAX_PROVIDER_RETRIES {
                return Err(invalid(
                    key("max_retries"),
                    format!("must be at most {MAX_PROVIDER_RETRIES}"),
                ));
            }
            if p.retry_initial_backoff.is_zero() {
                return Err(invalid(
                    key("retry_initial_backoff"),
                    "must be more than zero",
                ));
            }
            if p.retry_max_backoff < p.retry_initial_backoff {
                return Err(invalid(
                    key("retry_max_backoff"),
                    "must be at least retry_initial_backoff",
                ));
            }
            if p.api_key_env.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(
                    key("api_key_env"),
                    "must name an environment variable",
                ));
            }
        }
        for (name, w) in &self.workflows {
            let key = |k: &str| format!("workflows.{name}.{k}");
            if w.run_timeout.is_some_and(|t| t.is_zero()) {
                return Err(invalid(
                    key("run_timeout"),
                    "must be more than zero (leave it out for no limit)",
                ));
            }
            if w.max_steps == Some(0) {
                return Err(invalid(key("max_steps"), "must be at least 1"));
            }
            match w.kind.as_str() {
                "ticker" | "ask-human" => {
                    if w.provider.is_some()
                        || w.model.is_some()
                        || w.system.is_some()
                        || w.temperature.is_some()
                        || w.max_tokens.is_some()
                        || !w.tools.is_empty()
                    {
                        return Err(invalid(
                            key("kind"),
                            "provider, model, system, temperature, max_tokens and tools belong to kind \"agent\"",
                        ));
                    }
                }
                "agent" => {
                    match w.provider.as_deref() {
                        None => {
                            return Err(invalid(
                                key("provider"),
                                "required for kind \"agent\" (a [providers.NAME])",
                            ));
                        }
                        Some(p) if !self.providers.contains_key(p) => {
                            return Err(invalid(
                                key("provider"),
                                format!("{p:?}: no [providers.{p}] is declared"),
                            ));
                        }
                        Some(_) => {}
                    }
                    if w.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
                        return Err(invalid(key("model"), "required for kind \"agent\""));
                    }
                    if w.temperature
                        .is_some_and(|t| !t.is_finite() || !(0.0..=2.0).contains(&t))
                    {
                        return Err(invalid(key("temperature"), "must be between 0 and 2"));
                    }
                    if w.max_tokens == Some(0) {
                        return Err(invalid(key("max_tokens"), "must be at least 1"));
                    }
                    w.agent_tools(name)?;
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

/// A duration or a size as written: a whole number, or a string with a unit.
enum NumOrText {
    Num(u64),
    Text(String),
}

/// Reads a [`NumOrText`]; anything else (a negative or fractional number, a boolean, a table)
/// is an error that says what was expected, not serde's "did not match any variant".
struct NumOrTextVisitor(&'static str);

impl<'de> serde::de::Visitor<'de> for NumOrTextVisitor {
    type Value = NumOrText;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumOrText, E> {
        Ok(NumOrText::Num(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumOrText, E> {
        u64::try_from(v)
            .map(NumOrText::Num)
            .map_err(|_| E::custom(format!("{v} is negative: expected {}", self.0)))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NumOrText, E> {
        Ok(NumOrText::Text(v.to_owned()))
    }
}

const DURATION: &str =
    "a duration: a whole number of seconds or a string like \"500ms\", \"15s\" or \"10m\"";
const SIZE: &str = "a size: a whole number of bytes or a string like \"64KiB\" or \"1MiB\"";

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match d.deserialize_any(NumOrTextVisitor(DURATION))? {
        NumOrText::Num(n) => Ok(Duration::from_secs(n)),
        NumOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    size(d).map(Some)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match d.deserialize_any(NumOrTextVisitor(SIZE))? {
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
    fn a_store_that_is_not_available_is_named_so() {
        let e = |store: &str| {
            let c = Config::from_toml(&format!("[server]\nstore = {store:?}\n")).unwrap();
            c.validate().unwrap_err().to_string()
        };
        let nats = e("nats://127.0.0.1:4222");
        assert!(
            nats.contains("server.store")
                && nats.contains("the NATS JetStream store is not available yet"),
            "{nats}"
        );
        let other = e("postgres");
        assert!(
            other.contains("expected \"sqlite\" or \"memory\"") && !other.contains("NATS"),
            "{other}"
        );
    }

    const AGENT_EXAMPLE: &str = r#"
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:11434/v1"
api_key_env = "OPENAI_API_KEY"
max_concurrent_requests = 64
timeout = "60s"

[workflows.assistant]
kind = "agent"
provider = "local"
model = "qwen3:8b"
system = "You are a helpful assistant."
max_steps = 8
max_concurrent_runs = 100
queue = 1000
run_timeout = "10m"

[[workflows.assistant.tools]]
name = "get_weather"
kind = "http"
url = "http://127.0.0.1:9000/weather"
description = "Current weather for a city"
parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }

[[workflows.assistant.tools]]
name = "confirm"
kind = "client"
description = "Ask the user to confirm an action"
parameters = { type = "object", properties = { action = { type = "string" } } }
"#;

    #[test]
    fn agent_example_validates() {
        let c = Config::from_toml(AGENT_EXAMPLE).unwrap();
        c.validate().unwrap();
        let w = &c.workflows["assistant"];
        let tools = w.agent_tools("assistant").unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(
            tools[0].kind,
            ToolKind::Http {
                url: "http://127.0.0.1:9000/weather".into(),
                timeout: Duration::from_secs(30),
                max_response_bytes: 1 << 20,
                max_concurrent_calls: 64,
            }
        );
        assert_eq!(
            tools[0].parameters,
            serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
        );
        assert_eq!(tools[1].kind, ToolKind::Client);
        assert_eq!(tools[1].description, "Ask the user to confirm an action");
    }

    #[test]
    fn agent_errors_name_the_key() {
        let check = |edit: &dyn Fn(&str) -> String, key: &str| {
            let text = edit(AGENT_EXAMPLE);
            let e = match Config::from_toml(&text) {
                Ok(c) => c.validate().unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(key), "{key}: {e}");
        };
        check(
            &|t| t.replace("provider = \"local\"\n", ""),
            "workflows.assistant.provider",
        );
        check(
            &|t| t.replace("provider = \"local\"", "provider = \"nope\""),
            "workflows.assistant.provider",
        );
        check(
            &|t| t.replace("model = \"qwen3:8b\"\n", ""),
            "workflows.assistant.model",
        );
        check(
            &|t| t.replace("max_steps = 8", "max_steps = 0"),
            "workflows.assistant.max_steps",
        );
        check(
            &|t| t.replace("name = \"confirm\"", "name = \"get_weather\""),
            "workflows.assistant.tools[1].name",
        );
        check(
            &|t| t.replace("name = \"confirm\"", "name = \"con firm\""),
            "workflows.assistant.tools[1].name",
        );
        check(
            &|t| t.replace("url = \"http://127.0.0.1:9000/weather\"\n", ""),
            "workflows.assistant.tools[0].url",
        );
        check(
            &|t| t.replace("http://127.0.0.1:9000/weather", "file:///etc/passwd"),
            "workflows.assistant.tools[0].url",
        );
        check(
            &|t| t.replace("kind = \"client\"", "kind = \"shell\""),
            "workflows.assistant.tools[1].kind",
        );
        check(
            &|t| t.replace("kind = \"client\"", "kind = \"client\"\nurl = \"http://x\""),
            "workflows.assistant.tools[1].kind",
        );
        check(
            &|t| t.replace("kind = \"client\"", "kind = \"client\"\nbogus = 1"),
            "workflows.assistant.tools[1]",
        );
        check(
            &|t| {
                t.replace(
                    "base_url = \"http://127.0.0.1:11434/v1\"",
                    "base_url = \"localhost\"",
                )
            },
            "providers.local.base_url",
        );
        check(
            &|t| {
                t.replace(
                    "max_concurrent_requests = 64",
                    "max_concurrent_requests = 0",
                )
            },
            "providers.local.max_concurrent_requests",
        );
        check(
            &|t| format!("{t}\n[workflows.t]\nkind = \"ticker\"\nmodel = \"x\"\n"),
            "workflows.t.kind",
        );
        let provider_key = |extra: &str| -> Box<dyn Fn(&str) -> String> {
            let extra = extra.to_owned();
            Box::new(move |t: &str| t.replace("timeout = \"60s\"", &extra))
        };
        for (extra, key) in [
            ("timeout = \"0s\"", "providers.local.timeout"),
            ("idle_timeout = \"0s\"", "providers.local.idle_timeout"),
            (
                "connect_timeout = \"0s\"",
                "providers.local.connect_timeout",
            ),
            ("connect_timeout = \"soon\"", "connect_timeout"),
            ("max_retries = 101", "providers.local.max_retries"),
            ("max_retries = -1", "max_retries"),
            (
                "retry_initial_backoff = \"0s\"",
                "providers.local.retry_initial_backoff",
            ),
            (
                "retry_initial_backoff = \"2s\"\nretry_max_backoff = \"1s\"",
                "providers.local.retry_max_backoff",
            ),
            (
                "retry_max_backoff = \"100ms\"",
                "providers.local.retry_max_backoff",
            ),
            ("output_timeout = \"0s\"", "providers.local.output_timeout"),
            ("max_output = \"512\"", "providers.local.max_output"),
            ("max_output = \"lots\"", "max_output"),
            ("read_timeout = \"1s\"", "read_timeout"),
        ] {
            check(&*provider_key(extra), key);
        }
        check(
            &|t| {
                t.replace(
                    "kind = \"http\"",
                    "kind = \"http\"\nmax_concurrent_calls = 0",
                )
            },
            "workflows.assistant.tools[0].max_concurrent_calls",
        );
        check(
            &|t| {
                t.replace(
                    "kind = \"client\"",
                    "kind = \"client\"\nmax_concurrent_calls = 2",
                )
            },
            "workflows.assistant.tools[1].kind",
        );
    }

    #[test]
    fn the_documented_example_validates() {
        let doc = include_str!("../../../docs/protocol.md");
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = Config::from_toml(&doc[start..end]).unwrap();
        c.validate().unwrap();
        let p = &c.providers["local"];
        assert_eq!(p.connect_timeout, Duration::from_secs(10));
        assert_eq!(p.effective_idle_timeout(), Duration::from_secs(60));
        assert_eq!(p.max_retries, 2);
        let tools = c.workflows["assistant"].agent_tools("assistant").unwrap();
        assert!(matches!(
            tools[0].kind,
            ToolKind::Http {
                max_concurrent_calls: 64,
                ..
            }
        ));
    }

    #[test]
    fn provider_timeouts_and_retries() {
        let c = Config::from_toml(AGENT_EXAMPLE).unwrap();
        let p = &c.providers["local"];
        assert_eq!(p.connect_timeout, Duration::from_secs(10));
        assert_eq!(p.idle_timeout, None);
        assert_eq!(
            p.effective_idle_timeout(),
            Duration::from_secs(60),
            "timeout"
        );
        assert_eq!(p.max_retries, 2);
        assert_eq!(p.retry_initial_backoff, Duration::from_millis(500));
        assert_eq!(p.retry_max_backoff, Duration::from_secs(8));

        let text = AGENT_EXAMPLE.replace(
            "timeout = \"60s\"",
            "timeout = \"30s\"\nidle_timeout = \"45s\"\nconnect_timeout = \"2s\"\nmax_retries = 0\nretry_initial_backoff = \"100ms\"\nretry_max_backoff = \"1s\"",
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        let p = &c.providers["local"];
        assert_eq!(p.effective_idle_timeout(), Duration::from_secs(45));
        assert_eq!(p.connect_timeout, Duration::from_secs(2));
        assert_eq!(p.max_retries, 0);
        assert_eq!(p.retry_initial_backoff, Duration::from_millis(100));
        assert_eq!(p.retry_max_backoff, Duration::from_secs(1));

        let text = AGENT_EXAMPLE.replace(
            "url = \"http://127.0.0.1:9000/weather\"",
            "url = \"http://127.0.0.1:9000/weather\"\nmax_concurrent_calls = 4",
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        let tools = c.workflows["assistant"].agent_tools("assistant").unwrap();
        assert!(matches!(
            tools[0].kind,
            ToolKind::Http {
                max_concurrent_calls: 4,
                ..
            }
        ));
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
        for (text, key) in [
            ("max_event = \"10B\"", "server.max_event"),
            ("max_event = \"65MiB\"", "server.max_event"),
            ("shutdown_grace = \"0s\"", "server.shutdown_grace"),
            ("shutdown_grace = \"2h\"", "server.shutdown_grace"),
            ("max_streams = 0", "server.max_streams"),
            ("max_connections = 0", "server.max_connections"),
            ("listen_backlog = 0", "server.listen_backlog"),
            ("listen_backlog = 70000", "server.listen_backlog"),
            ("body_timeout = \"50ms\"", "server.body_timeout"),
            (
                "sqlite_synchronous = \"sometimes\"",
                "server.sqlite_synchronous",
            ),
            (
                "sqlite_commit_window = \"1s\"",
                "server.sqlite_commit_window",
            ),
        ] {
            let c = Config::from_toml(&format!("[server]\n{text}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let c = Config::from_toml("[server]\nmax_event = \"1MiB\"\nshutdown_grace = \"30s\"\n")
            .unwrap();
        c.validate().unwrap();
        let c = Config::from_toml("[workflows.x]\nkind = \"nope\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("workflows.x.kind")
        );
    }

    #[test]
    fn bad_limits_and_keys_are_named_with_the_problem() {
        // Parse errors: the key, and what a duration or a size looks like.
        for (text, key, says) in [
            ("heartbeat = -1", "heartbeat", "negative"),
            ("shutdown_grace = 1.5", "shutdown_grace", "a duration"),
            ("heartbeat = true", "heartbeat", "a duration"),
            ("max_body = -5", "max_body", "negative"),
            ("max_body = 2.5", "max_body", "a size"),
        ] {
            let e = Config::from_toml(&format!("[server]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
            assert!(!e.contains("variant"), "{text}: {e}");
        }
        // Validation: zero limits of a workflow, of any kind.
        for (kind, text, key) in [
            ("ticker", "run_timeout = \"0s\"", "workflows.w.run_timeout"),
            ("ask-human", "run_timeout = 0", "workflows.w.run_timeout"),
            ("ticker", "max_steps = 0", "workflows.w.max_steps"),
            ("ask-human", "max_steps = 0", "workflows.w.max_steps"),
        ] {
            let c =
                Config::from_toml(&format!("[workflows.w]\nkind = \"{kind}\"\n{text}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{kind} {text}: {e}");
        }
        // Keys: the list a short key is in, counted within that list; a key in both lists.
        let ok = "0123456789abcdef";
        let c = Config::from_toml(&format!(
            "[server]\napi_keys = [\"{ok}\"]\nadmin_keys = [\"short\"]\n"
        ))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("server.admin_keys") && e.contains("key #1"),
            "{e}"
        );
        let c = Config::from_toml(&format!(
            "[server]\napi_keys = [\"{ok}\"]\nadmin_keys = [\"{ok}\"]\n"
        ))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("server.admin_keys") && e.contains("also in"),
            "{e}"
        );
        assert!(!e.contains(ok), "a key is never shown: {e}");
        // Keys no client could send: spaces, control characters, non-ASCII (whose 16 bytes
        // may also be fewer than 16 characters).
        for bad in [
            "trailing-space-key-0123 ",
            "nl-key-0123456789abc\n",
            "clé-secrète-0123456789",
            "ééééééééé",
        ] {
            let c =
                Config::from_toml(&format!("[server]\napi_keys = [\"{ok}\", {bad:?}]\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("server.api_keys")
                    && e.contains("key #2")
                    && e.contains("visible ASCII"),
                "{bad:?}: {e}"
            );
        }
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
        // Key lists from the environment may also be comma-separated.
        let vars = [(
            "SLUICE_SERVER__ADMIN_KEYS".to_owned(),
            "0123456789abcdef, fedcba9876543210".to_owned(),
        )];
        let c = Config::from_toml_and_env("", vars).unwrap();
        assert_eq!(
            c.server.admin_keys,
            ["0123456789abcdef", "fedcba9876543210"]
        );
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
