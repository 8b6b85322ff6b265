//! Table maintenance for operators: vacuum, checkpoints with expired-log cleanup, and an
//! inspection of what a table holds (files per partition, versions, positions, the lease).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::Int32Type;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::table::compact::{DEFAULT_TARGET_SIZE, PartitionFiles, partitions};
use crate::table::delta::{committed_offset, open_table, register_table};
use crate::table::lease::{self, LeaseRecord};
use crate::table::problem::StorageError;

/// The retention vacuum keeps by default: readers and time travel within a week keep working.
pub const DEFAULT_VACUUM_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Errors of the maintenance commands.
#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    /// delta-rs failed.
    #[error("{table}: {operation}: {source}")]
    Delta {
        /// Table location.
        table: String,
        /// What was being done.
        operation: &'static str,
        /// delta-rs' error.
        source: StorageError<Box<DeltaTableError>>,
    },
    /// A retention shorter than the default was asked for without the override.
    #[error(
        "a vacuum retention of {hours} h is below the 168 h default: readers running longer \
         and time travel further back than that would fail. Pass --allow-short-retention if \
         that is what you want"
    )]
    ShortRetention {
        /// The retention asked for, in hours.
        hours: u64,
    },
    /// Something else went wrong reading the table.
    #[error("{table}: {reason}")]
    Other {
        /// Table location.
        table: String,
        /// What went wrong.
        reason: String,
    },
}

fn delta(table: &str, operation: &'static str) -> impl FnOnce(DeltaTableError) -> MaintainError {
    let table = table.to_string();
    move |source| MaintainError::Delta {
        table,
        operation,
        source: source.into(),
    }
}

/// What a vacuum removed (or would remove).
#[derive(Debug)]
pub struct VacuumReport {
    /// Files no version within the retention references.
    pub files: usize,
    /// Whether they were only listed.
    pub dry_run: bool,
}

/// Deletes the data files the table no longer references once they are older than
/// `retention` and any tombstone of theirs has expired; shorter than
/// [`DEFAULT_VACUUM_RETENTION`] only with `allow_short`.
///
/// It lists the table's folder (delta-rs' full mode) rather than reading the checkpoint's
/// tombstones alone, for two reasons: files a writer wrote but never committed (a crash
/// between upload and commit) are found too, and a table may keep tombstones for less time
/// than the files themselves (`delta.deletedFileRetentionDuration` of minutes, so sub-second
/// tables open fast): a file whose tombstone left the checkpoint is still kept until it is
/// `retention` old. A file replaced soon after it was written (every flush compaction merges)
/// therefore stays readable for `retention`; an older one for the table's tombstone retention
/// after it was replaced.
pub async fn vacuum(
    location: &str,
    storage_options: HashMap<String, String>,
    retention: Duration,
    allow_short: bool,
    dry_run: bool,
) -> Result<VacuumReport, MaintainError> {
    if retention < DEFAULT_VACUUM_RETENTION && !allow_short {
        return Err(MaintainError::ShortRetention {
            hours: retention.as_secs() / 3600,
        });
    }
    let table = open_table(location, storage_options)
        .await
        .map_err(delta(location, "open"))?;
    let retention = chrono::Duration::from_std(retention).map_err(|e| MaintainError::Other {
        table: location.to_string(),
        reason: format!("retention: {e}"),
    })?;
    let (_, metrics) = table
        .vacuum()
        .with_mode(VacuumMode::Full)
        .with_retention_period(retention)
        .with_enforce_retention_duration(!allow_short)
        .with_dry_run(dry_run)
        .await
        .map_err(delta(location, "vacuum"))?;
    tracing::info!(
        table = location,
        files = metrics.files_deleted.len(),
        dry_run,
        "vacuum"
    );
    Ok(VacuumReport {
        files: metrics.files_deleted.len(),
        dry_run,
    })
}

