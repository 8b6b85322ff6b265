//! End to end against real servers: the `sluice` binary, an Apache Kafka broker (KRaft, with
//! PLAINTEXT, SSL and SASL_SSL listeners) and moto's S3 server, with faults: kill -9 of writers,
//! an S3 outage, broker restarts, two writers in one group and a rolling restart, compaction
//! racing the writer, wrong credentials and untrusted certificates. Every scenario that lands
//! data ends with `sluice audit`: each produced offset is in the table or its dead letters
//! exactly once.
//!
//! `scripts/e2e.sh` installs and starts the servers and runs these tests; they are ignored by a
//! plain `cargo test`, which has no servers. Process logs land in `$SLUICE_E2E_LOGS`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Scrape, free_port, http_get};
use futures::TryStreamExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use sluice::config::Config;
use sluice::ingest::decode::Format;
use sluice::ingest::kafka::Connection;
use sluice::query::audit::audit_table;
use sluice::table::delta::{committed_offset, open_table, table_location};
use sluice::tools::generator::Shape;
use sluice::tools::produce::{ProduceOptions, ProduceReport, create_topics, produce};

/// How long a scenario waits for the writers to catch up before it fails with the logs.
const CATCH_UP: Duration = Duration::from_secs(240);
/// Partitions of each topic.
const PARTITIONS: i32 = 4;
/// Every n-th produced message is hostile and must become a dead letter.
const BAD_EVERY: u64 = 97;
/// The writers' `session.timeout.ms`: the broker's smallest (`group.min.session.timeout.ms`).
const SESSION_TIMEOUT_MS: u64 = 6_000;
/// How long a killed writer stays down before the next one starts. Longer than the session
/// timeout: the broker keeps a killed member, and its partitions, until its session expires, so
/// a writer started earlier only waits in the group; starting later keeps each run's 2–8 s for
/// ingesting, which the scenario needs to kill mid-commit.
const RESTART_AFTER: Duration = Duration::from_millis(SESSION_TIMEOUT_MS + 1_500);

/// The servers `scripts/e2e.sh` started, and where processes log.
struct Servers {
    kafka: KafkaEnv,
    s3: String,
    bucket: String,
    logs: PathBuf,
    seed: u64,
}

/// What `scripts/kafka.sh start` wrote about its broker: listeners, certificates, users.
#[derive(Clone)]
struct KafkaEnv {
    values: BTreeMap<String, String>,
}

impl KafkaEnv {
    fn read(file: &Path) -> KafkaEnv {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let values = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        KafkaEnv { values }
    }

    fn get(&self, key: &str) -> &str {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("kafka.env has no {key}"))
    }
}

/// A listener of the shared broker, and how a client reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// No security.
    Plaintext,
    /// TLS with a client certificate whose key has a password.
    Ssl,
    /// TLS and SASL SCRAM-SHA-512.
    SaslSsl,
    /// TLS and SASL OAUTHBEARER, tokens from an OIDC issuer (client credentials).
    Oauthbearer,
}

/// How a client reaches a listener: bootstrap servers, the librdkafka properties a config file
/// may hold (no secrets), and the secrets, as `SLUICE_KAFKA__PROPERTIES__*` variables.
struct Access {
    brokers: String,
    properties: Vec<(String, String)>,
    secrets: Vec<(String, String)>,
}

impl Access {
    fn to(kafka: &KafkaEnv, listener: Listener) -> Access {
        let pairs = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        match listener {
            Listener::Plaintext => Access {
                brokers: kafka.get("KAFKA_PLAINTEXT").into(),
                properties: vec![],
                secrets: vec![],
            },
            Listener::Ssl => Access {
                brokers: kafka.get("KAFKA_SSL").into(),
                properties: pairs(&[
                    ("security.protocol", "SSL"),
                    ("ssl.ca.location", kafka.get("KAFKA_CA")),
                    ("ssl.certificate.location", kafka.get("KAFKA_CLIENT_CERT")),
                    ("ssl.key.location", kafka.get("KAFKA_CLIENT_KEY")),
                ]),
                secrets: pairs(&[(
                    "SLUICE_KAFKA__PROPERTIES__SSL_KEY_PASSWORD",
                    kafka.get("KAFKA_CLIENT_KEY_PASSWORD"),
                )]),
            },
            Listener::SaslSsl => Access {
                brokers: kafka.get("KAFKA_SASL_SSL").into(),
                properties: pairs(&[
                    ("security.protocol", "SASL_SSL"),
                    ("sasl.mechanism", "SCRAM-SHA-512"),
                    ("sasl.username", kafka.get("KAFKA_SCRAM_USER")),
                    ("ssl.ca.location", kafka.get("KAFKA_CA")),
                ]),
                secrets: pairs(&[(
                    "SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD",
                    kafka.get("KAFKA_SCRAM_PASSWORD"),
                )]),
            },
            Listener::Oauthbearer => Access {
                brokers: kafka.get("KAFKA_SASL_SSL").into(),
                properties: pairs(&[
                    ("security.protocol", "SASL_SSL"),
                    ("sasl.mechanism", "OAUTHBEARER"),
                    ("sasl.oauthbearer.method", "oidc"),
                    (
                        "sasl.oauthbearer.client.id",
                        kafka.get("KAFKA_OIDC_CLIENT_ID"),
                    ),
                    (
                        "sasl.oauthbearer.token.endpoint.url",
                        kafka.get("KAFKA_OIDC_TOKEN_URL"),
                    ),
                    ("ssl.ca.location", kafka.get("KAFKA_CA")),
                ]),
                secrets: pairs(&[(
                    "SLUICE_KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET",
                    kafka.get("KAFKA_OIDC_CLIENT_SECRET"),
                )]),
            },
        }
    }

    /// This access with `key` set to `value` in the config file's properties.
    fn with_property(mut self, key: &str, value: &str) -> Access {
        self.properties.retain(|(k, _)| k != key);
        self.properties.push((key.to_string(), value.to_string()));
        self
    }

    /// This access with the secret variable `var` set to `value`.
    fn with_secret(mut self, var: &str, value: &str) -> Access {
        self.secrets.retain(|(k, _)| k != var);
        self.secrets.push((var.to_string(), value.to_string()));
        self
    }

