//! What the Kafka stages run against: a broker (in-process mock or the one given), the service
//! writing the bench tables, and the record sets produced to it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use tokio::sync::watch;

use crate::config::{Config, KAFKA_PROPERTIES_ENV};
use crate::ingest::batch::BatchLimits;
use crate::ingest::decode::{BodyDecoder, Format};
use crate::ingest::kafka::Connection;
use crate::ingest::pipeline::{Destination, TableWriter};
use crate::ingest::progress::Progress;
use crate::service::app::{self, load_table, open_sinks};
use crate::service::background::Maintenance;
use crate::table::delta::table_location;
use crate::tools::generator::Shape;
use crate::tools::produce::{ProduceOptions, ProduceReport, produce};

use super::corpus::Corpus;
use super::process::{Measured, Meter};
use super::{
    BenchError, BenchOptions, DRAIN_FLUSHES, Profile, STALL_TIMEOUT, partitions_per_topic,
    stage_error,
};

/// What the mock cluster keeps per partition (it drops older messages beyond ~5 MiB).
const MOCK_PARTITION_BYTES: u64 = 4_500_000;

/// The bench's config: the embedded flagship schema and mappings in `dir`, the storage,
/// maintenance and Delta settings of `options.storage` (or `dir` and the defaults), the
/// service's default batch limits.
pub(super) fn bench_config(
    dir: &Path,
    options: &BenchOptions,
    run: &str,
) -> Result<Config, BenchError> {
    std::fs::create_dir_all(dir.join("schemas/mappings"))
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let file = crate::tools::demo::write_config(dir, Format::Json, None)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    // librdkafka properties (a secured `--brokers`, or tuning) come from the environment, as
    // for the service; nothing else does.
    let properties = std::env::vars().filter(|(k, _)| k.starts_with(KAFKA_PROPERTIES_ENV));
    let mut config =
        Config::load(&file, properties).map_err(|e| BenchError::Setup(e.to_string()))?;
    config.batch = BatchLimits::default();
    if let Some(max_bytes) = options.max_bytes {
        config.batch.max_bytes = max_bytes;
    }
    config.kafka.group_id = format!("sluice-bench-{run}");
    if let Some(given) = &options.storage {
        config.storage = given.storage.clone();
        config.maintenance = given.maintenance.clone();
        config.delta = given.delta;
    }
    Ok(config)
}

/// The table of a stage: `<root>/<run>/<stage>-<profile>/enriched_posts` (and dead letters).
pub(super) fn stage_config(base: &Config, run: &str, stage: &str, profile: Profile) -> Config {
    let mut config = base.clone();
    let profile = profile.name();
    config.storage.root = table_location(
        &table_location(&base.storage.root, &format!("sluice-bench-{run}")),
        &format!("{stage}-{profile}"),
    );
    config
}

pub(super) fn decoders(config: &Config) -> Result<HashMap<Arc<str>, BodyDecoder>, BenchError> {
    let registry = app::registry(config)?;
    Ok(load_table(config, &config.tables[0], registry.as_ref())?.decoders)
}

async fn open_destination(config: &Config) -> Result<Destination, BenchError> {
    let loaded = load_table(config, &config.tables[0], None)?;
    let (table, dead_letters) = open_sinks(config, &loaded.schema)
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(Destination {
        table,
        dead_letters,
        forwarder: None,
    })
}

/// Feeds `corpus` to a writer with `limits`; returns what it did and what it cost.
pub(super) async fn feed(
    config: &Config,
    corpus: &Corpus,
    limits: BatchLimits,
) -> Result<(Progress, Measured), BenchError> {
    let destination = open_destination(config).await?;
    let (mut writer, _) = TableWriter::without_broker(
        destination,
        decoders(config)?,
        limits,
        config.ingest.decoding(),
        corpus.partitions(),
    )
    .await?;
    let meter = Meter::start();
    for i in 0..corpus.records {
        writer.ingest(corpus.record(i)).await?;
    }
    let progress = writer.finish().await?;
    Ok((progress, meter.stop()))
}

pub(super) fn where_tables_go(config: &Config) -> String {
    if config.storage.root.starts_with("s3://") {
        format!(
            "S3 ({})",
            config.storage.s3.endpoint.as_deref().unwrap_or("AWS")
        )
    } else {
        "local disk".to_string()
    }
}

