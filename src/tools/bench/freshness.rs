//! The freshness stage: a producer at a steady rate, and per record the time from its produce
//! (its Kafka timestamp) until a reader polling the table sees it, split into the steps it
//! waited in (from the writer's [`trace`]).

use std::collections::HashMap;
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{DataType, Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::datafusion::prelude::SessionContext;
use tokio::sync::watch;

use crate::config::Config;
use crate::ingest::pipeline::trace::{self, FlushTrace};
use crate::table::delta::{open_table, register_table, table_location};
use crate::tools::produce::produce;

use super::cluster::{broker, kafka_config, produce_options, stage_topics, start_service};
use super::process::{Meter, cpu_per_million, mib, named_threads_cpu_time, percentile};
use super::{
    BenchError, BenchOptions, Profile, READY, STALL_TIMEOUT, partitions_per_topic, stage_error,
};

/// How often the stage's reader looks for a new table version.
pub(super) const READER_POLL: Duration = Duration::from_millis(50);

/// The steps a record waits in, in order; each record's steps add up to its latency.
pub(super) const STEPS: [&str; 7] = [
    "fetch", "buffer", "decode", "encode", "upload", "commit", "refresh",
];

/// One record's latency split into [`STEPS`], in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Breakdown {
    pub(super) steps: [i64; 7],
}

impl Breakdown {
    /// From produce to a reader seeing it.
    pub(super) fn total(&self) -> i64 {
        self.steps.iter().sum()
    }
}

/// Splits a record's way into the table: produced (Kafka timestamp, µs), received by the
/// writer, the steps of the flush that committed it, and when a reader first saw that commit.
/// Checking positions and storing dead letters count as commit time.
pub(super) fn breakdown(produced: i64, received: i64, flush: &FlushTrace, seen: i64) -> Breakdown {
    let encoded = flush.encoded_us.clamp(flush.checked_us, flush.uploaded_us);
    Breakdown {
        steps: [
            received - produced,
            flush.started_us - received,
            flush.decoded_us - flush.started_us,
            encoded - flush.checked_us,
            flush.uploaded_us - encoded,
            (flush.checked_us - flush.decoded_us) + (flush.committed_us - flush.uploaded_us),
            seen - flush.committed_us,
        ],
    }
}

/// When the reader first saw each table version: (version, µs since the epoch).
type Sightings = Vec<(i64, i64)>;

/// The name of the reader's threads: its own and those its runtime runs blocking work on
/// (delta-rs replays the log there), so that their CPU time can be told from the writer's.
const READER_THREADS: &str = "bench-reader";

/// Starts [`read_along`] on threads of its own: it returns the sightings and their CPU time.
fn reader_thread(
    config: Config,
    stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<Result<(Sightings, Duration), BenchError>>> {
    std::thread::Builder::new()
        .name(READER_THREADS.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(READER_THREADS)
                // Kept until the CPU time is read below: an ended thread's time is the
                // process's, no longer the reader's.
                .thread_keep_alive(Duration::from_secs(24 * 3600))
                .build()
                .map_err(|e| stage_error("freshness")(e.to_string()))?;
            let seen = runtime.block_on(read_along(config, stop))?;
            Ok((seen, named_threads_cpu_time(READER_THREADS)))
        })
}

/// Polls the table every [`READER_POLL`] as a reader would, until `stop`; returns when it
/// first saw each version (µs since the epoch).
async fn read_along(
    config: Config,
    mut stop: watch::Receiver<bool>,
) -> Result<Sightings, BenchError> {
    let error = stage_error("freshness");
    let location = table_location(&config.storage.root, "enriched_posts");
    let mut table = open_table(&location, config.storage_options())
        .await
        .map_err(|e| error(e.to_string()))?;
    let mut seen = Vec::new();
    let mut last = table.version();
    loop {
        table
            .update_incremental(None)
            .await
            .map_err(|e| error(e.to_string()))?;
        let version = table.version();
        if version != last
            && let Some(v) = version
        {
            seen.push((v as i64, trace::now_us()));
            last = version;
        }
        tokio::select! {
            _ = stop.changed() => return Ok(seen),
            () = tokio::time::sleep(READER_POLL) => {}
        }
    }
}

