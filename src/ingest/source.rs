//! Source: the Kafka consumer, with partition assignment driven by the Delta table.
//!
//! The rebalance callback never assigns partitions at Kafka's committed offsets. It hands the
//! new assignment to the writer loop, which reads each partition's txn version from the table
//! and assigns at `version + 1`. Revocations unassign at once, and the loop drops what it
//! buffered for those partitions, so an instance never commits offsets it no longer owns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::ingest::kafka::{ClientError, Connection, Watch, forward_log, watermarks};
use crate::ingest::progress::Progress;
use crate::table::delta::PartitionKey;

/// KiB of messages librdkafka prefetches into the consumer queue before the writer asks for
/// them (`queued.max.messages.kbytes`; librdkafka's own default is 64 MiB). It is part of the
/// writer's memory, next to `batch.max_bytes`; `kafka.properties` may override it.
pub const PREFETCH_KBYTES: &str = "16384";
/// How long librdkafka pauses fetching a partition once the prefetch queue is full
/// (`fetch.queue.backoff.ms`). Its default, 1000 ms, makes a bounded queue a throughput limit:
/// measured through the mock cluster, 16 MiB drained ~37k posts/s with it and ~120–130k with
/// 10 ms.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// How long a seek may wait for the fetcher to apply it.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the Kafka side, with the topic or partition concerned.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The consumer could not be created (librdkafka refused a property).
    #[error("kafka consumer for group {group}: {source}")]
    Create {
        /// Consumer group.
        group: String,
        /// What was refused, without secrets.
        source: ClientError,
    },
    /// Subscribing to the topics failed.
    #[error("subscribe to {topics:?}: {source}")]
    Subscribe {
        /// Topics.
        topics: Vec<String>,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// Taking ownership of the group's assignment failed.
    #[error("assign {partitions} partitions: {source}")]
    Assign {
        /// Partitions in the assignment.
        partitions: usize,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// Assigning or seeking a partition failed.
    #[error("position {partition} at {offset:?}: {source}")]
    Position {
        /// Partition concerned.
        partition: PartitionKey,
        /// Where sluice tried to position it.
        offset: Offset,
        /// librdkafka's error.
        source: KafkaError,
    },
}

/// A change in the partitions this instance owns, in the order the group decided them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionEvent {
    /// These partitions are now ours (the complete new assignment).
    Assigned(Vec<PartitionKey>),
    /// These partitions are no longer ours.
    Revoked(Vec<PartitionKey>),
}

/// Forwards rebalances to the writer loop instead of assigning at committed offsets, and
/// connection failures to the consumer's [`Watch`].
pub struct RebalanceContext {
    events: mpsc::UnboundedSender<PartitionEvent>,
    watch: Arc<Watch>,
}

impl RebalanceContext {
    /// The consumer's connection state.
    pub fn watch(&self) -> &Arc<Watch> {
        &self.watch
    }
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(&self.watch, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.watch.report(&error, reason);
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let keys = keys_of(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Joining the group took a working connection.
                self.watch.connected();
                tracing::info!(partitions = ?keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions assigned by the group");
                // The writer loop assigns them, at the offsets the table holds.
                let _ = self.events.send(PartitionEvent::Assigned(keys));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked by the group");
                let _ = self.events.send(PartitionEvent::Revoked(keys));
                if let Err(e) = base_consumer.unassign() {
                    tracing::warn!(error = %e, "unassign after revoke failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                let _ = self.events.send(PartitionEvent::Revoked(keys));
                let _ = base_consumer.unassign();
            }
        }
    }
}

fn keys_of(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| PartitionKey {
            topic: Arc::from(e.topic()),
            partition: e.partition(),
        })
        .collect()
}

/// Where a partition without a committed txn version starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The oldest message Kafka still has.
    #[default]
    Earliest,
    /// Only messages produced after the writer joins.
    Latest,
}

/// The consumer of one table's topics.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    start_from: StartFrom,
}

