//! `sluice bench`: the writer's speed, freshness and memory, measured against the machine's
//! limit, printed as tables a user can paste.
//!
//! Stages, each run for two record profiles (enriched posts of ~800 B of JSON, tweets with
//! 384-dim embeddings of ~8 KB, the floats being text):
//! - **limit**: decode + Parquet encode of the same records in memory on one thread; what one
//!   core can do at best.
//! - **pipeline**: the writer ([`TableWriter`](crate::ingest::pipeline::TableWriter)) fed in
//!   process, from message bytes to committed Delta files on the configured storage, with no
//!   broker in the way.
//! - **kafka**: the service ([`app::start`](crate::service::app::start)) draining a
//!   pre-produced set from a broker: the in-process mock cluster, or `--brokers`.
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
use std::time::{Duration, Instant};

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::parquet::arrow::ArrowWriter;

use crate::config::Config;
use crate::ingest::decode::{BodyDecoder, Chunk, Format, Schemas};
use crate::ingest::kafka::Connection;
use crate::service::app::AppError;
use crate::table::delta::parquet_properties;
use crate::tools::generator::Shape;
use crate::tools::produce::produce;

use cluster::{
    bench_config, broker, decoders, produce_options, produce_set, set_size, stage_topics,
    where_tables_go,
};
use corpus::Corpus;
use freshness::{READER_POLL, STEPS, freshness_row};
use process::per_second;
use stages::{SMALL_FILE_ROWS, compaction_row, kafka_row, memory_row, pipeline_row};

mod cluster;
mod corpus;
mod freshness;
mod process;
mod stages;

/// Default flush bound (`batch.max_age_ms`) of the freshness stage.
pub const FRESHNESS_FLUSH_MS: u64 = 1_000;

/// The drained stages (pipeline, kafka) commit their set in this many flushes triggered by
/// size (`batch.max_rows` = records / this, other limits as configured), so the last record
/// triggers the last flush: no timer in the measurement, and both stages commit alike.
const DRAIN_FLUSHES: u64 = 4;

/// Partitions the Kafka stages spread a profile over.
const KAFKA_PARTITIONS: usize = 32;

/// Partitions per topic when a profile's `topics` share [`KAFKA_PARTITIONS`].
fn partitions_per_topic(topics: usize) -> i32 {
    (KAFKA_PARTITIONS / topics).max(1) as i32
}

/// How long a broker-fed stage may take before it is reported as stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// The posts profile with 1 % upstream operations (edits, redeliveries, deletes, replays
    /// of deleted posts) on the keyed flagship table: deletes are recorded in the commits'
    /// ledgers instead of becoming rows.
    Operations,
    /// The posts profile in Avro, in the registry's wire format (the limit stage only).
    Avro,
    /// The posts profile in Protobuf, in the registry's wire format (the limit stage only).
    Protobuf,
}

impl Profile {
    /// The JSON profiles, which every stage measures (the default).
    pub const ALL: [Profile; 2] = [Profile::Posts, Profile::Embeddings];

