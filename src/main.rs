//! The `sluice` command line: parse, start telemetry, hand over to the command (one file per
//! subcommand under `cli/`), which hands over to the library.

use std::process::ExitCode;

use clap::Parser;

use sluice::service::telemetry::init_logging;

mod cli;

fn main() -> ExitCode {
    cli::limit_malloc_arenas();
    let cli = cli::Cli::parse();
    init_logging(cli.log_format, &cli.command.log_filter());
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::Error::new(e).context("starting the async runtime"))
        .and_then(|runtime| runtime.block_on(cli.command.run()));
    match outcome {
        Ok(code) => code,
        Err(error) => {
            report(&error);
            ExitCode::FAILURE
        }
    }
}

/// The error as one message: each cause added only when the text before does not already say
/// it (most of sluice's errors quote their cause). The backtrace only when `RUST_BACKTRACE`
/// asks for one.
fn report(error: &anyhow::Error) {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    eprintln!("error: {message}");
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        eprintln!("\n{}", error.backtrace());
    }
}
