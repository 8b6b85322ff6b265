//! The `sluice` command line: parse, start telemetry, hand over to the command (one file per
//! subcommand under `cli/`), which hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use sluice::service::telemetry::init_logging;

mod cli;

fn main() -> anyhow::Result<ExitCode> {
    cli::limit_malloc_arenas();
    let cli = cli::Cli::parse();
    init_logging(cli.log_format, &cli.command.log_filter());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(cli.command.run())
}
