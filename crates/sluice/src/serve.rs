//! `sluice serve`.

use std::path::PathBuf;
use std::sync::Arc;

use std::collections::BTreeMap;

use anyhow::Context as _;
use sluice_agent::{AgentOptions, Tool};
use sluice_engine::{Engine, Limits, Workflow, builtin};
use sluice_llm::{ApiKey, Provider, ProviderConfig, ProviderKind, RetryPolicy};
use sluice_server::config::{Config, ToolKind, WorkflowOptions};
use sluice_store::Store;
use tokio_util::sync::CancellationToken;

/// `sluice serve [--config FILE] [--listen ADDR] [--data-dir DIR]`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (sluice.toml); without it the built-in workflows are served.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (overrides server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory of the embedded store (overrides server.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn load(args: &ServeArgs) -> anyhow::Result<Config> {
    let text = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => BUILT_IN.to_owned(),
    };
    let mut config = Config::from_toml_and_env(&text, std::env::vars())?;
    if let Some(l) = &args.listen {
        config.server.listen.clone_from(l);
    }
    if let Some(d) = &args.data_dir {
        config.server.data_dir.clone_from(d);
    }
    Ok(config)
}

/// Reads one environment variable; empty counts as unset. (Tests pass their own.)
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The model used by `assistant` when `OPENAI_MODEL` is not set.
const DEFAULT_ASSISTANT_MODEL: &str = "gpt-4o-mini";

/// Builds every `[providers.NAME]`, with its API key read from the variable `api_key_env`
/// names, its timeouts (`idle_timeout`, or its older name `timeout`) and its retry policy.
fn providers(config: &Config, env: Env<'_>) -> anyhow::Result<BTreeMap<String, Provider>> {
    let mut out = BTreeMap::new();
    for (name, p) in &config.providers {
        let kind = match p.kind.as_str() {
            "anthropic" => ProviderKind::Anthropic,
            _ => ProviderKind::OpenAi,
        };
        let mut provider = ProviderConfig::new(name.clone(), kind, p.base_url.clone())
            .with_max_concurrent_requests(p.max_concurrent_requests)
            .with_connect_timeout(p.connect_timeout)
            .with_idle_timeout(p.effective_idle_timeout())
            .with_output_timeout(p.output_timeout)
            .with_max_output(p.max_output)
            .with_retry(RetryPolicy {
                max_attempts: p.max_retries.saturating_add(1),
                initial_backoff: p.retry_initial_backoff,
                max_backoff: p.retry_max_backoff,
                ..RetryPolicy::default()
            });
        if let Some(var) = &p.api_key_env {
            match env(var) {
                Some(key) => provider = provider.with_api_key(ApiKey::new(key)),
                None => tracing::warn!(
                    provider = %name,
                    "providers.{name}.api_key_env: {var} is not set; calling the provider without an API key"
                ),
            }
        }
        let provider = Provider::new(provider).with_context(|| format!("providers.{name}"))?;
        out.insert(name.clone(), provider);
    }
    Ok(out)
}

/// A `kind = "agent"` workflow from its (validated) configuration.
fn agent_workflow(
    name: &str,
    w: &WorkflowOptions,
    providers: &BTreeMap<String, Provider>,
) -> anyhow::Result<Workflow> {
    let provider_name = w.provider.as_deref().unwrap_or_default();
    let provider = providers
        .get(provider_name)
        .with_context(|| format!("workflows.{name}.provider: no [providers.{provider_name}]"))?;
    let mut options = AgentOptions::new(provider.clone(), w.model.clone().unwrap_or_default());
    options.system = w.system.clone();
    options.max_steps = w.max_steps.unwrap_or(sluice_agent::DEFAULT_MAX_STEPS);
    options.temperature = w.temperature;
    options.max_tokens = w.max_tokens;
    options.description = w.description.clone().unwrap_or_default();
    options.tools = w
        .agent_tools(name)?
        .into_iter()
        .map(|t| match t.kind {
            ToolKind::Http {
                url,
                timeout,
                max_response_bytes,
                max_concurrent_calls,
            } => Tool::Http {
                name: t.name,
                description: t.description,
                parameters: t.parameters,
                url,
                timeout,
                max_response_bytes,
                max_concurrent_calls,
            },
            ToolKind::Client => Tool::Client {
                name: t.name,
                description: t.description,
                parameters: t.parameters,
            },
        })
        .collect();
    Ok(sluice_agent::agent(name, options)?)
}