/// Deletes now every data file a commit of the table removed, whatever its age: the files of
/// earlier versions that still hold rows a rewrite took out (`sluice forget --purge-history`).
/// Files no commit names (a writer's upload waiting for its commit) are left alone, so it is
/// safe beside running writers; time travel to the versions before those removals fails
/// afterwards, and so does a read that started before.
pub async fn purge_removed(
    location: &str,
    storage_options: HashMap<String, String>,
) -> Result<VacuumReport, MaintainError> {
    let table = open_table(location, storage_options)
        .await
        .map_err(delta(location, "open"))?;
    let (_, metrics) = table
        .vacuum()
        .with_mode(VacuumMode::Lite)
        .with_retention_period(chrono::Duration::zero())
        .with_enforce_retention_duration(false)
        .await
        .map_err(delta(location, "purge removed files"))?;
    tracing::info!(
        table = location,
        files = metrics.files_deleted.len(),
        "purged the files earlier versions removed"
    );
    Ok(VacuumReport {
        files: metrics.files_deleted.len(),
        dry_run: false,
    })
}

/// What a checkpoint run did.
#[derive(Debug)]
pub struct CheckpointReport {
    /// The version checkpointed.
    pub version: i64,
    /// Expired log files removed (older than the table's `delta.logRetentionDuration`).
    pub logs_removed: usize,
}

/// Writes a checkpoint at the current version and removes expired log files.
pub async fn checkpoint(
    location: &str,
    storage_options: HashMap<String, String>,
) -> Result<CheckpointReport, MaintainError> {
    let table = open_table(location, storage_options)
        .await
        .map_err(delta(location, "open"))?;
    Ok(CheckpointReport {
        version: write_checkpoint(&table, location).await?,
        logs_removed: remove_expired_logs(&table, location).await?,
    })
}

/// Writes a checkpoint of `table` at the version it is loaded at; returns that version.
pub async fn write_checkpoint(table: &DeltaTable, location: &str) -> Result<i64, MaintainError> {
    deltalake::checkpoints::create_checkpoint(table, None)
        .await
        .map_err(delta(location, "checkpoint"))?;
    let version = table.version().unwrap_or_default() as i64;
    tracing::info!(table = location, version, "checkpoint");
    Ok(version)
}

/// Removes the log files older than the table's `delta.logRetentionDuration` that no version
/// inside it needs, then thins the checkpoints older than [`CHECKPOINTS_THINNED_AFTER`] to one
/// per [`CHECKPOINTS_KEPT_EVERY`] versions; returns how many files went. It lists the whole
/// `_delta_log`: a month of sub-second commits is millions of files, so the service does it
/// hourly, not at every checkpoint.
pub async fn remove_expired_logs(
    table: &DeltaTable,
    location: &str,
) -> Result<usize, MaintainError> {
    let expired = deltalake::checkpoints::cleanup_metadata(table, None)
        .await
        .map_err(delta(location, "clean up expired logs"))?;
    let thinned = thin_checkpoints(
        table,
        location,
        chrono::Utc::now() - CHECKPOINTS_THINNED_AFTER,
        CHECKPOINTS_KEPT_EVERY,
    )
    .await?;
    tracing::info!(table = location, expired, thinned, "log cleaned");
    Ok(expired + thinned)
}

/// Checkpoints younger than this are all kept: readers of the latest versions use them.
pub const CHECKPOINTS_THINNED_AFTER: chrono::Duration = chrono::Duration::hours(1);

/// Older checkpoints are kept one per this many versions. At sub-second freshness a table
/// commits ~2 versions a second and checkpoints every 10: kept for the log's 30 days, those
/// would be ~9 GB a day. A reader travelling further back than the hour replays at most this
/// many commits after the checkpoint it starts from (~1 ms each).
pub const CHECKPOINTS_KEPT_EVERY: i64 = 1000;

/// Deletes the checkpoints written before `before`, except the oldest one, then one per
/// `keep_every` versions, and the newest; returns how many it deleted. Every version the log
/// still holds stays readable: the commits are all kept, and each version has a kept checkpoint at or
/// below it (the oldest one is never deleted, so neither is the one log cleanup starts from).
/// Checkpoints are an optimisation in the Delta protocol; readers pick the newest one at or
/// below the version they read.
pub async fn thin_checkpoints(
    table: &DeltaTable,
    location: &str,
    before: chrono::DateTime<chrono::Utc>,
    keep_every: i64,
) -> Result<usize, MaintainError> {
    let failed = |reason: String| MaintainError::Other {
        table: location.to_string(),
        reason,
    };
    let store = table.object_store();
    let mut checkpoints = Vec::new();
    let mut listing = store.list(Some(&Path::from("_delta_log")));
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| failed(format!("listing the log: {e}")))?;
        if let Some(version) = checkpoint_version(meta.location.filename().unwrap_or_default()) {
            checkpoints.push((version, meta.last_modified));
        }
    }
    let doomed = checkpoints_to_thin(checkpoints, before, keep_every);
    for version in &doomed {
        let path = Path::from(format!("_delta_log/{version:020}.checkpoint.parquet"));
        store
            .delete(&path)
            .await
            .map_err(|e| failed(format!("deleting {path}: {e}")))?;
    }
    Ok(doomed.len())
}

