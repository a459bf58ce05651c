//! `sluice-mock-llm`: serves a paced scripted model for benchmarks and manual tests.
//!
//! ```text
//! sluice-mock-llm [--listen ADDR] [--tokens N] [--rate PER_SECOND] [--stamp]
//! ```
//! Every request, on either API, gets `N` text deltas (default 100) at `PER_SECOND` (default
//! 50), then usage and `stop`. With `--stamp` each delta's text is `t<unix-ns> `, the time it
//! was written (the agent load scenario of `sluice-bench` measures added latency from it).
//! Prints `listening on http://ADDR/v1` and serves until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use sluice_mock_llm::{MockServer, Script};

const USAGE: &str =
    "usage: sluice-mock-llm [--listen ADDR] [--tokens N] [--rate PER_SECOND] [--stamp]";

struct Args {
    listen: SocketAddr,
    tokens: usize,
    rate: f64,
    stamp: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: 100,
        rate: 50.0,
        stamp: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--listen" => {
                args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?;
            }
            "--tokens" => args.tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--rate" => args.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--stamp" => args.stamp = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let script = if args.stamp {
        Script::paced_stamped(args.tokens, args.rate)
    } else {
        Script::paced(args.tokens, args.rate)
    }
    .record(false);
    let mock = match MockServer::bind(args.listen, script).await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    println!("listening on {}", mock.base_url());
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    eprintln!(
        "{} requests, {} streams completed, {} closed by clients",
        mock.request_count(),
        mock.completed_streams(),
        mock.client_disconnects()
    );
    ExitCode::SUCCESS
}
