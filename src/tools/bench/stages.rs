//! One function per stage: each produces its row of figures (pipeline, memory, kafka, freshness,
//! compaction).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::datafusion::prelude::SessionContext;
use tokio::sync::watch;

use crate::config::Config;
use crate::ingest::batch::BatchLimits;
use crate::ingest::progress::Progress;
use crate::query::library::queries;
use crate::query::sql::{Session, TimeTravel};
use crate::table::compact::{CompactOptions, compact};
use crate::table::delta::{open_table, register_table, table_location};
use crate::tools::produce::produce;

use super::cluster::{
    broker, feed, kafka_config, produce_options, produced_set, stage_config, stage_topics,
    start_service,
};
use super::corpus::Corpus;
use super::process::{Meter, cpu_per_million, mib, per_second, percentile};
use super::{
    BenchError, BenchOptions, DRAIN_FLUSHES, Profile, READY, STALL_TIMEOUT, partitions_per_topic,
    stage_error,
};

/// Flush bound of the freshness stage.
pub(super) const FRESHNESS_FLUSH_MS: u64 = 1_000;

/// Rows per commit of the many-small-files table.
pub(super) const SMALL_FILE_ROWS: usize = 500;

pub(super) async fn pipeline_row(
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

pub(super) async fn memory_row(
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

pub(super) async fn kafka_row(
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

pub(super) async fn freshness_row(
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

/// Runs every query of the library (`dir`, else the built-in one) on the tables of `config`;
/// returns the total wall time and the number of queries.
pub(super) async fn library(
    config: &Config,
    dir: Option<&Path>,
) -> Result<(Duration, usize), BenchError> {
    let error = stage_error("compaction");
    let queries = queries(dir).map_err(|e| error(e.to_string()))?;
    let started = Instant::now();
    for query in &queries {
        // A fresh session per query, as `sluice sql -f` does: every run opens the tables.
        let session = Session::open(config, &TimeTravel::default())
            .await
            .map_err(|e| error(e.to_string()))?;
        session
            .run(&query.sql)
            .await
            .map_err(|e| error(format!("{}: {e}", query.name)))?;
    }
    Ok((started.elapsed(), queries.len()))
}

pub(super) async fn compaction_row(
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
    let (before, queries) = library(&config, options.sql_dir.as_deref()).await?;
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
    let (after, _) = library(&config, options.sql_dir.as_deref()).await?;
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
