//! Background maintenance in the service, on two threads of their own (each with its own
//! single-threaded runtime, so neither Parquet rewrites nor checkpoints take CPU time slices
//! from the writers' runtime, and a long compaction pass never delays a checkpoint).
//!
//! **Checkpoints.** The writers tell the checkpoint thread each version they commit; once a
//! table is `delta.checkpoint_interval` versions past its last checkpoint, the thread writes
//! one at once (and checks every 30 s for commits of other processes). Every reader opening
//! the table replays each commit after the last checkpoint, ~1 ms each, so at sub-second
//! freshness a checkpoint that waits for a compaction pass or a polling tick costs every open.
//! Expired log files are removed and old checkpoints thinned hourly: that lists the whole
//! `_delta_log`. When the service stops, a table past its interval is checkpointed before the
//! thread ends.
//!
//! **Compaction.** Every `interval_s`, each table (and its dead letters) is compacted under
//! its lease, and vacuumed once a `vacuum_every_h`. Compaction commits are `dataChange=false`
//! and do not conflict with appends. Today's partition, which the writer is still filling,
//! is left alone until it has `hot_small_files` small files; older partitions are compacted
//! as soon as they have two. A partition still being written (a file in the last two
//! intervals) is merged in tiers: the files that arrived since the last pass, and a merged
//! file only once half as many bytes arrived after it, so a pass costs what arrived rather
//! than the partition and short intervals (sub-second freshness) stay cheap; once settled, a
//! partition's small files all merge. If a scheduled `sluice compact` holds the lease, the
//! pass skips that table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;
use deltalake::DeltaTable;
use tokio::sync::watch;

use crate::config::{Config, DeltaConfig, MaintenanceConfig};
use crate::table::compact::{CompactOptions, CompactOutcome, DEFAULT_LEASE_TTL, compact};
use crate::table::deletes::{ApplyOptions, ApplyOutcome, KeyedTable, apply};
use crate::table::delta::{TableSettings, open_table, table_location};
use crate::table::lease;
use crate::table::maintain::{last_checkpoint, remove_expired_logs, vacuum, write_checkpoint};

/// How the configuration's `[delta]` section sets up each table.
pub fn table_settings(delta: &DeltaConfig) -> TableSettings {
    TableSettings {
        checkpoint_interval: delta.checkpoint_interval,
        zstd_level: delta.zstd_level,
        tombstone_retention: Duration::from_secs(delta.tombstone_retention_min * 60),
        log_retention: Duration::from_secs(delta.log_retention_h * 3600),
    }
}

/// A table the service writes, as maintenance sees it.
pub struct MaintainedTable {
    /// The table's name.
    pub name: String,
    /// Whether `maintenance.zorder` applies (dead-letter tables do not have those columns).
    pub zorder: bool,
    /// Each version the table's writer commits (see `DeltaSink::checkpointed_by`).
    pub commits: watch::Receiver<i64>,
    /// The table when it has a key: each pass applies its deletes, edits and erasure requests
    /// first.
    pub keyed: Option<Arc<KeyedTable>>,
}

/// The running maintenance threads; [`Maintenance::stop`] ends them after their current work.
pub struct Maintenance {
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl Maintenance {
    /// Starts the compaction and checkpoint threads for `tables` of `config`, or returns
    /// `None` when maintenance is disabled (the writers then checkpoint on their commit path).
    pub fn start(config: &Config, tables: Vec<MaintainedTable>) -> Option<Maintenance> {
        if !config.maintenance.enabled {
            return None;
        }
        let (stop, stopped) = watch::channel(false);
        let root = config.storage.root.clone();
        let storage = config.storage_options();
        let checkpoints = {
            let interval = config.delta.checkpoint_interval.max(1) as i64;
            let tables: Vec<_> = tables
                .iter()
                .map(|t| {
                    (
                        table_location(&root, &t.name),
                        t.name.clone(),
                        t.commits.clone(),
                    )
                })
                .collect();
            let (storage, stopped) = (storage.clone(), stopped.clone());
            spawn_with_runtime("sluice-checkpoints", async move {
                let tasks = tables.into_iter().map(|(location, name, commits)| {
                    keep_checkpointed(name, location, &storage, interval, commits, stopped.clone())
                });
                futures::future::join_all(tasks).await;
            })
        };
        let compaction = {
            let settings = config.maintenance.clone();
            let table_settings = table_settings(&config.delta);
            let tables = tables
                .into_iter()
                .map(|t| (t.name, t.zorder, t.keyed))
                .collect();
            spawn_with_runtime(
                "sluice-maintenance",
                compact_and_vacuum(settings, table_settings, root, storage, tables, stopped),
            )
        };
        Some(Maintenance {
            stop,
            threads: vec![checkpoints, compaction],
        })
    }

    /// Stops after the current pass (and a last due checkpoint) and waits for the threads.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Runs `work` on a thread named `name` with a single-threaded runtime of its own.
fn spawn_with_runtime(
    name: &str,
    work: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("maintenance runtime starts")
                .block_on(work)
        })
        .expect("maintenance thread starts")
}

/// How often a table is checked for a due checkpoint without news from its writer: commits
/// of other processes (a scheduled `sluice compact`) count towards the interval too.
const CHECKPOINT_TICK: Duration = Duration::from_secs(30);

