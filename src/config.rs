//! Configuration: a TOML file, overridden by `SLUICE_*` environment variables, overridden by
//! command-line flags.
//!
//! Environment overrides name a key path with double underscores:
//! `SLUICE_KAFKA__BROKERS=host:9092` sets `kafka.brokers`; under `kafka.properties` single
//! underscores become dots (`SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`), so
//! secrets never need to be in a file. Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ingest::batch::BatchLimits;
use crate::ingest::decode::InputLimits;
use crate::ingest::kafka::{Connection, is_secret_key};
use crate::ingest::pipeline::Decoding;
use crate::ingest::source::StartFrom;
use crate::table::delta::DEFAULT_ZSTD_LEVEL;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SLUICE_";
/// Prefix of the environment variables that set librdkafka properties.
pub const KAFKA_PROPERTIES_ENV: &str = "SLUICE_KAFKA__PROPERTIES__";
/// Default consumer group.
pub const DEFAULT_GROUP_ID: &str = "sluice";
/// Default largest accepted message, in bytes; larger messages are rejected unparsed.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Default deepest nesting of JSON objects and arrays; real posts nest a handful of levels.
pub const DEFAULT_MAX_DEPTH: usize = 64;
/// Longest allowed `metrics.lag_interval_s`: the service drops a gauge from `/metrics` when it
/// has not been set for two minutes, so lag must be measured well within that.
pub const MAX_LAG_INTERVAL_S: u64 = 60;
/// Default number of commits between Delta checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 100;
/// Default messages decoded together; bigger chunks amortize decoder setup, smaller ones bound
/// the cost of re-decoding around a bad message.
pub const DEFAULT_DECODE_CHUNK: usize = 4096;

/// Errors loading configuration. Each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {file}: {source}")]
    Io {
        /// Config file path.
        file: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML, or a key is unknown or has the wrong type.
    #[error("config file {file}: {message}")]
    Invalid {
        /// Config file path.
        file: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// An environment override could not be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong.
        message: String,
    },
}

/// Everything `sluice run` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and consumer group.
    pub kafka: KafkaConfig,
    /// Where tables live.
    pub storage: StorageConfig,
    /// When buffered messages are flushed to Delta.
    #[serde(default)]
    pub batch: BatchLimits,
    /// How messages are decoded.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Delta table settings.
    #[serde(default)]
    pub delta: DeltaConfig,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// What `/readyz` demands.
    #[serde(default)]
    pub health: HealthConfig,
    /// Background compaction and vacuum in the service.
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    /// Tables to write, each fed by one or more topics.
    pub tables: Vec<TableConfig>,
}

/// Kafka settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Names the writers: each table's consumer group is `<group_id>.<table>` (so tables fed
    /// by one topic each read all of it), and it is part of the Delta txn app id, so changing
    /// it restarts from the beginning of every topic.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Where to start a partition the table has never seen: `earliest` or `latest`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Extra librdkafka properties (security, timeouts). Secrets belong in the environment.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_group_id() -> String {
    DEFAULT_GROUP_ID.into()
}

impl KafkaConfig {
    /// The consumer group of one table's writers: instances writing the same table split its
    /// partitions, and every table reads all of its topics, whichever other tables read them.
    pub fn consumer_group(&self, table: &str) -> String {
        format!("{}.{table}", self.group_id)
    }

    /// The brokers and properties every client of this cluster is created with.
    pub fn connection(&self) -> Connection {
        Connection {
            brokers: self.brokers.clone(),
            properties: self.properties.clone(),
        }
    }
}

/// Storage settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Root under which each table is a folder: a local path or `s3://bucket/prefix`.
    pub root: String,
    /// S3 / MinIO connection; credentials come only from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` in the environment.
    #[serde(default)]
    pub s3: S3Config,
}

/// S3-compatible object store settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL for MinIO or another S3-compatible store; unset for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region; MinIO accepts any.
    #[serde(default)]
    pub region: Option<String>,
    /// Allow plain HTTP (MinIO in a private network).
    #[serde(default)]
    pub allow_http: bool,
    /// Use virtual-hosted-style requests (`bucket.host`) instead of path style. Path style is
    /// what MinIO expects.
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

