//! `sluice bench`: the writer's speed, freshness and memory, measured against the machine's
//! limit, printed as tables a user can paste.
//!
//! Stages, each run for two record profiles (enriched posts of ~800 B of JSON, tweets with
//! 384-dim embeddings of ~8 KB, the floats being text):
//! - **limit**: decode + Parquet encode of the same records in memory on one thread; what one
//!   core can do at best.
//! - **pipeline**: the writer ([`TableWriter`]) fed in process, from message bytes to
//!   committed Delta files on the configured storage, with no broker in the way.
//! - **kafka**: the service ([`app::start`]) draining a pre-produced set from a broker: the
//!   in-process mock cluster, or `--brokers`.
//! - **freshness**: a steady producer below the maximum and a 1 s flush; per record, the time
//!   from produce to the commit that made it visible, as p50/p99.
//! - **compaction**: a table of many small files, compacted; the `sql/` library before and
//!   after.
//!
//! CPU time and peak RSS come from `/proc/self` (Linux): CPU seconds per million records
//! compare runs whatever caps them; peak RSS is reset before each measured stage.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::parquet::arrow::ArrowWriter;
use rdkafka::mocking::MockCluster;
use tokio::sync::watch;

use crate::config::{Config, KAFKA_PROPERTIES_ENV};
use crate::ingest::batch::BatchLimits;
use crate::ingest::decode::{BodyDecoder, Chunk};
use crate::ingest::kafka::Connection;
use crate::ingest::pipeline::{Destination, Record, TableWriter};
use crate::ingest::progress::Progress;
use crate::query::sql::{Session, TimeTravel};
use crate::service::app::{self, AppError, load_table, open_sinks};
use crate::table::compact::{CompactOptions, compact};
use crate::table::delta::{
    PartitionKey, open_table, parquet_properties, register_table, table_location,
};
use crate::tools::generator::{Generator, Shape};
use crate::tools::produce::{ProduceOptions, ProduceReport, produce};

/// How long a broker-fed stage may take before it is reported as stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(600);
/// What the mock cluster keeps per partition (it drops older messages beyond ~5 MiB).
const MOCK_PARTITION_BYTES: u64 = 4_500_000;
/// Partitions the Kafka stages spread a profile over.
const KAFKA_PARTITIONS: usize = 32;

/// Partitions per topic when a profile's `topics` share [`KAFKA_PARTITIONS`].
fn partitions_per_topic(topics: usize) -> i32 {
    (KAFKA_PARTITIONS / topics).max(1) as i32
}
/// The drained stages (pipeline, kafka) commit their set in this many flushes triggered by
/// size (`batch.max_rows` = records / this, other limits as configured), so the last record
/// triggers the last flush: no timer in the measurement, and both stages commit alike.
const DRAIN_FLUSHES: u64 = 4;
/// Flush bound of the freshness stage.
const FRESHNESS_FLUSH_MS: u64 = 1_000;
/// Rows per commit of the many-small-files table.
const SMALL_FILE_ROWS: usize = 500;

/// Errors running the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the tables or the writer failed.
    #[error(transparent)]
    App(#[from] AppError),
    /// The writer failed.
    #[error(transparent)]
    Pipeline(#[from] crate::ingest::pipeline::PipelineError),
    /// Files for the bench could not be written.
    #[error("{0}")]
    Setup(String),
    /// A stage did not finish.
    #[error("{stage}: {reason}")]
    Stage {
        /// The stage.
        stage: &'static str,
        /// What went wrong.
        reason: String,
    },
}

fn stage_error(stage: &'static str) -> impl Fn(String) -> BenchError {
    move |reason| BenchError::Stage { stage, reason }
}

/// The records a stage writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// The three upstream shapes, round robin: enriched posts of ~800 B of JSON, tweets with
    /// a 32-dimension embedding.
    Posts,
    /// Tweets with 384-dimension embeddings (~8 KB of JSON).
    Embeddings,
}

impl Profile {
    /// Both profiles.
    pub const ALL: [Profile; 2] = [Profile::Posts, Profile::Embeddings];

    fn shapes(self) -> &'static [Shape] {
        match self {
            Profile::Posts => &Shape::ALL,
            Profile::Embeddings => &[Shape::Tweets],
        }
    }

    fn embedding_dim(self) -> usize {
        match self {
            Profile::Posts => 32,
            Profile::Embeddings => 384,
        }
    }

    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Posts => "posts",
            Profile::Embeddings => "embeddings",
        }
    }

    /// Name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Profile::Posts => "posts",
            Profile::Embeddings => "384-dim embeddings",
        }
    }
}

