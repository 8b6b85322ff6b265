//! `sluice compact`: one-shot compaction for cron or a CronJob, table by table, with a
//! progress bar on a terminal and an exit code saying whether another compactor held a lease.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::contract::dead_letters;
use sluice::contract::schema::TableSchema;
use sluice::meter::Meter;
use sluice::table::compact::{
    CompactOptions, CompactOutcome, CompactedPartition, compact_with_progress,
};

use super::{load_config, table_locations};

/// `sluice compact` flags.
#[derive(clap::Args)]
pub struct CompactArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Only this table (its dead-letter table is compacted too). Default: every table.
    #[arg(long)]
    table: Option<String>,
    /// Only this partition value (e.g. 2026-11-20); repeatable.
    #[arg(long)]
    partition: Vec<String>,
    /// Only partitions on or after this date.
    #[arg(long, value_name = "DATE")]
    since: Option<chrono::NaiveDate>,
    /// Z-order rewritten partitions by these columns (comma-separated).
    #[arg(long, value_delimiter = ',')]
    zorder: Vec<String>,
    /// Target file size in MiB.
    #[arg(long, default_value_t = 128)]
    target_size_mb: u64,
    /// Memory budget of one partition's rewrite in MiB (Z-order sorts spill beyond it).
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
    /// Print the plan (partitions, files and bytes in, files out) and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Exit code of `sluice compact` when another compactor holds the lease.
const EXIT_LEASE_HELD: u8 = 3;

/// Runs `sluice compact`.
pub async fn run(args: CompactArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args.config, None)?;
    let options = CompactOptions {
        target_size: args.target_size_mb.max(1) * 1024 * 1024,
        partitions: args.partition,
        since: args.since,
        zorder: args.zorder,
        dry_run: args.dry_run,
        memory_limit: (args.memory_mb * 1024 * 1024) as usize,
        zstd_level: cfg.delta.zstd_level,
        ..CompactOptions::default()
    };
    let tables = table_locations(&cfg, args.table.as_deref(), &args.config)?;
    let dead_letter_tables = cfg
        .tables
        .iter()
        .map(|t| TableSchema::load(&t.schema).map(|schema| dead_letters::table_name(&schema.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut busy = false;
    for (name, location) in tables {
        let mut meter: Option<Meter> = None;
        let mut bar = |p: &CompactedPartition, done: usize, total: usize| {
            let m = meter.get_or_insert_with(|| {
                Meter::new(format!("compact {name}"), total as u64, "partitions", true)
            });
            let detail = format!(
                "last {} ({} files -> {})",
                p.partition, p.files_removed, p.files_added
            );
            if done == total {
                m.finish(done as u64, &detail);
            } else {
                m.update(done as u64, &detail);
            }
        };
        // Z-order columns are the main table's; its dead letters are bin-packed.
        let bin_pack = CompactOptions {
            zorder: Vec::new(),
            ..options.clone()
        };
        let options = if dead_letter_tables.contains(&name) {
            &bin_pack
        } else {
            &options
        };
        let outcome =
            compact_with_progress(&location, cfg.storage_options(), options, &mut bar).await?;
        match outcome {
            CompactOutcome::Planned(plan) => {
                println!("{name}: {} partitions to compact", plan.len());
                for p in plan {
                    println!(
                        "  {:<12} {:>6} files in ({:.1} MB) -> {} out",
                        p.partition,
                        p.files_in,
                        p.bytes_in as f64 / 1e6,
                        p.files_out
                    );
                }
            }
            CompactOutcome::Busy { owner, expires_at } => {
                println!("{name}: lease held by {owner} until {expires_at}; not compacted");
                busy = true;
            }
            CompactOutcome::Compacted(done) => {
                println!("{name}: {} partitions compacted", done.len());
                for p in done {
                    println!(
                        "  {:<12} {:>6} files ({:.1} MB) -> {} files ({:.1} MB), version {}{}",
                        p.partition,
                        p.files_removed,
                        p.bytes_removed as f64 / 1e6,
                        p.files_added,
                        p.bytes_added as f64 / 1e6,
                        p.version,
                        if p.spilled {
                            ", sort spilled to disk (raise --memory-mb to keep it in memory)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    }
    Ok(if busy {
        ExitCode::from(EXIT_LEASE_HELD)
    } else {
        ExitCode::SUCCESS
    })
}