/// Decoding settings.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest accepted message in bytes; larger ones are rejected before parsing.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Deepest accepted nesting of JSON objects and arrays; deeper messages are rejected
    /// before parsing.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// Messages decoded together: a partition's buffered messages are handed to a decode
    /// thread when they reach this many, or when all partitions together hold this many.
    #[serde(default = "default_decode_chunk")]
    pub decode_chunk: usize,
    /// Threads decoding in parallel (unset: one per core). Decoding is most of the writer's
    /// CPU; this caps how many cores it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_threads: Option<usize>,
}

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_max_depth() -> usize {
    DEFAULT_MAX_DEPTH
}
fn default_decode_chunk() -> usize {
    DEFAULT_DECODE_CHUNK
}

impl IngestConfig {
    /// How the writer decodes: chunk size and threads (one per core unless configured).
    pub fn decoding(&self) -> Decoding {
        Decoding {
            chunk: self.decode_chunk,
            threads: self.decode_threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }),
        }
    }

    /// The limits checked on raw bytes before parsing.
    pub fn input_limits(&self) -> InputLimits {
        InputLimits {
            max_message_bytes: self.max_message_bytes,
            max_depth: self.max_depth,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
            decode_chunk: DEFAULT_DECODE_CHUNK,
            decode_threads: None,
        }
    }
}

/// Delta table settings.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaConfig {
    /// Write a checkpoint every this many commits, so readers (Trino) never replay long logs.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// zstd level of data files.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

fn default_checkpoint_interval() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL
}
fn default_zstd_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig {
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// Background maintenance: compaction under the table's lease, and vacuum. It runs on its own
/// thread and runtime, so ingestion never waits for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Run maintenance in the service (`sluice compact`/`vacuum` work either way).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between maintenance passes.
    #[serde(default = "default_maintenance_interval")]
    pub interval_s: u64,
    /// Compaction's target file size, MiB.
    #[serde(default = "default_target_size_mb")]
    pub target_size_mb: u64,
    /// Z-order compacted partitions by these columns (empty: plain bin-packing).
    #[serde(default)]
    pub zorder: Vec<String>,
    /// Today's partition, still being written, is compacted only once it has this many small
    /// files; older partitions as soon as they have two.
    #[serde(default = "default_hot_small_files")]
    pub hot_small_files: usize,
    /// Memory budget of one partition's rewrite, MiB; Z-order sorts spill to disk beyond it.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Hours between vacuums (0: never from the service).
    #[serde(default = "default_vacuum_every_h")]
    pub vacuum_every_h: u64,
    /// Vacuum keeps files any version of this many recent hours needs; at least 168.
    #[serde(default = "default_vacuum_retention_h")]
    pub vacuum_retention_h: u64,
}

/// Default seconds between maintenance passes.
pub const DEFAULT_MAINTENANCE_INTERVAL_S: u64 = 300;
/// Default number of small files that makes today's partition worth compacting.
pub const DEFAULT_HOT_SMALL_FILES: usize = 64;

fn default_true() -> bool {
    true
}
fn default_maintenance_interval() -> u64 {
    DEFAULT_MAINTENANCE_INTERVAL_S
}
fn default_target_size_mb() -> u64 {
    crate::table::compact::DEFAULT_TARGET_SIZE / 1024 / 1024
}
fn default_memory_mb() -> u64 {
    (crate::table::compact::DEFAULT_MEMORY_LIMIT / 1024 / 1024) as u64
}
fn default_hot_small_files() -> usize {
    DEFAULT_HOT_SMALL_FILES
}
fn default_vacuum_every_h() -> u64 {
    24
}
fn default_vacuum_retention_h() -> u64 {
    crate::table::maintain::DEFAULT_VACUUM_RETENTION.as_secs() / 3600
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            enabled: true,
            interval_s: default_maintenance_interval(),
            target_size_mb: default_target_size_mb(),
            zorder: Vec::new(),
            hot_small_files: default_hot_small_files(),
            memory_mb: default_memory_mb(),
            vacuum_every_h: default_vacuum_every_h(),
            vacuum_retention_h: default_vacuum_retention_h(),
        }
    }
}

/// Prometheus endpoint settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `/metrics`, `/healthz` and `/readyz` on, e.g. `0.0.0.0:9464`; unset
    /// disables the endpoint (and metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Seconds between consumer-lag measurements (one watermark request per owned partition).
    #[serde(default = "default_lag_interval")]
    pub lag_interval_s: u64,
}

/// Default seconds between consumer-lag measurements.
pub const DEFAULT_LAG_INTERVAL_S: u64 = 10;

fn default_lag_interval() -> u64 {
    DEFAULT_LAG_INTERVAL_S
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            lag_interval_s: DEFAULT_LAG_INTERVAL_S,
        }
    }
}