    /// Bootstrap servers and every property, secrets included, for in-process clients.
    fn connection(&self) -> Connection {
        let mut properties: BTreeMap<String, String> = self.properties.iter().cloned().collect();
        properties.extend(
            sluice::config::kafka_properties_from_env(self.secrets.iter().cloned()).unwrap(),
        );
        Connection {
            brokers: self.brokers.clone(),
            properties,
        }
    }
}

impl Servers {
    fn from_env() -> Servers {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the end-to-end suite with `bash scripts/e2e.sh`")
            })
        };
        let seed = std::env::var("SLUICE_E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let logs = PathBuf::from(var("SLUICE_E2E_LOGS"));
        std::fs::create_dir_all(&logs).unwrap();
        Servers {
            kafka: KafkaEnv::read(Path::new(&var("SLUICE_E2E_KAFKA_ENV"))),
            s3: var("SLUICE_E2E_S3"),
            bucket: var("SLUICE_E2E_BUCKET"),
            logs,
            seed,
        }
    }
}

/// A child process whose output goes to a log file; killed when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, logs: &Path, command: &mut Command) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no flush, no goodbye.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (SIGKILL after `patience`).
    fn terminate(&mut self, patience: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }

    /// Whether it is still running (a writer must survive every fault).
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            self.kill9();
        }
    }
}

/// An Apache Kafka broker of the scenario's own (`scripts/kafka.sh`), so it can be killed and
/// restarted on the same ports and log directory without disturbing other scenarios.
struct OwnBroker {
    dir: PathBuf,
    env: KafkaEnv,
}

impl OwnBroker {
    fn start(servers: &Servers, name: &str) -> OwnBroker {
        let dir = servers.logs.join(format!("kafka-{name}"));
        kafka_script(&["start", &dir.display().to_string()], &servers.logs, name);
        let env = KafkaEnv::read(&dir.join("kafka.env"));
        OwnBroker { dir, env }
    }

    fn brokers(&self) -> String {
        self.env.get("KAFKA_PLAINTEXT").to_string()
    }

    /// kill -9, `down` of silence, and the broker again on the same ports and log.
    fn restart(&self, servers: &Servers, down: Duration) {
        kafka_script(
            &[
                "restart",
                &self.dir.display().to_string(),
                &format!("{:.1}", down.as_secs_f64()),
            ],
            &servers.logs,
            "restart",
        );
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(kafka_sh())
            .args(["stop", &self.dir.display().to_string()])
            .status();
    }
}

fn kafka_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

