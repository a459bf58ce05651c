//! The client commands of the `sluice` binary: `run`, `tail`, `send`, `cancel`, `runs`,
//! `workflows`, all through `sluice-client`.
//!
//! Layout: `follow.rs` follows a run's stream (human view or `--json`, prompts, Ctrl-C);
//! `render.rs` is the human view; `commands.rs` the one-shot commands.
//!
//! Exit codes: 0 completed (or success), 1 the run failed (or the server refused the request),
//! 2 usage or connection error, 130 cancelled (or interrupted by Ctrl-C).

mod commands;
mod follow;
mod render;

use std::io::IsTerminal;
use std::process::ExitCode;

use sluice_client::{Client, ErrorKind};

/// Success; the run completed.
pub const EXIT_OK: u8 = 0;
/// The run failed; the server refused the request.
pub const EXIT_FAILED: u8 = 1;
/// Bad usage or no connection to the server.
pub const EXIT_USAGE: u8 = 2;
/// The run was cancelled, or Ctrl-C.
pub const EXIT_CANCELLED: u8 = 130;

/// Where the server is and how to authenticate: on every client command.
#[derive(Debug, clap::Args)]
pub struct Connect {
    /// URL of the Sluice server (client commands).
    #[arg(
        long,
        global = true,
        env = "SLUICE_URL",
        default_value = sluice_client::DEFAULT_URL,
        value_name = "URL"
    )]
    server: String,
    /// API key sent as `Authorization: Bearer KEY` (client commands).
    #[arg(
        long,
        global = true,
        env = "SLUICE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
}

/// The client commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start a run of WORKFLOW; with --follow, watch it until it ends.
    Run(commands::RunArgs),
    /// Follow a run's events until it ends.
    Tail(commands::TailArgs),
    /// Send an event into a run (human input, client tool results, …).
    Send(commands::SendArgs),
    /// Cancel a run.
    Cancel(commands::CancelArgs),
    /// List runs, newest first.
    Runs(commands::RunsArgs),
    /// List the deployed workflows.
    Workflows(commands::WorkflowsArgs),
}

/// Runs a client command and answers the process exit code.
pub async fn execute(connect: Connect, command: Command) -> ExitCode {
    let mut builder = Client::builder().base_url(&connect.server);
    if let Some(key) = connect.api_key.as_deref().filter(|k| !k.is_empty()) {
        builder = builder.api_key(key);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: --server {}: {e}", connect.server);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let ctx = Ctx {
        client,
        server: connect.server,
    };
    let code = match command {
        Command::Run(a) => commands::run(&ctx, a).await,
        Command::Tail(a) => commands::tail(&ctx, a).await,
        Command::Send(a) => commands::send(&ctx, a).await,
        Command::Cancel(a) => commands::cancel(&ctx, a).await,
        Command::Runs(a) => commands::runs(&ctx, a).await,
        Command::Workflows(a) => commands::workflows(&ctx, a).await,
    };
    ExitCode::from(code)
}

/// What every command needs.
pub struct Ctx {
    client: Client,
    server: String,
}

impl Ctx {
    /// Reports an SDK error on stderr with a hint, and answers the exit code: 2 for connection,
    /// configuration and authentication problems, else `refused`.
    fn fail(&self, e: &sluice_client::Error, refused: u8) -> u8 {
        eprintln!("sluice: {e}");
        match e.kind() {
            ErrorKind::Transport => {
                eprintln!(
                    "sluice: is `sluice serve` running at {}? (set --server or SLUICE_URL)",
                    self.server
                );
                EXIT_USAGE
            }
            ErrorKind::Unauthorized => {
                eprintln!("sluice: the server wants an API key: set --api-key or SLUICE_API_KEY");
                EXIT_USAGE
            }
            ErrorKind::Config => EXIT_USAGE,
            ErrorKind::Rejected {
                retry_after: Some(d),
            } => {
                eprintln!(
                    "sluice: the server is at capacity; retry in {} s",
                    d.as_secs()
                );
                refused
            }
            _ => refused,
        }
    }
}

/// Whether stdout is a terminal, and colours are wanted there (`NO_COLOR` unset).
fn terminal() -> (bool, bool) {
    let tty = std::io::stdout().is_terminal();
    let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    (tty, color)
}

/// Parses a JSON argument; a usage error names the argument.
fn parse_json(what: &str, text: &str) -> Result<serde_json::Value, u8> {
    serde_json::from_str(text).map_err(|e| {
        eprintln!("sluice: {what} is not valid JSON: {e}");
        eprintln!("sluice: quote it for the shell, e.g. '{{\"n\": 3}}' or '\"text\"'");
        EXIT_USAGE
    })
}