/// Readiness settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between object-store probes of each table.
    #[serde(default = "default_probe_interval")]
    pub probe_interval_s: u64,
    /// Seconds past `batch.max_age_ms` a buffered message may wait for its commit before
    /// `/readyz` fails.
    #[serde(default = "default_commit_stall")]
    pub commit_stall_s: u64,
}

/// Default seconds between object-store probes.
pub const DEFAULT_PROBE_INTERVAL_S: u64 = 5;
/// Default grace beyond `batch.max_age_ms` before a waiting commit makes the service unready.
pub const DEFAULT_COMMIT_STALL_S: u64 = 60;

fn default_probe_interval() -> u64 {
    DEFAULT_PROBE_INTERVAL_S
}
fn default_commit_stall() -> u64 {
    DEFAULT_COMMIT_STALL_S
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval_s: DEFAULT_PROBE_INTERVAL_S,
            commit_stall_s: DEFAULT_COMMIT_STALL_S,
        }
    }
}

/// One table and the topics that feed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Schema file (relative paths are relative to the config file).
    pub schema: PathBuf,
    /// Topics feeding the table, each with the mapping for its JSON shape.
    pub sources: Vec<SourceConfig>,
    /// Also publish every dead letter to this Kafka topic (at least once; the dead-letter
    /// table stays the exactly-once record). Unset: table only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// One topic feeding a table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Kafka topic.
    pub topic: String,
    /// Mapping file for the topic's JSON shape (relative to the config file).
    pub mapping: PathBuf,
}

impl Config {
    /// Loads a config file, applies `SLUICE_*` overrides from `env`, and resolves relative
    /// paths against the file's folder.
    pub fn load(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            message,
        };
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let overrides = apply_env(&mut value, env)?;
        let mut config: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    if overrides.is_empty() {
                        // Parsing the text itself points at the line and the key.
                        let spanned = toml::from_str::<Config>(&text).err().unwrap_or(e);
                        invalid(spanned.to_string())
                    } else {
                        invalid(format!(
                            "{} (with environment overrides {})",
                            e.to_string().trim_end(),
                            overrides.join(", ")
                        ))
                    }
                })?;
        config.batch.validate().map_err(invalid)?;
        if config.tables.is_empty() {
            return Err(invalid(
                "`tables` is empty: configure at least one table".into(),
            ));
        }
        if config.ingest.decode_chunk == 0 {
            return Err(invalid("ingest.decode_chunk must be at least 1".into()));
        }
        if config.ingest.decode_threads == Some(0) {
            return Err(invalid("ingest.decode_threads must be at least 1".into()));
        }
        if let Some(listen) = &config.metrics.listen {
            listen.parse::<std::net::SocketAddr>().map_err(|e| {
                invalid(format!("metrics.listen `{listen}` is not an address: {e}"))
            })?;
        }
        if config.health.probe_interval_s == 0 {
            return Err(invalid("health.probe_interval_s must be at least 1".into()));
        }
        let max_lag = MAX_LAG_INTERVAL_S;
        if !(1..=max_lag).contains(&config.metrics.lag_interval_s) {
            return Err(invalid(format!(
                "metrics.lag_interval_s must be between 1 and {max_lag}"
            )));
        }
        if config.delta.checkpoint_interval == 0 {
            return Err(invalid(
                "delta.checkpoint_interval must be at least 1".into(),
            ));
        }
        if let Some(problem) = rebalancing_problem(&config.kafka.properties)
            .or_else(|| positioning_problem(&config.kafka.properties))
        {
            return Err(invalid(problem));
        }
        let base = file.parent().unwrap_or(Path::new("."));
        for table in &mut config.tables {
            table.schema = base.join(&table.schema);
            for source in &mut table.sources {
                source.mapping = base.join(&source.mapping);
            }
        }
        if !config.storage.root.contains("://") {
            let root = Path::new(&config.storage.root);
            if root.is_relative() {
                // components() drops `.` segments, so "." resolves to the folder itself.
                let joined: PathBuf = base.join(root).components().collect();
                config.storage.root = joined.to_string_lossy().into_owned();
            }
        }
        Ok(config)
    }

    /// Storage options passed to delta-rs for the configured root.
    pub fn storage_options(&self) -> std::collections::HashMap<String, String> {
        let mut options = std::collections::HashMap::new();
        let s3 = &self.storage.s3;
        if let Some(endpoint) = &s3.endpoint {
            options.insert("AWS_ENDPOINT_URL".into(), endpoint.clone());
        }
        if let Some(region) = &s3.region {
            options.insert("AWS_REGION".into(), region.clone());
        }
        if s3.allow_http {
            options.insert("AWS_ALLOW_HTTP".into(), "true".into());
        }
        options.insert(
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into(),
            s3.virtual_hosted_style.to_string(),
        );
        options
    }

    /// The config as TOML with secrets replaced, safe to log or print.
    pub fn redacted(&self) -> String {
        let mut copy = self.clone();
        for (key, value) in copy.kafka.properties.iter_mut() {
            if is_secret_key(key) {
                *value = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("<unprintable config: {e}>"))
    }
}