/// `assistant` from `OPENAI_API_KEY` / `OPENAI_BASE_URL` / `OPENAI_MODEL`, when either of the
/// first two is set.
fn default_assistant(env: Env<'_>) -> anyhow::Result<Option<Workflow>> {
    let key = env("OPENAI_API_KEY");
    let base_url = env("OPENAI_BASE_URL");
    if key.is_none() && base_url.is_none() {
        return Ok(None);
    }
    let base_url = base_url.unwrap_or_else(|| ProviderKind::OpenAi.default_base_url().to_owned());
    let mut config = ProviderConfig::new("openai", ProviderKind::OpenAi, base_url);
    if let Some(key) = key {
        config = config.with_api_key(ApiKey::new(key));
    }
    let provider = Provider::new(config).context("OPENAI_BASE_URL")?;
    let model = env("OPENAI_MODEL").unwrap_or_else(|| DEFAULT_ASSISTANT_MODEL.to_owned());
    let options = AgentOptions::new(provider, model)
        .with_description("A general assistant on the OpenAI-compatible model of OPENAI_MODEL.");
    Ok(Some(sluice_agent::agent("assistant", options)?))
}

/// The configuration without a file: the built-in workflows, as sections that
/// `SLUICE_WORKFLOWS__TICKER__QUEUE` and the like configure (or add to) like a file's.
const BUILT_IN: &str = r#"
[workflows.ticker]
kind = "ticker"

[workflows.ask-human]
kind = "ask-human"
"#;

/// The workflows to deploy: exactly those the configuration declares (without a file, the
/// built-ins of [`BUILT_IN`], and `assistant` when an OpenAI-compatible provider is set in the
/// environment).
fn workflows(config: &Config, from_file: bool, env: Env<'_>) -> anyhow::Result<Vec<Workflow>> {
    let mut out = declared(config, env)?;
    if !from_file && !config.workflows.contains_key("assistant") {
        match default_assistant(env)? {
            Some(assistant) => out.push(assistant),
            None => tracing::info!(
                "no model provider: set OPENAI_API_KEY or OPENAI_BASE_URL to serve the `assistant` agent, or declare [providers.NAME] and a kind = \"agent\" workflow in a config file"
            ),
        }
    }
    if out.is_empty() {
        anyhow::bail!("the configuration declares no [workflows.NAME]");
    }
    Ok(out)
}

/// Every `[workflows.NAME]` of the configuration, configured.
fn declared(config: &Config, env: Env<'_>) -> anyhow::Result<Vec<Workflow>> {
    let providers = providers(config, env)?;
    let mut out = Vec::new();
    for (name, w) in &config.workflows {
        let mut limits = Limits {
            max_concurrent_runs: w.max_concurrent_runs,
            queue: w.queue,
            run_timeout: w.run_timeout,
            max_steps: w.max_steps,
            description: w.description.clone(),
        };
        let base = match w.kind.as_str() {
            "ticker" => builtin::ticker(),
            "ask-human" => builtin::ask_human(),
            "agent" => {
                // An agent's max_steps counts model calls; its step budget follows from it.
                limits.max_steps = None;
                agent_workflow(name, w, &providers)?
            }
            other => anyhow::bail!("workflows.{name}.kind: {other:?} is not available"),
        };
        out.push(base.configure(name, &limits)?);
    }
    Ok(out)
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.server.store.as_str() {
        "memory" => Arc::new(sluice_store_memory::MemoryStore::new()),
        _ => {
            use sluice_store_sqlite::{SqliteOptions, Synchronous};
            let path = config.server.data_dir.join("sluice.db");
            let options = SqliteOptions {
                synchronous: match config.server.sqlite_synchronous.as_str() {
                    "full" => Synchronous::Full,
                    "off" => Synchronous::Off,
                    _ => Synchronous::Normal,
                },
                commit_window: config.server.sqlite_commit_window,
                inline_appends: config.server.sqlite_inline_appends,
                ..SqliteOptions::default()
            };
            let store = sluice_store_sqlite::SqliteStore::open(&path, options)
                .with_context(|| format!("cannot open the store at {}", path.display()))?;
            Arc::new(store)
        }
    })
}

