//! Shared helpers: an in-process Kafka (librdkafka's mock cluster), configs pointing at a
//! temporary table, and read-back of what the table holds.

#![allow(dead_code)]

pub mod faulty;
pub mod registry;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int32Type, Int64Type};
use deltalake::datafusion::prelude::SessionContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use sluice::config::{
    Config, DeltaConfig, IngestConfig, KafkaConfig, MetricsConfig, SourceConfig, StorageConfig,
    TableConfig,
};
use sluice::ingest::batch::BatchLimits;
use sluice::ingest::kafka::Connection;
use sluice::service::app::{self, RunningTable};
use sluice::table::delta::{open_table, register_table, table_location};
use sluice::tools::generator::Shape;
use sluice::tools::produce::{ProduceOptions, ProduceReport, produce};

/// How long a test waits for the writer to catch up before failing with a message.
pub const CATCH_UP: Duration = Duration::from_secs(120);

pub struct Kafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Kafka {
    pub fn new(topics: &[&str], partitions: i32) -> Self {
        let cluster = MockCluster::new(1).expect("mock cluster starts");
        for t in topics {
            cluster
                .create_topic(t, partitions, 1)
                .expect("topic created");
        }
        Kafka { cluster }
    }

    pub fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture's "now": posts are created in the three days before it.
pub const FIXTURE_CLOCK_MS: i64 = 1_763_942_400_000; // 2025-11-24T00:00:00Z
pub const FIXTURE_MESSAGES: u64 = 3_000;
/// Every 47th message of the fixture edits, redelivers or deletes a post (applied by one pass);
/// coprime to the hostile payloads' 50, which would otherwise take every operation's place.
pub const FIXTURE_OPERATIONS_EVERY: u64 = 47;

/// Builds, in its own runtime, a table written by sluice from a fixed seed and clock: 3,000
/// messages from the three upstreams, every 50th hostile and every 47th an edit, redelivery or
/// delete (applied by one pass), flushed every 250 rows, under `CARGO_TARGET_TMPDIR/<name>`
/// (with a `sluice.toml`). The same rows every time.
pub fn build_fixture_blocking(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(build_fixture(dir))
    })
    .join()
    .expect("fixture built")
}

async fn build_fixture(dir: PathBuf) -> PathBuf {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let topics: Vec<&str> = Shape::ALL.iter().map(|s| s.default_topic()).collect();
    let kafka = Kafka::new(&topics, 3);
    let report = produce(&ProduceOptions {
        connection: Connection::plain(&kafka.brokers()),
        shapes: Shape::ALL
            .iter()
            .map(|s| (*s, s.default_topic().to_string()))
            .collect(),
        count: FIXTURE_MESSAGES,
        rate: 0,
        seed: 7,
        embedding_dim: 16,
        bad_every: 50,
        operations_every: FIXTURE_OPERATIONS_EVERY,
        spread_days: 3,
        clock_ms: Some(FIXTURE_CLOCK_MS),
        progress: false,
        wire: None,
    })
    .await
    .expect("fixture published");
    let cfg = config(&kafka.brokers(), &dir, &Shape::ALL, limits(250, 1000));
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&report.last_offsets).await;
    writer.stop().await;
    // What the service's maintenance does: apply the deletes and edits.
    let keyed = app::keyed_table(&cfg, &cfg.tables[0])
        .unwrap()
        .expect("the flagship table is keyed");
    let options = sluice::table::deletes::ApplyOptions {
        owner: "fixture".into(),
        lease_ttl: Duration::from_secs(60),
        settings: sink_settings(),
        skip_when_idle: false,
    };
    match sluice::table::deletes::apply(&keyed, &Default::default(), &options)
        .await
        .expect("deletes applied")
    {
        sluice::table::deletes::ApplyOutcome::Applied(a) => {
            assert!(a.deletes > 0 && a.replaced > 0, "{a:?}")
        }
        other => panic!("{other:?}"),
    }
    write_lake_config(&dir);
    dir
}

/// A `sluice.toml` for the tables under `dir` (no reachable broker: for sql, compact, inspect).
pub fn write_lake_config(dir: &Path) -> PathBuf {
    let repo = repo();
    let repo = repo.display();
    let file = dir.join("sluice.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:1"
[storage]
root = "."
[[tables]]
schema = "{repo}/schemas/enriched_posts.toml"
sources = [
  {{ topic = "posts.mastodon", mapping = "{repo}/schemas/mappings/mastodon.toml" }},
  {{ topic = "posts.bluesky", mapping = "{repo}/schemas/mappings/bluesky.toml" }},
  {{ topic = "posts.tweets", mapping = "{repo}/schemas/mappings/tweets.toml" }},
]
"#
        ),
    )
    .unwrap();
    file
}