/// Why user properties would break the writer's partition ownership, if they do. The writer
/// relies on eager rebalances (every partition is revoked before the next assignment, and
/// each assignment is complete): a cooperative assignor or the KIP-848 consumer protocol hands
/// partitions over incrementally, which its `assign()` would get wrong.
fn rebalancing_problem(properties: &BTreeMap<String, String>) -> Option<String> {
    if let Some(strategy) = properties.get("partition.assignment.strategy")
        && strategy
            .split(',')
            .any(|s| s.trim().eq_ignore_ascii_case("cooperative-sticky"))
    {
        return Some(format!(
            "kafka.properties: partition.assignment.strategy = \"{strategy}\" is incremental; \
             sluice takes partitions in eager rebalances (a revoke precedes every assignment, \
             which its exactly-once ownership relies on): remove the property (sluice sets \
             `range`) or use `range` or `roundrobin`"
        ));
    }
    if let Some(protocol) = properties.get("group.protocol")
        && !protocol.trim().eq_ignore_ascii_case("classic")
    {
        return Some(format!(
            "kafka.properties: group.protocol = \"{protocol}\" rebalances incrementally (KIP-848); \
             sluice needs the classic protocol's eager rebalances: remove the property"
        ));
    }
    None
}

/// Why `properties` would let the consumer move a partition's position behind sluice's back:
/// sluice sets `auto.offset.reset = error` so a position the broker no longer has (retention)
/// or never had (a recreated topic, a failover) is reported and handled, never silently
/// replaced by the log's start or end.
fn positioning_problem(properties: &BTreeMap<String, String>) -> Option<String> {
    let reset = properties.get("auto.offset.reset")?;
    (!reset.trim().eq_ignore_ascii_case("error")).then(|| {
        format!(
            "kafka.properties: auto.offset.reset = \"{reset}\" would jump over messages the table \
             never wrote when its position is out of the broker's range; remove it (sluice reports \
             such positions and records what was lost) and use kafka.start_from for partitions \
             the table has never seen"
        )
    })
}

/// The librdkafka properties that `SLUICE_KAFKA__PROPERTIES__*` variables of `env` set, for
/// commands that reach a cluster without a config file (`sluice produce`, `sluice bench`).
pub fn kafka_properties_from_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut root = toml::Table::new();
    apply_env(
        &mut root,
        env.into_iter()
            .filter(|(k, _)| k.starts_with(KAFKA_PROPERTIES_ENV)),
    )?;
    let properties = root
        .get("kafka")
        .and_then(|k| k.get("properties"))
        .and_then(toml::Value::as_table)
        .map(|t| {
            t.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(properties)
}

/// Applies `SLUICE_*` overrides; returns the names of the variables applied.
fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    let applied = vars.iter().map(|(k, _)| k.clone()).collect();
    for (var, raw) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let mut path: Vec<String> = rest.split("__").map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty key segment".into(),
            });
        }
        if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
            path[2] = path[2].replace('_', ".");
        }
        let is_property = path.len() == 3 && path[1] == "properties";
        let value = if is_property {
            toml::Value::String(raw)
        } else {
            parse_scalar(&raw)
        };
        let (last, parents) = path
            .split_last()
            .expect("split yields at least one segment");
        let mut table = &mut *root;
        for key in parents {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                message: format!("`{key}` is not a table in the config file"),
            })?;
        }
        table.insert(last.clone(), value);
    }
    Ok(applied)
}

/// Reads an environment value as a TOML scalar when it is one (`42`, `true`), else a string.
fn parse_scalar(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let file = dir.join("sluice.toml");
        std::fs::write(&file, text).unwrap();
        file
    }

    const MINIMAL: &str = r#"
