//! Background maintenance in the service: every `interval_s`, each table (and its dead
//! letters) is compacted under its lease, and vacuumed once a `vacuum_every_h`. Checkpoints
//! (every `delta.checkpoint_interval` versions, checked every 30 s at most) and expired-log
//! cleanup are written here too, so commits never pay for them.
//!
//! It runs on its own thread with its own single-threaded runtime, so Parquet rewrites never
//! take CPU time slices from the writers' runtime. Compaction commits are `dataChange=false`
//! and do not conflict with appends. Today's partition, which the writer is still filling,
//! is left alone until it has `hot_small_files` small files; older partitions are compacted
//! as soon as they have two. A partition still being written (a file in the last two
//! intervals) is merged in tiers: the files that arrived since the last pass, and a merged
//! file only once half as many bytes arrived after it, so a pass costs what arrived rather
//! than the partition and short intervals (sub-second freshness) stay cheap; once settled, a
//! partition's small files all merge. If a scheduled `sluice compact` holds the lease, the
//! pass skips that table.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;
use deltalake::DeltaTable;
use tokio::sync::watch;

use crate::config::{Config, MaintenanceConfig};
use crate::table::compact::{CompactOptions, CompactOutcome, compact};
use crate::table::delta::{open_table, table_location};
use crate::table::lease;
use crate::table::maintain::{checkpoint_table, last_checkpoint, vacuum};

/// A running maintenance thread; dropping the handle's sender stops it after the current pass.
pub struct Maintenance {
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl Maintenance {
    /// Starts the thread for `tables` of `config`, or returns `None` when disabled. Each
    /// table comes with whether `maintenance.zorder` applies to it (dead-letter tables do not
    /// have those columns).
    pub fn start(config: &Config, tables: Vec<(String, bool)>) -> Option<Maintenance> {
        if !config.maintenance.enabled {
            return None;
        }
        let (stop, stopped) = watch::channel(false);
        let settings = config.maintenance.clone();
        let checkpoint_interval = config.delta.checkpoint_interval.max(1) as i64;
        let zstd_level = config.delta.zstd_level;
        let root = config.storage.root.clone();
        let storage = config.storage_options();
        let thread = std::thread::Builder::new()
            .name("sluice-maintenance".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("maintenance runtime starts");
                runtime.block_on(run(
                    settings,
                    checkpoint_interval,
                    zstd_level,
                    root,
                    storage,
                    tables,
                    stopped,
                ));
            })
            .expect("maintenance thread starts");
        Some(Maintenance { stop, thread })
    }

    /// Stops after the current pass and waits for the thread.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
    }
}

/// How often checkpoints are checked for when compaction runs less often.
const CHECKPOINT_TICK: Duration = Duration::from_secs(30);

async fn run(
    settings: MaintenanceConfig,
    checkpoint_interval: i64,
    zstd_level: i32,
    root: String,
    storage: HashMap<String, String>,
    tables: Vec<(String, bool)>,
    mut stopped: watch::Receiver<bool>,
) {
    let owner = lease::owner_id();
    let interval = Duration::from_secs(settings.interval_s.max(1));
    let vacuum_every = Duration::from_secs(settings.vacuum_every_h * 3600);
    let tick = interval.min(CHECKPOINT_TICK);
    let mut last_vacuum = Instant::now();
    let mut last_compaction = Instant::now();
    // Loaded once, then brought forward incrementally each tick: reading only new commits.
    let mut loaded: HashMap<String, DeltaTable> = HashMap::new();
    tracing::info!(interval_s = settings.interval_s, %owner, "maintenance started");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        for (name, _) in &tables {
            let location = table_location(&root, name);
            match checkpoint_if_due(&mut loaded, &location, &storage, checkpoint_interval).await {
                Ok(true) => metrics::counter!("sluice_checkpoints_total", "table" => name.clone())
                    .increment(1),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(table = %name, error = %e, "checkpoint failed; retrying next tick")
                }
            }
        }
        if last_compaction.elapsed() < interval {
            continue;
        }
        last_compaction = Instant::now();
        for (name, zorder) in &tables {
            let location = table_location(&root, name);
            if let Err(e) = pass(
                &settings, zstd_level, *zorder, name, &location, &storage, &owner,
            )
            .await
            {
                tracing::warn!(table = %name, error = %e, "maintenance pass failed; retrying next interval");
                metrics::counter!("sluice_compaction_runs_total", "table" => name.clone(), "outcome" => "failed")
                    .increment(1);
            }
            if *stopped.borrow() {
                break;
            }
        }
        if settings.vacuum_every_h > 0 && last_vacuum.elapsed() >= vacuum_every {
            last_vacuum = Instant::now();
            let retention = Duration::from_secs(settings.vacuum_retention_h * 3600);
            for (name, _) in &tables {
                let location = table_location(&root, name);
                match vacuum(&location, storage.clone(), retention, false, false).await {
                    Ok(report) => {
                        metrics::counter!("sluice_vacuumed_files_total", "table" => name.clone())
                            .increment(report.files as u64);
                    }
                    Err(e) => tracing::warn!(table = %name, error = %e, "vacuum failed"),
                }
            }
        }
    }
    tracing::info!("maintenance stopped");
}