/// A benchmark stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Stage {
    /// Decode + encode in memory on one thread.
    Limit,
    /// The writer fed in process to committed Delta files.
    Pipeline,
    /// The service draining a broker.
    Kafka,
    /// Peak memory of the service draining a broker at the shipped settings.
    Memory,
    /// Produce-to-visible latency at a steady rate.
    Freshness,
    /// Compaction and the sql/ library before and after.
    Compaction,
}

impl Stage {
    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Limit => "limit",
            Stage::Pipeline => "pipeline",
            Stage::Kafka => "kafka",
            Stage::Memory => "memory",
            Stage::Freshness => "freshness",
            Stage::Compaction => "compaction",
        }
    }

    /// Every stage, in report order.
    pub const ALL: [Stage; 6] = [
        Stage::Limit,
        Stage::Pipeline,
        Stage::Kafka,
        Stage::Memory,
        Stage::Freshness,
        Stage::Compaction,
    ];
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Records per profile and stage (the mock cluster may hold fewer; the report says).
    pub records: u64,
    /// Profiles to run.
    pub profiles: Vec<Profile>,
    /// Stages to run.
    pub stages: Vec<Stage>,
    /// Storage for the tables: this config's `[storage]` (root and S3 settings), or a
    /// temporary folder.
    pub storage: Option<Config>,
    /// A broker for the Kafka stages instead of the in-process mock cluster.
    pub brokers: Option<String>,
    /// librdkafka properties for every client of the Kafka stages (TLS and SASL for a secured
    /// `brokers`), from the `SLUICE_KAFKA__PROPERTIES__*` environment as for the service.
    pub kafka_properties: BTreeMap<String, String>,
    /// Producer rate of the freshness stage (messages/s).
    pub rate: u64,
    /// Duration of the freshness stage.
    pub seconds: u64,
    /// The `sql/` library for the compaction stage.
    pub sql_dir: PathBuf,
    /// Generator seed.
    pub seed: u64,
    /// `batch.max_bytes` instead of the default.
    pub max_bytes: Option<usize>,
    /// Payload bytes of the set the parent produced into `brokers`.
    pub set_bytes: u64,
    /// The parent `sluice bench` prepared `brokers` (a mock cluster it hosts, or the broker
    /// of `--brokers`): the topics exist and hold the set, and for the freshness stage the
    /// parent produces. The measuring process only drains.
    pub parent_produces: bool,
}

impl BenchOptions {
    /// The cluster at `brokers` with the run's librdkafka properties.
    fn connection(&self, brokers: &str) -> Connection {
        Connection {
            brokers: brokers.to_string(),
            properties: self.kafka_properties.clone(),
        }
    }
}

/// CPU seconds of this process (user + system) and the wall clock, to take differences of.
struct Meter {
    wall: Instant,
    cpu: Duration,
}