/// Runs `scripts/kafka.sh ARGS`, its output in a log; panics with the log when it fails.
fn kafka_script(args: &[&str], logs: &Path, label: &str) {
    let log = logs.join(format!("kafka-sh-{label}.log"));
    let out = File::options()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let status = Command::new("bash")
        .arg(kafka_sh())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "kafka.sh {args:?} failed:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// One scenario: its topics, its table under `s3://bucket/<name>`, its config file.
struct Scenario {
    name: String,
    servers: Servers,
    dir: tempfile::TempDir,
    topics: Vec<(Shape, String)>,
    /// Topics in a registry format, and the format (the others are plain JSON).
    formats: BTreeMap<String, Format>,
    rng: SmallRng,
    /// How its clients reach Kafka: brokers given to `config` are used with these properties,
    /// and the secrets go to every process as environment variables.
    access: Access,
}

impl Scenario {
    /// A scenario with topics of its own (`<name>.posts.<shape>`), created here.
    async fn new(name: &str) -> Scenario {
        let scenario =
            Scenario::with_topics(name, |shape| format!("{name}.{}", shape.default_topic()));
        scenario.create_topics(&scenario.access.brokers).await;
        scenario
    }

    fn with_topics(name: &str, topic: impl Fn(Shape) -> String) -> Scenario {
        let servers = Servers::from_env();
        let seed = servers.seed;
        println!(
            "scenario {name}: seed {seed} (rerun with SLUICE_E2E_SEED={seed}), logs in {}",
            servers.logs.display()
        );
        let topics = [Shape::Mastodon, Shape::Bluesky, Shape::Tweets]
            .into_iter()
            .map(|s| (s, topic(s)))
            .collect();
        Scenario {
            name: name.to_string(),
            dir: tempfile::tempdir().unwrap(),
            rng: SmallRng::seed_from_u64(seed),
            access: Access::to(&servers.kafka, Listener::Plaintext),
            servers,
            topics,
            formats: BTreeMap::new(),
        }
    }

    /// The clients of this scenario reach Kafka through `listener`.
    fn through(mut self, access: Access) -> Scenario {
        self.access = access;
        self
    }

    /// The scenario's access with other brokers (a broker of its own).
    fn connection(&self, brokers: &str) -> Connection {
        Connection {
            brokers: brokers.to_string(),
            ..self.access.connection()
        }
    }

    /// Loads a config the scenario wrote, with its secrets from the "environment".
    fn load(&self, config: &Path) -> Config {
        Config::load(config, self.access.secrets.iter().cloned()).unwrap()
    }

    /// A `sluice` command with the scenario's secrets in its environment.
    fn sluice(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.envs(self.access.secrets.iter().cloned());
        command
    }

    async fn create_topics(&self, brokers: &str) {
        let topics: Vec<String> = self.topics.iter().map(|(_, t)| t.clone()).collect();
        let created = create_topics(&self.connection(brokers), &topics, PARTITIONS)
            .await
            .expect("topics created");
        assert_eq!(created, topics, "the scenario's topics are new");
    }

    /// Writes the writer's config: brokers and S3 endpoint as given, `extra` TOML appended.
    fn config(&self, brokers: &str, s3: &str, extra: &str) -> PathBuf {
        let repo = env!("CARGO_MANIFEST_DIR");
        let sources: Vec<String> = self
            .topics
            .iter()
            .map(|(shape, topic)| {
                let format = self.formats.get(topic).copied().unwrap_or_default();
                format!(
                    "{{ topic = \"{topic}\", mapping = \"{repo}/schemas/{}\", format = \"{}\" }}",
                    shape.mapping_file(),
                    format.as_str()
                )
            })
            .collect();
        let properties: String = self
            .access
            .properties
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect();
        let text = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "e2e-{name}"
[kafka.properties]
"session.timeout.ms" = "{SESSION_TIMEOUT_MS}"
"heartbeat.interval.ms" = "400"
{properties}
[storage]
root = "s3://{bucket}/{name}"
[storage.s3]
endpoint = "{s3}"
region = "us-east-1"
allow_http = true

[batch]
max_age_ms = 1000

[metrics]
lag_interval_s = 1

[health]
probe_interval_s = 1
{extra}

[[tables]]
schema = "{repo}/schemas/enriched_posts.toml"
sources = [{sources}]
"#,
            name = self.name,
            bucket = self.servers.bucket,
            sources = sources.join(", "),
        );
        let file = self.dir.path().join(format!("{}.toml", self.name));
        std::fs::write(&file, text).unwrap();
        file
    }

    /// The default config: the shared broker and S3 server.
    fn default_config(&self, extra: &str) -> PathBuf {
        self.config(&self.access.brokers, &self.servers.s3, extra)
    }

    /// Starts `sluice run` with the metrics endpoint on a free port.
    fn writer(&self, label: &str, config: &Path) -> Writer {
        let port = free_port();
        let process = Proc::spawn(
            &format!("{}-{label}", self.name),
            &self.servers.logs,
            self.sluice()
                .args(["--log-format", "json", "run", "--config"])
                .arg(config)
                .args(["--metrics-listen", &format!("127.0.0.1:{port}")]),
        );
        Writer {
            process,
            metrics: ([127, 0, 0, 1], port).into(),
        }
    }

    /// Publishes `count` messages at `rate`/s to the scenario's topics in the background.
    fn produce(&mut self, brokers: &str, count: u64, rate: u64) -> JoinHandle<ProduceReport> {
        let options = ProduceOptions {
            connection: self.connection(brokers),
            shapes: self.topics.clone(),
            count,
            rate,
            seed: self.rng.random(),
            embedding_dim: 64,
            bad_every: BAD_EVERY,
            operations_every: 0,
            spread_days: 2,
            clock_ms: None,
            progress: false,
            wire: None,
        };
        tokio::spawn(async move { produce(&options).await.expect("every message delivered") })
    }

    /// A random pause in `range` (milliseconds).
    fn pause(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.random_range(range))
    }

    /// Waits until the table has committed every offset up to `last_offsets`.
    async fn wait_committed(&self, config: &Path, last_offsets: &BTreeMap<(String, i32), i64>) {
        let config = self.load(config);
        let deadline = Instant::now() + CATCH_UP;
        let mut behind = Vec::new();
        while Instant::now() < deadline {
            behind = lagging(&config, last_offsets).await;
            if behind.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "scenario {}: the table did not catch up within {CATCH_UP:?}; behind: {behind:?}; logs in {}",
            self.name,
            self.servers.logs.display()
        );
    }

    /// Waits until the audit has checked at least `produced` messages (for producers that do
    /// not report offsets); panics on a finding or when the table does not catch up.
    async fn wait_audited(&self, config: &Path, produced: u64) {
        let config = self.load(config);
        let deadline = Instant::now() + CATCH_UP;
        let mut last = String::from("(no audit yet)");
        while Instant::now() < deadline {
            if let Ok(audit) = audit_table(&config, &config.tables[0]).await {
                last = audit.render();
                assert!(audit.is_clean(), "scenario {}:\n{last}", self.name);
                let checked: u64 = audit.partitions.iter().map(|p| p.checked).sum();
                if checked >= produced {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!(
            "scenario {}: the table did not catch up within {CATCH_UP:?}:\n{last}",
            self.name
        );
    }

    /// Runs `sluice audit` and returns its report; panics with it unless clean and covering at
    /// least `produced` messages.
    fn audit(&self, config: &Path, produced: u64) -> String {
        let output = self
            .sluice()
            .args(["audit", "--config"])
            .arg(config)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        let errors = String::from_utf8_lossy(&output.stderr);
        println!("scenario {} audit:\n{report}", self.name);
        assert!(
            output.status.success(),
            "scenario {}: audit exit {:?}\n{report}\n{errors}",
            self.name,
            output.status.code()
        );
        let checked = audited_messages(&report);
        assert!(
            checked >= produced,
            "scenario {}: the audit checked {checked} messages, {produced} were produced\n{report}",
            self.name
        );
        self.read_independently(produced);
        report
    }

    /// An oracle that is not sluice: a Delta reader of its own (deltalake2db + DuckDB,
    /// `scripts/independent_read.py --ledger`) reads both tables from S3. Per partition, rows
    /// and dead letters together must hold every offset from 0 on exactly once, and at least
    /// the `produced` messages the producer had acknowledged.
    fn read_independently(&self, produced: u64) {
        let root = format!("s3://{}/{}", self.servers.bucket, self.name);
        let output = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/independent_read.py"))
            .args(["--ledger", "--s3-endpoint", &self.servers.s3, &root])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "scenario {}: independent_read.py: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let results: Vec<(String, String, Vec<serde_json::Value>)> =
            serde_json::from_slice(&output.stdout).unwrap();
        let rows_of = |name: &str| {
            results
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, _, rows)| rows.clone())
                .unwrap_or_else(|| panic!("no {name} in the independent reader's output"))
        };
        let int = |row: &serde_json::Value, column: &str| row[column].as_i64().unwrap();
        assert_eq!(
            int(&rows_of("in both")[0], "offsets"),
            0,
            "scenario {}: offsets both a row and a dead letter",
            self.name
        );
        // (topic, partition) -> (messages, last offset), over both tables.
        let mut partitions: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
        for table in ["rows", "dead letters"] {
            for row in rows_of(table) {
                let (messages, distinct) = (int(&row, "messages"), int(&row, "distinct_offsets"));
                assert_eq!(
                    messages, distinct,
                    "scenario {}: {table} hold an offset twice: {row}",
                    self.name
                );
                let key = (
                    row["kafka_topic"].as_str().unwrap().to_string(),
                    int(&row, "kafka_partition"),
                );
                let entry = partitions.entry(key).or_insert((0, -1));
                entry.0 += messages;
                entry.1 = entry.1.max(int(&row, "last_offset"));
            }
        }
        for ((topic, partition), (messages, last)) in &partitions {
            assert_eq!(
                *messages,
                last + 1,
                "scenario {}: {topic}/{partition} holds {messages} offsets of 0..={last}",
                self.name
            );
        }
        let total: i64 = partitions.values().map(|(m, _)| m).sum();
        assert!(
            total as u64 >= produced,
            "scenario {}: the independent reader found {total} messages, {produced} were produced",
            self.name
        );
        println!(
            "scenario {}: independent reader: {total} messages in {} partitions, each offset once",
            self.name,
            partitions.len()
        );
    }
}

