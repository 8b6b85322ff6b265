//! The configuration's sections, each with its defaults: Kafka, storage, ingest limits, Delta,
//! maintenance, metrics and health.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ingest::decode::{Format, InputLimits};
use crate::ingest::kafka::Connection;
use crate::ingest::pipeline::Decoding;
use crate::ingest::registry::RegistrySettings;
use crate::ingest::source::StartFrom;
use crate::table::delta::DEFAULT_ZSTD_LEVEL;

/// Default consumer group.
pub const DEFAULT_GROUP_ID: &str = "sluice";

/// Default largest accepted message, in bytes; larger messages are rejected unparsed.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Default deepest nesting of JSON objects and arrays; real posts nest a handful of levels.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Default number of commits between Delta checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 100;

/// Default messages decoded together; bigger chunks amortize decoder setup, smaller ones bound
/// the cost of re-decoding around a bad message.
pub const DEFAULT_DECODE_CHUNK: usize = 4096;

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
    /// Minutes checkpoints keep the `remove` tombstones of replaced files (the table's
    /// `delta.deletedFileRetentionDuration`; Delta's default is a week). Every open of the
    /// table reads them, so sub-second tables, whose compaction replaces files all the time,
    /// keep them for minutes. Vacuum keeps the files themselves `vacuum_retention_h` from
    /// when they were written either way.
    #[serde(default = "default_tombstone_retention_min")]
    pub tombstone_retention_min: u64,
    /// Hours commits stay in the log (the table's `delta.logRetentionDuration`; Delta's
    /// default is 30 days): how far back time travel reaches. A sub-second table writes ~3 GB
    /// of commits a day.
    #[serde(default = "default_log_retention_h")]
    pub log_retention_h: u64,
}

impl DeltaConfig {
    /// What is wrong with these settings (and their vacuum retention), naming the key.
    pub fn validate(&self, maintenance: &MaintenanceConfig) -> Result<(), String> {
        if self.checkpoint_interval == 0 {
            return Err("delta.checkpoint_interval must be at least 1".into());
        }
        if self.tombstone_retention_min == 0 {
            return Err("delta.tombstone_retention_min must be at least 1".into());
        }
        if self.log_retention_h == 0 {
            return Err("delta.log_retention_h must be at least 1".into());
        }
        if self.tombstone_retention_min > maintenance.vacuum_retention_h * 60 {
            return Err(format!(
                "delta.tombstone_retention_min ({} min) is longer than \
                 maintenance.vacuum_retention_h ({} h): vacuum refuses a retention shorter \
                 than the table's tombstone retention",
                self.tombstone_retention_min, maintenance.vacuum_retention_h
            ));
        }
        Ok(())
    }
}

fn default_checkpoint_interval() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL
}

/// Delta's default tombstone retention, a week, in minutes.
pub const DEFAULT_TOMBSTONE_RETENTION_MIN: u64 =
    crate::table::delta::DEFAULT_TOMBSTONE_RETENTION.as_secs() / 60;

fn default_tombstone_retention_min() -> u64 {
    DEFAULT_TOMBSTONE_RETENTION_MIN
}

/// Delta's default log retention, 30 days, in hours.
pub const DEFAULT_LOG_RETENTION_H: u64 =
    crate::table::delta::DEFAULT_LOG_RETENTION.as_secs() / 3600;

fn default_log_retention_h() -> u64 {
    DEFAULT_LOG_RETENTION_H
}

fn default_zstd_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig {
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            tombstone_retention_min: DEFAULT_TOMBSTONE_RETENTION_MIN,
            log_retention_h: DEFAULT_LOG_RETENTION_H,
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
    /// Today's partition, still being written, is compacted only once a pass would merge this
    /// many of its small files; older partitions as soon as two.
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
    /// Mapping file for the topic's shape (relative to the config file).
    pub mapping: PathBuf,
    /// How the topic's messages are encoded: `json` (plain, the default), or `avro`,
    /// `protobuf`, `json-schema` in the schema registry's wire format (needs `[registry]`).
    #[serde(default)]
    pub format: Format,
}

/// The schema registry holding the schemas of `avro`, `protobuf` and `json-schema` sources:
/// any Confluent-compatible API (Confluent Schema Registry, Karapace, Redpanda, Apicurio's
/// `/apis/ccompat/v7`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, `http://` or `https://`.
    pub url: String,
    /// HTTP basic authentication user (Confluent Cloud: the API key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// HTTP basic authentication password: set it with `SLUICE_REGISTRY__PASSWORD`, never in
    /// the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// PEM file of the CA that signed the registry's certificate, when the system's trust
    /// store lacks it (relative to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Milliseconds one registry request may take before it is retried.
    #[serde(default = "default_registry_timeout")]
    pub timeout_ms: u64,
}

/// Default milliseconds per registry request.
pub const DEFAULT_REGISTRY_TIMEOUT_MS: u64 = 10_000;

fn default_registry_timeout() -> u64 {
    DEFAULT_REGISTRY_TIMEOUT_MS
}

impl RegistryConfig {
    /// The client settings.
    pub fn settings(&self) -> RegistrySettings {
        RegistrySettings {
            url: self.url.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            ca_file: self.ca_file.clone(),
            timeout: std::time::Duration::from_millis(self.timeout_ms.max(1)),
        }
    }
}
