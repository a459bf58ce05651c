//! `sluice`: parse arguments, load configuration, initialise logging, run.
//!
//! `serve` runs the server (`serve.rs`); the other commands are its command-line client
//! (`cli/`).

mod cli;
mod serve;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the server's threads free each other's
/// allocations all the time (an event is built by a run's task, written by the SQLite writer
/// thread, dropped by a follower), and glibc's allocator serialises those frees on per-arena
/// locks, which the writer thread then waits for. Built without transparent huge pages
/// (`no_thp`): with them its arenas raised the server's RSS by half in S2.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: a streaming server for LLM agent workflows.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(flatten)]
    connect: cli::Connect,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    #[command(flatten)]
    Client(cli::Command),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&format!("cannot start the async runtime: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args)
                .await
                .map(|()| std::process::ExitCode::SUCCESS),
            Command::Client(command) => Ok(cli::execute(cli.connect, command).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&format!("{e:#}"));
            std::process::ExitCode::from(2)
        }
    }
}

/// `sluice: …` on stderr, ignoring a failure to write it (`eprintln!` would panic).
fn report(message: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "sluice: {message}");
}
