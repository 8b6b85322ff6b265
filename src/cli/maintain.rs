//! `sluice vacuum`, `sluice checkpoint` and `sluice inspect`: maintenance of each configured
//! table and its dead letters, one line (or block) per table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sluice::table::maintain;

use super::{load_config, table_locations};

/// `sluice vacuum` flags.
#[derive(clap::Args)]
pub struct VacuumArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Only this table (and its dead letters).
    #[arg(long)]
    table: Option<String>,
    /// Keep unreferenced files written less than this many hours ago.
    #[arg(long, default_value_t = 168)]
    retention_hours: u64,
    /// Allow a retention below 168 hours (breaks longer readers and time travel).
    #[arg(long)]
    allow_short_retention: bool,
    /// List what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The flags of `sluice checkpoint` and `sluice inspect`.
#[derive(clap::Args)]
pub struct TableArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Only this table (and its dead letters).
    #[arg(long)]
    table: Option<String>,
}

/// Deletes the data files the table no longer references once older than the retention.
pub async fn vacuum(args: VacuumArgs) -> anyhow::Result<ExitCode> {
    let VacuumArgs {
        config,
        table,
        retention_hours,
        allow_short_retention,
        dry_run,
    } = args;
    let cfg = load_config(&config, None)?;
    for (name, location) in table_locations(&cfg, table.as_deref(), &config)? {
        let report = maintain::vacuum(
            &location,
            cfg.storage_options(),
            Duration::from_secs(retention_hours * 3600),
            allow_short_retention,
            dry_run,
        )
        .await?;
        println!(
            "{name}: {} {} files",
            if report.dry_run {
                "would delete"
            } else {
                "deleted"
            },
            report.files
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a checkpoint of each table, removes expired log files and thins old checkpoints.
pub async fn checkpoint(args: TableArgs) -> anyhow::Result<ExitCode> {
    let TableArgs { config, table } = args;
    let cfg = load_config(&config, None)?;
    for (name, location) in table_locations(&cfg, table.as_deref(), &config)? {
        let report = maintain::checkpoint(&location, cfg.storage_options()).await?;
        println!(
            "{name}: checkpoint at version {}, {} expired log files and old checkpoints removed",
            report.version, report.logs_removed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows each table's files, versions, positions and lease.
pub async fn inspect(args: TableArgs) -> anyhow::Result<ExitCode> {
    let TableArgs { config, table } = args;
    let cfg = load_config(&config, None)?;
    for (name, location) in table_locations(&cfg, table.as_deref(), &config)? {
        let inspection =
            maintain::inspect(&name, &location, cfg.storage_options(), &cfg.kafka.group_id).await?;
        print!("{}", inspection.render());
    }
    Ok(ExitCode::SUCCESS)
}