/// Writes a checkpoint (and removes expired logs) once the table is `interval` versions past
/// its last checkpoint; says whether it wrote one. `loaded` keeps each table between ticks.
async fn checkpoint_if_due(
    loaded: &mut HashMap<String, DeltaTable>,
    location: &str,
    storage: &HashMap<String, String>,
    interval: i64,
) -> Result<bool, String> {
    let table = match loaded.get_mut(location) {
        Some(table) => {
            table
                .update_incremental(None)
                .await
                .map_err(|e| e.to_string())?;
            table
        }
        None => {
            let table = open_table(location, storage.clone())
                .await
                .map_err(|e| e.to_string())?;
            loaded.entry(location.to_string()).or_insert(table)
        }
    };
    let version = table.version().unwrap_or(0) as i64;
    let due = match last_checkpoint(table).await {
        Some(last) => version - last >= interval,
        None => version >= interval,
    };
    if !due {
        return Ok(false);
    }
    checkpoint_table(table, location)
        .await
        .map(|_| true)
        .map_err(|e| e.to_string())
}

/// One compaction pass over a table: cold partitions with small files, and today's once it
/// is fragmented enough. The planner applies both rules; with nothing to do no lease is taken.
async fn pass(
    settings: &MaintenanceConfig,
    zstd_level: i32,
    zorder: bool,
    name: &str,
    location: &str,
    storage: &HashMap<String, String>,
    owner: &str,
) -> Result<(), String> {
    let options = CompactOptions {
        target_size: settings.target_size_mb.max(1) * 1024 * 1024,
        zorder: if zorder {
            settings.zorder.clone()
        } else {
            Vec::new()
        },
        owner: owner.to_string(),
        memory_limit: (settings.memory_mb * 1024 * 1024) as usize,
        zstd_level,
        hot: Some((
            Utc::now().date_naive().to_string(),
            settings.hot_small_files,
        )),
        // A partition nothing was written to for two intervals is settled: all its small
        // files merge. One still being written merges in tiers.
        tiered: Some(Utc::now() - chrono::Duration::seconds(settings.interval_s.max(1) as i64 * 2)),
        ..CompactOptions::default()
    };
    let started = Instant::now();
    let outcome = compact(location, storage.clone(), &options)
        .await
        .map_err(|e| e.to_string())?;
    let table = name.to_string();
    let label = match &outcome {
        CompactOutcome::Busy { owner, expires_at } => {
            tracing::info!(table = location, %owner, %expires_at, "compaction lease held elsewhere; skipped");
            "lease_busy"
        }
        CompactOutcome::Compacted(done) if !done.is_empty() => {
            let removed: u64 = done.iter().map(|p| p.files_removed).sum();
            let added: u64 = done.iter().map(|p| p.files_added).sum();
            let bytes: u64 = done.iter().map(|p| p.bytes_removed).sum();
            metrics::counter!("sluice_compaction_files_removed_total", "table" => table.clone())
                .increment(removed);
            metrics::counter!("sluice_compaction_files_added_total", "table" => table.clone())
                .increment(added);
            metrics::counter!("sluice_compaction_bytes_rewritten_total", "table" => table.clone())
                .increment(bytes);
            metrics::histogram!("sluice_compaction_duration_seconds", "table" => table.clone())
                .record(started.elapsed().as_secs_f64());
            "compacted"
        }
        CompactOutcome::Compacted(_) | CompactOutcome::Planned(_) => "nothing_to_do",
    };
    metrics::counter!("sluice_compaction_runs_total", "table" => table, "outcome" => label)
        .increment(1);
    Ok(())
}
