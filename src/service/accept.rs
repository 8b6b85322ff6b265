//! `sluice accept-log`: the operator's explicit decision to read a partition from a new Kafka
//! log after the broker's log went backwards (a recreated topic, a failover to a cluster with
//! other offsets, an unclean leader election).
//!
//! The writer stops such a partition: its position in the table lies past the broker's end,
//! and the offsets the broker hands out now name other messages than the rows already written.
//! Accepting the new log moves the partition's position in the table and its dead-letter table
//! to just before the broker's first offset, and records the moment of acceptance with it. The
//! rows of the old log stay where they are; the audit tells the two logs apart by when rows
//! were ingested, so it needs the table's `ingested_at` column.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;

use crate::config::{Config, TableConfig};
use crate::contract::schema::{ColumnSource, TableSchema};
use crate::ingest::kafka::{CONNECT_TIMEOUT, ClientError, WatchContext, watermarks};
use crate::service::app::{AppError, open_sinks};
use crate::table::delta::{DeltaError, PartitionKey};

/// How long reading a partition's offsets from the broker may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a new log was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The table or its schema could not be opened.
    #[error(transparent)]
    App(#[from] AppError),
    /// Reading or committing to a table failed.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// The cluster cannot be reached.
    #[error("accept-log for {table}: {source}")]
    Connect {
        /// Table name.
        table: String,
        /// Where and why, without secrets.
        source: ClientError,
    },
    /// The broker's offsets of the partition could not be read.
    #[error("accept-log for {table}: offsets of {partition}: {reason}")]
    Kafka {
        /// Table name.
        table: String,
        /// Partition concerned.
        partition: PartitionKey,
        /// What failed.
        reason: String,
    },
    /// The table has no column recording when rows were ingested.
    #[error(
        "accept-log for {table}: the schema has no column with source = \"ingested_at\"; without \
         it the audit cannot tell the rows of the old log from the new one's"
    )]
    NoIngestedAt {
        /// Table name.
        table: String,
    },
    /// The partition's position is within the broker's log: there is nothing to accept.
    #[error(
        "accept-log for {table}: {partition} is at {position:?} and the broker has offsets \
         {low}..{high}; only a position past the broker's end (a log that went backwards) is \
         accepted"
    )]
    NotBehind {
        /// Table name.
        table: String,
        /// Partition concerned.
        partition: PartitionKey,
        /// The table's last offset for it.
        position: Option<i64>,
        /// The broker's first offset.
        low: i64,
        /// The broker's next offset.
        high: i64,
    },
}

/// What accepting a new log changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Table name.
    pub table: String,
    /// The partition.
    pub partition: PartitionKey,
    /// The table's last offset before, in the old log.
    pub old_position: i64,
    /// The broker's first offset, where writers read the partition from now on.
    pub new_start: i64,
    /// When the new log was accepted (µs since the epoch).
    pub accepted_at_us: i64,
}

/// Accepts the broker's current log of `topic`/`partition` for `table`: writers read it from its
/// first offset, the audit checks the table against it from now on.
pub async fn accept_log(
    config: &Config,
    table: &TableConfig,
    topic: &str,
    partition: i32,
) -> Result<Accepted, AcceptError> {
    let schema = Arc::new(TableSchema::load(&table.schema).map_err(AppError::from)?);
    let name = schema.name.clone();
    if !schema
        .columns
        .iter()
        .any(|c| c.source == Some(ColumnSource::IngestedAt))
    {
        return Err(AcceptError::NoIngestedAt { table: name });
    }
    let key = PartitionKey {
        topic: Arc::from(topic),
        partition,
    };
    let connection = config.kafka.connection();
    connection
        .check(CONNECT_TIMEOUT)
        .await
        .map_err(|source| AcceptError::Connect {
            table: name.clone(),
            source,
        })?;
    let (consumer, _): (BaseConsumer<WatchContext>, _) = connection
        .create(&connection.client_config(&[]))
        .map_err(|source| AcceptError::Connect {
            table: name.clone(),
            source,
        })?;
    let (low, high) = watermarks(Arc::new(consumer), topic, partition, WATERMARK_TIMEOUT)
        .await
        .map_err(|e| AcceptError::Kafka {
            table: name.clone(),
            partition: key.clone(),
            reason: e.to_string(),
        })?;

    let (mut main, mut dead_letters) = open_sinks(config, &schema).await?;
    let position = main.txn_version(&key).await?;
    let Some(old_position) = position.filter(|&p| p + 1 > high) else {
        return Err(AcceptError::NotBehind {
            table: name,
            partition: key,
            position,
            low,
            high,
        });
    };
    let accepted_at_us = chrono::Utc::now().timestamp_micros();
    // The dead letters first, as a flush commits them: a writer never finds the main table
    // ahead of its dead letters.
    dead_letters
        .accept_log(&key, low - 1, accepted_at_us)
        .await?;
    main.accept_log(&key, low - 1, accepted_at_us).await?;
    tracing::info!(table = %name, partition = %key, old_position, new_start = low,
        "accepted the broker's new log; writers read the partition from its first offset after a restart");
    Ok(Accepted {
        table: name,
        partition: key,
        old_position,
        new_start: low,
        accepted_at_us,
    })
}
