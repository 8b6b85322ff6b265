//! Compaction: bin-packs a table's small files into files near a target size, partition by
//! partition, most fragmented first, under the table's compaction [`lease`](crate::table::lease).
//!
//! Streaming appends leave one small file per flush and partition; every query pays for each
//! one. Compaction commits are `dataChange=false`, so readers see the same rows and appends
//! keep committing while it runs. The lease is renewed before each partition's rewrite, so a
//! compactor that lost it (paused past expiry, or another took it over) stops before the next.
//! The lease cannot cover the commit itself (a rewrite may outlast it), so every compaction
//! commit also carries a txn action with one app id, [`COMPACTION_APP_ID`]: Delta's conflict
//! checker rejects a commit when a commit made since its snapshot used one of its app ids, so
//! of two compactions of the same files only the first lands. (delta-rs optimize can neither
//! carry a txn nor conflict on `dataChange=false` removes, so plain bin-packing is sluice's own
//! rewrite; Z-order still goes through optimize and relies on the lease alone.) The rewritten
//! files are stored as the writer stores them (`delta.zstd_level`, vectors plain), and a
//! checkpoint at the compacted version follows, so readers open the table without replaying the
//! rewrite.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, Utc};
use deltalake::operations::optimize::OptimizeType;
use deltalake::{DeltaTable, DeltaTableError};

use crate::table::delta::{DEFAULT_ZSTD_LEVEL, arrow_schema_of, open_table, parquet_properties};
use crate::table::lease::{self, Acquired, LeaseError};
use crate::table::problem::StorageError;

use rewrite::partition_of;
pub use rewrite::{Rewrite, commit_rewrite, rewrite_partition};

mod rewrite;

/// Default size compaction aims for.
pub const DEFAULT_TARGET_SIZE: u64 = 128 * 1024 * 1024;

/// Default memory budget of a rewrite; sorts (Z-order) spill to disk beyond it.
pub const DEFAULT_MEMORY_LIMIT: usize = 1024 * 1024 * 1024;

/// The smallest memory budget a Z-order rewrite gets. Below it DataFusion's sort, which
/// reserves 10 MiB per stream (one per core) for merging its spills, failed ("Not enough
/// memory to continue external sort") instead of spilling: at 32 MiB with 20,000 posts.
pub const MIN_MEMORY_LIMIT: usize = 64 * 1024 * 1024;

/// Default lease duration: long enough for one partition's rewrite, short enough that a
/// crashed compactor blocks the next one only briefly.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10 * 60);

/// Errors compacting.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The table could not be opened, read or rewritten.
    #[error("compacting {table}: {operation}: {source}")]
    Delta {
        /// Table location.
        table: String,
        /// What was being done.
        operation: String,
        /// delta-rs' error.
        source: StorageError<Box<DeltaTableError>>,
    },
    /// The lease could not be read, taken, renewed or released.
    #[error("compacting {table}: {source}")]
    Lease {
        /// Table location.
        table: String,
        /// What went wrong.
        source: LeaseError,
    },
    /// Another compaction committed since this one read the table: nothing of this one landed.
    #[error(
        "compacting {table}: another compaction committed a rewrite while partition {partition} \
         was being rewritten (its lease had expired); nothing of this rewrite was committed"
    )]
    Concurrent {
        /// Table location.
        table: String,
        /// The partition being rewritten.
        partition: String,
    },
    /// A requested partition value or column does not fit the table.
    #[error("compacting {table}: {reason}")]
    Invalid {
        /// Table location.
        table: String,
        /// What is wrong.
        reason: String,
    },
}

/// The txn app id every bin-packing commit carries, so two of them from the same snapshot
/// conflict instead of both landing (each would add the rows of the files both remove).
pub const COMPACTION_APP_ID: &str = "sluice-compaction";

