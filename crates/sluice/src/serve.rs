//! `sluice serve`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use sluice_engine::{Engine, Limits, Workflow, builtin};
use sluice_server::config::Config;
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
        None => String::new(),
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

/// The workflows to deploy: exactly those the file declares, or the built-ins without one.
fn workflows(config: &Config, from_file: bool) -> anyhow::Result<Vec<Workflow>> {
    if !from_file {
        return Ok(vec![builtin::ticker(), builtin::ask_human()]);
    }
    let mut out = Vec::new();
    for (name, w) in &config.workflows {
        let base = match w.kind.as_str() {
            "ticker" => builtin::ticker(),
            "ask-human" => builtin::ask_human(),
            other => anyhow::bail!("workflows.{name}.kind: {other:?} is not available"),
        };
        let limits = Limits {
            max_concurrent_runs: w.max_concurrent_runs,
            queue: w.queue,
            run_timeout: w.run_timeout,
            max_steps: w.max_steps,
            description: w.description.clone(),
        };
        out.push(base.configure(name, &limits)?);
    }
    if out.is_empty() {
        anyhow::bail!("the configuration declares no [workflows.NAME]");
    }
    Ok(out)
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.server.store.as_str() {
        "memory" => Arc::new(sluice_store_memory::MemoryStore::new()),
        _ => {
            let path = config.server.data_dir.join("sluice.db");
            let store = sluice_store_sqlite::SqliteStore::open(
                &path,
                sluice_store_sqlite::SqliteOptions::default(),
            )
            .with_context(|| format!("cannot open the store at {}", path.display()))?;
            Arc::new(store)
        }
    })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = load(&args)?;
    let addr = config.validate()?;
    let store = open_store(&config)?;
    let engine = Engine::new(store, workflows(&config, args.config.is_some())?)?;
    let recovered = engine.recover().await.context("recovering runs")?;
    if recovered != sluice_engine::Recovered::default() {
        tracing::info!(
            resumed = recovered.resumed,
            requeued = recovered.requeued,
            interrupted = recovered.interrupted,
            "recovered runs"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let names: Vec<String> = engine
        .workflows()
        .iter()
        .map(|w| w.name().to_owned())
        .collect();
    tracing::info!(%local, store = %config.server.store, workflows = ?names, "sluice listening");
    // Scripts and tests read this line to find an ephemeral port.
    println!("listening on http://{local}");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    let app = sluice_server::App::new(engine, config.server.clone());
    sluice_server::serve(listener, app, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
