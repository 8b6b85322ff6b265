//! Dead letters: messages that could not become rows, stored with their raw bytes in a Delta
//! table next to the main one (`<table>_dead_letters`).
//!
//! Exactly-once across the two tables: a flush commits its dead letters first, with one txn per
//! Kafka partition (version = last offset the flush covers), then its rows. A crash in between
//! leaves dead letters whose rows never landed; the restarted writer re-reads those messages
//! from the main table's position and reads which offsets up to the dead-letter table's txn
//! version are stored: those stay dead letters (never decoded into rows again, whatever the
//! contract or the clock says now), the others are decoded and stored as usual. Every consumed
//! offset therefore ends up exactly once in one of the two tables.

use std::collections::HashSet;
use std::sync::Arc;

use deltalake::arrow::array::AsArray;
use deltalake::arrow::array::{
    ArrayRef, BinaryArray, Date32Array, Int32Array, Int64Array, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::Int64Type;
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::{DeltaTable, DeltaTableError};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::contract::schema::TableSchema;
use crate::contract::values::UTC;
use crate::ingest::decode::Rejection;
use crate::ingest::kafka::{ClientError, Connection, WatchContext};
use crate::table::delta::{PartitionKey, register_table};

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Largest payload forwarded to the dead-letter topic; Kafka's default message limit is 1 MB.
/// Bigger payloads are forwarded without their bytes (header `sluice.payload_omitted`); the
/// dead-letter table always has them.
pub const MAX_FORWARDED_PAYLOAD: usize = 900_000;

/// Publishes dead letters to a Kafka topic as well, for consumers that alert or repair.
///
/// Sent and acknowledged before the dead-letter table commit, so a crash can repeat a message
/// on the topic but never skip one: at least once there, exactly once in the table.
pub struct Forwarder {
    producer: FutureProducer<WatchContext>,
    topic: String,
    table: String,
}

impl Forwarder {
    /// A producer for `topic` on the cluster of `connection`.
    pub fn new(connection: &Connection, topic: &str, table: &str) -> Result<Self, ClientError> {
        let client = connection.client_config(&[
            ("enable.idempotence", "true"),
            ("message.max.bytes", "1000000"),
        ]);
        let (producer, _) = connection.create(&client)?;
        Ok(Forwarder {
            producer,
            topic: topic.to_string(),
            table: table.to_string(),
        })
    }

    /// The topic dead letters go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes each dead letter with its original key and payload, and where it came from and
    /// why in headers; returns once the broker acknowledged all of them.
    pub async fn send(&self, letters: &[(&PartitionKey, &Rejection)]) -> Result<(), KafkaError> {
        let mut pending = Vec::with_capacity(letters.len());
        for (key, r) in letters {
            let partition = key.partition.to_string();
            let offset = r.offset.to_string();
            let size = r.payload.as_ref().map_or(0, Vec::len);
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "sluice.table",
                    value: Some(&self.table),
                })
                .insert(Header {
                    key: "sluice.topic",
                    value: Some(&*key.topic),
                })
                .insert(Header {
                    key: "sluice.partition",
                    value: Some(&partition),
                })
                .insert(Header {
                    key: "sluice.offset",
                    value: Some(&offset),
                })
                .insert(Header {
                    key: "sluice.reason",
                    value: Some(r.reason.code()),
                })
                .insert(Header {
                    key: "sluice.detail",
                    value: Some(&r.detail),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic);
            if let Some(k) = &r.key {
                record = record.key(k.as_slice());
            }
            match &r.payload {
                Some(p) if p.len() <= MAX_FORWARDED_PAYLOAD => {
                    record = record.payload(p.as_slice())
                }
                Some(_) => {
                    headers = headers.insert(Header {
                        key: "sluice.payload_omitted",
                        value: Some(&size.to_string()),
                    });
                }
                None => {}
            }
            let delivery = self
                .producer
                .send_result(record.headers(headers))
                .map_err(|(e, _)| e)?;
            pending.push(delivery);
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }
}

/// Offsets in `(after, up_to]` of one partition that the dead-letter table holds, read from the
/// table's current snapshot. Used only when recovering from a crash that left dead letters
/// ahead of the rows.
pub async fn stored_offsets(
    table: &DeltaTable,
    key: &PartitionKey,
    after: Option<i64>,
    up_to: i64,
) -> Result<HashSet<i64>, DeltaTableError> {
    let ctx = SessionContext::new();
    register_table(&ctx, "dead_letters", table).await?;
    let topic = key.topic.replace('\'', "''");
    let sql = format!(
        "SELECT kafka_offset FROM dead_letters WHERE kafka_topic = '{topic}' \
         AND kafka_partition = {} AND kafka_offset > {} AND kafka_offset <= {up_to}",
        key.partition,
        after.unwrap_or(-1)
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    Ok(batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect())
}

/// One row per rejection, in the dead-letter table's column order.
pub fn batch(
    schema: &TableSchema,
    letters: &[(&PartitionKey, &Rejection)],
    now_us: i64,
) -> Result<RecordBatch, ArrowError> {
    let event_date = |r: &Rejection| {
        let micros = r
            .timestamp_ms
            .and_then(crate::contract::values::kafka_micros)
            .unwrap_or(now_us);
        micros.div_euclid(MICROS_PER_DAY) as i32
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            letters.iter().map(|(k, _)| &*k.topic),
        )),
        Arc::new(Int32Array::from_iter_values(
            letters.iter().map(|(k, _)| k.partition),
        )),
        Arc::new(Int64Array::from_iter_values(
            letters.iter().map(|(_, r)| r.offset),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter(letters.iter().map(|(_, r)| {
                r.timestamp_ms
                    .and_then(crate::contract::values::kafka_micros)
            }))
            .with_timezone(UTC),
        ),
        Arc::new(BinaryArray::from_iter(
            letters.iter().map(|(_, r)| r.key.as_deref()),
        )),
        Arc::new(BinaryArray::from_iter(
            letters.iter().map(|(_, r)| r.payload.as_deref()),
        )),
        Arc::new(Int64Array::from_iter_values(
            letters
                .iter()
                .map(|(_, r)| r.payload.as_ref().map_or(0, Vec::len) as i64),
        )),
        Arc::new(StringArray::from_iter_values(
            letters.iter().map(|(_, r)| r.reason.code()),
        )),
        Arc::new(StringArray::from_iter_values(
            letters.iter().map(|(_, r)| r.detail.as_str()),
        )),
        Arc::new(TimestampMicrosecondArray::from_value(now_us, letters.len()).with_timezone(UTC)),
        Arc::new(Date32Array::from_iter_values(
            letters.iter().map(|(_, r)| event_date(r)),
        )),
    ];
    RecordBatch::try_new(schema.arrow_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::dead_letters::schema;
    use crate::ingest::decode::RejectReason;

    #[test]
    fn a_dead_letter_keeps_the_bytes_and_the_reason() {
        let schema = schema("enriched_posts").unwrap();
        assert_eq!(schema.name, "enriched_posts_dead_letters");
        let key = PartitionKey {
            topic: "posts".into(),
            partition: 2,
        };
        let rejection = Rejection {
            offset: 41,
            timestamp_ms: Some(1_740_823_200_000),
            key: Some(b"k1".to_vec()),
            payload: Some(b"\xff\xfe{}".to_vec()),
            reason: RejectReason::InvalidUtf8,
            detail: "invalid UTF-8 at byte 0".into(),
        };
        let batch = batch(&schema, &[(&key, &rejection)], 0).unwrap();
        assert_eq!(batch.num_rows(), 1);
        let payload = batch.column_by_name("payload").unwrap().as_binary::<i32>();
        assert_eq!(payload.value(0), b"\xff\xfe{}");
        let reason = batch.column_by_name("reason").unwrap().as_string::<i32>();
        assert_eq!(reason.value(0), "invalid_utf8");
        let day = batch
            .column_by_name("event_date")
            .unwrap()
            .as_primitive::<deltalake::arrow::datatypes::Date32Type>();
        assert_eq!(day.value(0), 20148); // 2025-03-01
    }
}