/// A config writing `enriched_posts` under `root`, fed by the given shapes' default topics.
pub fn config(brokers: &str, root: &Path, shapes: &[Shape], limits: BatchLimits) -> Config {
    Config {
        kafka: KafkaConfig {
            brokers: brokers.to_string(),
            group_id: "sluice-test".into(),
            start_from: sluice::ingest::source::StartFrom::Earliest,
            properties: BTreeMap::from([
                ("session.timeout.ms".to_string(), "6000".to_string()),
                ("heartbeat.interval.ms".to_string(), "500".to_string()),
            ]),
        },
        storage: StorageConfig {
            root: root.to_string_lossy().into_owned(),
            s3: Default::default(),
        },
        batch: limits,
        // Small chunks on more threads than cores: decodes overlap consumption, commits and
        // rebalances in every test.
        ingest: IngestConfig {
            decode_chunk: 64,
            decode_threads: Some(3),
            ..IngestConfig::default()
        },
        delta: DeltaConfig {
            checkpoint_interval: 5,
            ..DeltaConfig::default()
        },
        metrics: MetricsConfig::default(),
        health: Default::default(),
        maintenance: Default::default(),
        registry: None,
        tables: vec![TableConfig {
            schema: repo().join("schemas/enriched_posts.toml"),
            sources: shapes
                .iter()
                .map(|s| SourceConfig {
                    topic: s.default_topic().to_string(),
                    mapping: repo().join("schemas").join(s.mapping_file()),
                    format: Default::default(),
                })
                .collect(),
            dead_letter_topic: None,
        }],
    }
}

pub fn limits(max_rows: usize, max_age_ms: u64) -> BatchLimits {
    BatchLimits {
        max_rows,
        max_bytes: 64 * 1024 * 1024,
        max_age_ms,
    }
}

pub async fn publish(
    brokers: &str,
    shapes: &[Shape],
    count: u64,
    seed: u64,
    bad_every: u64,
) -> ProduceReport {
    produce(&ProduceOptions {
        connection: Connection::plain(brokers),
        shapes: shapes
            .iter()
            .map(|s| (*s, s.default_topic().to_string()))
            .collect(),
        count,
        rate: 0,
        seed,
        embedding_dim: 16,
        bad_every,
        operations_every: 0,
        spread_days: 3,
        clock_ms: None,
        progress: false,
        wire: None,
    })
    .await
    .expect("messages delivered")
}

/// The last offset per partition over several publish runs.
pub fn latest_offsets(reports: &[&ProduceReport]) -> BTreeMap<(String, i32), i64> {
    let mut all: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for report in reports {
        for (k, v) in &report.last_offsets {
            let e = all.entry(k.clone()).or_insert(*v);
            *e = (*e).max(*v);
        }
    }
    all
}

