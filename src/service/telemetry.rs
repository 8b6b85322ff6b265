//! Telemetry: `tracing` logs (human or JSON lines), the Prometheus recorder, and the HTTP
//! endpoint serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Every metric sluice records is listed in [`METRICS`] with its type and help text, so the
//! README, the Grafana dashboard and the tests check against one list.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tracing_subscriber::EnvFilter;

use crate::service::health::Health;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global log subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = result;
}

/// The kind of a metric, as Prometheus types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; the name ends in `_total`.
    Counter,
    /// A value at scrape time.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// Every metric sluice records: name, kind, labels, help.
pub const METRICS: &[(&str, Kind, &str, &str)] = &[
    (
        "sluice_messages_consumed_total",
        Kind::Counter,
        "table, topic, partition",
        "Kafka messages received by the writer (re-reads after a rebalance count again).",
    ),
    (
        "sluice_rows_written_total",
        Kind::Counter,
        "table, topic, partition",
        "Rows committed to the table.",
    ),
    (
        "sluice_dead_letters_total",
        Kind::Counter,
        "table, topic, partition, reason",
        "Messages committed to the dead-letter table, by reason code.",
    ),
    (
        "sluice_commits_total",
        Kind::Counter,
        "table",
        "Delta commits made (dead-letter tables count under their own name).",
    ),
    (
        "sluice_written_files_total",
        Kind::Counter,
        "table",
        "Parquet data files added by commits.",
    ),
    (
        "sluice_written_bytes_total",
        Kind::Counter,
        "table",
        "Bytes of Parquet data files added by commits.",
    ),
    (
        "sluice_flushes_total",
        Kind::Counter,
        "table, reason",
        "Flushes by what triggered them: rows, bytes, age or shutdown.",
    ),
    (
        "sluice_batch_messages",
        Kind::Histogram,
        "table",
        "Messages per committed batch (rows plus dead letters).",
    ),
    (
        "sluice_batch_bytes",
        Kind::Histogram,
        "table",
        "Kafka payload bytes per committed batch.",
    ),
    (
        "sluice_commit_duration_seconds",
        Kind::Histogram,
        "table",
        "Time to write a batch's Parquet files and commit them.",
    ),
    (
        "sluice_commit_conflicts_total",
        Kind::Counter,
        "table",
        "Commits that lost a race with another writer and re-checked positions.",
    ),
    (
        "sluice_commit_retries_total",
        Kind::Counter,
        "table",
        "Commits retried after a transient failure.",
    ),
    (
        "sluice_object_store_errors_total",
        Kind::Counter,
        "table, operation",
        "Failed object-store operations of the writer: commit, refresh, probe.",
    ),
    (
        "sluice_consumer_lag_messages",
        Kind::Gauge,
        "table, topic, partition",
        "Messages in Kafka past the position committed to the table.",
    ),
    (
        "sluice_consumer_unread_messages",
        Kind::Gauge,
        "table, topic, partition",
        "Messages in Kafka the writer has not read yet (high watermark minus the consumer's position); lag minus this is what it holds buffered.",
    ),
    (
        "sluice_freshness_seconds",
        Kind::Gauge,
        "table",
        "Now minus the newest Kafka timestamp this writer has committed.",
    ),
    (
        "sluice_last_committed_message_timestamp_seconds",
        Kind::Gauge,
        "table",
        "Newest Kafka timestamp this writer has committed (Unix seconds).",
    ),
    (
        "sluice_last_commit_timestamp_seconds",
        Kind::Gauge,
        "table",
        "When this writer last committed (Unix seconds).",
    ),
    (
        "sluice_table_version",
        Kind::Gauge,
        "table",
        "Latest Delta version this writer committed or read.",
    ),
    (
        "sluice_assigned_partitions",
        Kind::Gauge,
        "table",
        "Kafka partitions this instance owns.",
    ),
    (
        "sluice_ready",
        Kind::Gauge,
        "",
        "1 when /readyz passes, else 0.",
    ),
    (
        "sluice_offsets_skipped_total",
        Kind::Counter,
        "table, topic, partition",
        "Offsets the broker skipped in a continuous read: transaction markers, aborted transactions, a compacted topic.",
    ),
    (
        "sluice_offsets_lost_total",
        Kind::Counter,
        "table, topic, partition",
        "Offsets retention removed before sluice read them (each range is also a `lost` dead letter).",
    ),
    (
        "sluice_partitions_stopped",
        Kind::Gauge,
        "table",
        "Partitions stopped because the broker's log is behind the table's position (see `sluice accept-log`).",
    ),
    (
        "sluice_position_resets_total",
        Kind::Counter,
        "table, topic, partition",
        "Buffers dropped because another writer moved a partition's position.",
    ),
    (
        "sluice_kafka_errors_total",
        Kind::Counter,
        "table",
        "Kafka receive and watermark errors (retried).",
    ),
    (
        "sluice_kafka_connection_failures_total",
        Kind::Counter,
        "kind",
        "Failed connection attempts to Kafka as librdkafka reports them, by kind: unreachable, authentication, tls, protocol. The log says so once, then after 30 s, 1, 2, 4, 8 min and every 10 min.",
    ),
    (
        "sluice_dead_letter_forward_errors_total",
        Kind::Counter,
        "table",
        "Failures publishing dead letters to the dead-letter topic (retried).",
    ),
    (
        "sluice_labels_total",
        Kind::Counter,
        "table, column, outcome",
        "Label canonicalization: exact, folded, alias, fuzzy, unknown.",
    ),
    (
        "sluice_compaction_runs_total",
        Kind::Counter,
        "table, outcome",
        "Background compaction passes: compacted, nothing_to_do, lease_busy, failed.",
    ),
    (
        "sluice_compaction_files_removed_total",
        Kind::Counter,
        "table",
        "Small files rewritten away by compaction.",
    ),
    (
        "sluice_compaction_files_added_total",
        Kind::Counter,
        "table",
        "Files compaction wrote.",
    ),
    (
        "sluice_compaction_bytes_rewritten_total",
        Kind::Counter,
        "table",
        "Bytes of the files compaction rewrote.",
    ),
    (
        "sluice_compaction_duration_seconds",
        Kind::Histogram,
        "table",
        "Duration of compaction passes that rewrote files.",
    ),
    (
        "sluice_checkpoints_total",
        Kind::Counter,
        "table",
        "Delta checkpoints written by the maintenance thread.",
    ),
    (
        "sluice_vacuumed_files_total",
        Kind::Counter,
        "table",
        "Unreferenced files deleted by vacuum.",
    ),
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// A gauge not set for this long is dropped from `/metrics`; lag measurements must come more
/// often (`metrics.lag_interval_s` is at most [`MAX_LAG_INTERVAL_S`](crate::config::MAX_LAG_INTERVAL_S)).
pub const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// Installs the Prometheus recorder (once per process) and describes every metric. Metrics
/// recorded before this call are lost, so the service installs it before opening tables.
pub fn recorder() -> Result<&'static PrometheusHandle, String> {
    // Two services starting at once (tests) must not both try to install.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = HANDLE.get() {
        return Ok(h);
    }
    let seconds = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ];
    let messages = [1.0, 10.0, 100.0, 1e3, 1e4, 5e4, 1e5, 2e5, 5e5, 1e6];
    let bytes = [1e3, 1e4, 1e5, 1e6, 4e6, 16e6, 64e6, 128e6, 256e6, 1e9];
    let handle = PrometheusBuilder::new()
        // Lag series of partitions this instance no longer owns disappear instead of showing
        // their last value forever; live gauges are set every few seconds or at each scrape.
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("sluice_batch_messages".into()), &messages)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("sluice_batch_bytes".into()), &bytes))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    for (name, kind, _, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
    Ok(HANDLE.get_or_init(|| handle))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` (port 0 picks a free port) and
/// returns the bound address. Must run inside a Tokio runtime.
pub async fn serve(listen: &str, health: Arc<Health>) -> Result<SocketAddr, String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("metrics.listen `{listen}` is not an address: {e}"))?;
    let handle = recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let health = health.clone();
                    async move { Ok::<_, Infallible>(respond(&request, &health, handle)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics endpoint: connection ended");
                }
            });
        }
    });
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

fn respond<B>(
    request: &Request<B>,
    health: &Health,
    handle: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    let now = SystemTime::now();
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            health.observe(now);
            handle.run_upkeep();
            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            let readiness = health.readiness(now);
            let status = if readiness.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain", readiness.render())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}
