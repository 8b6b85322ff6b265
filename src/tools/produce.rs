//! Produce: publishes generated enriched posts to a Kafka cluster at a steady rate.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::ingest::kafka::{CONNECT_TIMEOUT, ClientError, Connection, WatchContext};
use crate::meter::Meter;
use crate::tools::generator::{Generator, Operations, Shape};
use crate::tools::wire::WireEncoder;

/// Deliveries awaited in flight before the producer waits for the oldest.
const MAX_IN_FLIGHT: usize = 20_000;

/// Errors publishing.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The producer could not be created or could not reach the cluster.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A topic could not be created.
    #[error("cannot create topic {topic} on {brokers}: {reason}")]
    CreateTopic {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// The broker's or client's answer.
        reason: String,
    },
    /// Operations are generated as JSON (their delete formats are not in the registry schemas).
    #[error(
        "--operations-every generates JSON messages; it cannot be combined with a registry format"
    )]
    OperationsNeedJson,
    /// Messages could not be delivered.
    #[error("{failed} of {count} messages to {topic} were not delivered; first error: {first}")]
    Delivery {
        /// Topic of the first failure.
        topic: String,
        /// Messages that failed.
        failed: u64,
        /// Messages attempted.
        count: u64,
        /// The first failure.
        first: String,
    },
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// The cluster: bootstrap servers and librdkafka properties (TLS, SASL).
    pub connection: Connection,
    /// Shapes to publish, round robin; each goes to its topic.
    pub shapes: Vec<(Shape, String)>,
    /// Messages in total.
    pub count: u64,
    /// Messages per second (0 = as fast as possible).
    pub rate: u64,
    /// Generator seed.
    pub seed: u64,
    /// Embedding dimension of tweets.
    pub embedding_dim: usize,
    /// Every n-th message is hostile (0 = none).
    pub bad_every: u64,
    /// Every n-th message edits, redelivers or deletes a recent post, or replays a deleted
    /// post's create (0 = none; JSON only).
    pub operations_every: u64,
    /// Days over which created_at is spread back from now.
    pub spread_days: i64,
    /// A fixed "now" (ms since the epoch) for reproducible tables: posts are created before
    /// it, and message timestamps step evenly through the spread instead of being the wall
    /// clock. `None` uses the wall clock.
    pub clock_ms: Option<i64>,
    /// Draw a progress bar when stderr is a terminal (the CLI); otherwise progress is logged
    /// every 10 s.
    pub progress: bool,
    /// Encode in a registry format with these registered schemas; `None` publishes JSON.
    pub wire: Option<WireEncoder>,
}

/// What was published.
#[derive(Debug, Clone, Default)]
pub struct ProduceReport {
    /// Messages delivered.
    pub delivered: u64,
    /// Payload bytes delivered.
    pub bytes: u64,
    /// Highest delivered offset per (topic, partition).
    pub last_offsets: BTreeMap<(String, i32), i64>,
    /// Wall time.
    pub elapsed: Duration,
    /// Operations among the messages delivered, by kind.
    pub operations: Operations,
}

/// Creates those of `topics` that do not exist yet with `partitions` partitions (replication
/// 1), for brokers that do not create topics on first use; returns the ones it created.
pub async fn create_topics(
    connection: &Connection,
    topics: &[String],
    partitions: i32,
) -> Result<Vec<String>, ProduceError> {
    let fail = |topic: &str, reason: String| ProduceError::CreateTopic {
        brokers: connection.brokers.clone(),
        topic: topic.to_string(),
        reason: connection.redactor().scrub(&reason),
    };
    connection.check(CONNECT_TIMEOUT).await?;
    let (admin, _): (AdminClient<WatchContext>, _) =
        connection.create(&connection.client_config(&[]))?;
    let wanted: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&wanted, &options)
        .await
        .map_err(|e| fail(&topics.join(","), e.to_string()))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(fail(&topic, code.to_string())),
        }
    }
    Ok(created)
}

