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
/// inside it needs; returns how many. It lists the whole `_delta_log`: a month of sub-second
/// commits is millions of files, so the service does it hourly, not at every checkpoint.
pub async fn remove_expired_logs(
    table: &DeltaTable,
    location: &str,
) -> Result<usize, MaintainError> {
    let removed = deltalake::checkpoints::cleanup_metadata(table, None)
        .await
        .map_err(delta(location, "clean up expired logs"))?;
    tracing::info!(table = location, removed, "expired logs removed");
    Ok(removed)
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