/// Topics of a profile for a broker-fed stage: fresh names per run, so an external broker's
/// old messages never mix in.
pub(super) fn stage_topics(profile: Profile, run: &str, stage: &str) -> Vec<(Shape, String)> {
    profile
        .shapes()
        .iter()
        .map(|shape| {
            (
                *shape,
                format!("bench-{run}-{stage}.{}", shape.default_topic()),
            )
        })
        .collect()
}

/// A broker with `topics`: the given one (topics created if missing) or a mock cluster.
pub(super) async fn broker(
    options: &BenchOptions,
    topics: &[(Shape, String)],
    partitions: i32,
) -> Result<
    (
        String,
        Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    ),
    BenchError,
> {
    match &options.brokers {
        Some(brokers) if options.parent_produces => Ok((brokers.clone(), None)),
        Some(brokers) => {
            let names: Vec<String> = topics.iter().map(|(_, t)| t.clone()).collect();
            crate::tools::produce::create_topics(&options.connection(brokers), &names, partitions)
                .await
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            Ok((brokers.clone(), None))
        }
        None => {
            let cluster = MockCluster::new(1).map_err(|e| BenchError::Setup(e.to_string()))?;
            for (_, topic) in topics {
                cluster
                    .create_topic(topic, partitions, 1)
                    .map_err(|e| BenchError::Setup(e.to_string()))?;
            }
            Ok((cluster.bootstrap_servers(), Some(cluster)))
        }
    }
}

/// The config of a broker-fed stage: `brokers`, the stage's topics, `max_age_ms`.
pub(super) fn kafka_config(
    base: &Config,
    run: &str,
    stage: &str,
    profile: Profile,
    brokers: &str,
    topics: &[(Shape, String)],
) -> Config {
    let mut config = stage_config(base, run, stage, profile);
    config.kafka.brokers = brokers.to_string();
    let table = &mut config.tables[0];
    table.sources = topics
        .iter()
        .map(|(shape, topic)| {
            let mut source = table
                .sources
                .iter()
                .find(|s| s.topic == shape.default_topic())
                .expect("the bench config has every shape")
                .clone();
            source.topic = topic.clone();
            source
        })
        .collect();
    config
}

/// The service running one table, with its maintenance thread as `sluice run` has it (when
/// the config enables maintenance); stops it on drop of the returned sender.
pub(super) struct Service {
    stop: tokio::sync::oneshot::Sender<()>,
    pub(super) progress: watch::Receiver<Progress>,
    task: tokio::task::JoinHandle<Result<Progress, crate::ingest::pipeline::PipelineError>>,
    maintenance: Option<Maintenance>,
}

pub(super) async fn start_service(
    config: &Config,
    partitions: usize,
) -> Result<Service, BenchError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (running, maintenance) = app::start_maintained(config, async move {
        let _ = stopped.await;
    })
    .await?;
    let table = running.into_iter().next().expect("one table");
    let mut progress = table.progress.clone();
    tokio::time::timeout(
        STALL_TIMEOUT,
        progress.wait_for(|p| p.owned.len() == partitions),
    )
    .await
    .map_err(|_| BenchError::Stage {
        stage: "kafka",
        reason: "the group never assigned every partition".into(),
    })?
    .map_err(|e| stage_error("kafka")(e.to_string()))?;
    Ok(Service {
        stop,
        progress,
        task: table.task,
        maintenance,
    })
}

impl Service {
    pub(super) async fn wait_covers(
        &mut self,
        stage: &'static str,
        targets: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), BenchError> {
        tokio::time::timeout(STALL_TIMEOUT, self.progress.wait_for(|p| p.covers(targets)))
            .await
            .map_err(|_| stage_error(stage)(format!("not caught up within {STALL_TIMEOUT:?}")))?
            .map_err(|e| stage_error(stage)(e.to_string()))?;
        Ok(())
    }

    pub(super) async fn stop(self) -> Result<Progress, BenchError> {
        let _ = self.stop.send(());
        let written = self
            .task
            .await
            .map_err(|e| stage_error("kafka")(e.to_string()))?
            .map_err(BenchError::from);
        if let Some(maintenance) = self.maintenance {
            let _ = tokio::task::spawn_blocking(move || maintenance.stop()).await;
        }
        written
    }
}

