//! What an operator sees: `/metrics` agrees with what landed in the tables, `/readyz` follows
//! the object store, and the dashboard, README and metric catalogue agree with each other.
//!
//! The Prometheus recorder is global to the process, so each test writes a table of its own
//! name and reads only series labelled with it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sluice::config::Config;
use sluice::service::health::Health;
use sluice::service::telemetry::{Kind, METRICS, serve};
use sluice::tools::generator::Shape;
use tokio::sync::oneshot;

/// Polls `check` until it yields a value; fails with `what` after [`CATCH_UP`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The service as `sluice run` starts it: endpoint first, then the writers.
struct Service {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    async fn start(config: Config) -> Service {
        let health = Health::new(config.tables.len(), Duration::from_secs(60));
        let addr = serve("127.0.0.1:0", health.clone()).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let h = health.clone();
        let task = tokio::spawn(async move {
            sluice::service::app::run(
                config,
                async move {
                    let _ = stopped.await;
                    h.stopping();
                },
                Some(Arc::clone(&health)),
            )
            .await
            .expect("service runs and stops cleanly");
        });
        Service { addr, stop, task }
    }

    async fn readyz(&self) -> (u16, String) {
        let addr = self.addr;
        tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
            .await
            .unwrap()
            .expect("/readyz answers")
    }

