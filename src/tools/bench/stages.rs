//! One function per stage: each produces its row of figures (pipeline, memory, kafka, freshness,
//! compaction).

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::ingest::batch::BatchLimits;
use crate::ingest::progress::Progress;
use crate::query::library::queries;
use crate::query::sql::{Session, TimeTravel};
use crate::table::compact::{CompactOptions, compact};
use crate::table::delta::{open_table, table_location};

use super::cluster::{feed, kafka_config, produced_set, stage_config, stage_topics, start_service};
use super::corpus::Corpus;
use super::process::{Meter, cpu_per_million, mib, per_second};
use super::{BenchError, BenchOptions, DRAIN_FLUSHES, Profile, stage_error};

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