/// `(topic, partition, committed)` for every partition whose committed position is short of
/// `last_offsets`.
async fn lagging(
    config: &Config,
    last_offsets: &BTreeMap<(String, i32), i64>,
) -> Vec<(String, i32, Option<i64>)> {
    let location = table_location(&config.storage.root, "enriched_posts");
    let Ok(table) = open_table(&location, config.storage_options()).await else {
        return vec![("(no table yet)".into(), -1, None)];
    };
    let mut behind = Vec::new();
    for ((topic, partition), last) in last_offsets {
        let committed = committed_offset(&table, &config.kafka.group_id, topic, *partition)
            .await
            .ok()
            .flatten();
        if committed.is_none_or(|c| c < *last) {
            behind.push((topic.clone(), *partition, committed));
        }
    }
    behind
}

/// The "N messages checked" figure of an audit report.
fn audited_messages(report: &str) -> u64 {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("CLEAN: "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A running `sluice run`.
struct Writer {
    process: Proc,
    metrics: SocketAddr,
}

impl Writer {
    /// `/readyz` status and body, if the endpoint answers.
    fn readyz(&self) -> Option<(u16, String)> {
        http_get(self.metrics, "/readyz")
    }

    /// Sum of a metric over the label sets that include every pair of `filter`.
    fn metric(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        Scrape::fetch(self.metrics).map(|scrape| scrape.sum(name, filter))
    }

    /// Stops with SIGTERM; a clean stop commits what it buffered and exits 0.
    fn stop(mut self) {
        let status = self.process.terminate(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not stop cleanly on SIGTERM ({status:?}); log {}",
            self.process.name,
            self.process.log.display()
        );
    }
}

/// A TCP proxy in front of a server that can be taken down: while down its port refuses
/// connections and every open connection is cut, as when the server itself stops.
struct Outage {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Outage {
    async fn start(target: SocketAddr) -> Outage {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, mut state) = watch::channel(true);
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let Some(open) = &listener else {
                    // Down: wait to come back, then listen on the same port again.
                    if state.wait_for(|up| *up).await.is_err() {
                        return;
                    }
                    listener = Some(rebind(addr).await);
                    continue;
                };
                tokio::select! {
                    accepted = open.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let state = state.clone();
                        tokio::spawn(pipe(client, target, state));
                    }
                    changed = state.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if !*state.borrow() {
                            listener = None;
                        }
                    }
                }
            }
        });
        Outage { addr, up }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn down(&self) {
        self.up.send_replace(false);
    }

    fn up(&self) {
        self.up.send_replace(true);
    }
}

async fn rebind(addr: SocketAddr) -> tokio::net::TcpListener {
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Copies bytes both ways until either side closes or the proxy goes down.
async fn pipe(mut client: TcpStream, target: SocketAddr, mut state: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = state.wait_for(|up| !*up) => {}
    }
}

fn socket_addr(endpoint: &str) -> SocketAddr {
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Scenario 1: all three upstream shapes plus hostile payloads through `sluice run` into
/// `s3://` on moto, stopped with SIGTERM; the audit accounts for every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn shapes_and_hostile_payloads_land_on_s3_exactly_once() {
    // As a user would: `sluice produce` creates the default topics and publishes, then
    // `sluice run` drains them.
    let s = Scenario::with_topics("shapes", |shape| shape.default_topic().to_string());
    let mut producer = Proc::spawn(
        "shapes-produce",
        &s.servers.logs,
        Command::new(env!("CARGO_BIN_EXE_sluice")).args([
            "produce",
            "--brokers",
            &s.access.brokers,
            "--count",
            "6000",
            "--rate",
            "0",
            "--bad-every",
            &BAD_EVERY.to_string(),
            "--embedding-dim",
            "64",
            "--partitions",
            &PARTITIONS.to_string(),
            "--seed",
            &s.servers.seed.to_string(),
        ]),
    );
    let status = producer.child.wait().unwrap();
    let output = std::fs::read_to_string(&producer.log).unwrap();
    assert!(status.success(), "sluice produce failed:\n{output}");
    for (_, topic) in &s.topics {
        assert!(
            output.contains(&format!(
                "created topic {topic} with {PARTITIONS} partitions"
            )),
            "sluice produce --partitions created {topic}:\n{output}"
        );
    }
    assert!(output.contains("delivered 6000 messages"), "{output}");

    let config = s.default_config("");
    let writer = s.writer("writer", &config);
    s.wait_audited(&config, 6_000).await;
    assert!(
        writer
            .metric("sluice_dead_letters_total", &[])
            .unwrap_or(0.0)
            >= (6_000 / BAD_EVERY) as f64,
        "every hostile payload is a dead letter"
    );
    writer.stop();
    let audit = s.audit(&config, 6_000);
    assert!(audit.contains("posts.tweets") && audit.contains("posts.bluesky"));
}

/// Scenario 2: the writer is killed with SIGKILL at random moments while producing goes on,
/// and restarted each time; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let mut s = Scenario::new("kill9").await;
    let config = s.default_config("");
    let producer = s.produce(&s.access.brokers.clone(), 24_000, 200);
    let mut after_commits = 0;
    for kill in 0..12 {
        let mut writer = s.writer(&format!("run{kill}"), &config);
        tokio::time::sleep(s.pause(2_000..8_000)).await;
        assert!(
            writer.process.running(),
            "the writer died on its own; log {}",
            writer.process.log.display()
        );
        let commits = writer.metric("sluice_commits_total", &[]).unwrap_or(0.0);
        writer.process.kill9();
        println!(
            "kill {kill}: the writer had made {} commits",
            commits as u64
        );
        if commits > 0.0 {
            after_commits += 1;
        }
        tokio::time::sleep(RESTART_AFTER).await;
    }
    assert!(
        after_commits >= 3,
        "only {after_commits} of 12 kills hit a writer that was committing: the scenario \
         did not kill mid-ingest"
    );
    let writer = s.writer("final", &config);
    let report = producer.await.unwrap();
    s.wait_committed(&config, &report.last_offsets).await;
    writer.stop();
    s.audit(&config, report.delivered);
}

/// Polls `check` every 250 ms until it holds; false if `within` passes first.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    check()
}

