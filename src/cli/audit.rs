//! `sluice audit` and `sluice accept-log`: the proof that every offset landed exactly once, and
//! the operator's decision to read a partition from a broker's new log.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::contract::schema::TableSchema;
use sluice::query::audit::audit_table;
use sluice::service::accept::accept_log;

use super::load_config;

/// Exit code of `sluice audit` when something is missing or duplicated.
const EXIT_AUDIT_FAILED: u8 = 2;

/// `sluice audit` flags.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Audit only this table (default: every configured table).
    #[arg(long)]
    table: Option<String>,
    /// Override kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
}

/// `sluice accept-log` flags.
#[derive(clap::Args)]
pub struct AcceptLogArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// The table whose partition stopped.
    #[arg(long)]
    table: String,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The partition.
    #[arg(long)]
    partition: i32,
    /// Override kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
}

/// Audits every table of the config, or the one asked for.
pub async fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let AuditArgs {
        config,
        table,
        brokers,
    } = args;
    let cfg = load_config(&config, brokers)?;
    let mut clean = true;
    let mut audited = 0;
    for table_config in &cfg.tables {
        let name = TableSchema::load(&table_config.schema)?.name;
        if table.as_ref().is_some_and(|t| *t != name) {
            continue;
        }
        let audit = audit_table(&cfg, table_config).await?;
        print!("{}", audit.render());
        clean &= audit.is_clean();
        audited += 1;
    }
    if audited == 0 {
        anyhow::bail!(
            "no table named {} in {}",
            table.unwrap_or_default(),
            config.display()
        );
    }
    if !clean {
        return Ok(ExitCode::from(EXIT_AUDIT_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Moves a stopped partition's position to the broker's new log.
pub async fn accept(args: AcceptLogArgs) -> anyhow::Result<ExitCode> {
    let AcceptLogArgs {
        config,
        table,
        topic,
        partition,
        brokers,
    } = args;
    let cfg = load_config(&config, brokers)?;
    let mut table_config = None;
    for candidate in &cfg.tables {
        if TableSchema::load(&candidate.schema)?.name == table {
            table_config = Some(candidate);
        }
    }
    let Some(table_config) = table_config else {
        anyhow::bail!("no table named {table} in {}", config.display());
    };
    if !table_config.sources.iter().any(|s| s.topic == topic) {
        anyhow::bail!("table {table} does not read topic {topic}");
    }
    let accepted = accept_log(&cfg, table_config, &topic, partition).await?;
    println!(
        "{}: {} now reads the broker's log from offset {} (was at {} in the old log); \
         restart the writers of the table",
        accepted.table, accepted.partition, accepted.new_start, accepted.old_position
    );
    Ok(ExitCode::SUCCESS)
}