/// What to compact and how.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Files below this size are candidates; output files aim for it.
    pub target_size: u64,
    /// Only these partition values (e.g. `2026-11-20`); empty means all.
    pub partitions: Vec<String>,
    /// Only partitions on or after this date.
    pub since: Option<NaiveDate>,
    /// Z-order each rewritten partition by these columns (empty: plain bin-packing).
    pub zorder: Vec<String>,
    /// Print the plan, change nothing.
    pub dry_run: bool,
    /// How long the lease lasts between renewals.
    pub lease_ttl: Duration,
    /// Who is compacting (see [`lease::owner_id`]).
    pub owner: String,
    /// Memory budget of a partition's rewrite in bytes; Z-order sorts spill to disk beyond it.
    pub memory_limit: usize,
    /// A partition still being written (today's), compacted only once it has this many small
    /// files; every other partition from two.
    pub hot: Option<(String, usize)>,
    /// zstd level of the rewritten files (`delta.zstd_level`), as the writer uses.
    pub zstd_level: i32,
    /// Partitions written to since this time merge only their smallest files, in tiers (see
    /// [`tiered_count`]); the others, settled, all their small files. Checkpoints are then
    /// left to their interval. What the service does: a pass costs what arrived since the
    /// last one, not the partition, and a day still ends as few files. Plain bin-packing only
    /// (a Z-order rewrite sorts the whole partition).
    pub tiered: Option<chrono::DateTime<Utc>>,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            target_size: DEFAULT_TARGET_SIZE,
            partitions: Vec::new(),
            since: None,
            zorder: Vec::new(),
            dry_run: false,
            lease_ttl: DEFAULT_LEASE_TTL,
            owner: lease::owner_id(),
            memory_limit: DEFAULT_MEMORY_LIMIT,
            hot: None,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            tiered: None,
        }
    }
}

/// Files, bytes and rows of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionFiles {
    /// The partition value (`""` for an unpartitioned table).
    pub partition: String,
    /// Data files.
    pub files: usize,
    /// Bytes of all files.
    pub bytes: u64,
    /// Sizes of the files below the target size, smallest first.
    pub small_sizes: Vec<u64>,
    /// When the newest file was written (ms since the epoch).
    pub newest_ms: i64,
    /// Rows, from the files' statistics.
    pub rows: u64,
}

impl PartitionFiles {
    /// Files below the target size.
    pub fn small_files(&self) -> usize {
        self.small_sizes.len()
    }

    /// Bytes of the files below the target size.
    pub fn small_bytes(&self) -> u64 {
        self.small_sizes.iter().sum()
    }
}

/// One partition's share of a compaction plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPartition {
    /// The partition value.
    pub partition: String,
    /// Files that will be rewritten.
    pub files_in: usize,
    /// Their bytes.
    pub bytes_in: u64,
    /// Files expected out (bytes in / target size, rounded up).
    pub files_out: usize,
    /// Only the smallest files, in tiers: the partition is still being written.
    pub tiered: bool,
}

/// What one partition's rewrite did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactedPartition {
    /// The partition value.
    pub partition: String,
    /// Files removed (`dataChange=false`).
    pub files_removed: u64,
    /// Files added.
    pub files_added: u64,
    /// Bytes removed.
    pub bytes_removed: u64,
    /// Bytes added.
    pub bytes_added: u64,
    /// The table version of the commit.
    pub version: i64,
    /// Whether the rewrite's sort (Z-order) outgrew its memory budget and spilled to disk.
    pub spilled: bool,
}

/// The outcome of a compaction run.
#[derive(Debug)]
pub enum CompactOutcome {
    /// `dry_run`: what would be done.
    Planned(Vec<PlannedPartition>),
    /// Another compactor holds the lease.
    Busy {
        /// The holder.
        owner: String,
        /// When its lease runs out unless renewed.
        expires_at: chrono::DateTime<Utc>,
    },
    /// Partitions rewritten, in order.
    Compacted(Vec<CompactedPartition>),
}

fn delta_error(table: &str, operation: &str) -> impl FnOnce(DeltaTableError) -> CompactError {
    let (table, operation) = (table.to_string(), operation.to_string());
    move |source| CompactError::Delta {
        table,
        operation,
        source: source.into(),
    }
}

