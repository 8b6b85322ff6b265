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
use crate::ingest::decode::Format;
use crate::ingest::kafka::is_secret_key;

use env::apply_env;
pub use env::{ENV_PREFIX, KAFKA_PROPERTIES_ENV, kafka_properties_from_env};
pub use sections::{
    DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_COMMIT_STALL_S, DEFAULT_DECODE_CHUNK, DEFAULT_GROUP_ID,
    DEFAULT_HOT_SMALL_FILES, DEFAULT_LAG_INTERVAL_S, DEFAULT_MAINTENANCE_INTERVAL_S,
    DEFAULT_MAX_DEPTH, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PROBE_INTERVAL_S,
    DEFAULT_REGISTRY_TIMEOUT_MS, DeltaConfig, HealthConfig, IngestConfig, KafkaConfig,
    MaintenanceConfig, MetricsConfig, RegistryConfig, S3Config, SourceConfig, StorageConfig,
    TableConfig,
};

mod env;
mod sections;

/// Longest allowed `metrics.lag_interval_s`: the service drops a gauge from `/metrics` when it
/// has not been set for two minutes, so lag must be measured well within that.
pub const MAX_LAG_INTERVAL_S: u64 = 60;

/// Errors loading configuration. Each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(
        "config file {file}: {source}{}",
        if source.kind() == std::io::ErrorKind::NotFound {
            "; pass the path of an existing config (`sluice demo` writes one to lakehouse/sluice.toml)"
        } else {
            ""
        }
    )]
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
    /// The schema registry of `avro`, `protobuf` and `json-schema` sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryConfig>,
    /// Tables to write, each fed by one or more topics.
    pub tables: Vec<TableConfig>,
}

/// Builds the error for a problem with the contents of `file`.
fn invalid_in(file: &Path) -> impl Fn(String) -> ConfigError + Copy + '_ {
    move |message| ConfigError::Invalid {
        file: file.to_path_buf(),
        message,
    }
}

/// The text of `file`, its TOML with `env`'s `SLUICE_*` overrides applied, and the overrides.
fn read_with_env(
    file: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(String, toml::Table, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Io {
        file: file.to_path_buf(),
        source,
    })?;
    let mut value: toml::Table =
        toml::from_str(&text).map_err(|e| invalid_in(file)(e.to_string()))?;
    let overrides = apply_env(&mut value, env)?;
    Ok((text, value, overrides))
}

/// A relative local `storage.root` starts from the config file's folder `base`.
fn resolve_root(storage: &mut StorageConfig, base: &Path) {
    if !storage.root.contains("://") {
        let root = Path::new(&storage.root);
        if root.is_relative() {
            // components() drops `.` segments, so "." resolves to the folder itself.
            let joined: PathBuf = base.join(root).components().collect();
            storage.root = joined.to_string_lossy().into_owned();
        }
    }
}

/// Where tables live and how they are kept: the `[storage]`, `[delta]` and `[maintenance]` of a
/// config file, with the same environment overrides. What `sluice bench --config` needs; a
/// whole service config is one too (its other sections are not read).
#[derive(Debug, Clone, Deserialize)]
pub struct Lake {
    /// Where tables live.
    pub storage: StorageConfig,
    /// Delta table settings.
    #[serde(default)]
    pub delta: DeltaConfig,
    /// Background compaction and vacuum.
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
}

impl Lake {
    /// Reads the lake settings of `file`, then applies `env` overrides (`SLUICE_STORAGE__ROOT`).
    pub fn load(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Lake, ConfigError> {
        let invalid = invalid_in(file);
        let (_, value, _) = read_with_env(file, env)?;
        let mut lake: Lake = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.to_string().trim_end().to_string()))?;
        lake.delta.validate(&lake.maintenance).map_err(invalid)?;
        resolve_root(&mut lake.storage, file.parent().unwrap_or(Path::new(".")));
        Ok(lake)
    }
}