/// How often expired log files are removed and old checkpoints thinned (both list the whole
/// `_delta_log`).
const LOG_CLEANUP_EVERY: Duration = Duration::from_secs(3600);

/// Keeps one table within `interval` versions of a checkpoint until `stopped`, then writes
/// a last one if due. A failure is logged and retried at the next commit or tick.
async fn keep_checkpointed(
    name: String,
    location: String,
    storage: &HashMap<String, String>,
    interval: i64,
    mut commits: watch::Receiver<i64>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut table: Option<DeltaTable> = None;
    // The version the interval counts from (the last checkpoint's), once read.
    let mut counted_from: Option<i64> = None;
    let mut logs_cleaned: Option<Instant> = None;
    let mut writer_alive = true;
    let mut ticked = true;
    loop {
        let committed = *commits.borrow_and_update();
        let may_be_due = counted_from.is_none_or(|from| committed - from >= interval);
        if ticked || may_be_due {
            match checkpoint_if_due(&mut table, &location, storage, interval).await {
                Ok(outcome) => {
                    counted_from = Some(outcome.counted_from);
                    if outcome.written {
                        metrics::counter!("sluice_checkpoints_total", "table" => name.clone())
                            .increment(1);
                    }
                }
                Err(e) => {
                    counted_from = None;
                    tracing::warn!(table = %name, error = %e, "checkpoint failed; retrying");
                }
            }
        }
        if let Some(table) = &table
            && counted_from.is_some()
            && logs_cleaned.is_none_or(|at| at.elapsed() >= LOG_CLEANUP_EVERY)
        {
            logs_cleaned = Some(Instant::now());
            if let Err(e) = remove_expired_logs(table, &location).await {
                tracing::warn!(table = %name, error = %e, "log cleanup failed; retrying in an hour");
            }
        }
        if *stopped.borrow() {
            break;
        }
        ticked = false;
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => {}
            changed = commits.changed(), if writer_alive => writer_alive = changed.is_ok(),
            _ = tokio::time::sleep(CHECKPOINT_TICK) => ticked = true,
        }
    }
}

/// What [`checkpoint_if_due`] found and did.
struct CheckpointOutcome {
    /// The version the interval counts from: the last checkpoint's (this one's if it wrote
    /// one), 0 for a table without.
    counted_from: i64,
    /// Whether it wrote one.
    written: bool,
}

/// Writes a checkpoint once the table is `interval` versions past its last checkpoint. The
/// table is loaded at the first call and brought forward incrementally after: reading only
/// the commits since.
async fn checkpoint_if_due(
    loaded: &mut Option<DeltaTable>,
    location: &str,
    storage: &HashMap<String, String>,
    interval: i64,
) -> Result<CheckpointOutcome, String> {
    let table = match loaded {
        Some(table) => {
            table
                .update_incremental(None)
                .await
                .map_err(|e| e.to_string())?;
            table
        }
        None => loaded.insert(
            open_table(location, storage.clone())
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    let version = table.version().unwrap_or(0) as i64;
    let counted_from = last_checkpoint(table).await.unwrap_or(0);
    if version - counted_from < interval {
        return Ok(CheckpointOutcome {
            counted_from,
            written: false,
        });
    }
    let written = write_checkpoint(table, location)
        .await
        .map_err(|e| e.to_string())?;
    Ok(CheckpointOutcome {
        counted_from: written,
        written: true,
    })
}

/// Compacts every `interval_s` and vacuums every `vacuum_every_h` until `stopped`.
async fn compact_and_vacuum(
    settings: MaintenanceConfig,
    table_settings: TableSettings,
    root: String,
    storage: HashMap<String, String>,
    tables: Vec<(String, bool, Option<Arc<KeyedTable>>)>,
    mut stopped: watch::Receiver<bool>,
) {
    let zstd_level = table_settings.zstd_level;
    let owner = lease::owner_id();
    let interval = Duration::from_secs(settings.interval_s.max(1));
    let vacuum_every = Duration::from_secs(settings.vacuum_every_h * 3600);
    let mut last_vacuum = Instant::now();
    let mut applied_once: HashSet<String> = HashSet::new();
    tracing::info!(interval_s = settings.interval_s, %owner, "maintenance started");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        for (name, zorder, keyed) in &tables {
            let location = table_location(&root, name);
            if let Some(keyed) = keyed {
                let options = ApplyOptions {
                    owner: owner.clone(),
                    lease_ttl: DEFAULT_LEASE_TTL,
                    settings: table_settings,
                    // After a pass of this process succeeded, an idle table costs no lease.
                    skip_when_idle: applied_once.contains(name),
                };
                match apply(keyed, &storage, &options).await {
                    Ok(ApplyOutcome::Applied(_)) => {
                        applied_once.insert(name.clone());
                    }
                    Ok(ApplyOutcome::Busy { owner, expires_at }) => {
                        tracing::info!(table = %name, %owner, %expires_at, "lease held elsewhere; deletes applied next interval");
                    }
                    Err(e) => {
                        applied_once.remove(name);
                        tracing::warn!(table = %name, error = %e, "applying deletes failed; retrying next interval");
                        metrics::counter!("sluice_apply_failures_total", "table" => name.clone())
                            .increment(1);
                    }
                }
            }
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
            for (name, _, _) in &tables {
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