/// The table's partition column (sluice tables have one or none).
fn partition_column(table: &DeltaTable, location: &str) -> Result<Option<String>, CompactError> {
    let snapshot = table
        .snapshot()
        .map_err(delta_error(location, "snapshot"))?;
    let columns = snapshot.metadata().partition_columns();
    match columns {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        more => Err(CompactError::Invalid {
            table: location.to_string(),
            reason: format!("partitioned by {more:?}; sluice compacts single-column partitions"),
        }),
    }
}

/// Files, bytes and rows per partition of the table's current version, sorted by partition.
pub fn partitions(table: &DeltaTable, target_size: u64) -> Result<Vec<PartitionFiles>, String> {
    let snapshot = table.snapshot().map_err(|e| e.to_string())?;
    let mut by_partition: BTreeMap<String, PartitionFiles> = BTreeMap::new();
    for file in snapshot.log_data().iter() {
        // sluice writes Hive-style paths: `event_date=2026-11-20/part-....parquet`.
        let partition = partition_of(&file.path());
        let size = file.size().max(0) as u64;
        let rows = file
            .stats()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|s| s.get("numRecords").and_then(|n| n.as_u64()))
            .unwrap_or(0);
        let entry = by_partition
            .entry(partition.clone())
            .or_insert_with(|| PartitionFiles {
                partition,
                ..PartitionFiles::default()
            });
        entry.files += 1;
        entry.bytes += size;
        entry.newest_ms = entry.newest_ms.max(file.modification_time());
        entry.rows += rows;
        if size < target_size {
            entry.small_sizes.push(size);
        }
    }
    let mut parts: Vec<PartitionFiles> = by_partition.into_values().collect();
    for part in &mut parts {
        part.small_sizes.sort_unstable();
    }
    Ok(parts)
}

/// How many of a partition's small files (`sizes`, smallest first) a tiered pass merges: the
/// smallest, then each next one while it is at most twice the size of those taken so far.
/// A merged file is merged again only once half as many bytes arrived after it, so a byte is
/// rewritten a logarithmic number of times, a pass costs roughly what arrived since the last
/// one, and a partition keeps a few files of growing sizes instead of one per flush.
pub fn tiered_count(sizes: &[u64]) -> usize {
    let mut taken = 0;
    let mut sum = 0u64;
    for &size in sizes {
        if taken > 0 && size > sum.saturating_mul(2) {
            break;
        }
        sum += size;
        taken += 1;
    }
    taken
}

/// Which partitions to rewrite: those selected with at least two small files (or, when
/// Z-ordering, at least two files; the hot partition needs its own minimum), most small
/// files first.
pub fn plan(parts: &[PartitionFiles], options: &CompactOptions) -> Vec<PlannedPartition> {
    let mut planned: Vec<PlannedPartition> = parts
        .iter()
        .filter(|p| options.partitions.is_empty() || options.partitions.contains(&p.partition))
        .filter(|p| {
            match (
                options.since,
                NaiveDate::parse_from_str(&p.partition, "%Y-%m-%d"),
            ) {
                (Some(since), Ok(day)) => day >= since,
                (Some(_), Err(_)) => false,
                (None, _) => true,
            }
        })
        .filter_map(|p| {
            let tiered = options.zorder.is_empty()
                && options
                    .tiered
                    .is_some_and(|since| p.newest_ms >= since.timestamp_millis());
            let (files_in, bytes_in) = if !options.zorder.is_empty() {
                (p.files, p.bytes)
            } else if tiered {
                let taken = tiered_count(&p.small_sizes);
                (taken, p.small_sizes[..taken].iter().sum())
            } else {
                (p.small_files(), p.small_bytes())
            };
            let min_files = match &options.hot {
                Some((hot, min)) if *hot == p.partition => (*min).max(2),
                _ => 2,
            };
            (files_in >= min_files).then(|| PlannedPartition {
                partition: p.partition.clone(),
                files_in,
                bytes_in,
                files_out: bytes_in.div_ceil(options.target_size.max(1)).max(1) as usize,
                tiered,
            })
        })
        .collect();
    planned.sort_by(|a, b| {
        (b.files_in - b.files_out)
            .cmp(&(a.files_in - a.files_out))
            .then(a.partition.cmp(&b.partition))
    });
    planned
}