/// The HTTP client's crates: at `debug` they log the address of every connection they make,
/// a provider's host and port, which the logs never name (docs/protocol.md). They log at `info`
/// at most unless `SLUICE_LOG` names them itself.
const CLIENT_CRATES: [&str; 2] = ["hyper_util", "reqwest"];

/// The log filter: `SLUICE_LOG` (default `info`), with [`CLIENT_CRATES`] capped.
fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = spec.unwrap_or("info");
    let mut filter = tracing_subscriber::EnvFilter::try_new(spec).unwrap_or_else(|_| "info".into());
    for krate in CLIENT_CRATES {
        if !spec.contains(krate)
            && let Ok(d) = format!("{krate}=info").parse()
        {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// The log's stderr, ignoring failed writes. A reader of the log that went away (a closed pipe:
/// `| head`, a log shipper restarting) must not stop the server: tracing reports a failed
/// write with `eprintln!`, which panics on a closed stderr, in whichever task was logging (the
/// signal handler, the retention sweeper), and that task would be gone.
struct LogOut;

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("SLUICE_LOG").ok().as_deref()))
        .with_writer(|| LogOut)
        // Colours for a terminal only (and never with NO_COLOR): not into files or journald.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let config = load(&args)?;
    let addr = config.validate()?;
    let store = open_store(&config)?;
    let engine = Engine::new(
        store,
        workflows(&config, args.config.is_some(), &process_env)?,
    )?;
    let recovered = engine.recover().await.context("recovering runs")?;
    if recovered != sluice_engine::Recovered::default() {
        tracing::info!(
            resumed = recovered.resumed,
            requeued = recovered.requeued,
            interrupted = recovered.interrupted,
            "recovered runs"
        );
    }
    let listener = sluice_server::bind(addr, config.server.listen_backlog)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let names: Vec<String> = engine
        .workflows()
        .iter()
        .map(|w| w.name().to_owned())
        .collect();
    tracing::info!(%local, store = %config.server.store, workflows = ?names, "sluice listening");
    // Scripts and tests read this line to find an ephemeral port (a closed stdout is no error).
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on http://{local}").and_then(|()| out.flush());
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
        tracing::info!("shutting down (a second signal exits at once)");
        // One who asks twice does not want to wait for the drain: what a run had written is
        // in the log, and the next start takes it up from its last checkpoint (as after kill -9).
        let code = wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(code);
    });
    let app = sluice_server::App::new(engine, config.server.clone());
    sluice_server::serve(listener, app, shutdown).await?;
    Ok(())
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM; the exit status a process ended by it has (130, 143).
async fn wait_for_signal() -> i32 {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            return tokio::select! {
                _ = ctrl_c => 130,
                _ = term.recv() => 143,
            };
        }
    }
    let _ = ctrl_c.await;
    130
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, v)| *n == name && !v.is_empty())
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn names(w: &[Workflow]) -> Vec<(&str, &str)> {
        w.iter().map(|w| (w.name(), w.kind())).collect()
    }

    #[test]
    fn assistant_only_with_an_openai_provider_in_the_environment() {
        let config = Config::from_toml(BUILT_IN).unwrap();
        let none = workflows(&config, false, &env_of(&[("OPENAI_API_KEY", "")])).unwrap();
        assert_eq!(
            names(&none),
            [("ask-human", "ask-human"), ("ticker", "ticker")]
        );
        let with = workflows(
            &config,
            false,
            &env_of(&[("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")]),
        )
        .unwrap();
        assert_eq!(names(&with)[2], ("assistant", "agent"));
        let bad = workflows(&config, false, &env_of(&[("OPENAI_BASE_URL", "nope")]));
        assert!(format!("{:#}", bad.unwrap_err()).contains("OPENAI_BASE_URL"));
    }

    #[test]
    fn without_a_file_the_environment_configures_the_built_ins() {
        let vars = [
            ("SLUICE_WORKFLOWS__TICKER__MAX_CONCURRENT_RUNS", "1"),
            ("SLUICE_WORKFLOWS__TICKER__QUEUE", "0"),
            ("SLUICE_WORKFLOWS__SLOW__KIND", "ticker"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::from_toml_and_env(BUILT_IN, vars).unwrap();
        let w = workflows(&config, false, &env_of(&[])).unwrap();
        assert_eq!(
            names(&w),
            [
                ("ask-human", "ask-human"),
                ("slow", "ticker"),
                ("ticker", "ticker")
            ]
        );
        let ticker = w.iter().find(|w| w.name() == "ticker").unwrap();
        assert_eq!((ticker.max_concurrent_runs(), ticker.queue()), (1, 0));
    }

    #[test]
    fn agents_from_the_config_file() {
        let text = r#"
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "LOCAL_KEY"

[workflows.helper]
kind = "agent"
provider = "local"
model = "m"
max_steps = 2
max_concurrent_runs = 3

[[workflows.helper.tools]]
name = "confirm"
kind = "client"

[workflows.tick]
kind = "ticker"
"#;
        let config = Config::from_toml(text).unwrap();
        config.validate().unwrap();
        let w = workflows(&config, true, &env_of(&[("LOCAL_KEY", "sk-1")])).unwrap();
        assert_eq!(names(&w), [("helper", "agent"), ("tick", "ticker")]);
        assert_eq!(w[0].max_concurrent_runs(), 3);
    }

    fn provider_of(extra: &str) -> Provider {
        let text = format!(
            "[providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n{extra}\n"
        );
        let config = Config::from_toml(&text).unwrap();
        config.validate().unwrap();
        providers(&config, &env_of(&[]))
            .unwrap()
            .remove("p")
            .unwrap()
    }

    #[test]
    fn provider_timeouts_and_retries_from_the_config() {
        // The defaults are the provider crate's.
        let p = provider_of("");
        let defaults = ProviderConfig::new("p", ProviderKind::OpenAi, "http://127.0.0.1:1/v1");
        assert_eq!(p.config().connect_timeout, defaults.connect_timeout);
        assert_eq!(p.config().idle_timeout, defaults.idle_timeout);
        assert_eq!(p.config().output_timeout, defaults.output_timeout);
        assert_eq!(p.config().max_output, defaults.max_output);
        assert_eq!(p.config().retry, RetryPolicy::default());

        let p = provider_of("output_timeout = \"90s\"\nmax_output = \"64KiB\"");
        assert_eq!(p.config().output_timeout, Duration::from_secs(90));
        assert_eq!(p.config().max_output, 64 << 10);

        // `timeout` is the older name of `idle_timeout`; it no longer sets the connect limit.
        let p = provider_of("timeout = \"5s\"");
        assert_eq!(p.config().idle_timeout, Duration::from_secs(5));
        assert_eq!(p.config().connect_timeout, Duration::from_secs(10));
        let p = provider_of("timeout = \"5s\"\nidle_timeout = \"7s\"");
        assert_eq!(p.config().idle_timeout, Duration::from_secs(7));

        let p = provider_of(
            "connect_timeout = \"2s\"\nmax_retries = 0\nretry_initial_backoff = \"50ms\"\nretry_max_backoff = \"1s\"",
        );
        assert_eq!(p.config().connect_timeout, Duration::from_secs(2));
        assert_eq!(
            p.config().retry,
            RetryPolicy {
                max_attempts: 1,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                ..RetryPolicy::default()
            }
        );
    }
}