    fn shapes(self) -> &'static [Shape] {
        match self {
            Profile::Posts | Profile::Operations | Profile::Avro | Profile::Protobuf => &Shape::ALL,
            Profile::Embeddings => &[Shape::Tweets],
        }
    }

    fn embedding_dim(self) -> usize {
        match self {
            Profile::Posts | Profile::Operations | Profile::Avro | Profile::Protobuf => 32,
            Profile::Embeddings => 384,
        }
    }

    /// Every how many messages one is an upstream operation (0: none).
    pub(super) fn operations_every(self) -> u64 {
        match self {
            Profile::Operations => 100,
            _ => 0,
        }
    }

    /// How the profile's messages are encoded.
    pub fn format(self) -> Format {
        match self {
            Profile::Posts | Profile::Embeddings | Profile::Operations => Format::Json,
            Profile::Avro => Format::Avro,
            Profile::Protobuf => Format::Protobuf,
        }
    }

    /// Whether the profile measures `stage`: the registry formats measure decoding only.
    pub fn measures(self, stage: Stage) -> bool {
        self.format() == Format::Json || stage == Stage::Limit
    }

    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Posts => "posts",
            Profile::Embeddings => "embeddings",
            Profile::Operations => "operations",
            Profile::Avro => "avro",
            Profile::Protobuf => "protobuf",
        }
    }

    /// Name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Profile::Posts => "posts",
            Profile::Embeddings => "384-dim embeddings",
            Profile::Operations => "posts, 1 % edits/deletes",
            Profile::Avro => "posts in Avro",
            Profile::Protobuf => "posts in Protobuf",
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
    /// Storage for the tables: a config's `[storage]` (root and S3 settings), with its
    /// `[maintenance]` and `[delta]`; or a temporary folder and the defaults.
    pub storage: Option<crate::config::Lake>,
    /// A broker for the Kafka stages instead of the in-process mock cluster.
    pub brokers: Option<String>,
    /// librdkafka properties for every client of the Kafka stages (TLS and SASL for a secured
    /// `brokers`), from the `SLUICE_KAFKA__PROPERTIES__*` environment as for the service.
    pub kafka_properties: BTreeMap<String, String>,
    /// Producer rate of the freshness stage (messages/s).
    pub rate: u64,
    /// Duration of the freshness stage.
    pub seconds: u64,
    /// `batch.max_age_ms` of the freshness stage.
    pub max_age_ms: u64,
    /// Freshness measurements per profile.
    pub runs: usize,
    /// The `sql/` library for the compaction stage.
    pub sql_dir: Option<PathBuf>,
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
        for &profile in options.profiles.iter().filter(|p| p.measures(stage)) {
            let runs = if stage == Stage::Freshness {
                options.runs.max(1)
            } else {
                1
            };
            for i in 1..=runs {
                // Each freshness run has topics and a table of its own.
                let id = if runs > 1 {
                    format!("{run}r{i}")
                } else {
                    run.clone()
                };
                let mut row = measure(&exe, child_args, options, &id, stage, profile).await?;
                if stage == Stage::Freshness {
                    row = with_run(&row, i);
                }
                progress(&row);
                section.push_str(&row);
                section.push('\n');
            }
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

/// A freshness row with the run's number after its first cell.
fn with_run(row: &str, run: usize) -> String {
    match row.split_once(" | ") {
        Some((first, rest)) => format!("{first} | {run} | {rest}"),
        None => row.to_string(),
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
    if !profile.measures(stage) {
        return Err(BenchError::Setup(format!(
            "the {} profile measures decoding only: run it with --stage limit",
            profile.name()
        )));
    }
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
            "### Freshness: {} msg/s for {} s from {broker}, batch.max_age_ms = {}\n\n\
             Per record, from its produce to a reader (polling the table every {} ms) seeing \
             it; then the steps it waited in, p50 / p99 ms each.\n\n\
             | records | run | p50 | p99 | max | {} | commits | CPU-s per M records | peak RSS |\n\
             |---|---|---|---|---|{}---|---|---|\n",
            options.rate,
            options.seconds,
            options.max_age_ms,
            READER_POLL.as_millis(),
            STEPS.join(" | "),
            "---|".repeat(STEPS.len()),
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
    let format = profile.format();
    let decoders: HashMap<Arc<str>, BodyDecoder> = decoders(base)?
        .into_iter()
        .map(|(topic, decoder)| (topic, decoder.with_format(format, None)))
        .collect();
    let schemas = Schemas::known(format, &corpus::registered(format));
    let corpus = Corpus::new(profile, options.records, options.seed);
    let n = corpus.records;
    let now_us = chrono::Utc::now().timestamp_micros();
    let started = Instant::now();
    let mut chunks: BTreeMap<(Arc<str>, i32), Chunk> = BTreeMap::new();
    let mut batches: Vec<RecordBatch> = Vec::new();
    let decode = |chunk: &Chunk, batches: &mut Vec<RecordBatch>| -> Result<(), BenchError> {
        let decoded = decoders[&chunk.topic]
            .decode_with(chunk, &schemas, now_us)
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
    use super::process::percentile;
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