/// Compacts the table at `location` as `options` say.
pub async fn compact(
    location: &str,
    storage_options: HashMap<String, String>,
    options: &CompactOptions,
) -> Result<CompactOutcome, CompactError> {
    compact_with_progress(location, storage_options, options, &mut |_, _, _| {}).await
}

/// [`compact`], calling `progress(partition, done, total)` after each partition's rewrite.
pub async fn compact_with_progress(
    location: &str,
    storage_options: HashMap<String, String>,
    options: &CompactOptions,
    progress: &mut (dyn FnMut(&CompactedPartition, usize, usize) + Send),
) -> Result<CompactOutcome, CompactError> {
    let table = open_table(location, storage_options.clone())
        .await
        .map_err(delta_error(location, "open"))?;
    let column = partition_column(&table, location)?;
    if column.is_none() && !options.partitions.is_empty() {
        return Err(CompactError::Invalid {
            table: location.to_string(),
            reason: "the table is not partitioned; drop --partition".into(),
        });
    }
    let parts =
        partitions(&table, options.target_size).map_err(|reason| CompactError::Invalid {
            table: location.to_string(),
            reason,
        })?;
    let planned = plan(&parts, options);
    if options.dry_run {
        return Ok(CompactOutcome::Planned(planned));
    }
    if planned.is_empty() {
        // Nothing to rewrite: no need to take (and write) the lease.
        return Ok(CompactOutcome::Compacted(Vec::new()));
    }

    let lease_error = |source| CompactError::Lease {
        table: location.to_string(),
        source,
    };
    let mut lease = match lease::acquire(
        table.object_store(),
        &options.owner,
        options.lease_ttl,
        Utc::now(),
    )
    .await
    .map_err(lease_error)?
    {
        Acquired::Held(lease) => lease,
        Acquired::Busy { owner, expires_at } => {
            return Ok(CompactOutcome::Busy { owner, expires_at });
        }
    };

    // Whatever happens after the lease was taken, it is released: a failed rewrite must not
    // turn the next compactor away until the lease expires.
    let rewritten: Result<Vec<CompactedPartition>, CompactError> = async {
        let target = NonZeroU64::new(options.target_size.max(1)).expect("at least 1");
        // The files are rewritten as the writer writes them, not with delta-rs' defaults.
        let schema = arrow_schema_of(&table).map_err(delta_error(location, "snapshot"))?;
        let properties =
            parquet_properties(options.zstd_level, &schema).map_err(|e| CompactError::Invalid {
                table: location.to_string(),
                reason: format!("zstd level {}: {e}", options.zstd_level),
            })?;
        let mut done = Vec::new();
        let mut table = table;
        for part in &planned {
            lease.renew(Utc::now()).await.map_err(lease_error)?;
            table
                .update_state()
                .await
                .map_err(delta_error(location, "refresh"))?;
            if options.zorder.is_empty() {
                let rewrite = rewrite_partition(
                    &table,
                    location,
                    &part.partition,
                    options.target_size.max(1),
                    part.tiered,
                    properties.clone(),
                )
                .await?;
                let Some(rewrite) = rewrite else {
                    continue;
                };
                crate::failpoint::reached(
                    crate::failpoint::armed().as_deref(),
                    "after_compaction_rewrite",
                );
                let (updated, result) = commit_rewrite(rewrite).await?;
                table = updated;
                log_compacted(location, &result);
                progress(&result, done.len() + 1, planned.len());
                done.push(result);
                continue;
            }
            let optimize_type = OptimizeType::ZOrder(options.zorder.clone());
            let filters = column.as_deref().map(|c| {
                vec![(
                    c,
                    deltalake::kernel::schema::partitions::FilterOp::Eq,
                    deltalake::kernel::schema::partitions::FilterValue::Scalar(part.partition.as_str()),
                )]
            });
            // Kept to ask its disk manager afterwards whether the sort spilled: it creates its
            // temporary folder on the first spill.
            let budget = options.memory_limit.max(MIN_MEMORY_LIMIT);
            let runtime = deltalake::delta_datafusion::DeltaRuntimeEnvBuilder::new()
                .with_max_spill_size(budget)
                .build();
            let mut session =
                deltalake::delta_datafusion::DeltaSessionContext::with_runtime_env(runtime.clone())
                    .state();
            // One sort: with one per core their spills are merged by a final merge that cannot
            // spill, and which found the pool held by the sorters (a 30 MB partition failed
            // at the 64 MiB floor with "Resources exhausted ... SortPreservingMergeExec").
            session.config_mut().options_mut().execution.target_partitions = 1;
            let mut builder = table
                .clone()
                .optimize()
                .with_type(optimize_type)
                .with_target_size(target)
                .with_writer_properties(properties.clone())
                .with_session_state(Arc::new(session));
            if let Some(filters) = &filters {
                builder = builder.with_filters(filters);
            }
            let (updated, metrics) = builder.await.map_err(delta_error(
                location,
                &format!("rewrite partition {}", part.partition),
            ))?;
            table = updated;
            let version = table.version().unwrap_or_default() as i64;
            let result = CompactedPartition {
                partition: part.partition.clone(),
                files_removed: metrics.num_files_removed,
                files_added: metrics.num_files_added,
                bytes_removed: metrics.files_removed.total_size.max(0) as u64,
                bytes_added: metrics.files_added.total_size.max(0) as u64,
                version,
                spilled: !runtime.disk_manager.temp_dir_paths().is_empty(),
            };
            log_compacted(location, &result);
            progress(&result, done.len() + 1, planned.len());
            done.push(result);
        }
        // Without a checkpoint every reader would replay the rewrite's commits (a remove per small
        // file) on each open: a checkpoint at the compacted version cut opening a compacted
        // 1,600-file table from 50 to 20 ms. Failing it loses nothing; readers replay the log.
        if !done.is_empty()
            && options.tiered.is_none()
            && let Err(e) = deltalake::checkpoints::create_checkpoint(&table, None).await
        {
            tracing::warn!(table = location, error = %e, "checkpoint after compaction failed; readers replay the log instead");
        }
        Ok(done)
    }
    .await;
    let released = lease.release().await.map_err(lease_error);
    let done = rewritten?;
    released?;
    Ok(CompactOutcome::Compacted(done))
}