/// Scenario 3: the S3 server is unreachable for 20 s mid-ingest. The writer keeps consuming,
/// retries its commits, reports unready while the store is gone and ready once it is back,
/// and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn s3_outage_is_retried_and_shown_by_readiness() {
    let mut s = Scenario::new("s3outage").await;
    let proxy = Outage::start(socket_addr(&s.servers.s3)).await;
    let brokers = s.access.brokers.clone();
    let config = s.config(&brokers, &proxy.endpoint(), "");
    let writer = s.writer("writer", &config);
    let producer = s.produce(&brokers, 36_000, 1_000);
    let ready = |w: &Writer| w.readyz().is_some_and(|(status, _)| status == 200);
    assert!(
        eventually(Duration::from_secs(60), || ready(&writer)).await,
        "the writer never became ready: {:?}",
        writer.readyz()
    );
    tokio::time::sleep(s.pause(3_000..6_000)).await;

    proxy.down();
    let outage = Instant::now();
    let mut unready = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            unready = writer.readyz().filter(|(status, _)| *status == 503);
            unready.is_some()
        })
        .await,
        "readiness did not report the unreachable store: {:?}",
        writer.readyz()
    );
    let (_, body) = unready.unwrap();
    assert!(
        body.contains("FAIL enriched_posts object store")
            || body.contains("FAIL enriched_posts commit"),
        "/readyz names the store problem:\n{body}"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed())).await;
    proxy.up();

    assert!(
        eventually(Duration::from_secs(90), || ready(&writer)).await,
        "the writer did not become ready after the store came back: {:?}",
        writer.readyz()
    );
    let report = producer.await.unwrap();
    s.wait_committed(&config, &report.last_offsets).await;
    assert!(
        writer
            .metric("sluice_object_store_errors_total", &[])
            .unwrap_or(0.0)
            > 0.0,
        "the outage is counted in sluice_object_store_errors_total"
    );
    writer.stop();
    s.audit(&config, report.delivered);
}

/// Scenario 4: a broker of the scenario's own is killed with SIGKILL and restarted twice
/// mid-ingest; the producer and the writer reconnect, and every message the broker holds lands
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn broker_restarts_mid_ingest_lose_nothing() {
    let mut s = Scenario::new("restart").await;
    let broker = tokio::task::block_in_place(|| OwnBroker::start(&s.servers, "restart"));
    s.create_topics(&broker.brokers()).await;
    let config = s.config(&broker.brokers(), &s.servers.s3.clone(), "");
    let writer = s.writer("writer", &config);
    let producer = s.produce(&broker.brokers(), 24_000, 1_000);
    for _ in 0..2 {
        tokio::time::sleep(s.pause(5_000..8_000)).await;
        let down = s.pause(2_000..5_000);
        tokio::task::block_in_place(|| broker.restart(&s.servers, down));
    }
    let report = producer.await.unwrap();
    s.wait_committed(&config, &report.last_offsets).await;
    writer.stop();
    // A producer retrying across the restart may have written a message twice; the audit
    // counts the broker's offsets, so it covers at least every delivery.
    s.audit(&config, report.delivered);
}

/// Scenario 5: two writers in one group share the partitions; one is killed and restarted,
/// with rebalances in between; both end up writing and nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn two_writers_in_one_group_survive_a_kill_and_rebalances() {
    let mut s = Scenario::new("group").await;
    let config = s.default_config("");
    let producer = s.produce(&s.access.brokers.clone(), 30_000, 1_000);
    let mut first = s.writer("a", &config);
    tokio::time::sleep(s.pause(3_000..5_000)).await;
    let second = s.writer("b", &config);
    tokio::time::sleep(s.pause(4_000..7_000)).await;
    assert!(
        first.process.running(),
        "log {}",
        first.process.log.display()
    );
    first.process.kill9();
    tokio::time::sleep(RESTART_AFTER).await;
    let restarted = s.writer("a-restarted", &config);
    let report = producer.await.unwrap();
    s.wait_committed(&config, &report.last_offsets).await;
    for w in [&second, &restarted] {
        let rows = w.metric("sluice_rows_written_total", &[]).unwrap_or(0.0);
        assert!(
            rows > 0.0,
            "{} wrote no rows: the group never gave it partitions; log {}",
            w.process.name,
            w.process.log.display()
        );
    }
    second.stop();
    restarted.stop();
    s.audit(&config, report.delivered);
}

/// Scenario 6: the service compacts in the background while a scheduled `sluice compact`
/// starts against the same table; the lease lets one rewrite at a time, the writer's appends
/// never conflict with the rewrites, and the compacted table still audits clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn compaction_in_the_service_and_a_concurrent_compact_job() {
    let mut s = Scenario::new("compact").await;
    let config = s.default_config("[maintenance]\ninterval_s = 3\nhot_small_files = 4\n");
    let writer = s.writer("writer", &config);
    let producer = s.produce(&s.access.brokers.clone(), 24_000, 1_000);
    let mut outcomes = Vec::new();
    let mut job_compactions = 0;
    for round in 0..3 {
        tokio::time::sleep(s.pause(4_000..7_000)).await;
        let job = |n: usize| {
            Proc::spawn(
                &format!("compact-job-{round}-{n}"),
                &s.servers.logs,
                Command::new(env!("CARGO_BIN_EXE_sluice"))
                    .args(["compact", "--config"])
                    .arg(&config),
            )
        };
        let mut jobs = [job(0), job(1)];
        for j in &mut jobs {
            let status = j.child.wait().unwrap();
            assert!(
                matches!(status.code(), Some(0) | Some(3)),
                "sluice compact failed ({status}); log {}",
                j.log.display()
            );
            outcomes.push(status.code());
            let output = std::fs::read_to_string(&j.log).unwrap();
            job_compactions += output.matches("compacted partition").count();
        }
    }
    let report = producer.await.unwrap();
    s.wait_committed(&config, &report.last_offsets).await;
    let service_compactions = writer
        .metric("sluice_compaction_runs_total", &[("outcome", "compacted")])
        .unwrap_or(0.0);
    writer.stop();
    assert!(
        service_compactions > 0.0 && job_compactions > 0,
        "both the service ({service_compactions} runs) and the jobs ({job_compactions} \
         partitions) compacted while the writer wrote"
    );

    let loaded = s.load(&config);
    let table = open_table(
        &table_location(&loaded.storage.root, "enriched_posts"),
        loaded.storage_options(),
    )
    .await
    .unwrap();
    let history: Vec<_> = table.history(None).try_collect().await.unwrap();
    let rewrites = history
        .iter()
        .filter(|c| c.operation.as_deref() == Some("OPTIMIZE"))
        .count();
    assert!(
        rewrites > 0,
        "no compaction committed (job exit codes {outcomes:?})"
    );
    s.audit(&config, report.delivered);
}

