//! The client commands of the `sluice` binary: `run`, `tail`, `send`, `cancel`, `runs`,
//! `workflows`, all through `sluice-client`.
//!
//! Layout: `follow.rs` follows a run's stream (human view or `--json`, prompts, Ctrl-C);
//! `render.rs` is the human view; `commands.rs` the commands; `output.rs` writes to stdout and
//! stderr without panicking; `interrupt.rs` listens for Ctrl-C.
//!
//! Exit codes, one rule for every command (the protocol's "0 completed, 1 failed, 2 usage or
//! connection error, 130 cancelled"):
//! - 0: done; for `run --follow` and `tail`, the run completed. Also when stdout's reader goes
//!   away (`sluice runs | head -1`): the command stops quietly.
//! - 1: the run failed (`chain-error`). Only `run --follow` and `tail` exit 1, so 1 always
//!   means "the run ran and failed".
//! - 2: the command could not do what it was asked: bad usage or JSON; the server cannot be
//!   reached, wants an API key, or refused the request (unknown workflow or run, invalid input,
//!   a run that has already ended for `send` and `cancel`, at capacity); the event stream broke
//!   for good. The reason is on stderr.
//! - 130: the run was cancelled, or Ctrl-C stopped the command (the run goes on unless
//!   `--cancel-on-exit`).

mod commands;
mod follow;
mod interrupt;
mod output;
mod render;

use std::io::IsTerminal;
use std::process::ExitCode;

use sluice_client::{Client, ErrorKind};

use output::say;

/// Done; the run completed.
pub const EXIT_OK: u8 = 0;
/// The run failed.
pub const EXIT_FAILED: u8 = 1;
/// Bad usage, no connection to the server, or a request the server refused.
pub const EXIT_USAGE: u8 = 2;
/// The run was cancelled, or Ctrl-C.
pub const EXIT_CANCELLED: u8 = 130;

/// How a command ends: `Ok(code)` after doing its work, `Err(code)` when it stopped early;
/// either way the process exits with `code`.
type Exit = Result<u8, u8>;

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
pub async fn execute(mut connect: Connect, command: Command) -> ExitCode {
    // An empty SLUICE_URL counts as unset, as for the API key.
    if connect.server.trim().is_empty() {
        sluice_client::DEFAULT_URL.clone_into(&mut connect.server);
    }
    let mut builder = Client::builder().base_url(&connect.server);
    if let Some(key) = connect.api_key.as_deref().filter(|k| !k.is_empty()) {
        builder = builder.api_key(key);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            say!(
                "--server {}: {e}",
                sluice_protocol::without_userinfo(&connect.server)
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let ctx = Ctx {
        client,
        server: connect.server,
        has_key: connect.api_key.as_deref().is_some_and(|k| !k.is_empty()),
    };
    let exit = match command {
        Command::Run(a) => commands::run(&ctx, a).await,
        Command::Tail(a) => commands::tail(&ctx, a).await,
        Command::Send(a) => commands::send(&ctx, a).await,
        Command::Cancel(a) => commands::cancel(&ctx, a).await,
        Command::Runs(a) => commands::runs(&ctx, a).await,
        Command::Workflows(a) => commands::workflows(&ctx, a).await,
    };
    ExitCode::from(exit.unwrap_or_else(|code| code))
}

/// What every command needs.
pub struct Ctx {
    client: Client,
    server: String,
    /// Whether an API key was given (a 401 then means it was refused).
    has_key: bool,
}

impl Ctx {
    /// Reports a request that failed on stderr, with a hint where one helps, and answers the
    /// exit code: always 2 (the command could not do what it was asked).
    fn refused(&self, e: &sluice_client::Error) -> u8 {
        say!("{e}");
        match e.kind() {
            ErrorKind::Transport => {
                say!(
                    "is `sluice serve` running at {}? (set --server or SLUICE_URL)",
                    sluice_protocol::without_userinfo(&self.server)
                );
            }
            ErrorKind::Unauthorized if self.has_key => {
                say!(
                    "the server refused the API key given (--api-key or SLUICE_API_KEY): is it one of its keys?"
                );
            }
            ErrorKind::Unauthorized => {
                say!("the server wants an API key: set --api-key or SLUICE_API_KEY");
            }
            ErrorKind::Rejected {
                retry_after: Some(d),
            } => {
                say!(
                    "the server is at capacity; retry in {} s",
                    d.as_secs().max(1)
                );
            }
            ErrorKind::Conflict if e.to_string().contains("if_busy=enqueue") => {
                say!("`sluice run --enqueue` queues the run behind it");
            }
            ErrorKind::NotFound if e.code() == Some("run_not_found") => {
                say!("`sluice runs` lists the runs");
            }
            ErrorKind::NotFound if e.code() == Some("workflow_not_found") => {
                say!("`sluice workflows` lists the deployed workflows");
            }
            _ => {}
        }
        EXIT_USAGE
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
        say!("{what} is not valid JSON: {e}");
        say!("quote it for the shell, e.g. '{{\"n\": 3}}' or '\"text\"'");
        EXIT_USAGE
    })
}