fn log_compacted(location: &str, result: &CompactedPartition) {
    tracing::info!(
        table = location,
        partition = %result.partition,
        files_removed = result.files_removed,
        files_added = result.files_added,
        bytes_removed = result.bytes_removed,
        bytes_added = result.bytes_added,
        version = result.version,
        spilled = result.spilled,
        "compacted partition"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(partition: &str, files: usize, small_files: usize) -> PartitionFiles {
        PartitionFiles {
            partition: partition.into(),
            files,
            bytes: files as u64 * 1000,
            small_sizes: vec![1000; small_files],
            newest_ms: 0,
            rows: 0,
        }
    }

    #[test]
    fn a_tiered_pass_merges_the_newest_small_files_and_leaves_the_merged_ones() {
        // Flushes of ~20 KB on top of a 1 MB file merged earlier: only the flushes.
        let mut sizes = vec![20_000; 20];
        sizes.push(1_000_000);
        assert_eq!(tiered_count(&sizes), 20);
        // Once half as many bytes arrived after it, the merged file goes along.
        let mut sizes = vec![20_000; 30];
        sizes.push(1_000_000);
        assert_eq!(tiered_count(&sizes), 31);
        // One small file and a large one: nothing worth rewriting.
        assert_eq!(tiered_count(&[10, 1_000]), 1);
        assert_eq!(tiered_count(&[]), 0);
        // Flushes of uneven size still merge.
        assert_eq!(tiered_count(&[10, 18, 25, 30]), 4);
    }

    #[test]
    fn tiered_passes_keep_a_partition_at_a_few_files_rewriting_each_byte_a_few_times() {
        // 2,000 flushes of 20 KB into one partition, a tiered pass after every 50: the live
        // files stay few, and the bytes rewritten stay a small multiple of the bytes written
        // (a full rewrite each pass would rewrite the growing partition 40 times).
        let mut files: Vec<u64> = Vec::new();
        let (mut written, mut rewritten, mut most) = (0u64, 0u64, 0usize);
        for flush in 1..=2_000u64 {
            files.push(20_000);
            written += 20_000;
            most = most.max(files.len());
            if flush % 50 == 0 {
                files.sort_unstable();
                let taken = tiered_count(&files);
                if taken >= 2 {
                    let merged: u64 = files.drain(..taken).sum();
                    rewritten += merged;
                    files.push(merged);
                }
            }
        }
        assert!(files.len() <= 8, "{files:?}");
        assert!(most <= 60, "{most}");
        assert!(rewritten <= written * 8, "{rewritten} for {written}");
        assert_eq!(files.iter().sum::<u64>(), written);
    }

    #[test]
    fn a_tiered_plan_counts_only_the_files_a_pass_would_merge() {
        let since = Utc::now() - chrono::Duration::minutes(10);
        let mut hot = part("2026-11-21", 21, 21);
        hot.small_sizes = vec![1000; 20];
        hot.small_sizes.push(1_000_000);
        hot.newest_ms = Utc::now().timestamp_millis();
        let options = CompactOptions {
            tiered: Some(since),
            ..CompactOptions::default()
        };
        let planned = plan(std::slice::from_ref(&hot), &options);
        assert_eq!((planned[0].files_in, planned[0].bytes_in), (20, 20_000));
        assert!(planned[0].tiered);
        // One new flush beside a merged file is not worth a pass.
        hot.small_sizes = vec![1000, 1_000_000];
        hot.files = 2;
        assert!(plan(std::slice::from_ref(&hot), &options).is_empty());
        // Once nothing was written to it since, the partition's small files all merge.
        hot.newest_ms = (since - chrono::Duration::seconds(1)).timestamp_millis();
        let settled = plan(&[hot], &options);
        assert_eq!(
            (settled[0].files_in, settled[0].bytes_in, settled[0].tiered),
            (2, 1_001_000, false)
        );
    }

    #[test]
    fn plans_the_most_fragmented_selected_partitions_first() {
        let parts = [
            part("2026-11-18", 30, 30),
            part("2026-11-19", 1, 1),
            part("2026-11-20", 90, 90),
            part("2026-11-21", 5, 5),
        ];
        let options = CompactOptions {
            target_size: 4000,
            ..CompactOptions::default()
        };
        let all = plan(&parts, &options);
        let order: Vec<&str> = all.iter().map(|p| p.partition.as_str()).collect();
        assert_eq!(order, ["2026-11-20", "2026-11-18", "2026-11-21"]);
        assert_eq!(
            (all[0].files_in, all[0].bytes_in, all[0].files_out),
            (90, 90_000, 23)
        );

        let since = CompactOptions {
            since: NaiveDate::from_ymd_opt(2026, 11, 21),
            ..options.clone()
        };
        assert_eq!(plan(&parts, &since).len(), 1);
        let one = CompactOptions {
            partitions: vec!["2026-11-18".into()],
            ..options.clone()
        };
        assert_eq!(plan(&parts, &one)[0].partition, "2026-11-18");
        let hot = CompactOptions {
            hot: Some(("2026-11-21".into(), 6)),
            ..CompactOptions::default()
        };
        assert!(
            plan(&parts, &hot)
                .iter()
                .all(|p| p.partition != "2026-11-21")
        );
    }
}