impl Meter {
    fn start() -> Meter {
        reset_peak_rss();
        Meter {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    fn stop(&self) -> Measured {
        Measured {
            wall: self.wall.elapsed(),
            cpu: cpu_time().saturating_sub(self.cpu),
            peak_rss: peak_rss(),
        }
    }
}

struct Measured {
    wall: Duration,
    cpu: Duration,
    peak_rss: u64,
}

/// User + system CPU time of the process, from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Peak resident set size in bytes since the last reset (`VmHWM`).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Starts a new peak RSS measurement (Linux: `echo 5 > /proc/self/clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Distinct generated payloads a stage cycles through: the records differ the way a real
/// stream's do, while memory holds only the pool, not every record.
const POOL: u64 = 12_000;

/// One generated message.
struct Payload {
    key: Vec<u8>,
    value: Vec<u8>,
}

/// `records` messages spread round robin over the profile's topics and `KAFKA_PARTITIONS`
/// partitions, their payloads cycled from a pool.
struct Corpus {
    pool: Vec<Payload>,
    records: u64,
    topics: Vec<Arc<str>>,
    per_topic: i32,
    timestamp_ms: i64,
}

impl Corpus {
    fn new(profile: Profile, records: u64, seed: u64) -> Corpus {
        let timestamp_ms = chrono::Utc::now().timestamp_millis();
        let mut generator = Generator::new(seed, profile.embedding_dim(), timestamp_ms, 3);
        let shapes = profile.shapes();
        // A multiple of the shape count, so that record i and its pool entry share a shape.
        let size = (records.min(POOL) / shapes.len() as u64).max(1) * shapes.len() as u64;
        let pool = (0..size as usize)
            .map(|i| {
                let (key, value) = generator.next(shapes[i % shapes.len()]);
                Payload {
                    key: key.into_bytes(),
                    value,
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
    fn record(&self, i: u64) -> Record<'_> {
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
    fn bytes(&self) -> u64 {
        let pool: u64 = self.pool.iter().map(|p| p.value.len() as u64).sum();
        pool * self.records / self.pool.len().max(1) as u64
    }

    fn average(&self) -> u64 {
        self.bytes() / self.records.max(1)
    }

    fn partitions(&self) -> Vec<PartitionKey> {
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

/// The bench's config: the embedded flagship schema and mappings in `dir`, the storage of
/// `options.storage` (or `dir`), the service's default batch limits.
fn bench_config(dir: &Path, options: &BenchOptions, run: &str) -> Result<Config, BenchError> {
    std::fs::create_dir_all(dir.join("schemas/mappings"))
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let file =
        crate::tools::demo::write_config(dir).map_err(|e| BenchError::Setup(e.to_string()))?;
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
    if let Some(storage) = &options.storage {
        config.storage = storage.storage.clone();
    }
    Ok(config)
}

/// The table of a stage: `<root>/<run>/<stage>-<profile>/enriched_posts` (and dead letters).
fn stage_config(base: &Config, run: &str, stage: &str, profile: Profile) -> Config {
    let mut config = base.clone();
    let profile = profile.name();
    config.storage.root = table_location(
        &table_location(&base.storage.root, &format!("sluice-bench-{run}")),
        &format!("{stage}-{profile}"),
    );
    config
}

fn decoders(config: &Config) -> Result<HashMap<Arc<str>, BodyDecoder>, BenchError> {
    Ok(load_table(config, &config.tables[0])?.decoders)
}

/// The results, one table per stage.
#[derive(Debug, Default)]
pub struct BenchReport {
    /// Rendered tables, in stage order.
    pub sections: Vec<String>,
}

impl BenchReport {
    /// The report as Markdown.
    pub fn render(&self) -> String {
        self.sections.join("\n")
    }
}

fn per_second(count: f64, wall: Duration) -> f64 {
    count / wall.as_secs_f64().max(1e-9)
}

fn cpu_per_million(cpu: Duration, records: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / records.max(1) as f64
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs the chosen stages and profiles, each measurement in a fresh child process (`exe`,
/// `sluice bench --row STAGE:PROFILE ...`) so that its peak RSS is its own; `progress` gets
/// each row as it is measured.
pub async fn run(
    options: &BenchOptions,
    child_args: &[String],
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<BenchReport, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let dir = std::env::temp_dir().join(format!("sluice-bench-{run}"));
    let base = bench_config(&dir, options, &run)?;
    let mut report = BenchReport::default();
    let mut stages = options.stages.clone();
    stages.sort();
    stages.dedup();
    for stage in stages {
        let mut section = header(stage, options, &base);
        for &profile in &options.profiles {
            let row = measure(&exe, child_args, options, &run, stage, profile).await?;
            progress(&row);
            section.push_str(&row);
            section.push('\n');
        }
        report.sections.push(section);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Runs one measurement in a child process and returns its table row. Broker-fed stages read
/// a broker prepared here: a mock cluster hosted here without `--brokers`, else the given
/// broker, with the stage's topics created and its set produced from this process, so the
/// writer's CPU and memory are its own; the freshness producer runs here too, from the moment
/// the child's writer owns every partition.
async fn measure(
    exe: &Path,
    child_args: &[String],
    options: &BenchOptions,
    run: &str,
    stage: Stage,
    profile: Profile,
) -> Result<String, BenchError> {
    use tokio::io::AsyncBufReadExt;
    let failed = |reason: String| BenchError::Stage {
        stage: stage.name(),
        reason: format!("the {} measurement failed: {reason}", profile.label()),
    };
    let fed = matches!(stage, Stage::Kafka | Stage::Memory | Stage::Freshness);
    let topics = stage_topics(profile, run, stage.name());
    let per_topic = partitions_per_topic(topics.len());
    let (brokers, cluster) = if fed {
        let (brokers, cluster) = broker(options, &topics, per_topic).await?;
        (Some(brokers), cluster)
    } else {
        (None, None)
    };
    let mut set_bytes = None;
    if let (Some(brokers), Stage::Kafka | Stage::Memory) = (&brokers, stage) {
        let partitions = per_topic as usize * topics.len();
        let count = set_size(options, profile, partitions, cluster.is_some());
        let produced = produce_set(brokers, &topics, options, profile, count)
            .await
            .map_err(|e| failed(e.to_string()))?;
        set_bytes = Some(produced.bytes);
    }
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("bench")
        .args(child_args)
        .args(["--row", &format!("{}:{}", stage.name(), profile.name())])
        .args(["--run", run])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    if let Some(brokers) = &brokers {
        // `--brokers` is among the child's arguments already unless the broker is hosted here.
        if cluster.is_some() {
            command.args(["--brokers", brokers]);
        }
        command.arg("--parent-produces");
    }
    if let Some(bytes) = set_bytes {
        command.args(["--set-bytes", &bytes.to_string()]);
    }
    let mut child = command
        .spawn()
        .map_err(|e| failed(format!("{}: {e}", exe.display())))?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut row = None;
    while let Some(line) = lines.next_line().await.map_err(|e| failed(e.to_string()))? {
        if line == READY {
            if let (Some(brokers), Stage::Freshness) = (&brokers, stage) {
                let options = produce_options(
                    options.connection(brokers),
                    &topics,
                    profile,
                    options.rate * options.seconds,
                    options.rate,
                    options.seed,
                );
                produce(&options).await.map_err(|e| failed(e.to_string()))?;
            }
        } else if line.starts_with('|') {
            row = Some(line);
        }
    }
    let status = child.wait().await.map_err(|e| failed(e.to_string()))?;
    drop(cluster);
    match row {
        Some(row) if status.success() => Ok(row),
        _ => Err(failed(status.to_string())),
    }
}

/// What a freshness measurement prints once its writer owns every partition.
pub const READY: &str = "ready";

/// One measurement, in this process: the table row of `stage` for `profile`.
pub async fn row(
    options: &BenchOptions,
    run: &str,
    stage: Stage,
    profile: Profile,
) -> Result<String, BenchError> {
    let dir = std::env::temp_dir().join(format!("sluice-bench-{run}-{}", std::process::id()));
    let base = bench_config(&dir, options, run)?;
    let row = match stage {
        Stage::Limit => limit_row(&base, options, profile),
        Stage::Pipeline => pipeline_row(&base, run, options, profile).await,
        Stage::Kafka => kafka_row(&base, run, options, profile).await,
        Stage::Memory => memory_row(&base, run, options, profile).await,
        Stage::Freshness => freshness_row(&base, run, options, profile).await,
        Stage::Compaction => compaction_row(&base, run, options, profile).await,
    };
    if options.storage.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    row
}

/// The heading and column names of a stage's table.
fn header(stage: Stage, options: &BenchOptions, base: &Config) -> String {
    let broker = match &options.brokers {
        Some(b) => format!("the broker at {b}"),
        None => "librdkafka's mock cluster in another process".into(),
    };
    match stage {
        Stage::Limit => "### Limit: decode + Parquet encode in memory, one thread\n\n\
             | records | avg JSON size | decode | encode (zstd-1) | both | both, MB/s of JSON |\n\
             |---|---|---|---|---|---|\n"
            .to_string(),
        Stage::Pipeline => format!(
            "### Pipeline: the writer fed in process → committed Delta files on {} \
             (batch.max_rows = records/{DRAIN_FLUSHES})\n\n\
             | records | records/s | MB/s of JSON | CPU-s per M records | cores used | peak RSS | files | commits |\n\
             |---|---|---|---|---|---|---|---|\n",
            where_tables_go(base)
        ),
        Stage::Kafka => format!(
            "### With Kafka: the service draining a pre-produced set from {broker} \
             (batch.max_rows = records/{DRAIN_FLUSHES})\n\n\
             | records | records/s | MB/s of JSON | CPU-s per M records | peak RSS | files | commits |\n\
             |---|---|---|---|---|---|---|\n"
        ),
        Stage::Memory => format!(
            "### Memory: the service draining a pre-produced set from {broker} at the shipped \
             settings (batch.max_bytes {} MiB, max_rows {}, max_age_ms {}; librdkafka prefetch {} KiB)\n\n\
             | records | MB of JSON | peak RSS | commits | largest commit (messages) |\n\
             |---|---|---|---|---|\n",
            base.batch.max_bytes >> 20,
            base.batch.max_rows,
            base.batch.max_age_ms,
            crate::ingest::source::PREFETCH_KBYTES,
        ),
        Stage::Freshness => format!(
            "### Freshness: {} msg/s for {} s from {broker}, flush every {} ms\n\n\
             | records | p50 | p99 | max | commits | CPU-s per M records | peak RSS |\n\
             |---|---|---|---|---|---|---|\n",
            options.rate, options.seconds, FRESHNESS_FLUSH_MS
        ),
        Stage::Compaction => format!(
            "### Compaction: a table committed every {SMALL_FILE_ROWS} rows, then compacted\n\n\
             | records | files before | files after | compaction | sql/ library before | after | speed-up |\n\
             |---|---|---|---|---|---|---|\n"
        ),
    }
}

fn limit_row(
    base: &Config,
    options: &BenchOptions,
    profile: Profile,
) -> Result<String, BenchError> {
    let decoders = decoders(base)?;
    let corpus = Corpus::new(profile, options.records, options.seed);
    let n = corpus.records;
    let now_us = chrono::Utc::now().timestamp_micros();
    let started = Instant::now();
    let mut chunks: BTreeMap<(Arc<str>, i32), Chunk> = BTreeMap::new();
    let mut batches: Vec<RecordBatch> = Vec::new();
    let decode = |chunk: &Chunk, batches: &mut Vec<RecordBatch>| -> Result<(), BenchError> {
        let decoded = decoders[&chunk.topic]
            .decode(chunk, now_us)
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        batches.extend(decoded.batch);
        Ok(())
    };
    for i in 0..n {
        let r = corpus.record(i);
        let topic: Arc<str> = corpus.topics[(i % corpus.topics.len() as u64) as usize].clone();
        let chunk = chunks
            .entry((topic.clone(), r.partition))
            .or_insert_with(|| Chunk::new(topic.clone(), r.partition));
        chunk.push(r.offset, r.timestamp_ms, r.key, r.payload);
        if chunk.len() >= base.ingest.decode_chunk {
            let full = std::mem::replace(chunk, Chunk::new(topic, r.partition));
            decode(&full, &mut batches)?;
        }
    }
    for chunk in chunks.values().filter(|c| !c.is_empty()) {
        decode(chunk, &mut batches)?;
    }
    let decoding = started.elapsed();
    let started = Instant::now();
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| BenchError::Setup("nothing decoded".into()))?;
    let properties = parquet_properties(base.delta.zstd_level, &schema)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut writer = ArrowWriter::try_new(std::io::sink(), schema, Some(properties))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    for batch in &batches {
        writer
            .write(batch)
            .map_err(|e| BenchError::Setup(e.to_string()))?;
    }
    writer
        .close()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let encoding = started.elapsed();
    let both = decoding + encoding;
    Ok(format!(
        "| {n} {} | {} B | {:.0}k rec/s | {:.0}k rec/s | **{:.0}k rec/s** | {:.0} MB/s |",
        profile.label(),
        corpus.average(),
        per_second(n as f64, decoding) / 1e3,
        per_second(n as f64, encoding) / 1e3,
        per_second(n as f64, both) / 1e3,
        per_second(corpus.bytes() as f64, both) / 1e6,
    ))
}

async fn open_destination(config: &Config) -> Result<Destination, BenchError> {
    let loaded = load_table(config, &config.tables[0])?;
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
async fn feed(
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

fn where_tables_go(config: &Config) -> String {
    if config.storage.root.starts_with("s3://") {
        format!(
            "S3 ({})",
            config.storage.s3.endpoint.as_deref().unwrap_or("AWS")
        )
    } else {
        "local disk".to_string()
    }
}

async fn pipeline_row(
    base: &Config,
    run: &str,
    options: &BenchOptions,
    profile: Profile,
) -> Result<String, BenchError> {
    let corpus = Corpus::new(profile, options.records, options.seed);
    let config = stage_config(base, run, "pipeline", profile);
    let n = corpus.records;
    let (written, m) = feed(&config, &corpus, drain_limits(&base.batch, n)).await?;
    Ok(format!(
        "| {n} {} | **{:.0}k** | {:.0} | {:.1} | {:.2} | {:.0} MiB | {} | {} |",
        profile.label(),
        per_second(n as f64, m.wall) / 1e3,
        per_second(corpus.bytes() as f64, m.wall) / 1e6,
        cpu_per_million(m.cpu, n),
        m.cpu.as_secs_f64() / m.wall.as_secs_f64().max(1e-9),
        mib(m.peak_rss),
        written.files,
        written.commits,
    ))
}

/// `limits` with `max_rows` set so that `records` make [`DRAIN_FLUSHES`] flushes.
fn drain_limits(limits: &BatchLimits, records: u64) -> BatchLimits {
    BatchLimits {
        max_rows: (records / DRAIN_FLUSHES).max(1) as usize,
        ..*limits
    }
}

/// Topics of a profile for a broker-fed stage: fresh names per run, so an external broker's
/// old messages never mix in.
fn stage_topics(profile: Profile, run: &str, stage: &str) -> Vec<(Shape, String)> {
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
async fn broker(
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
fn kafka_config(
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

/// The service running one table; stops it on drop of the returned sender.
struct Service {
    stop: tokio::sync::oneshot::Sender<()>,
    progress: watch::Receiver<Progress>,
    task: tokio::task::JoinHandle<Result<Progress, crate::ingest::pipeline::PipelineError>>,
}

async fn start_service(config: &Config, partitions: usize) -> Result<Service, BenchError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = app::start(config, async move {
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
    })
}

impl Service {
    async fn wait_covers(
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

    async fn stop(self) -> Result<Progress, BenchError> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| stage_error("kafka")(e.to_string()))?
            .map_err(BenchError::from)
    }
}

fn produce_options(
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
        spread_days: 3,
        clock_ms: None,
        progress: false,
    }
}

/// Records in the pre-produced set of a broker-fed stage: as many as the broker keeps, in
/// whole [`DRAIN_FLUSHES`].
fn set_size(options: &BenchOptions, profile: Profile, partitions: usize, mock: bool) -> u64 {
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
async fn produced_set(
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
async fn produce_set(
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

async fn memory_row(
    base: &Config,
    run: &str,
    options: &BenchOptions,
    profile: Profile,
) -> Result<String, BenchError> {
    let topics = stage_topics(profile, run, "memory");
    let (produced, partitions, brokers, cluster) =
        produced_set(options, profile, &topics, "memory").await?;
    let config = kafka_config(base, run, "memory", profile, &brokers, &topics);
    let meter = Meter::start();
    let mut service = start_service(&config, partitions).await?;
    let largest = watch_largest_commit(service.progress.clone());
    service
        .wait_covers("memory", &produced.last_offsets)
        .await?;
    let m = meter.stop();
    let written = service.stop().await?;
    let largest = largest
        .await
        .map_err(|e| stage_error("memory")(e.to_string()))?;
    drop(cluster);
    Ok(format!(
        "| {} {} | {:.0} | **{:.0} MiB** | {} | {largest} |",
        produced.delivered,
        profile.label(),
        produced.bytes as f64 / 1e6,
        mib(m.peak_rss),
        written.commits,
    ))
}

/// The most messages (rows + rejections) one commit of the writer held.
fn watch_largest_commit(mut progress: watch::Receiver<Progress>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (mut largest, mut before) = (0, 0);
        while progress.changed().await.is_ok() {
            let p = progress.borrow_and_update();
            let messages = p.rows + p.rejected;
            largest = largest.max(messages - before);
            before = messages;
        }
        largest
    })
}

async fn kafka_row(
    base: &Config,
    run: &str,
    options: &BenchOptions,
    profile: Profile,
) -> Result<String, BenchError> {
    let topics = stage_topics(profile, run, "kafka");
    let (produced, partitions, brokers, cluster) =
        produced_set(options, profile, &topics, "kafka").await?;
    let count = produced.delivered;
    let mut config = kafka_config(base, run, "kafka", profile, &brokers, &topics);
    config.batch = drain_limits(&config.batch, count);
    let mut service = start_service(&config, partitions).await?;
    let meter = Meter::start();
    service.wait_covers("kafka", &produced.last_offsets).await?;
    let m = meter.stop();
    let written = service.stop().await?;
    drop(cluster);
    let n = produced.delivered;
    Ok(format!(
        "| {n} {} | **{:.0}k** | {:.0} | {:.1} | {:.0} MiB | {} | {} |",
        profile.label(),
        per_second(n as f64, m.wall) / 1e3,
        per_second(produced.bytes as f64, m.wall) / 1e6,
        cpu_per_million(m.cpu, n),
        mib(m.peak_rss),
        written.files,
        written.commits,
    ))
}

/// `(observed at, unix ms)` with the committed offsets then, per partition.
type Visibility = Vec<(i64, BTreeMap<(String, i32), i64>)>;

/// Records when each commit became visible to the writer's progress watchers.
fn watch_commits(mut progress: watch::Receiver<Progress>) -> tokio::task::JoinHandle<Visibility> {
    tokio::spawn(async move {
        let mut seen = Visibility::new();
        let mut commits = 0;
        while progress.changed().await.is_ok() {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let p = progress.borrow_and_update();
            if p.commits != commits {
                commits = p.commits;
                let committed = p
                    .committed
                    .iter()
                    .map(|(k, o)| ((k.topic.to_string(), k.partition), *o))
                    .collect();
                seen.push((now, committed));
            }
        }
        seen
    })
}

/// Per row, milliseconds from its Kafka timestamp (produce time) to the first commit that
/// covered its offset.
async fn latencies(config: &Config, seen: &Visibility) -> Result<Vec<i64>, BenchError> {
    let error = stage_error("freshness");
    let location = table_location(&config.storage.root, "enriched_posts");
    let table = open_table(&location, config.storage_options())
        .await
        .map_err(|e| error(e.to_string()))?;
    let ctx = SessionContext::new();
    register_table(&ctx, "posts", &table)
        .await
        .map_err(|e| error(e.to_string()))?;
    let batches = ctx
        .sql("SELECT kafka_topic, kafka_partition, kafka_offset, kafka_timestamp FROM posts")
        .await
        .map_err(|e| error(e.to_string()))?
        .collect()
        .await
        .map_err(|e| error(e.to_string()))?;
    let mut out = Vec::new();
    for batch in &batches {
        let topics = deltalake::arrow::compute::cast(
            batch.column(0),
            &deltalake::arrow::datatypes::DataType::Utf8,
        )
        .map_err(|e| error(e.to_string()))?;
        let topics = topics.as_string::<i32>();
        let partitions = batch.column(1).as_primitive::<Int32Type>();
        let offsets = batch.column(2).as_primitive::<Int64Type>();
        let produced = batch.column(3).as_primitive::<TimestampMicrosecondType>();
        for row in 0..batch.num_rows() {
            if produced.is_null(row) {
                continue;
            }
            let key = (topics.value(row).to_string(), partitions.value(row));
            let offset = offsets.value(row);
            let Some((visible, _)) = seen
                .iter()
                .find(|(_, committed)| committed.get(&key).is_some_and(|c| *c >= offset))
            else {
                return Err(error(format!("no observed commit covers {key:?}@{offset}")));
            };
            out.push(visible - produced.value(row) / 1000);
        }
    }
    Ok(out)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn freshness_row(
    base: &Config,
    run: &str,
    options: &BenchOptions,
    profile: Profile,
) -> Result<String, BenchError> {
    let topics = stage_topics(profile, run, "freshness");
    let per_topic = partitions_per_topic(topics.len());
    let partitions = per_topic as usize * topics.len();
    let (brokers, cluster) = broker(options, &topics, per_topic).await?;
    let mut config = kafka_config(base, run, "freshness", profile, &brokers, &topics);
    config.batch.max_age_ms = FRESHNESS_FLUSH_MS;
    let mut service = start_service(&config, partitions).await?;
    let watcher = watch_commits(service.progress.clone());
    let meter = Meter::start();
    let count = options.rate * options.seconds;
    if options.parent_produces {
        // The parent produces from now on; the writer is done when it holds every record.
        println!("{READY}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::time::timeout(
            STALL_TIMEOUT,
            service.progress.wait_for(|p| p.rows + p.rejected >= count),
        )
        .await
        .map_err(|_| {
            stage_error("freshness")(format!("not all {count} records within {STALL_TIMEOUT:?}"))
        })?
        .map_err(|e| stage_error("freshness")(e.to_string()))?;
    } else {
        let produced = produce(&produce_options(
            options.connection(&brokers),
            &topics,
            profile,
            count,
            options.rate,
            options.seed,
        ))
        .await
        .map_err(|e| stage_error("freshness")(e.to_string()))?;
        service
            .wait_covers("freshness", &produced.last_offsets)
            .await?;
    }
    let m = meter.stop();
    let written = service.stop().await?;
    let seen = watcher
        .await
        .map_err(|e| stage_error("freshness")(e.to_string()))?;
    drop(cluster);
    let mut lags = latencies(&config, &seen).await?;
    lags.sort_unstable();
    Ok(format!(
        "| {} {} | {} ms | **{} ms** | {} ms | {} | {:.1} | {:.0} MiB |",
        lags.len(),
        profile.label(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        lags.last().copied().unwrap_or(0),
        written.commits,
        cpu_per_million(m.cpu, count),
        mib(m.peak_rss),
    ))
}

/// Runs every `.sql` file of `dir` on the tables of `config`; returns the total wall time.
async fn library(config: &Config, dir: &Path) -> Result<(Duration, usize), BenchError> {
    let error = stage_error("compaction");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| error(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(error(format!("no .sql files in {}", dir.display())));
    }
    let started = Instant::now();
    for file in &files {
        let sql = std::fs::read_to_string(file).map_err(|e| error(e.to_string()))?;
        // A fresh session per query, as `sluice sql -f` does: every run opens the tables.
        let session = Session::open(config, &TimeTravel::default())
            .await
            .map_err(|e| error(e.to_string()))?;
        session
            .run(&sql)
            .await
            .map_err(|e| error(format!("{}: {e}", file.display())))?;
    }
    Ok((started.elapsed(), files.len()))
}

async fn compaction_row(
    base: &Config,
    run: &str,
    options: &BenchOptions,
    profile: Profile,
) -> Result<String, BenchError> {
    let corpus = Corpus::new(profile, options.records, options.seed);
    let config = stage_config(base, run, "compaction", profile);
    let limits = BatchLimits {
        max_rows: SMALL_FILE_ROWS,
        ..base.batch
    };
    let (written, _) = feed(&config, &corpus, limits).await?;
    let (before, queries) = library(&config, &options.sql_dir).await?;
    let location = table_location(&config.storage.root, "enriched_posts");
    let started = Instant::now();
    compact(
        &location,
        config.storage_options(),
        &CompactOptions::default(),
    )
    .await
    .map_err(|e| stage_error("compaction")(e.to_string()))?;
    let compacting = started.elapsed();
    let files_after = live_files(&config, &location).await?;
    let (after, _) = library(&config, &options.sql_dir).await?;
    Ok(format!(
        "| {} {} | {} | {} | {:.1} s | {:.2} s ({queries} queries) | {:.2} s | **{:.1}×** |",
        corpus.records,
        profile.label(),
        written.files,
        files_after,
        compacting.as_secs_f64(),
        before.as_secs_f64(),
        after.as_secs_f64(),
        before.as_secs_f64() / after.as_secs_f64().max(1e-9),
    ))
}

async fn live_files(config: &Config, location: &str) -> Result<usize, BenchError> {
    let table = open_table(location, config.storage_options())
        .await
        .map_err(|e| stage_error("compaction")(e.to_string()))?;
    let files = table
        .get_file_uris()
        .map_err(|e| stage_error("compaction")(e.to_string()))?
        .count();
    Ok(files)
}

/// The machine the figures come from, for the report's heading.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let mut out = String::new();
    let _ = write!(out, "{cores} cores ({cpu}), {memory} GiB");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_offsets_are_contiguous_per_partition_and_payloads_keep_their_topics_shape() {
        let corpus = Corpus::new(Profile::Posts, 5_000, 7);
        assert_eq!(corpus.pool.len() % 3, 0);
        let mut offsets: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
        for i in 0..corpus.records {
            let r = corpus.record(i);
            offsets
                .entry((r.topic.to_string(), r.partition))
                .or_default()
                .push(r.offset);
            let payload = std::str::from_utf8(r.payload.unwrap()).unwrap();
            let marker = match r.topic {
                "posts.mastodon" => "\"content\"",
                "posts.bluesky" => "\"did\"",
                "posts.tweets" => "\"embedding\"",
                other => panic!("unexpected topic {other}"),
            };
            assert!(
                payload.contains(marker),
                "record {i} on {}: {payload}",
                r.topic
            );
        }
        assert_eq!(offsets.len(), corpus.partitions().len());
        for (key, list) in offsets {
            assert_eq!(list, (0..list.len() as i64).collect::<Vec<_>>(), "{key:?}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50);
        assert_eq!(percentile(&values, 99.0), 99);
        assert_eq!(percentile(&values, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