    async fn scrape(&self) -> Scrape {
        let addr = self.addr;
        tokio::task::spawn_blocking(move || Scrape::fetch(addr))
            .await
            .unwrap()
            .expect("/metrics answers")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn fast_telemetry(mut config: Config) -> Config {
    config.metrics.lag_interval_s = 1;
    config.health.probe_interval_s = 1;
    config
}

/// Bytes of the Parquet files under a table folder.
fn parquet_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !path.ends_with("_delta_log") {
                total += parquet_bytes(&path);
            }
        } else if path.extension().is_some_and(|e| e == "parquet") {
            total += std::fs::metadata(&path).unwrap().len();
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_landed_in_the_tables() {
    let shapes = [Shape::Mastodon, Shape::Bluesky, Shape::Tweets];
    let topics: Vec<&str> = shapes.iter().map(|s| s.default_topic()).collect();
    let kafka = Kafka::new(&topics, 3);
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_telemetry(config(
        &kafka.brokers(),
        dir.path(),
        &shapes,
        limits(150, 1000),
    ));
    config.maintenance.enabled = false;
    let service = Service::start(config).await;
    eventually("readiness", || async {
        (service.readyz().await.0 == 200).then_some(())
    })
    .await;
    let report = publish(&kafka.brokers(), &shapes, 900, 31, 25).await;
    assert_eq!(report.delivered, 900);
    let table = [("table", "enriched_posts")];
    let dead_table = [("table", "enriched_posts_dead_letters")];

    // Everything committed, and the lag measured after that commit.
    let scrape = eventually("every message committed and lag at zero", || async {
        let s = service.scrape().await;
        let landed =
            s.sum("sluice_rows_written_total", &table) + s.sum("sluice_dead_letters_total", &table);
        let lags: Vec<f64> = s
            .matching("sluice_consumer_lag_messages", &table)
            .map(|x| x.value)
            .collect();
        (landed == 900.0 && lags.len() == 9 && lags.iter().all(|l| *l == 0.0)).then_some(s)
    })
    .await;

    let rows = scalar_i64(&query(dir.path(), "SELECT count(*) FROM enriched_posts").await);
    let dead = scalar_i64(
        &query(
            dir.path(),
            "SELECT count(*) FROM enriched_posts_dead_letters",
        )
        .await,
    );
    assert_eq!(rows + dead, 900);
    assert!(dead > 0, "every 25th message is hostile");
    assert_eq!(scrape.sum("sluice_rows_written_total", &table), rows as f64);
    assert_eq!(scrape.sum("sluice_dead_letters_total", &table), dead as f64);
    // Per topic and partition, the counters match the table's provenance columns.
    let per_partition = query(
        dir.path(),
        "SELECT kafka_topic, kafka_partition, count(*) FROM enriched_posts GROUP BY 1, 2",
    )
    .await;
    for batch in &per_partition {
        let topics = strings(batch.column(0));
        for (i, topic) in topics.iter().enumerate() {
            let partition = batch
                .column(1)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int32Array>()
                .unwrap()
                .value(i)
                .to_string();
            let n = batch
                .column(2)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .unwrap()
                .value(i);
            let labels = [
                ("table", "enriched_posts"),
                ("topic", topic.as_str()),
                ("partition", partition.as_str()),
            ];
            assert_eq!(
                scrape.sum("sluice_rows_written_total", &labels),
                n as f64,
                "{topic}/{partition}"
            );
        }
    }
    // Dead letters by reason match the dead-letter table.
    let reasons = query(
        dir.path(),
        "SELECT reason, count(*) FROM enriched_posts_dead_letters GROUP BY reason",
    )
    .await;
    for batch in &reasons {
        for (i, reason) in strings(batch.column(0)).iter().enumerate() {
            let n = batch
                .column(1)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .unwrap()
                .value(i);
            assert_eq!(
                scrape.sum(
                    "sluice_dead_letters_total",
                    &[("table", "enriched_posts"), ("reason", reason.as_str())]
                ),
                n as f64,
                "{reason}"
            );
        }
    }
    // One writer, no rebalance: every message is fetched exactly once.
    assert_eq!(scrape.sum("sluice_messages_consumed_total", &table), 900.0);

    // Commits: every version after the table's creation is one of this writer's commits, and
    // the bytes counted are the Parquet files on disk.
    let version = open_table_version(dir.path(), "enriched_posts").await;
    assert_eq!(scrape.sum("sluice_commits_total", &table), version as f64);
    assert_eq!(
        scrape.sum("sluice_commit_duration_seconds_count", &table),
        version as f64
    );
    assert_eq!(scrape.sum("sluice_flushes_total", &table), version as f64);
    // The batches' sizes add up to what the tables hold (counted by the tables, not by the
    // ledger the counters come from).
    assert_eq!(
        scrape.sum("sluice_batch_messages_sum", &table),
        (rows + dead) as f64
    );
    assert_eq!(
        scrape.sum("sluice_written_bytes_total", &table),
        parquet_bytes(&dir.path().join("enriched_posts")) as f64
    );
    assert_eq!(
        scrape.sum("sluice_written_bytes_total", &dead_table),
        parquet_bytes(&dir.path().join("enriched_posts_dead_letters")) as f64
    );
    assert_eq!(scrape.sum("sluice_table_version", &table), version as f64);
    assert_eq!(scrape.sum("sluice_assigned_partitions", &table), 9.0);

    // Freshness: the newest committed Kafka timestamp is the newest in the table.
    let newest_ms = scalar_i64(
        &query(
            dir.path(),
            "SELECT CAST(max(kafka_timestamp) AS BIGINT) / 1000 FROM enriched_posts",
        )
        .await,
    );
    let newest_dead_ms = scalar_i64(
        &query(
            dir.path(),
            "SELECT CAST(max(kafka_timestamp) AS BIGINT) / 1000 FROM enriched_posts_dead_letters",
        )
        .await,
    );
    let gauge = scrape.sum("sluice_last_committed_message_timestamp_seconds", &table);
    assert_eq!(
        (gauge * 1000.0).round() as i64,
        newest_ms.max(newest_dead_ms)
    );
    // Freshness is the age of that newest message at the moment of the scrape.
    let seconds = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let newest_s = newest_ms.max(newest_dead_ms) as f64 / 1000.0;
    let before = std::time::SystemTime::now();
    let fresh = service.scrape().await;
    let after = std::time::SystemTime::now();
    let freshness = fresh.sum("sluice_freshness_seconds", &table);
    assert_eq!(
        fresh.matching("sluice_freshness_seconds", &table).count(),
        1
    );
    assert!(
        freshness >= seconds(before) - newest_s - 0.001
            && freshness <= seconds(after) - newest_s + 0.001,
        "freshness {freshness} s; the newest message was {} s old before the scrape and {} s after",
        seconds(before) - newest_s,
        seconds(after) - newest_s
    );
    assert_eq!(scrape.sum("sluice_ready", &[]), 1.0);

    // Nothing is exported that the catalogue (and so the README) does not describe.
    let known: BTreeSet<&str> = METRICS.iter().map(|m| m.0).collect();
    for sample in &scrape.0 {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| sample.name.strip_suffix(s))
            .filter(|b| known.contains(b))
            .unwrap_or(&sample.name);
        assert!(known.contains(base), "{} is not in METRICS", sample.name);
    }
    let (status, body) = tokio::task::spawn_blocking({
        let addr = service.addr;
        move || http_get(addr, "/healthz")
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    service.stop().await;
}

async fn open_table_version(root: &Path, name: &str) -> i64 {
    let location = sluice::table::delta::table_location(&root.to_string_lossy(), name);
    sluice::table::delta::open_table(&location, Default::default())
        .await
        .unwrap()
        .version()
        .unwrap() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_object_store() {
    let shapes = [Shape::Mastodon];
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 2);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let mut config = fast_telemetry(config(&kafka.brokers(), &root, &shapes, limits(50, 1000)));
    // Its own table name, so the counters of the other test do not mix in.
    let schema = std::fs::read_to_string(&config.tables[0].schema)
        .unwrap()
        .replace("name = \"enriched_posts\"", "name = \"ready_posts\"");
    let schema_file = dir.path().join("ready_posts.toml");
    std::fs::write(&schema_file, schema).unwrap();
    config.tables[0].schema = schema_file;
    let mapping = std::fs::read_to_string(&config.tables[0].sources[0].mapping)
        .unwrap()
        .replace("\"enriched_posts\"", "\"ready_posts\"");
    let mapping_file = dir.path().join("mastodon.toml");
    std::fs::write(&mapping_file, mapping).unwrap();
    config.tables[0].sources[0].mapping = mapping_file;
    let table = [("table", "ready_posts")];
    config.maintenance.enabled = false;
    let service = Service::start(config).await;
    let report = publish(&kafka.brokers(), &shapes, 120, 5, 0).await;
    let (_, body) = eventually("ready with everything committed", || async {
        let (status, body) = service.readyz().await;
        let s = service.scrape().await;
        let landed = s.sum("sluice_rows_written_total", &table);
        (status == 200 && landed == report.delivered as f64).then_some((status, body))
    })
    .await;
    assert!(
        body.contains("ok   ready_posts assignment: 2 partitions assigned"),
        "{body}"
    );

    // The table's folder disappears (a lost mount, a wrong bucket): not ready, with the reason.
    let folder = root.join("ready_posts");
    let moved = root.join("ready_posts.moved");
    std::fs::rename(&folder, &moved).unwrap();
    let body = eventually("not ready", || async {
        let (status, body) = service.readyz().await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.starts_with("not ready\n"), "{body}");
    assert!(
        body.contains("FAIL ready_posts object store: unreachable"),
        "{body}"
    );
    let s = service.scrape().await;
    assert_eq!(s.sum("sluice_ready", &[]), 0.0);
    assert!(
        s.sum(
            "sluice_object_store_errors_total",
            &[("table", "ready_posts"), ("operation", "probe")]
        ) >= 1.0
    );

    // It comes back: ready again, and ingestion carries on where it was.
    std::fs::rename(&moved, &folder).unwrap();
    eventually("ready again", || async {
        (service.readyz().await.0 == 200).then_some(())
    })
    .await;
    let more = publish(&kafka.brokers(), &shapes, 60, 6, 0).await;
    let total = (report.delivered + more.delivered) as f64;
    eventually("the later messages committed", || async {
        let s = service.scrape().await;
        (s.sum("sluice_rows_written_total", &table) == total).then_some(())
    })
    .await;
    let location = sluice::table::delta::table_location(&root.to_string_lossy(), "ready_posts");
    let ctx = deltalake::datafusion::prelude::SessionContext::new();
    let t = sluice::table::delta::open_table(&location, Default::default())
        .await
        .unwrap();
    sluice::table::delta::register_table(&ctx, "ready_posts", &t)
        .await
        .unwrap();
    let rows = scalar_i64(
        &ctx.sql("SELECT count(*) FROM ready_posts")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap(),
    );
    assert_eq!(rows as f64, total);
    service.stop().await;
}

/// The metric catalogue, the README's metrics table and the Grafana dashboard agree.
#[test]
fn readme_and_dashboard_use_only_metrics_sluice_exports() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for (name, kind, labels, _) in METRICS {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README's metrics table lacks {name}"
        );
        match kind {
            Kind::Counter => assert!(name.ends_with("_total"), "{name}"),
            _ => assert!(!name.ends_with("_total"), "{name}"),
        }
        assert!(
            labels
                .split(", ")
                .all(|l| l.is_empty() || l.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
            "{name}: {labels}"
        );
    }
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let alert_exprs: Vec<String> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(str::to_string)
        .collect();
    assert!(alert_exprs.len() >= 5, "alert rules have expressions");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/sluice.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let known: BTreeSet<&str> = METRICS.iter().map(|m| m.0).collect();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has panels with queries");
    let mut used = BTreeSet::new();
    for expr in exprs.iter().chain(&alert_exprs) {
        let names: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("sluice_"))
            .collect();
        assert!(!names.is_empty(), "a query without a sluice metric: {expr}");
        for n in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|b| known.contains(b))
                .unwrap_or(n);
            assert!(known.contains(base), "dashboard uses unknown metric {n}");
            used.insert(base.to_string());
        }
    }
    for must in [
        "sluice_consumer_lag_messages",
        "sluice_freshness_seconds",
        "sluice_rows_written_total",
        "sluice_dead_letters_total",
        "sluice_commit_duration_seconds",
        "sluice_compaction_runs_total",
        "sluice_ready",
    ] {
        assert!(used.contains(must), "the dashboard does not chart {must}");
    }
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Every configuration key, with its default, is in the README's reference table.
#[test]
fn readme_documents_every_configuration_key() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut config = config(
        "localhost:9092",
        Path::new("/lake"),
        &[Shape::Mastodon],
        limits(1, 1000),
    );
    config.metrics.listen = Some("0.0.0.0:9464".into());
    config.storage.s3.endpoint = Some("http://minio:9000".into());
    config.storage.s3.region = Some("us-east-1".into());
    config.tables[0].dead_letter_topic = Some("dead".into());
    let value = toml::Value::try_from(&config).unwrap();
    let mut keys = BTreeMap::new();
    flatten("", &value, &mut keys);
    assert!(keys.len() > 30, "{keys:?}");
    for key in keys.keys() {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README's configuration table lacks `{key}`"
        );
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, ()>) {
    match value {
        toml::Value::Table(t) if prefix != "kafka.properties" => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        // Each source is documented as one `{ topic, mapping }` entry.
        toml::Value::Array(_) if prefix == "tables[].sources" => {
            out.insert(format!("{prefix}[]"), ());
        }
        toml::Value::Array(items) if items.first().is_some_and(toml::Value::is_table) => {
            for item in items {
                flatten(&format!("{prefix}[]"), item, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), ());
        }
    }
}

