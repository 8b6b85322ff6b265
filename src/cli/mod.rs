//! The `sluice` subcommands, one file each: their flags and what they print. The work itself
//! is the library's; these turn its results into lines and exit codes.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sluice::config::Config;
use sluice::contract::dead_letters;
use sluice::contract::schema::TableSchema;
use sluice::service::telemetry::LogFormat;
use sluice::table::delta::table_location;

mod audit;
mod bench;
mod compact;
mod demo;
mod forget;
mod maintain;
mod produce;
mod service;
mod sql;
mod trino;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Exactly-once Kafka → Delta Lake for enriched social streams"
)]
pub struct Cli {
    /// Log format: human-readable text or JSON lines.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SLUICE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the whole pipeline on an in-process Kafka and a local table, then print a summary.
    Demo(demo::DemoArgs),
    /// Run the writer service until SIGINT/SIGTERM.
    Run(service::ServiceArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(service::ConfigCommand),
    /// Publish generated enriched posts to a Kafka cluster.
    Produce(produce::ProduceArgs),
    /// Prove every Kafka offset is in the table or its dead letters exactly once.
    ///
    /// Exit codes: 0 clean, 2 something missing or duplicated, 1 the audit could not run.
    Audit(audit::AuditArgs),
    /// Read a partition from the broker's new log after its log went backwards (a recreated
    /// topic, a failover, an unclean leader election): the writer stops such a partition and
    /// says so; this moves the table's position to the broker's first offset and records when,
    /// so the audit tells the old log's rows from the new one's. Restart the writers after.
    AcceptLog(audit::AcceptLogArgs),
    /// Compact small files into files near a target size (one-shot, for cron or a CronJob).
    ///
    /// Exit codes: 0 done (or nothing to do), 3 another compactor holds the table's lease,
    /// 1 failure.
    Compact(compact::CompactArgs),
    /// Delete data files the table no longer references (replaced by compaction, or uploaded by
    /// a writer that crashed before its commit) once they are older than the retention
    /// (default 7 days) and the table's tombstone for them has expired.
    Vacuum(maintain::VacuumArgs),
    /// Write a checkpoint now, remove expired log files and thin old checkpoints.
    Checkpoint(maintain::TableArgs),
    /// Apply the deletes and edits the writer recorded to each table with a `key`: remove the
    /// rows of deleted posts and the older versions of edited or redelivered ones, recording
    /// each in `<table>_deletions` (one pass; the service does this every maintenance interval).
    ///
    /// Exit codes: 0 done, 3 a compactor holds a table's lease, 1 failure.
    Apply(maintain::TableArgs),
    /// Erase posts by key or by author (GDPR erasure, takedowns): removes their rows from the
    /// table and the dead letters that name them, records each request in
    /// `<table>_deletions` so every later pass removes what still arrives for it, and says how
    /// the old versions' files go (vacuum, or at once with --purge-history). Idempotent; runs
    /// beside the service.
    ///
    /// Exit codes: 0 done, 3 a compactor holds the table's lease (nothing recorded), 1 failure.
    Forget(forget::ForgetArgs),
    /// Show per partition files, small files, bytes and rows; version, last checkpoint,
    /// committed Kafka positions and the compaction lease.
    Inspect(maintain::TableArgs),
    /// Query the tables with SQL: an interactive shell, one statement (-c) or a file (-f).
    ///
    /// Read-only. Every table of the config is registered by name, with its dead letters.
    Sql(sql::SqlArgs),
    /// Measure throughput, freshness and memory against the machine's limit; prints Markdown
    /// tables (stages: limit, pipeline, kafka, memory, freshness, compaction).
    Bench(bench::BenchArgs),
    /// Print the Trino SQL that registers every table of the config (and its dead letters)
    /// in a delta_lake catalog, with the locations taken from storage.root; or, with
    /// --server, register them through Trino (again and again: registered tables are kept).
    TrinoSql(trino::TrinoSqlArgs),
}

impl Command {
    /// What the command logs. delta-kernel logs an ERROR when it looks for a table that does
    /// not exist yet (sluice then creates it); its real failures reach sluice as errors and
    /// are logged with context.
    pub fn log_filter(&self) -> String {
        let level = match self {
            // Query output owns the terminal; only warnings and errors are logged.
            Command::Sql(_) | Command::Config(_) | Command::TrinoSql(_) | Command::Bench(_) => {
                "warn"
            }
            // On a terminal long jobs draw a progress bar instead of logging progress lines.
            Command::Compact(_) | Command::Produce(_) | Command::Audit(_)
                if std::io::stderr().is_terminal() =>
            {
                "warn"
            }
            // The demo's summary tells what happened (dead letters, labels, the audit); its
            // log lines would bury it.
            Command::Demo(_) => "error",
            _ => "info",
        };
        // delta-rs warns each time a commit finds a newer version and checks it for conflicts
        // (an append racing the maintenance thread's compaction commit, several a minute at
        // sub-second freshness): routine, resolved there; a real conflict is an error sluice
        // reports itself.
        format!(
            "{level},deltalake=warn,deltalake_core=warn,deltalake_core::writer::stats=error,deltalake_core::kernel::transaction=error,buoyant_kernel=off,buoyant_kernel_engine=off"
        )
    }

    /// Runs the command to its exit code.
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Demo(args) => demo::run(args).await,
            Command::Run(args) => service::run(args).await,
            Command::Config(service::ConfigCommand::Check(args)) => service::check(args),
            Command::Produce(args) => produce::run(args).await,
            Command::Audit(args) => audit::audit(args).await,
            Command::AcceptLog(args) => audit::accept(args).await,
            Command::Compact(args) => compact::run(args).await,
            Command::Vacuum(args) => maintain::vacuum(args).await,
            Command::Checkpoint(args) => maintain::checkpoint(args).await,
            Command::Apply(args) => maintain::apply(args).await,
            Command::Forget(args) => forget::run(args).await,
            Command::Inspect(args) => maintain::inspect(args).await,
            Command::Sql(args) => sql::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::TrinoSql(args) => trino::run(args).await,
        }
    }
}

pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only tunes the allocator; it runs before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The config file, then `SLUICE_*` environment overrides, then `--brokers`.
fn load_config(file: &Path, brokers: Option<String>) -> anyhow::Result<Config> {
    let mut config = Config::load(file, std::env::vars())?;
    if let Some(b) = brokers {
        config.kafka.brokers = b;
    }
    Ok(config)
}

/// (name, location) of every configured table matching `only`, each followed by its
/// dead-letter table.
fn table_locations(
    cfg: &Config,
    only: Option<&str>,
    file: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for table in &cfg.tables {
        let name = TableSchema::load(&table.schema)?.name;
        if only.is_none_or(|t| t == name) {
            let dead = dead_letters::table_name(&name);
            for n in [name, dead] {
                let location = table_location(&cfg.storage.root, &n);
                out.push((n, location));
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "no table named {} in {}",
            only.unwrap_or_default(),
            file.display()
        );
    }
    Ok(out)
}