impl Scenario {
    /// Runs a `sluice` command to completion; its stdout and stderr together.
    fn run_sluice(&self, args: &[&str]) -> (ExitStatus, String) {
        let output = self.sluice().args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status, text)
    }

    /// Panics if any secret of the scenario appears in `outputs` or in a log of its processes.
    fn assert_no_secret_in(&self, outputs: &[String]) {
        let mut texts: Vec<(String, String)> = outputs
            .iter()
            .enumerate()
            .map(|(i, o)| (format!("captured output {i}"), o.clone()))
            .collect();
        for entry in std::fs::read_dir(&self.servers.logs).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}-", self.name)) && path.is_file() {
                texts.push((name, std::fs::read_to_string(&path).unwrap_or_default()));
            }
        }
        assert!(
            texts.len() > outputs.len(),
            "scenario {}: no process log to check",
            self.name
        );
        for (var, secret) in &self.access.secrets {
            for (source, text) in &texts {
                assert!(
                    !text.contains(secret.as_str()),
                    "scenario {}: the value of {var} appears in {source}",
                    self.name
                );
            }
        }
    }
}

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Mastodon => "mastodon",
        Shape::Bluesky => "bluesky",
        Shape::Tweets => "tweets",
    }
}

/// Scenario 7: through the TLS listener (client certificate, key with a password) and the
/// SASL_SSL listener (SCRAM-SHA-512, and OAUTHBEARER with tokens from an OIDC issuer), secrets
/// only in `SLUICE_KAFKA__PROPERTIES__*` variables: `sluice produce` creates the topics and publishes, `sluice run` lands every
/// message, `sluice audit` proves it, and no secret appears in any output, log or metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn secured_listeners_carry_produce_run_and_audit_without_leaking_secrets() {
    const PER_TOPIC: u64 = 700;
    for (label, listener) in [
        ("ssl", Listener::Ssl),
        ("scram", Listener::SaslSsl),
        ("oidc", Listener::Oauthbearer),
    ] {
        let name = format!("secured-{label}");
        let base =
            Scenario::with_topics(&name, |shape| format!("{name}.{}", shape.default_topic()));
        let access = Access::to(&base.servers.kafka, listener);
        let s = base.through(access);
        let config = s.default_config("");
        let config_arg = config.display().to_string();
        let mut outputs = Vec::new();
        for (shape, topic) in &s.topics {
            let (status, output) = s.run_sluice(&[
                "produce",
                "--config",
                &config_arg,
                "--shape",
                shape_name(*shape),
                "--topic",
                topic,
                "--count",
                &PER_TOPIC.to_string(),
                "--rate",
                "0",
                "--bad-every",
                &BAD_EVERY.to_string(),
                "--partitions",
                &PARTITIONS.to_string(),
                "--embedding-dim",
                "64",
            ]);
            assert!(status.success(), "{name}: sluice produce failed:\n{output}");
            assert!(
                output.contains(&format!("created topic {topic}"))
                    && output.contains(&format!("delivered {PER_TOPIC} messages")),
                "{name}:\n{output}"
            );
            outputs.push(output);
        }
        let produced = PER_TOPIC * s.topics.len() as u64;
        let writer = s.writer("writer", &config);
        s.wait_audited(&config, produced).await;
        assert!(
            writer
                .readyz()
                .is_some_and(|(status, body)| status == 200
                    && body.contains("ok   enriched_posts assignment")),
            "{name}: {:?}",
            writer.readyz()
        );
        outputs.extend(http_get(writer.metrics, "/metrics").map(|(_, body)| body));
        outputs.extend(writer.readyz().map(|(_, body)| body));
        writer.stop();
        outputs.push(s.audit(&config, produced));
        let (status, checked) = s.run_sluice(&["config", "check", "--config", &config_arg]);
        assert!(status.success(), "{name}: {checked}");
        assert!(checked.contains("<redacted>"), "{name}: {checked}");
        outputs.push(checked);
        s.assert_no_secret_in(&outputs);
    }
}

/// Scenario 8: a wrong SCRAM password, a wrong OIDC client secret, a CA that did not sign the
/// broker's certificate, and a PLAINTEXT client on the TLS listener. `sluice produce` and `sluice audit` stop with one
/// error naming the listener and the cause; `sluice run` logs that error once, keeps retrying,
/// and `/readyz` says why it is not ready. No secret appears anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn misconfigured_clients_stop_with_one_clear_error() {
    let kafka = Servers::from_env().kafka;
    let wrong_password = format!("wrong-{:016x}", rand::random::<u64>());
    let cases = [
        (
            "wrong-password",
            Access::to(&kafka, Listener::SaslSsl)
                .with_secret("SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD", &wrong_password),
            format!(
                "authentication failed at sasl_ssl://{}",
                kafka.get("KAFKA_SASL_SSL")
            ),
            "sasl.password",
        ),
        (
            "wrong-client-secret",
            Access::to(&kafka, Listener::Oauthbearer).with_secret(
                "SLUICE_KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET",
                &wrong_password,
            ),
            format!("authentication failed at {}", kafka.get("KAFKA_SASL_SSL")),
            "sasl.oauthbearer.client.secret",
        ),
        (
            "untrusted-ca",
            Access::to(&kafka, Listener::Ssl)
                .with_property("ssl.ca.location", kafka.get("KAFKA_OTHER_CA")),
            format!("TLS handshake failed at ssl://{}", kafka.get("KAFKA_SSL")),
            "set ssl.ca.location to the CA that signed it",
        ),
        (
            "plaintext-on-tls",
            Access {
                brokers: kafka.get("KAFKA_SSL").into(),
                properties: vec![],
                secrets: vec![],
            },
            format!(
                "the listener does not speak the client's protocol at {}",
                kafka.get("KAFKA_SSL")
            ),
            "set security.protocol",
        ),
    ];
    for (label, access, cause, hint) in cases {
        let name = format!("misconfigured-{label}");
        let s = Scenario::with_topics(&name, |shape| format!("{name}.{}", shape.default_topic()))
            .through(access);
        let config = s.default_config("");
        let config_arg = config.display().to_string();
        let mut outputs = Vec::new();

        let (status, output) = s.run_sluice(&[
            "produce",
            "--config",
            &config_arg,
            "--shape",
            "mastodon",
            "--topic",
            &s.topics[0].1,
            "--count",
            "10",
        ]);
        assert_eq!(status.code(), Some(1), "{name}: produce:\n{output}");
        assert!(
            output.contains(&cause) && output.contains(hint),
            "{name}: produce names the listener and the cause ({cause}; {hint}):\n{output}"
        );
        outputs.push(output);

        let writer = s.writer("writer", &config);
        let mut unready = None;
        let reported = eventually(Duration::from_secs(60), || {
            unready = writer
                .readyz()
                .filter(|(status, body)| *status == 503 && body.contains(&cause));
            unready.is_some()
        })
        .await;
        assert!(
            reported,
            "{name}: /readyz does not say why: {:?}",
            writer.readyz()
        );
        let body = unready.unwrap().1;
        assert!(
            body.contains(&format!("FAIL enriched_posts kafka: {cause}")),
            "{body}"
        );
        outputs.push(body);
        // librdkafka retries; the writer stays up and still says the same.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            writer
                .readyz()
                .is_some_and(|(status, body)| status == 503 && body.contains(&cause)),
            "{name}: {:?}",
            writer.readyz()
        );
        let log = writer.process.log.clone();
        writer.stop();
        let log = std::fs::read_to_string(&log).unwrap();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("\"level\":\"ERROR\""))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{name}: the writer logs the failure once:\n{}",
            errors.join("\n")
        );
        assert!(errors[0].contains(&cause), "{}", errors[0]);

        let (status, output) = s.run_sluice(&["audit", "--config", &config_arg]);
        assert_eq!(status.code(), Some(1), "{name}: audit:\n{output}");
        assert!(output.contains(&cause), "{name}: audit:\n{output}");
        outputs.push(output);
        s.assert_no_secret_in(&outputs);
    }
}

