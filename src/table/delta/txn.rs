//! Positions in the table: the `txn` app id of each Kafka partition and the versions read back
//! from the log, for the writer and for an operator's accepted loss (`sluice accept-log`).

use std::sync::Arc;

use deltalake::{DeltaTable, DeltaTableError};

use super::PartitionKey;

/// The txn app id for a Kafka partition: group, topic and partition, so two groups writing one
/// table keep separate positions.
pub fn app_id(group_id: &str, key: &PartitionKey) -> String {
    format!("sluice-{group_id}-{}-{}", key.topic, key.partition)
}

/// The txn app id recording when a new log of a partition was accepted (`sluice accept-log`);
/// its version is that moment in µs since the epoch. Rows of the partition ingested before it
/// belong to the log that went away.
pub fn log_app_id(group_id: &str, key: &PartitionKey) -> String {
    format!("{}.log", app_id(group_id, key))
}

/// When a new log of `topic`/`partition` was accepted for `group_id` in `table` (µs), if ever.
pub async fn log_accepted_at(
    table: &DeltaTable,
    group_id: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, DeltaTableError> {
    txn_version(table, &log_app_id(group_id, &key_of(topic, partition))).await
}

/// The last offset of `topic`/`partition` that `group_id` committed to `table` (its txn
/// version), as of the table's loaded snapshot.
pub async fn committed_offset(
    table: &DeltaTable,
    group_id: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, DeltaTableError> {
    txn_version(table, &app_id(group_id, &key_of(topic, partition))).await
}

fn key_of(topic: &str, partition: i32) -> PartitionKey {
    PartitionKey {
        topic: Arc::from(topic),
        partition,
    }
}

/// The version of txn `app_id` in `table`'s loaded snapshot.
pub async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>, DeltaTableError> {
    table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
}