[kafka]
brokers = "localhost:9092"
[storage]
root = "lake"
[[tables]]
schema = "schemas/t.toml"
sources = [{ topic = "posts", mapping = "m.toml" }]
"#;

    #[test]
    fn env_overrides_file_and_paths_resolve_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), MINIMAL);
        let env = vec![
            (
                "SLUICE_KAFKA__BROKERS".to_string(),
                "b1:9092,b2:9092".to_string(),
            ),
            ("SLUICE_BATCH__MAX_AGE_MS".to_string(), "2000".to_string()),
            (
                "SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD".to_string(),
                "hunter2".to_string(),
            ),
            (
                "SLUICE_LOG".to_string(),
                "ignored: no double underscore".to_string(),
            ),
        ];
        let config = Config::load(&file, env).unwrap();
        assert_eq!(config.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(config.batch.max_age_ms, 2000);
        assert_eq!(config.kafka.properties["sasl.password"], "hunter2");
        let only_properties = kafka_properties_from_env([
            (
                "SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD".to_string(),
                "hunter2".to_string(),
            ),
            (
                "SLUICE_KAFKA__BROKERS".to_string(),
                "elsewhere:9092".to_string(),
            ),
        ])
        .unwrap();
        assert_eq!(
            only_properties,
            BTreeMap::from([("sasl.password".to_string(), "hunter2".to_string())])
        );
        assert_eq!(config.tables[0].schema, dir.path().join("schemas/t.toml"));
        assert_eq!(
            config.storage.root,
            dir.path().join("lake").to_string_lossy()
        );
        let printed = config.redacted();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn incremental_rebalancing_and_silent_offset_resets_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        for (property, value, words) in [
            (
                "partition.assignment.strategy",
                "cooperative-sticky",
                "eager rebalances",
            ),
            (
                "partition.assignment.strategy",
                "range, cooperative-sticky",
                "eager rebalances",
            ),
            ("group.protocol", "consumer", "KIP-848"),
            ("auto.offset.reset", "earliest", "never wrote"),
            ("auto.offset.reset", "latest", "never wrote"),
        ] {
            let file = write(
                dir.path(),
                &MINIMAL.replace(
                    "[storage]",
                    &format!("[kafka.properties]\n\"{property}\" = \"{value}\"\n[storage]"),
                ),
            );
            let error = Config::load(&file, vec![]).unwrap_err().to_string();
            assert!(
                error.contains(property) && error.contains(words),
                "{property} = {value}: {error}"
            );
        }
        for (property, value) in [
            ("partition.assignment.strategy", "roundrobin"),
            ("group.protocol", "classic"),
            ("auto.offset.reset", "error"),
        ] {
            let file = write(
                dir.path(),
                &MINIMAL.replace(
                    "[storage]",
                    &format!("[kafka.properties]\n\"{property}\" = \"{value}\"\n[storage]"),
                ),
            );
            assert!(Config::load(&file, vec![]).is_ok(), "{property} = {value}");
        }
    }

    #[test]
    fn decode_threads_default_to_the_cores_and_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), MINIMAL);
        let config = Config::load(&file, vec![]).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config.ingest.decoding().threads, cores);
        let file = write(
            dir.path(),
            &format!("{MINIMAL}\n[ingest]\ndecode_threads = 3\n"),
        );
        let config = Config::load(&file, vec![]).unwrap();
        assert_eq!(config.ingest.decoding().threads, 3);
        let file = write(
            dir.path(),
            &format!("{MINIMAL}\n[ingest]\ndecode_threads = 0\n"),
        );
        let err = Config::load(&file, vec![]).unwrap_err().to_string();
        assert!(
            err.contains("ingest.decode_threads must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), &format!("{MINIMAL}\n[batch]\nmax_rowz = 5\n"));
        let err = Config::load(&file, vec![]).unwrap_err().to_string();
        assert!(err.contains("sluice.toml"), "{err}");
        assert!(err.contains("unknown field `max_rowz`"), "{err}");
        assert!(err.contains("line 11"), "the line is named: {err}");

        let file = write(
            dir.path(),
            &format!("{MINIMAL}\n[batch]\nmax_rows = \"many\"\n"),
        );
        let err = Config::load(&file, vec![]).unwrap_err().to_string();
        assert!(
            err.contains("max_rows = \"many\""),
            "the key is shown: {err}"
        );

        let err = Config::load(
            &write(dir.path(), MINIMAL),
            vec![("SLUICE_KAFKA__BROKER".to_string(), "x".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `broker`"), "{err}");
        assert!(
            err.contains("SLUICE_KAFKA__BROKER"),
            "the variable is named: {err}"
        );
    }
}