/// Scenario 9: two writers in one group, each stopped with SIGTERM and started again in turn
/// while producing goes on (a rolling restart, as a deployment does it); nothing is lost or
/// duplicated and every stop is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn a_rolling_restart_under_load_loses_and_duplicates_nothing() {
    let mut s = Scenario::new("rolling").await;
    let config = s.default_config("");
    let producer = s.produce(&s.access.brokers.clone(), 30_000, 1_000);
    let mut writers = vec![s.writer("a0", &config), s.writer("b0", &config)];
    for round in 1..=2 {
        for slot in 0..writers.len() {
            tokio::time::sleep(s.pause(3_000..6_000)).await;
            let label = format!("{}{round}", ["a", "b"][slot]);
            let next = s.writer(&label, &config);
            let old = std::mem::replace(&mut writers[slot], next);
            old.stop();
        }
    }
    let report = producer.await.unwrap();
    s.wait_committed(&config, &report.last_offsets).await;
    for w in writers {
        w.stop();
    }
    s.audit(&config, report.delivered);
}

/// A bucket that does not exist stops the writer, the shell and compaction with one line that
/// names the bucket and the fix, not the store's XML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn a_missing_bucket_is_one_line_naming_it_and_the_fix() {
    let s = Scenario::with_topics("missing-bucket", |shape| {
        format!("missing-bucket.{}", shape.default_topic())
    });
    let config = s.default_config("");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("s3://{}/", s.servers.bucket),
        "s3://no-such-bucket/",
    );
    std::fs::write(&config, text).unwrap();
    let config_arg = config.display().to_string();
    let expected = format!(
        "the S3 bucket `no-such-bucket` does not exist at {}; create it (`aws s3 mb`, `mc mb`) \
         or change storage.root",
        s.servers.s3
    );
    for command in [
        &["run", "--config", &config_arg][..],
        &["sql", "--config", &config_arg, "-c", "SELECT 1"],
        &["compact", "--config", &config_arg],
    ] {
        let run = s
            .sluice()
            .args(command)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let output = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{command:?}:\n{output}");
        let errors: Vec<&str> = output.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{command:?}: one error line:\n{output}");
        assert!(
            errors[0].starts_with("error: ") && errors[0].ends_with(&expected),
            "{command:?}:\n{output}"
        );
    }
}