impl Config {
    /// Loads a config file, applies `SLUICE_*` overrides from `env`, and resolves relative
    /// paths against the file's folder.
    pub fn load(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let invalid = invalid_in(file);
        let (text, value, overrides) = read_with_env(file, env)?;
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
        config
            .delta
            .validate(&config.maintenance)
            .map_err(invalid)?;
        if let Some(problem) = rebalancing_problem(&config.kafka.properties)
            .or_else(|| positioning_problem(&config.kafka.properties))
        {
            return Err(invalid(problem));
        }
        let framed = config
            .tables
            .iter()
            .flat_map(|t| &t.sources)
            .find(|s| s.format != Format::Json);
        if let Some(source) = framed
            && config.registry.is_none()
        {
            return Err(invalid(format!(
                "topic {} has format = \"{}\", which needs a [registry] section with its url",
                source.topic,
                source.format.as_str()
            )));
        }
        let base = file.parent().unwrap_or(Path::new("."));
        for table in &mut config.tables {
            table.schema = base.join(&table.schema);
            for source in &mut table.sources {
                source.mapping = base.join(&source.mapping);
            }
        }
        if let Some(ca_file) = config.registry.as_mut().and_then(|r| r.ca_file.as_mut()) {
            *ca_file = base.join(&*ca_file);
        }
        resolve_root(&mut config.storage, base);
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
        if let Some(password) = copy.registry.as_mut().and_then(|r| r.password.as_mut()) {
            *password = "<redacted>".into();
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
    fn lake_settings_need_only_storage_and_a_service_config_is_one_too() {
        let dir = tempfile::tempdir().unwrap();
        let only = write(
            dir.path(),
            "[storage]\nroot = \"lake\"\n[maintenance]\ninterval_s = 10\nhot_small_files = 8\n",
        );
        let lake = Lake::load(&only, Vec::new()).unwrap();
        assert_eq!(lake.storage.root, dir.path().join("lake").to_string_lossy());
        assert_eq!(
            (
                lake.maintenance.interval_s,
                lake.maintenance.hot_small_files
            ),
            (10, 8)
        );
        assert_eq!(lake.delta.checkpoint_interval, DEFAULT_CHECKPOINT_INTERVAL);
        let env = vec![("SLUICE_STORAGE__ROOT".to_string(), "s3://b/w".to_string())];
        assert_eq!(Lake::load(&only, env).unwrap().storage.root, "s3://b/w");

        let service = write(dir.path(), MINIMAL);
        let lake = Lake::load(&service, Vec::new()).unwrap();
        assert_eq!(lake.maintenance.interval_s, DEFAULT_MAINTENANCE_INTERVAL_S);
        let none = write(dir.path(), "[maintenance]\ninterval_s = 10\n");
        let err = Lake::load(&none, Vec::new()).unwrap_err().to_string();
        assert!(err.contains("storage"), "{err}");
    }

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
    fn tombstones_are_kept_a_week_unless_set_and_never_longer_than_vacuum_keeps_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), MINIMAL);
        let config = Config::load(&file, vec![]).unwrap();
        assert_eq!(config.delta.tombstone_retention_min, 7 * 24 * 60);
        let file = write(
            dir.path(),
            "[storage]\nroot = \"lake\"\n[delta]\ntombstone_retention_min = 10\n",
        );
        assert_eq!(
            Lake::load(&file, vec![])
                .unwrap()
                .delta
                .tombstone_retention_min,
            10
        );
        for (settings, problem) in [
            (
                "[delta]\ntombstone_retention_min = 0\n",
                "delta.tombstone_retention_min must be at least 1",
            ),
            (
                "[delta]\ntombstone_retention_min = 20160\n",
                "is longer than maintenance.vacuum_retention_h (168 h)",
            ),
        ] {
            let file = write(dir.path(), &format!("{MINIMAL}\n{settings}"));
            let err = Config::load(&file, vec![]).unwrap_err().to_string();
            assert!(err.contains(problem), "{err}");
        }
        let file = write(
            dir.path(),
            &format!(
                "{MINIMAL}\n[delta]\ntombstone_retention_min = 20160\n\
                 [maintenance]\nvacuum_retention_h = 336\n"
            ),
        );
        assert!(Config::load(&file, vec![]).is_ok());
    }

    #[test]
    fn the_log_is_kept_thirty_days_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let load =
            |delta: &str| Config::load(&write(dir.path(), &format!("{MINIMAL}\n{delta}")), vec![]);
        assert_eq!(load("").unwrap().delta.log_retention_h, 30 * 24);
        assert_eq!(
            load("[delta]\nlog_retention_h = 48\n")
                .unwrap()
                .delta
                .log_retention_h,
            48
        );
        let err = load("[delta]\nlog_retention_h = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delta.log_retention_h must be at least 1"),
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
