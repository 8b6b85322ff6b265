//! What the broker holds: each partition's offsets read back from Kafka, independently of the
//! writer's consumer group.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::ingest::kafka::WatchContext;
use crate::meter::Meter;

use super::AuditError;

/// How long the broker may stay silent while the audit still expects messages.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads message offsets of one topic straight from the broker, outside any consumer group.
pub(super) struct KafkaReader {
    consumer: Arc<BaseConsumer<WatchContext>>,
    table: String,
    topic: String,
}

impl KafkaReader {
    pub(super) fn new(config: &Config, table: &str, topic: &str) -> Result<Self, AuditError> {
        let connection = config.kafka.connection();
        let group = format!("{}-audit", config.kafka.group_id);
        let client = connection.client_config(&[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
        ]);
        let (consumer, _) = connection.create(&client).map_err(|e| AuditError::Kafka {
            table: table.to_string(),
            topic: topic.to_string(),
            reason: format!("cannot create a consumer: {e}"),
        })?;
        Ok(KafkaReader {
            consumer: Arc::new(consumer),
            table: table.to_string(),
            topic: topic.to_string(),
        })
    }

    fn fail(&self, reason: String) -> AuditError {
        AuditError::Kafka {
            table: self.table.clone(),
            topic: self.topic.clone(),
            reason,
        }
    }

    /// Low and high watermark of every partition of the topic.
    pub(super) async fn watermarks(&self) -> Result<BTreeMap<i32, (i64, i64)>, AuditError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let result = tokio::task::spawn_blocking(move || {
            let metadata = consumer
                .fetch_metadata(Some(&topic), READ_TIMEOUT)
                .map_err(|e| format!("cannot read metadata: {e}"))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err("the topic does not exist or has no partitions".to_string());
            }
            let mut out = BTreeMap::new();
            for p in partitions {
                let marks = consumer
                    .fetch_watermarks(&topic, p, READ_TIMEOUT)
                    .map_err(|e| format!("cannot read the offsets of partition {p}: {e}"))?;
                out.insert(p, marks);
            }
            Ok(out)
        })
        .await
        .map_err(|e| self.fail(format!("bug: metadata task failed: {e}")))?;
        result.map_err(|e| self.fail(e))
    }

    /// Offsets of the messages in `[from, to)` for each `(partition, from, to)`.
    pub(super) async fn read_offsets(
        &self,
        wanted: Vec<(i32, i64, i64)>,
    ) -> Result<HashMap<i32, Vec<i64>>, AuditError> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut list = TopicPartitionList::new();
            let mut ends: HashMap<i32, i64> = HashMap::new();
            for &(p, from, to) in &wanted {
                list.add_partition_offset(&topic, p, Offset::Offset(from))
                    .map_err(|e| e.to_string())?;
                ends.insert(p, to);
            }
            consumer.assign(&list).map_err(|e| e.to_string())?;
            let total: i64 = wanted.iter().map(|&(_, from, to)| to - from).sum();
            let mut meter = Meter::new(format!("audit {topic}"), total as u64, "offsets", true);
            let mut read = 0u64;
            let mut out: HashMap<i32, Vec<i64>> = HashMap::new();
            let mut last_progress = Instant::now();
            while !ends.is_empty() {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        last_progress = Instant::now();
                        let p = m.partition();
                        let Some(&end) = ends.get(&p) else { continue };
                        if m.offset() < end {
                            out.entry(p).or_default().push(m.offset());
                            read += 1;
                            meter.update(read, "");
                        }
                        if m.offset() + 1 >= end {
                            ends.remove(&p);
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        // Nothing more to read: the range ends in transaction markers or
                        // removed messages.
                        ends.remove(&p);
                    }
                    Some(Err(e)) => return Err(format!("read failed: {e}")),
                    None if last_progress.elapsed() > READ_TIMEOUT => {
                        return Err(format!(
                            "no messages for {}s while partitions {:?} were still expected",
                            READ_TIMEOUT.as_secs(),
                            ends.keys().collect::<Vec<_>>()
                        ));
                    }
                    None => {}
                }
            }
            meter.finish(read, "");
            Ok(out)
        })
        .await
        .map_err(|e| self.fail(format!("bug: reader task failed: {e}")))?;
        result.map_err(|e| self.fail(e))
    }
}
