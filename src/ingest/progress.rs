//! What a writer has committed so far, published after every commit: read by the source (lag),
//! health (readiness, gauges) and the tools, written only by the pipeline.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::table::delta::PartitionKey;

/// What the writer has committed so far; published after every commit.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Latest table version this writer committed or observed.
    pub table_version: i64,
    /// Commits made by this writer.
    pub commits: u64,
    /// Rows committed by this writer.
    pub rows: u64,
    /// Messages rejected and accounted for in commits by this writer.
    pub rejected: u64,
    /// Messages committed that delete a post (recorded in the commit, applied by maintenance).
    pub deletions: u64,
    /// Data files added.
    pub files: u64,
    /// Bytes of data files added.
    pub bytes: u64,
    /// Last committed offset per owned partition, as last read from or written to the table.
    pub committed: BTreeMap<PartitionKey, i64>,
    /// Rejection counts by reason code.
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// Dead letters this writer stored in the dead-letter table.
    pub dead_letters: u64,
    /// The partitions this writer currently owns.
    pub owned: Vec<PartitionKey>,
    /// Whether the consumer group has given this writer an assignment yet (possibly empty).
    pub assigned_once: bool,
    /// When this writer last committed.
    pub last_commit_at: Option<SystemTime>,
    /// Newest Kafka message timestamp (ms) in any commit of this writer: freshness.
    pub newest_committed_ms: Option<i64>,
    /// When the oldest message still waiting for a commit arrived; `None` when nothing waits.
    pub buffered_since: Option<SystemTime>,
    /// The error of the last commit attempt while it is being retried.
    pub store_error: Option<String>,
    /// Partitions whose position the broker could not serve: a range lost to retention (for as
    /// long as this writer owns the partition) or a log that went backwards (the partition is
    /// stopped until an operator accepts the new log).
    pub partition_problems: BTreeMap<PartitionKey, String>,
}

impl Progress {
    /// Whether every (topic, partition) of `targets` is committed up to its offset.
    pub fn covers(&self, targets: &BTreeMap<(String, i32), i64>) -> bool {
        targets.iter().all(|((topic, partition), last)| {
            self.committed
                .iter()
                .any(|(k, c)| &*k.topic == topic.as_str() && k.partition == *partition && c >= last)
        })
    }
}