/// A writer running in the background, stoppable gracefully or by abort (a crash).
pub struct Writer {
    pub table: RunningTable,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Writer {
    pub async fn start(config: &Config) -> Writer {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut running = app::start(config, async move {
            let _ = rx.await;
        })
        .await
        .expect("writer starts");
        Writer {
            table: running.remove(0),
            stop: Some(tx),
        }
    }

    /// Waits until the writer has committed every offset up to `targets` (inclusive).
    pub async fn wait_committed(&mut self, targets: &BTreeMap<(String, i32), i64>) {
        let result = tokio::time::timeout(
            CATCH_UP,
            self.table.progress.wait_for(|p| p.covers(targets)),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
        let progress = self.table.progress.borrow().clone();
        assert!(
            result,
            "writer did not catch up: wanted {targets:?}, committed {:?}",
            progress.committed
        );
    }

    /// Graceful stop: flushes and commits.
    pub async fn stop(mut self) -> sluice::ingest::progress::Progress {
        let _ = self.stop.take().unwrap().send(());
        self.table
            .task
            .await
            .unwrap()
            .expect("writer stops cleanly")
    }

    /// A crash: the task dies with whatever it buffered.
    pub async fn crash(self) {
        self.table.task.abort();
        let _ = self.table.task.await;
    }
}

/// How the tests' writers set up a table: a checkpoint every 5 commits, zstd level 1, Delta's
/// retentions.
pub fn sink_settings() -> sluice::table::delta::TableSettings {
    sluice::table::delta::TableSettings {
        checkpoint_interval: 5,
        zstd_level: 1,
        tombstone_retention: sluice::table::delta::DEFAULT_TOMBSTONE_RETENTION,
        log_retention: sluice::table::delta::DEFAULT_LOG_RETENTION,
    }
}

/// Opens (creating it when absent) the `enriched_posts` table under `root` for writing, with
/// `schema`, [`sink_settings`] and `tombstone_retention`.
pub async fn open_sink(
    root: &Path,
    schema: sluice::contract::schema::TableSchema,
    tombstone_retention: Duration,
) -> Result<sluice::table::delta::DeltaSink, sluice::table::delta::DeltaError> {
    sluice::table::delta::DeltaSink::open_or_create(
        &table_location(&root.to_string_lossy(), "enriched_posts"),
        Default::default(),
        std::sync::Arc::new(schema),
        "sluice-test",
        sluice::table::delta::TableSettings {
            tombstone_retention,
            ..sink_settings()
        },
    )
    .await
}

/// (topic, partition, offset) of every row in the table.
pub async fn table_offsets(root: &Path) -> Vec<(String, i32, i64)> {
    offsets_in_table(root, "enriched_posts").await
}

/// (kafka_topic, kafka_partition, kafka_offset) of every row of `table` under `root`, sorted.
pub async fn offsets_in_table(root: &Path, table: &str) -> Vec<(String, i32, i64)> {
    let batches = query(
        root,
        &format!("SELECT kafka_topic, kafka_partition, kafka_offset FROM {table}"),
    )
    .await;
    let mut out = Vec::new();
    for b in batches {
        let topics = strings(b.column(0));
        let parts = b.column(1).as_primitive::<Int32Type>();
        let offs = b.column(2).as_primitive::<Int64Type>();
        for (i, topic) in topics.into_iter().enumerate() {
            out.push((topic, parts.value(i), offs.value(i)));
        }
    }
    out.sort();
    out
}

/// The file names in a table folder's `_delta_log` (none when it has no log).
pub fn log_files(table_dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(table_dir.join("_delta_log")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Asserts every offset up to `last_offsets` is in the table exactly once, except `missing`.
pub fn assert_exactly_once(
    rows: &[(String, i32, i64)],
    last_offsets: &BTreeMap<(String, i32), i64>,
    missing: &BTreeSet<(String, i32, i64)>,
) {
    let mut seen = BTreeSet::new();
    for r in rows {
        assert!(seen.insert(r.clone()), "duplicate row for {r:?}");
    }
    let mut expected = BTreeSet::new();
    for ((topic, partition), last) in last_offsets {
        for o in 0..=*last {
            let key = (topic.clone(), *partition, o);
            if !missing.contains(&key) {
                expected.insert(key);
            }
        }
    }
    let lost: Vec<_> = expected.difference(&seen).take(10).collect();
    let extra: Vec<_> = seen.difference(&expected).take(10).collect();
    assert!(lost.is_empty(), "messages missing from the table: {lost:?}");
    assert!(extra.is_empty(), "unexpected rows: {extra:?}");
}

/// Runs `sql` over `enriched_posts` and, once they exist, `enriched_posts_dead_letters` and
/// `enriched_posts_deletions`.
pub async fn query(root: &Path, sql: &str) -> Vec<RecordBatch> {
    let ctx = SessionContext::new();
    for name in [
        "enriched_posts",
        "enriched_posts_dead_letters",
        "enriched_posts_deletions",
    ] {
        let location = table_location(&root.to_string_lossy(), name);
        let Ok(table) = open_table(&location, Default::default()).await else {
            assert_ne!(name, "enriched_posts", "the main table opens");
            continue;
        };
        register_table(&ctx, name, &table).await.unwrap();
    }
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// Sends payloads one by one (`None` is a tombstone) and returns their offsets.
pub async fn send_raw(brokers: &str, topic: &str, payloads: &[Option<Vec<u8>>]) -> Vec<i64> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer");
    let mut offsets = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let key = format!("raw-{i}");
        let mut record = FutureRecord::<str, [u8]>::to(topic).key(&key).partition(0);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        let delivered = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
        offsets.push(delivered.offset);
    }
    offsets
}

/// `sum(...)`-style results as u64 per first-column string key.
pub fn counts_by_key(batches: &[RecordBatch]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for b in batches {
        let keys = strings(b.column(0));
        let values = b.column(1).as_primitive::<Int64Type>();
        for (i, k) in keys.into_iter().enumerate() {
            out.insert(k, values.value(i));
        }
    }
    out
}

pub fn strings(array: &dyn Array) -> Vec<String> {
    if let Some(a) = array.as_string_view_opt() {
        return (0..a.len()).map(|i| a.value(i).to_string()).collect();
    }
    let a = array.as_string::<i32>();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

pub fn scalar_i64(batches: &[RecordBatch]) -> i64 {
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

/// Runs `sluice run` until `done` holds (or [`CATCH_UP`] passes), then stops it with SIGTERM.
/// Returns whether `done` held.
pub async fn run_until(config: &std::path::Path, done: impl AsyncFn() -> bool) -> bool {
    let mut writer = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let caught_up = tokio::time::timeout(CATCH_UP, async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &writer.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || writer.wait()).await;
    caught_up.is_ok()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0 (the server closes after answering): status and body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone)]
pub struct Scrape(pub Vec<Sample>);

impl Scrape {
    pub fn fetch(addr: std::net::SocketAddr) -> Option<Scrape> {
        let (status, body) = http_get(addr, "/metrics")?;
        (status == 200).then(|| Scrape::parse(&body))
    }

    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels close");
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label is k=\"v\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            samples.push(Sample {
                name,
                labels,
                value: value.parse().expect("sample value is a number"),
            });
        }
        Scrape(samples)
    }

    /// Samples named `name` whose labels include every pair of `filter`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum over the matching samples (0 when there are none).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }
}