/// Scenario: the schema registry for real. Apicurio Registry (started by scripts/e2e.sh) holds
/// the schemas: `sluice produce` registers them and writes Avro (Bluesky), Protobuf (tweets,
/// subjects by record name) and JSON Schema (Mastodon) in the wire format; a second Avro
/// version with an added field arrives while the writer runs, and a message with an id the
/// registry does not have. Every offset lands exactly once, as a row or a dead letter with
/// its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the servers of scripts/e2e.sh"]
async fn registry_formats_land_exactly_once_through_apicurio() {
    let registry_url = std::env::var("SLUICE_E2E_REGISTRY")
        .expect("SLUICE_E2E_REGISTRY is not set: run the suite with `bash scripts/e2e.sh`");
    let mut s = Scenario::new("registry").await;
    let formats = [
        (Shape::Bluesky, Format::Avro, "topic"),
        (Shape::Tweets, Format::Protobuf, "record"),
        (Shape::Mastodon, Format::JsonSchema, "topic"),
    ];
    let mut produced = 0;
    for (shape, format, strategy) in formats {
        let topic = s
            .topics
            .iter()
            .find(|(sh, _)| *sh == shape)
            .unwrap()
            .1
            .clone();
        s.formats.insert(topic.clone(), format);
        let mut producer = Proc::spawn(
            &format!("registry-produce-{}", format.as_str()),
            &s.servers.logs,
            s.sluice().args([
                "produce",
                "--brokers",
                &s.access.brokers,
                "--shape",
                &format!("{shape:?}").to_lowercase(),
                "--topic",
                &topic,
                "--format",
                format.as_str(),
                "--registry",
                &registry_url,
                "--subject-strategy",
                strategy,
                "--count",
                "1500",
                "--rate",
                "0",
                "--bad-every",
                &BAD_EVERY.to_string(),
                "--embedding-dim",
                "64",
                "--seed",
                &s.servers.seed.to_string(),
            ]),
        );
        let status = producer.child.wait().unwrap();
        let output = std::fs::read_to_string(&producer.log).unwrap();
        assert!(
            status.success(),
            "sluice produce --format {format:?} failed:\n{output}"
        );
        assert!(output.contains("delivered 1500 messages"), "{output}");
        produced += 1500;
    }
    // The writer reaches the registry over HTTPS (its certificate signed by a CA of the
    // test's, given as ca_file) through a proxy that can refuse connections.
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/e2e.sh"))
    };
    let (tls_url, ca_file) = (
        var("SLUICE_E2E_REGISTRY_TLS"),
        var("SLUICE_E2E_REGISTRY_CA"),
    );
    let (registry_addr, api) = tls_url
        .trim_start_matches("https://")
        .split_once('/')
        .expect("the registry URL has the API's path");
    let proxy = Outage::start(registry_addr.parse().unwrap()).await;
    let proxied = format!("https://{}/{api}", proxy.addr);
    let registry_section = format!("[registry]\nurl = \"{proxied}\"\nca_file = \"{ca_file}\"\n");
    let config = s.default_config(&registry_section);
    let writer = s.writer("writer", &config);
    s.wait_audited(&config, produced).await;

    // The registry goes away before the new version's first message arrives.
    proxy.down();

    // A new version with an optional field the table lacks, registered and produced while
    // the writer runs; then a message whose schema id Apicurio does not have.
    let bluesky = s
        .topics
        .iter()
        .find(|(sh, _)| *sh == Shape::Bluesky)
        .unwrap()
        .1
        .clone();
    let registry =
        sluice::ingest::registry::Registry::new(sluice::ingest::registry::RegistrySettings {
            url: registry_url.clone(),
            username: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(10),
        })
        .unwrap();
    let (shipped, record) =
        sluice::tools::wire::shape_schema(Shape::Bluesky, Format::Avro).unwrap();
    let mut v2: serde_json::Value = serde_json::from_str(shipped).unwrap();
    v2["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "client", "type": ["null", "string"], "default": null}));
    let v2 = v2.to_string();
    let v2_id = registry
        .register(
            &format!("{bluesky}-value"),
            sluice::ingest::registry::SchemaKind::Avro,
            &v2,
        )
        .await
        .expect("Apicurio accepts a compatible new version");
    let mut encoder = sluice::tools::wire::WireEncoder::default();
    encoder
        .add(
            &bluesky,
            v2_id,
            sluice::ingest::registry::SchemaKind::Avro,
            &v2,
            record,
        )
        .unwrap();
    // A v2 record cut short: a producer that lost its tail.
    let (_, post) = sluice::tools::generator::Generator::new(1, 64, 1_763_942_400_000, 2)
        .next_value(Shape::Bluesky);
    let mut truncated = encoder.encode(&bluesky, &post.unwrap());
    truncated.truncate(truncated.len() - 4);
    let options = ProduceOptions {
        connection: s.connection(&s.access.brokers),
        shapes: vec![(Shape::Bluesky, bluesky.clone())],
        count: 500,
        rate: 0,
        seed: s.servers.seed.wrapping_add(1),
        embedding_dim: 64,
        bad_every: 0,
        operations_every: 0,
        spread_days: 2,
        clock_ms: None,
        progress: false,
        wire: Some(encoder),
    };
    produce(&options).await.expect("v2 messages delivered");
    produced += 500;
    let waiting = |w: &Writer| {
        w.readyz().is_some_and(|(status, body)| {
            status == 503 && body.contains("schema registry") && body.contains(&proxied)
        })
    };
    assert!(
        eventually(Duration::from_secs(60), || waiting(&writer)).await,
        "/readyz did not name the unreachable registry: {:?}",
        writer.readyz()
    );
    assert_eq!(
        writer
            .metric("sluice_dead_letters_total", &[("reason", "unknown_schema")])
            .unwrap_or(0.0),
        0.0,
        "an outage is not bad input"
    );
    proxy.up();
    let mut unknown = vec![0u8];
    unknown.extend_from_slice(&(v2_id + 100_000).to_be_bytes());
    unknown.extend_from_slice(&[2, b'x']);
    let producer: rdkafka::producer::FutureProducer = s
        .connection(&s.access.brokers)
        .client_config(&[])
        .create()
        .unwrap();
    for (key, payload) in [("unknown-id", &unknown), ("truncated", &truncated)] {
        producer
            .send(
                rdkafka::producer::FutureRecord::<str, [u8]>::to(&bluesky)
                    .key(key)
                    .payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
        produced += 1;
    }
    s.wait_audited(&config, produced).await;
    let ready = writer.readyz().map(|(status, _)| status);
    writer.stop();
    assert_eq!(
        ready,
        Some(200),
        "the writer is ready once the registry answered"
    );

    let ctx = deltalake::datafusion::prelude::SessionContext::new();
    let root = format!("s3://{}/{}", s.servers.bucket, s.name);
    let config = s.load(&config);
    for name in ["enriched_posts", "enriched_posts_dead_letters"] {
        let table = open_table(&table_location(&root, name), config.storage_options())
            .await
            .unwrap();
        sluice::table::delta::register_table(&ctx, name, &table)
            .await
            .unwrap();
    }
    let count = |sql: String| {
        let ctx = ctx.clone();
        async move {
            let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            batches[0]
                .column(0)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        }
    };
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM enriched_posts_dead_letters WHERE kafka_topic = '{bluesky}' \
             AND reason = 'unknown_schema'"
        ))
        .await,
        1
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM enriched_posts_dead_letters WHERE kafka_topic = '{bluesky}' \
             AND reason = 'schema_mismatch'"
        ))
        .await,
        1
    );
    // Every platform landed rows through its registry format.
    for platform in ["bluesky", "twitter", "mastodon"] {
        let rows = count(format!(
            "SELECT count(*) FROM enriched_posts WHERE platform = '{platform}'"
        ))
        .await;
        assert!(rows > 1_000, "{platform}: {rows} rows");
    }
    s.audit(&s.default_config(&registry_section), produced);

    // Without the CA, the registry's certificate is refused: an outage that names the cause.
    let untrusted =
        sluice::ingest::registry::Registry::new(sluice::ingest::registry::RegistrySettings {
            url: tls_url.clone(),
            username: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(5),
        })
        .unwrap();
    let lookup = tokio::time::timeout(Duration::from_secs(3), untrusted.schema(v2_id)).await;
    assert!(lookup.is_err(), "an untrusted registry must not answer");
    let outage = untrusted.outage().expect("the refusal is an outage");
    assert!(outage.error.contains("certificate"), "{}", outage.error);
}
