//! `sluice vacuum`, `sluice checkpoint`, `sluice inspect` and `sluice apply`: maintenance of
//! each configured table and its dead letters, one line (or block) per table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sluice::contract::schema::TableSchema;
use sluice::service::app::keyed_table;
use sluice::service::background::table_settings;
use sluice::table::compact::DEFAULT_LEASE_TTL;
use sluice::table::deletes::{Applied, ApplyOptions, ApplyOutcome, apply as apply_deletes};
use sluice::table::{lease, maintain};

use super::{load_config, table_locations};

/// Exit code of `sluice apply` when a compactor holds a table's lease.
const EXIT_LEASE_HELD: u8 = 3;

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

/// Applies the recorded deletes and edits of each keyed table (one pass, as the service's
/// maintenance does every interval).
pub async fn apply(args: TableArgs) -> anyhow::Result<ExitCode> {
    let TableArgs { config, table } = args;
    let cfg = load_config(&config, None)?;
    let options = ApplyOptions {
        owner: lease::owner_id(),
        lease_ttl: DEFAULT_LEASE_TTL,
        settings: table_settings(&cfg.delta),
        skip_when_idle: false,
    };
    let mut keyed = 0;
    let mut busy = false;
    for table_config in &cfg.tables {
        let schema = TableSchema::load(&table_config.schema)?;
        if table.as_deref().is_some_and(|t| t != schema.name) {
            continue;
        }
        let Some(keyed_table) = keyed_table(&cfg, table_config)? else {
            println!("{}: no key declared; nothing to apply", schema.name);
            continue;
        };
        keyed += 1;
        match apply_deletes(&keyed_table, &cfg.storage_options(), &options).await? {
            ApplyOutcome::Applied(a) => println!("{}: {}", schema.name, describe(&a)),
            ApplyOutcome::Busy { owner, expires_at } => {
                busy = true;
                println!(
                    "{}: lease held by {owner} until {expires_at}; try again later",
                    schema.name
                );
            }
        }
    }
    if keyed == 0 && table.is_some() {
        anyhow::bail!(
            "no keyed table named {} in {}",
            table.unwrap_or_default(),
            config.display()
        );
    }
    Ok(if busy {
        ExitCode::from(EXIT_LEASE_HELD)
    } else {
        ExitCode::SUCCESS
    })
}

/// One line saying what a pass did.
pub(super) fn describe(a: &Applied) -> String {
    let mut line = format!(
        "read version {}; {} new deletes recorded; {} rows removed as deleted, {} as replaced by \
         a newer version",
        a.read_version, a.deletes, a.deleted, a.replaced
    );
    if a.forget_requests + a.forgotten + a.forgotten_dead_letters + a.dead_letters_pending > 0 {
        line.push_str(&format!(
            "; {} erasure requests recorded, {} rows and {} dead letters forgotten",
            a.forget_requests, a.forgotten, a.forgotten_dead_letters
        ));
    }
    if a.dead_letters_pending > 0 {
        line.push_str(&format!(
            " ({} dead letters wait for the dead-letter table's lease)",
            a.dead_letters_pending
        ));
    }
    line.push_str(&format!("; {} files rewritten", a.files_rewritten));
    if let Some(v) = a.version {
        line.push_str(&format!(" (version {v})"));
    }
    if a.dead_letter_files_rewritten > 0 {
        line.push_str(&format!(
            ", {} dead-letter files",
            a.dead_letter_files_rewritten
        ));
    }
    line
}