pub(super) fn produce_options(
    connection: Connection,
    topics: &[(Shape, String)],
    profile: Profile,
    count: u64,
    rate: u64,
    seed: u64,
) -> ProduceOptions {
    ProduceOptions {
        connection,
        shapes: topics.to_vec(),
        count,
        rate,
        seed,
        embedding_dim: profile.embedding_dim(),
        bad_every: 0,
        operations_every: profile.operations_every(),
        spread_days: 3,
        clock_ms: None,
        progress: false,
        wire: None,
    }
}

/// Records in the pre-produced set of a broker-fed stage: as many as the broker keeps, in
/// whole [`DRAIN_FLUSHES`].
pub(super) fn set_size(
    options: &BenchOptions,
    profile: Profile,
    partitions: usize,
    mock: bool,
) -> u64 {
    let average = Corpus::new(profile, 300, options.seed).average().max(1);
    let mut count = options.records;
    if mock {
        count = count.min(partitions as u64 * MOCK_PARTITION_BYTES / average);
    }
    // Whole flushes only: a partial last batch would wait for `max_age_ms`.
    (count / DRAIN_FLUSHES).max(1) * DRAIN_FLUSHES
}

/// The pre-produced set of a broker-fed stage. A parent `sluice bench` produced it already
/// (so the producer's CPU and memory are not the writer's): it is every message of `topics`.
/// Run on its own (`--row`), the stage produces it here.
pub(super) async fn produced_set(
    options: &BenchOptions,
    profile: Profile,
    topics: &[(Shape, String)],
    stage: &'static str,
) -> Result<(ProduceReport, usize, String, Option<HostedMock>), BenchError> {
    let per_topic = partitions_per_topic(topics.len());
    let partitions = per_topic as usize * topics.len();
    let (brokers, cluster) = broker(options, topics, per_topic).await?;
    let error = stage_error(stage);
    if options.parent_produces {
        let names: Vec<String> = topics.iter().map(|(_, t)| t.clone()).collect();
        let connection = options.connection(&brokers);
        let marks = tokio::task::spawn_blocking(move || watermarks(&connection, &names, per_topic))
            .await
            .map_err(|e| error(e.to_string()))?
            .map_err(|e| error(e.to_string()))?;
        let report = ProduceReport {
            delivered: marks
                .iter()
                .map(|(_, (low, high))| (high - low) as u64)
                .sum(),
            bytes: options.set_bytes,
            last_offsets: marks
                .into_iter()
                .filter(|(_, (low, high))| high > low)
                .map(|(key, (_, high))| (key, high - 1))
                .collect(),
            elapsed: Duration::ZERO,
            operations: Default::default(),
        };
        return Ok((report, partitions, brokers, cluster));
    }
    let count = set_size(options, profile, partitions, cluster.is_some());
    let produced = produce_set(&brokers, topics, options, profile, count)
        .await
        .map_err(|e| error(e.to_string()))?;
    Ok((produced, partitions, brokers, cluster))
}

/// Produces `count` records of `profile` as fast as the broker takes them.
pub(super) async fn produce_set(
    brokers: &str,
    topics: &[(Shape, String)],
    options: &BenchOptions,
    profile: Profile,
    count: u64,
) -> Result<ProduceReport, crate::tools::produce::ProduceError> {
    produce(&produce_options(
        options.connection(brokers),
        topics,
        profile,
        count,
        0,
        options.seed,
    ))
    .await
}

/// Low and high watermark per (topic, partition).
type Watermarks = BTreeMap<(String, i32), (i64, i64)>;

/// Low and high watermarks of every partition of `topics`.
fn watermarks(
    connection: &Connection,
    topics: &[String],
    partitions: i32,
) -> Result<Watermarks, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (consumer, _): (BaseConsumer<crate::ingest::kafka::WatchContext>, _) = connection
        .create(&connection.client_config(&[]))
        .map_err(|e| e.to_string())?;
    let mut marks = BTreeMap::new();
    for topic in topics {
        for partition in 0..partitions {
            let mark = consumer
                .fetch_watermarks(topic, partition, STALL_TIMEOUT)
                .map_err(|e| connection.redactor().scrub(&e.to_string()))?;
            marks.insert((topic.clone(), partition), mark);
        }
    }
    Ok(marks)
}

type HostedMock = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;