/// The version of a single-file checkpoint's file name (`00000000000000000120.checkpoint.parquet`).
/// Multi-part and V2 checkpoints are left alone (sluice writes neither).
fn checkpoint_version(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(".checkpoint.parquet")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Which of `checkpoints` (version, written at) [`thin_checkpoints`] deletes.
fn checkpoints_to_thin(
    mut checkpoints: Vec<(i64, chrono::DateTime<chrono::Utc>)>,
    before: chrono::DateTime<chrono::Utc>,
    keep_every: i64,
) -> Vec<i64> {
    checkpoints.sort();
    // The newest is what `_last_checkpoint` names, however old: every reader starts there.
    checkpoints.pop();
    let mut kept: Option<i64> = None;
    let mut doomed = Vec::new();
    for (version, written) in checkpoints {
        // Versions only grow with time: the first young checkpoint ends the old ones.
        if written >= before {
            break;
        }
        match kept {
            Some(k) if version - k < keep_every => doomed.push(version),
            _ => kept = Some(version),
        }
    }
    doomed
}

/// The version of the table's last checkpoint, from `_delta_log/_last_checkpoint`.
pub async fn last_checkpoint(table: &DeltaTable) -> Option<i64> {
    let got = table
        .object_store()
        .get(&Path::from("_delta_log/_last_checkpoint"))
        .await
        .ok()?;
    let bytes = got.bytes().await.ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("version")?
        .as_i64()
}

/// What `sluice inspect` shows for one table.
#[derive(Debug)]
pub struct Inspection {
    /// Table name.
    pub name: String,
    /// Where it lives.
    pub location: String,
    /// Current version.
    pub version: i64,
    /// Version of the last checkpoint, from `_delta_log/_last_checkpoint`.
    pub last_checkpoint: Option<i64>,
    /// Files, small files, bytes and rows per partition.
    pub partitions: Vec<PartitionFiles>,
    /// Committed position (last offset) per Kafka topic and partition for the writer group.
    pub positions: Vec<(String, i32, Option<i64>)>,
    /// The compaction lease's current record.
    pub lease: Option<LeaseRecord>,
}

/// Reads what a table holds. `group_id` selects whose positions are shown.
pub async fn inspect(
    name: &str,
    location: &str,
    storage_options: HashMap<String, String>,
    group_id: &str,
) -> Result<Inspection, MaintainError> {
    let table = open_table(location, storage_options)
        .await
        .map_err(delta(location, "open"))?;
    let store = table.object_store();
    let last_checkpoint = last_checkpoint(&table).await;
    let other = |reason: String| MaintainError::Other {
        table: location.to_string(),
        reason,
    };
    let partitions = partitions(&table, DEFAULT_TARGET_SIZE).map_err(other)?;
    let lease = lease::current(store.as_ref())
        .await
        .map_err(|e| other(e.to_string()))?;

    // The Kafka partitions the table has rows from, then each one's txn version.
    let ctx = SessionContext::new();
    register_table(&ctx, "t", &table)
        .await
        .map_err(delta(location, "register"))?;
    let mut keys = Vec::new();
    let has_provenance = table
        .snapshot()
        .map_err(delta(location, "snapshot"))?
        .schema()
        .fields()
        .any(|f| f.name() == "kafka_topic");
    if has_provenance {
        let batches = ctx
            .sql("SELECT DISTINCT CAST(kafka_topic AS varchar), kafka_partition FROM t ORDER BY 1, 2")
            .await
            .map_err(|e| other(e.to_string()))?
            .collect()
            .await
            .map_err(|e| other(e.to_string()))?;
        for batch in batches {
            let partitions = batch.column(1).as_primitive::<Int32Type>();
            let topics = batch.column(0);
            for row in 0..batch.num_rows() {
                let topic = match topics.as_string_view_opt() {
                    Some(a) => a.value(row).to_string(),
                    None => topics.as_string::<i32>().value(row).to_string(),
                };
                if !partitions.is_null(row) {
                    keys.push((topic, partitions.value(row)));
                }
            }
        }
    }
    let mut positions = Vec::new();
    for (topic, partition) in keys {
        let version = committed_offset(&table, group_id, &topic, partition)
            .await
            .map_err(delta(location, "read txn version"))?;
        positions.push((topic, partition, version));
    }
    Ok(Inspection {
        name: name.to_string(),
        location: location.to_string(),
        version: table.version().unwrap_or_default() as i64,
        last_checkpoint,
        partitions,
        positions,
        lease,
    })
}

impl Inspection {
    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let files: usize = self.partitions.iter().map(|p| p.files).sum();
        let small: usize = self.partitions.iter().map(|p| p.small_files()).sum();
        let bytes: u64 = self.partitions.iter().map(|p| p.bytes).sum();
        let rows: u64 = self.partitions.iter().map(|p| p.rows).sum();
        let _ = writeln!(out, "{} at {}", self.name, self.location);
        let _ = writeln!(
            out,
            "  version {}, last checkpoint {}, {files} files ({small} below {} MiB), {:.1} MB, {rows} rows",
            self.version,
            self.last_checkpoint
                .map(|v| v.to_string())
                .unwrap_or_else(|| "none".into()),
            DEFAULT_TARGET_SIZE / 1024 / 1024,
            bytes as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "  compaction lease: {}",
            match &self.lease {
                None => "never taken".to_string(),
                Some(l) if l.released => format!("free (last held by {})", l.owner),
                Some(l) => format!(
                    "{} until {}",
                    l.owner,
                    chrono::DateTime::from_timestamp_millis(l.expires_at_ms).unwrap_or_default()
                ),
            }
        );
        let _ = writeln!(
            out,
            "  {:<12} {:>7} {:>7} {:>12} {:>10}",
            "partition", "files", "small", "bytes", "rows"
        );
        for p in &self.partitions {
            let _ = writeln!(
                out,
                "  {:<12} {:>7} {:>7} {:>12} {:>10}",
                if p.partition.is_empty() {
                    "(none)"
                } else {
                    &p.partition
                },
                p.files,
                p.small_files(),
                p.bytes,
                p.rows
            );
        }
        if !self.positions.is_empty() {
            let _ = writeln!(
                out,
                "  committed positions (last offset in the table's txn):"
            );
            for (topic, partition, version) in &self.positions {
                let _ = writeln!(
                    out,
                    "    {topic}[{partition}] {}",
                    version
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "none for this group".into())
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 0, minute, 0).unwrap()
    }

    #[test]
    fn old_checkpoints_thin_to_one_per_interval_keeping_the_oldest_and_the_newest() {
        // A checkpoint every 20 versions, one a minute.
        let every_20 = |versions: std::ops::Range<i64>| {
            versions
                .step_by(20)
                .enumerate()
                .map(|(minute, v)| (v, at(minute as u32)))
                .collect::<Vec<_>>()
        };
        // Versions 100..1300: 60 checkpoints, the last 10 written after minute 50.
        let doomed = checkpoints_to_thin(every_20(100..1300), at(50), 500);
        let kept: Vec<i64> = every_20(100..1300)
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| !doomed.contains(v))
            .collect();
        assert_eq!(
            kept,
            [
                100, 600, 1100, 1120, 1140, 1160, 1180, 1200, 1220, 1240, 1260, 1280
            ]
        );
        // An idle table: its newest checkpoint is old but stays.
        assert_eq!(
            checkpoints_to_thin(every_20(0..100), at(59), 1000),
            [20, 40, 60]
        );
        assert!(checkpoints_to_thin(Vec::new(), at(59), 1000).is_empty());
    }

    #[test]
    fn only_single_file_checkpoints_are_recognised() {
        assert_eq!(
            checkpoint_version("00000000000000000120.checkpoint.parquet"),
            Some(120)
        );
        for other in [
            "00000000000000000120.json",
            "00000000000000000120.checkpoint.0000000001.0000000002.parquet",
            "00000000000000000120.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.parquet",
            "_last_checkpoint",
            "120.checkpoint.parquet",
        ] {
            assert_eq!(checkpoint_version(other), None, "{other}");
        }
    }
}