impl KafkaSource {
    /// Creates a consumer in consumer group `group` on the cluster `connection` names,
    /// subscribed to `topics`; partition events arrive on the returned channel. Partitions the
    /// table has never seen start at `start_from`.
    pub fn subscribe(
        connection: &Connection,
        group: &str,
        start_from: StartFrom,
        topics: &[String],
    ) -> Result<(Self, mpsc::UnboundedReceiver<PartitionEvent>), SourceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = connection.client_config(&[
            ("group.id", group),
            // Positions come from the Delta table; Kafka's committed offsets are informational.
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            // A position out of the broker's range is an error the writer handles (a lost
            // range, or a log that went backwards), never a silent jump; partitions the table
            // has never seen start at `start_from`, given explicitly in `assign`.
            ("auto.offset.reset", "error"),
            // Eager rebalancing: every assignment is complete, every revoke precedes the next
            // assignment, which keeps the ownership rules simple.
            ("partition.assignment.strategy", "range"),
            ("enable.partition.eof", "false"),
            ("queued.max.messages.kbytes", PREFETCH_KBYTES),
            ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
        ]);
        let context = RebalanceContext {
            events: tx,
            watch: Arc::new(Watch::new(connection)),
        };
        let consumer: StreamConsumer<RebalanceContext> = client
            .create_with_context(context)
            .map_err(|e| SourceError::Create {
                group: group.to_owned(),
                source: connection.config_error(&e),
            })?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|source| SourceError::Subscribe {
                topics: topics.to_vec(),
                source,
            })?;
        Ok((
            KafkaSource {
                consumer: Arc::new(consumer),
                start_from,
            },
            rx,
        ))
    }

    /// A handle for receiving messages; received messages borrow the handle, not the source,
    /// so the writer can buffer them in place while it owns everything else mutably.
    pub fn receiver(&self) -> Arc<StreamConsumer<RebalanceContext>> {
        self.consumer.clone()
    }

    /// Where a partition starts given its last committed offset in the table.
    pub fn start_offset(&self, committed: Option<i64>) -> Offset {
        match (committed, self.start_from) {
            (Some(v), _) => Offset::Offset(v + 1),
            (None, StartFrom::Earliest) => Offset::Beginning,
            (None, StartFrom::Latest) => Offset::End,
        }
    }

    /// Takes ownership of `positions` (the complete assignment), each at its offset.
    pub fn assign(&self, positions: &BTreeMap<PartitionKey, Offset>) -> Result<(), SourceError> {
        let mut tpl = TopicPartitionList::new();
        for (key, offset) in positions {
            tpl.add_partition_offset(&key.topic, key.partition, *offset)
                .map_err(|source| SourceError::Position {
                    partition: key.clone(),
                    offset: *offset,
                    source,
                })?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|source| SourceError::Position {
                partition: positions
                    .keys()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| PartitionKey {
                        topic: Arc::from(""),
                        partition: -1,
                    }),
                offset: Offset::Invalid,
                source,
            })
    }

    /// Re-reads a partition from `offset`; messages fetched before the seek are discarded by
    /// librdkafka.
    pub fn seek(&self, key: &PartitionKey, offset: Offset) -> Result<(), SourceError> {
        self.consumer
            .seek(&key.topic, key.partition, offset, SEEK_TIMEOUT)
            .map_err(|source| SourceError::Position {
                partition: key.clone(),
                offset,
                source,
            })
    }

    /// The first offset the broker still has for a partition and the one its next message
    /// will get.
    pub async fn watermarks(&self, key: &PartitionKey) -> Result<(i64, i64), SourceError> {
        watermarks(
            self.consumer.clone(),
            &key.topic,
            key.partition,
            WATERMARK_TIMEOUT,
        )
        .await
        .map_err(|source| SourceError::Position {
            partition: key.clone(),
            offset: Offset::Invalid,
            source,
        })
    }

    /// Tells Kafka how far the table has got, for lag dashboards. Best effort: positions are
    /// always taken from the table, never from these offsets.
    pub fn report_committed(&self, offsets: &[(PartitionKey, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (key, last) in offsets {
            if tpl
                .add_partition_offset(&key.topic, key.partition, Offset::Offset(last + 1))
                .is_err()
            {
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "informational Kafka offset commit failed");
        }
    }
}

/// How long one watermark request may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets `sluice_consumer_lag_messages` for every partition the writer owns, every `interval`:
/// the broker's high watermark minus the position committed to the table (everything from the
/// low watermark when the table has nothing of the partition yet); and
/// `sluice_consumer_unread_messages`: the high watermark minus the consumer's position (what
/// the writer has not even read yet). Runs until aborted.
pub async fn lag_loop(
    table: String,
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    progress: watch::Receiver<Progress>,
    interval: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        let (owned, committed) = {
            let p = progress.borrow();
            (p.owned.clone(), p.committed.clone())
        };
        // Where the consumer will read next, per partition (a local call, no request).
        let positions: BTreeMap<(String, i32), i64> = consumer
            .position()
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        for key in owned {
            let marks = watermarks(
                consumer.clone(),
                &key.topic,
                key.partition,
                WATERMARK_TIMEOUT,
            )
            .await;
            match marks {
                Ok((low, high)) => {
                    consumer.context().watch.connected();
                    let next = committed.get(&key).map_or(low, |c| (c + 1).max(low));
                    metrics::gauge!("sluice_consumer_lag_messages", "table" => table.clone(),
                        "topic" => key.topic.to_string(), "partition" => key.partition.to_string())
                    .set((high - next).max(0) as f64);
                    // Nothing read since the assignment: the position is the table's.
                    let read_next = positions
                        .get(&(key.topic.to_string(), key.partition))
                        .copied()
                        .unwrap_or(next);
                    metrics::gauge!("sluice_consumer_unread_messages", "table" => table.clone(),
                        "topic" => key.topic.to_string(), "partition" => key.partition.to_string())
                    .set((high - read_next).max(0) as f64);
                }
                Err(KafkaError::Canceled) => return,
                Err(e) => {
                    // While the connection fails, the watch has said why once already.
                    if consumer.context().watch.problem().is_none() {
                        tracing::warn!(table = %table, partition = %key, error = %e, "cannot read watermarks for lag");
                    }
                    metrics::counter!("sluice_kafka_errors_total", "table" => table.clone())
                        .increment(1);
                }
            }
        }
    }
}