/// A writer that fails ends the service at once, with its error, although the other table's
/// writer is healthy: a supervisor then restarts the process. Before, writers were awaited in
/// table order, so a failure of the second table was not even logged while the first ran, and
/// the process stayed up with one table stuck. The failure here: another tool upgrades the
/// second table to a writer feature sluice does not support.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_writer_ends_the_service_with_its_error_while_another_table_runs() {
    let kafka = Kafka::new(
        &[
            Shape::Mastodon.default_topic(),
            Shape::Bluesky.default_topic(),
        ],
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 500),
    );
    // Tables of their own names: metrics are per process, shared with the other tests here.
    let table = |name: &str, shape: Shape| {
        let schema = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &schema,
            std::fs::read_to_string(repo().join("schemas/enriched_posts.toml"))
                .unwrap()
                .replace("name = \"enriched_posts\"", &format!("name = \"{name}\"")),
        )
        .unwrap();
        let mapping = dir
            .path()
            .join(format!("{name}-{}", shape.mapping_file().replace('/', "-")));
        std::fs::write(
            &mapping,
            std::fs::read_to_string(repo().join("schemas").join(shape.mapping_file()))
                .unwrap()
                .replace("table = \"enriched_posts\"", &format!("table = \"{name}\"")),
        )
        .unwrap();
        sluice::config::TableConfig {
            schema,
            sources: vec![sluice::config::SourceConfig {
                topic: shape.default_topic().to_string(),
                mapping,
                format: Default::default(),
            }],
            dead_letter_topic: None,
        }
    };
    config.tables = vec![
        table("healthy_posts", Shape::Mastodon),
        table("other_posts", Shape::Bluesky),
    ];
    let (stop, stopped) = oneshot::channel::<()>();
    let service = tokio::spawn(sluice::service::app::run(
        config,
        async move {
            let _ = stopped.await;
        },
        None,
    ));

    // Both tables commit once; then the second one's protocol moves past sluice.
    let other = dir.path().join("other_posts");
    let produced = publish(&kafka.brokers(), &[Shape::Bluesky], 20, 0, 0).await;
    let deadline = std::time::Instant::now() + CATCH_UP;
    let version = loop {
        if let Ok(table) =
            deltalake::open_table(url::Url::from_directory_path(&other).unwrap()).await
            && table.version().unwrap_or(0) >= 1
        {
            break table.version().unwrap();
        }
        if service.is_finished() {
            panic!("the service ended early: {:?}", service.await);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "other_posts never committed ({produced:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    std::fs::write(
        other
            .join("_delta_log")
            .join(format!("{:020}.json", version + 1)),
        concat!(
            r#"{"protocol":{"minReaderVersion":1,"minWriterVersion":7,"#,
            r#""writerFeatures":["aFeatureFromTheFuture"]}}"#,
            "\n"
        ),
    )
    .unwrap();
    publish(&kafka.brokers(), &[Shape::Bluesky], 20, 1, 0).await;
    publish(&kafka.brokers(), &[Shape::Mastodon], 20, 2, 0).await;

    let ended = tokio::time::timeout(CATCH_UP, service).await;
    let _ = stop.send(());
    let result = ended
        .expect("the service ends on its own once a writer fails")
        .unwrap();
    let error = result
        .expect_err("the service ends with the writer's error")
        .to_string();
    assert!(
        error.contains("other_posts") || error.contains("aFeatureFromTheFuture"),
        "the error names the table or the cause: {error}"
    );
}