/// Publishes `options.count` messages and waits for every delivery report.
/// Fails first, naming the listener and the cause, when the cluster cannot be reached (wrong
/// credentials, an untrusted certificate, a plaintext client on a TLS listener).
pub async fn produce(options: &ProduceOptions) -> Result<ProduceReport, ProduceError> {
    if options.wire.is_some() && options.operations_every > 0 {
        return Err(ProduceError::OperationsNeedJson);
    }
    let connection = &options.connection;
    connection.check(CONNECT_TIMEOUT).await?;
    let (producer, _): (FutureProducer<WatchContext>, _) =
        connection.create(&connection.client_config(&[
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
            ("queue.buffering.max.messages", "200000"),
            ("message.timeout.ms", "60000"),
        ]))?;
    let now_ms = options
        .clock_ms
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let spread_ms = options.spread_days.max(1) * 86_400_000;
    let mut generator = Generator::new(
        options.seed,
        options.embedding_dim,
        now_ms,
        options.spread_days,
    )
    .with_bad_every(options.bad_every)
    .with_operations_every(options.operations_every);
    let started = Instant::now();
    let mut in_flight: VecDeque<(usize, usize, DeliveryFuture)> = VecDeque::new();
    let mut report = ProduceReport::default();
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut meter = Meter::new("produce", options.count, "messages", options.progress);

    for n in 0..options.count {
        if options.rate > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / options.rate as f64);
            let now = Instant::now();
            if due > now + Duration::from_millis(2) {
                tokio::time::sleep(due - now).await;
            }
        }
        let which = (n as usize) % options.shapes.len();
        let (shape, topic) = &options.shapes[which];
        let (key, message) = generator.next_value(*shape);
        let payload = match (&options.wire, message) {
            (Some(wire), Ok(post)) => wire.encode(topic, &post),
            (None, Ok(post)) => serde_json::to_vec(&post).expect("generated JSON serializes"),
            // Hostile payloads go out as generated: in a registry format, unframed, as a
            // broken producer on the topic would send them.
            (_, Err(hostile)) => hostile,
        };
        let len = payload.len();
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        if options.clock_ms.is_some() {
            let step = spread_ms as f64 / options.count.max(1) as f64;
            record = record.timestamp(now_ms - spread_ms + (n as f64 * step) as i64);
        }
        let future = loop {
            match producer.send_result(record) {
                Ok(f) => break f,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match in_flight.pop_front() {
                        Some(d) => settle(d, options, &mut report, &mut failures).await,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => {
                    failures.push((topic.clone(), connection.redactor().scrub(&e.to_string())));
                    return Err(delivery_error(&failures, options.count));
                }
            }
        };
        in_flight.push_back((which, len, future));
        while in_flight.len() > MAX_IN_FLIGHT {
            let d = in_flight.pop_front().expect("non-empty");
            settle(d, options, &mut report, &mut failures).await;
        }
        meter.update(n + 1, "");
    }
    while let Some(d) = in_flight.pop_front() {
        settle(d, options, &mut report, &mut failures).await;
    }
    meter.finish(options.count, &format!("{} delivered", report.delivered));
    report.elapsed = started.elapsed();
    report.operations = generator.operations();
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(delivery_error(&failures, options.count))
    }
}

fn delivery_error(failures: &[(String, String)], count: u64) -> ProduceError {
    let (topic, first) = failures.first().cloned().unwrap_or_default();
    ProduceError::Delivery {
        topic,
        failed: failures.len() as u64,
        count,
        first,
    }
}

async fn settle(
    (which, len, future): (usize, usize, DeliveryFuture),
    options: &ProduceOptions,
    report: &mut ProduceReport,
    failures: &mut Vec<(String, String)>,
) {
    let topic = &options.shapes[which].1;
    match future.await {
        Ok(Ok(delivery)) => {
            report.delivered += 1;
            report.bytes += len as u64;
            let entry = report
                .last_offsets
                .entry((topic.clone(), delivery.partition))
                .or_insert(-1);
            *entry = (*entry).max(delivery.offset);
        }
        Ok(Err((e, _))) => failures.push((
            topic.clone(),
            options.connection.redactor().scrub(&e.to_string()),
        )),
        Err(_) => failures.push((topic.clone(), "producer dropped the delivery".into())),
    }
}