/// Kafka timestamp (µs) of every row of the table, by topic, partition and offset.
async fn produce_times(config: &Config) -> Result<HashMap<(String, i32, i64), i64>, BenchError> {
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
    let mut out = HashMap::new();
    for batch in &batches {
        // The topic is dictionary-encoded or a view, as the table's files have it.
        let topics = deltalake::arrow::compute::cast(batch.column(0), &DataType::Utf8)
            .map_err(|e| error(e.to_string()))?;
        let topics = topics.as_string::<i32>();
        let partitions = batch.column(1).as_primitive::<Int32Type>();
        let offsets = batch.column(2).as_primitive::<Int64Type>();
        let produced = batch.column(3).as_primitive::<TimestampMicrosecondType>();
        for row in 0..batch.num_rows() {
            if !produced.is_null(row) {
                let key = (
                    topics.value(row).to_string(),
                    partitions.value(row),
                    offsets.value(row),
                );
                out.insert(key, produced.value(row));
            }
        }
    }
    Ok(out)
}

/// Every committed record's breakdown, from the writer's traces and the reader's sightings.
fn breakdowns(
    produced: &HashMap<(String, i32, i64), i64>,
    traces: &[FlushTrace],
    seen: &[(i64, i64)],
) -> Result<Vec<Breakdown>, BenchError> {
    let error = stage_error("freshness");
    // A reader that polls may see several commits at once: a version is visible from the
    // first sighting of it or any later one.
    let visible = |version: i64| {
        seen.iter()
            .filter(|(v, _)| *v >= version)
            .map(|(_, at)| *at)
            .min()
    };
    let mut out = Vec::new();
    for flush in traces {
        let seen = visible(flush.version)
            .ok_or_else(|| error(format!("the reader never saw version {}", flush.version)))?;
        for (key, offset, received) in &flush.received {
            let Some(&at) = produced.get(&(key.topic.to_string(), key.partition, *offset)) else {
                // A dead letter: no row, no Kafka timestamp in the table.
                continue;
            };
            out.push(breakdown(at, *received, flush, seen));
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
    let error = stage_error("freshness");
    let mut traces = trace::install();
    let topics = stage_topics(profile, run, "freshness");
    let per_topic = partitions_per_topic(topics.len());
    let partitions = per_topic as usize * topics.len();
    let (brokers, cluster) = broker(options, &topics, per_topic).await?;
    let mut config = kafka_config(base, run, "freshness", profile, &brokers, &topics);
    config.batch.max_age_ms = options.max_age_ms;
    let mut service = start_service(&config, partitions).await?;
    let (stop_reader, reader_stop) = watch::channel(false);
    let reader = reader_thread(config.clone(), reader_stop).map_err(|e| error(e.to_string()))?;
    let meter = Meter::start();
    let count = options.rate * options.seconds;
    if options.parent_produces {
        // The parent produces from now on; the writer is done when it holds every record.
        println!("{READY}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let within = Duration::from_secs(options.seconds) + STALL_TIMEOUT;
        tokio::time::timeout(
            within,
            service.progress.wait_for(|p| p.rows + p.rejected >= count),
        )
        .await
        .map_err(|_| error(format!("not all {count} records within {within:?}")))?
        .map_err(|e| error(e.to_string()))?;
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
        .map_err(|e| error(e.to_string()))?;
        service
            .wait_covers("freshness", &produced.last_offsets)
            .await?;
    }
    let m = meter.stop();
    let written = service.stop().await?;
    // The last commit is in the table; give the reader one more look before it stops.
    tokio::time::sleep(READER_POLL * 2).await;
    let _ = stop_reader.send(true);
    let (seen, reader_cpu) = tokio::task::spawn_blocking(move || reader.join())
        .await
        .map_err(|e| error(e.to_string()))?
        .map_err(|_| error("the reader thread panicked".into()))??;
    // The reader stands for a query engine elsewhere: its CPU is not the writer's.
    let writer_cpu = m.cpu.saturating_sub(reader_cpu);
    drop(cluster);
    let mut flushes = Vec::new();
    while let Ok(flush) = traces.try_recv() {
        flushes.push(flush);
    }
    let produced = produce_times(&config).await?;
    let records = breakdowns(&produced, &flushes, &seen)?;
    if records.len() != produced.len() {
        return Err(error(format!(
            "{} rows in the table, {} traced",
            produced.len(),
            records.len()
        )));
    }
    let ms = |us: i64| (us as f64 / 1000.0).round() as i64;
    let mut totals: Vec<i64> = records.iter().map(|r| ms(r.total())).collect();
    totals.sort_unstable();
    let mut cells = vec![
        format!("{} {}", totals.len(), profile.label()),
        format!("{} ms", percentile(&totals, 50.0)),
        format!("**{} ms**", percentile(&totals, 99.0)),
        format!("{} ms", totals.last().copied().unwrap_or(0)),
    ];
    for step in 0..STEPS.len() {
        let mut values: Vec<i64> = records.iter().map(|r| ms(r.steps[step])).collect();
        values.sort_unstable();
        cells.push(format!(
            "{} / {}",
            percentile(&values, 50.0),
            percentile(&values, 99.0)
        ));
    }
    cells.extend([
        written.commits.to_string(),
        format!("{:.1}", cpu_per_million(writer_cpu, count)),
        format!("{:.0} MiB", mib(m.peak_rss)),
    ]);
    Ok(format!("| {} |", cells.join(" | ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::delta::PartitionKey;

    fn flush(version: i64, received: Vec<(PartitionKey, i64, i64)>) -> FlushTrace {
        FlushTrace {
            table: "t".into(),
            version,
            received,
            started_us: 1_000_000,
            decoded_us: 1_010_000,
            checked_us: 1_012_000,
            encoded_us: 1_040_000,
            uploaded_us: 1_050_000,
            committed_us: 1_080_000,
        }
    }

    #[test]
    fn a_records_steps_add_up_to_its_latency() {
        let key = PartitionKey {
            topic: "a".into(),
            partition: 0,
        };
        let produced: HashMap<_, _> = [
            (("a".to_string(), 0, 7), 400_000),
            (("a".to_string(), 0, 8), 900_000),
        ]
        .into();
        // Offset 9 became a dead letter: no row, no latency.
        let traces = [flush(
            3,
            vec![
                (key.clone(), 7, 420_000),
                (key.clone(), 8, 905_000),
                (key, 9, 990_000),
            ],
        )];
        // The reader saw versions 2 and 4 only: version 3 was visible at the second look.
        let seen = [(2, 500_000), (4, 1_100_000)];
        let records = breakdowns(&produced, &traces, &seen).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(
            records[0].steps,
            [20_000, 580_000, 10_000, 28_000, 10_000, 32_000, 20_000]
        );
        assert_eq!(records[0].total(), 1_100_000 - 400_000);
        assert_eq!(records[1].total(), 1_100_000 - 900_000);
        assert!(breakdowns(&produced, &traces, &[(2, 500_000)]).is_err());
    }

    #[test]
    fn an_encoding_that_closed_before_the_checks_ended_counts_no_encode_time() {
        let mut trace = flush(1, vec![]);
        trace.encoded_us = 1_005_000;
        let b = breakdown(0, 500_000, &trace, 1_100_000);
        assert_eq!(b.steps[3], 0);
        assert_eq!(b.steps[4], 1_050_000 - 1_012_000);
        assert_eq!(b.total(), 1_100_000);
    }
}
