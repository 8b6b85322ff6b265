//! The records a bench feeds: a pool of generated posts per profile, serialized once, so the
//! measured stage does not include generating them.

use std::sync::Arc;

use crate::ingest::decode::Format;
use crate::ingest::pipeline::Record;
use crate::ingest::registry::RegisteredSchema;
use crate::table::delta::PartitionKey;
use crate::tools::generator::{Generator, Shape};
use crate::tools::wire::{WireEncoder, shape_schema};

use super::{Profile, partitions_per_topic};

/// Distinct generated payloads a stage cycles through: the records differ the way a real
/// stream's do, while memory holds only the pool, not every record.
const POOL: u64 = 12_000;

/// One generated message.
pub(super) struct Payload {
    key: Vec<u8>,
    value: Vec<u8>,
}

/// `records` messages spread round robin over the profile's topics and `KAFKA_PARTITIONS`
/// partitions, their payloads cycled from a pool.
pub(super) struct Corpus {
    pub(super) pool: Vec<Payload>,
    pub(super) records: u64,
    pub(super) topics: Vec<Arc<str>>,
    per_topic: i32,
    timestamp_ms: i64,
}

impl Corpus {
    pub(super) fn new(profile: Profile, records: u64, seed: u64) -> Corpus {
        let timestamp_ms = chrono::Utc::now().timestamp_millis();
        let mut generator = Generator::new(seed, profile.embedding_dim(), timestamp_ms, 3)
            .with_operations_every(profile.operations_every());
        let shapes = profile.shapes();
        // A multiple of the shape count, so that record i and its pool entry share a shape.
        let size = (records.min(POOL) / shapes.len() as u64).max(1) * shapes.len() as u64;
        let format = profile.format();
        let mut wire = WireEncoder::default();
        for schema in registered(format) {
            let shape = Shape::ALL[schema.id as usize - 1];
            let (_, record) = shape_schema(shape, format).expect("registry formats have schemas");
            wire.add(
                shape.default_topic(),
                schema.id,
                schema.kind,
                &schema.text,
                record,
            )
            .expect("the shipped schemas compile");
        }
        let pool = (0..size as usize)
            .map(|i| {
                let shape = shapes[i % shapes.len()];
                let (key, post) = generator.next_value(shape);
                let post = post.expect("the bench generates no hostile payloads");
                Payload {
                    key: key.into_bytes(),
                    value: wire.encode(shape.default_topic(), &post),
                }
            })
            .collect();
        Corpus {
            pool,
            records,
            topics: shapes
                .iter()
                .map(|s| Arc::from(s.default_topic()))
                .collect(),
            per_topic: partitions_per_topic(shapes.len()),
            timestamp_ms,
        }
    }

    /// Record `i`: topic `i mod topics`, then partitions round robin, offsets in order.
    pub(super) fn record(&self, i: u64) -> Record<'_> {
        let topics = self.topics.len() as u64;
        let per_topic = self.per_topic as u64;
        // The pool is generated round robin over the shapes too, so record i keeps its shape.
        let payload = &self.pool[(i % self.pool.len() as u64) as usize];
        Record {
            topic: &self.topics[(i % topics) as usize],
            partition: ((i / topics) % per_topic) as i32,
            offset: (i / (topics * per_topic)) as i64,
            timestamp_ms: Some(self.timestamp_ms),
            key: Some(&payload.key),
            payload: Some(&payload.value),
        }
    }

    /// JSON bytes of all `records`.
    pub(super) fn bytes(&self) -> u64 {
        let pool: u64 = self.pool.iter().map(|p| p.value.len() as u64).sum();
        pool * self.records / self.pool.len().max(1) as u64
    }

    pub(super) fn average(&self) -> u64 {
        self.bytes() / self.records.max(1)
    }

    pub(super) fn partitions(&self) -> Vec<PartitionKey> {
        self.topics
            .iter()
            .flat_map(|topic| {
                (0..self.per_topic).map(|partition| PartitionKey {
                    topic: topic.clone(),
                    partition,
                })
            })
            .collect()
    }
}

/// The shipped schemas of a registry format as a registry would hold them: shape `k` of
/// [`Shape::ALL`] under id `k + 1`. None for plain JSON.
pub(super) fn registered(format: Format) -> Vec<RegisteredSchema> {
    let Some(kind) = format.schema_kind() else {
        return Vec::new();
    };
    (Shape::ALL.iter().enumerate())
        .map(|(k, shape)| RegisteredSchema {
            id: k as u32 + 1,
            kind,
            text: shape_schema(*shape, format)
                .expect("registry formats have schemas")
                .0
                .to_string(),
            references: Vec::new(),
        })
        .collect()
}
