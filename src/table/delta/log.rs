//! Reading the commit log itself: which commits it still holds, each commit's `commitInfo`
//! (its timestamp, and the ledger sluice writes into it), and the deletions those ledgers
//! recorded.

use std::sync::Arc;

use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};

use super::{Deletion, PartitionKey};

/// The commits the log still holds (log cleanup removes old ones), oldest first, with their
/// files' metadata.
pub async fn commits(table: &DeltaTable) -> Result<Vec<(u64, ObjectMeta)>, DeltaTableError> {
    let store = table.object_store();
    let mut commits = Vec::new();
    let mut listing = store.list(Some(&Path::from("_delta_log")));
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        if let Some(version) = commit_version(meta.location.filename().unwrap_or_default()) {
            commits.push((version, meta));
        }
    }
    commits.sort_by_key(|(version, _)| *version);
    Ok(commits)
}

/// The version of a commit file's name (`00000000000000000012.json`).
fn commit_version(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The `commitInfo` action of a commit, if its writer wrote one.
pub async fn commit_info(
    store: &Arc<dyn ObjectStore>,
    meta: &ObjectMeta,
) -> Result<Option<serde_json::Value>, DeltaTableError> {
    let bytes = store.get(&meta.location).await?.bytes().await?;
    let text = String::from_utf8_lossy(&bytes);
    for line in text.lines().filter(|line| line.contains("\"commitInfo\"")) {
        let mut action: serde_json::Value = serde_json::from_str(line)?;
        if let Some(info) = action.get_mut("commitInfo") {
            return Ok(Some(info.take()));
        }
    }
    Ok(None)
}

/// A commit's timestamp in milliseconds: its `inCommitTimestamp`, else its `commitInfo`'s
/// `timestamp`, else (a writer that records neither) the file's modification time. These are
/// the times `DESCRIBE HISTORY` and Trino's `$history` show.
pub async fn commit_timestamp(
    store: &Arc<dyn ObjectStore>,
    meta: &ObjectMeta,
) -> Result<i64, DeltaTableError> {
    let stamp = commit_info(store, meta).await?.and_then(|info| {
        info.get("inCommitTimestamp")
            .or_else(|| info.get("timestamp"))
            .and_then(serde_json::Value::as_i64)
    });
    Ok(stamp.unwrap_or_else(|| meta.last_modified.timestamp_millis()))
}

/// The deletions the writer recorded in the ledgers of the commits after version `after` up to
/// `through` (each end open for `None`: all the log holds), with their partitions, in commit
/// order.
pub async fn recorded_deletions(
    table: &DeltaTable,
    after: Option<u64>,
    through: Option<u64>,
) -> Result<Vec<(PartitionKey, Deletion)>, DeltaTableError> {
    let store = table.object_store();
    let mut found = Vec::new();
    for (version, meta) in commits(table).await? {
        if after.is_some_and(|a| version <= a) || through.is_some_and(|t| version > t) {
            continue;
        }
        let Some(info) = commit_info(&store, &meta).await? else {
            continue;
        };
        let Some(ledger) = info.pointer("/sluice/ledger").and_then(|l| l.as_object()) else {
            continue;
        };
        for (partition, entry) in ledger {
            let Some(deletions) = entry.get("deletions") else {
                continue;
            };
            let key = partition_key(partition).ok_or_else(|| {
                DeltaTableError::Generic(format!(
                    "commit {version}: ledger entry `{partition}` is not topic/partition"
                ))
            })?;
            let deletions: Vec<Deletion> = serde_json::from_value(deletions.clone())?;
            found.extend(deletions.into_iter().map(|d| (key.clone(), d)));
        }
    }
    Ok(found)
}

/// Parses the `topic/partition` form [`PartitionKey`] displays as.
fn partition_key(text: &str) -> Option<PartitionKey> {
    let (topic, partition) = text.rsplit_once('/')?;
    Some(PartitionKey {
        topic: topic.into(),
        partition: partition.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_files_and_ledger_keys_parse() {
        assert_eq!(commit_version("00000000000000000012.json"), Some(12));
        assert_eq!(
            commit_version("00000000000000000012.checkpoint.parquet"),
            None
        );
        assert_eq!(commit_version("_last_checkpoint"), None);
        let key = partition_key("posts.bluesky/3").unwrap();
        assert_eq!((&*key.topic, key.partition), ("posts.bluesky", 3));
        assert!(partition_key("no-partition").is_none());
    }
}
