//! The service: builds one writer per configured table from the config and runs them until
//! shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::{FutureExt, Shared};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, TableConfig};
use crate::contract::mapping::{Mapping, MappingError};
use crate::contract::schema::{SchemaError, TableSchema};
use crate::contract::{dead_letters, deletions};
use crate::ingest::dead_letters::Forwarder;
use crate::ingest::decode::BodyDecoder;
use crate::ingest::pipeline::{Destination, PipelineError, TableWriter};
use crate::ingest::progress::Progress;
use crate::ingest::registry::{Registry, RegistryError};
use crate::ingest::source::{KafkaSource, RebalanceContext, lag_loop};
use crate::service::background::{MaintainedTable, Maintenance, table_settings};
use crate::service::health::{Health, probe_loop};
use crate::table::deletes::KeyedTable;
use crate::table::delta::{DeltaSink, table_location};
use deltalake::logstore::ObjectStoreRef;
use rdkafka::consumer::{Consumer, StreamConsumer};

/// Errors starting or running the service.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A schema file is wrong.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A mapping file is wrong.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A table is misconfigured.
    #[error("table {table}: {reason}")]
    Table {
        /// Table name.
        table: String,
        /// What is wrong.
        reason: String,
    },
    /// A writer stopped with an error.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The `[registry]` settings cannot make a client.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A writer task panicked; this is a bug.
    #[error("bug: writer task for table {table} panicked: {message}")]
    Panicked {
        /// Table name.
        table: String,
        /// Panic message.
        message: String,
    },
}

/// A table's schema and the decoder for each of its topics.
pub struct LoadedTable {
    /// The table definition.
    pub schema: Arc<TableSchema>,
    /// Decoder per topic.
    pub decoders: HashMap<Arc<str>, BodyDecoder>,
    /// With a `key`: the table as maintenance applies its deletes and erasure requests.
    pub keyed: Option<Arc<KeyedTable>>,
}

/// A keyed table as the passes that apply its deletes and erasure requests see it: its
/// locations and each topic's mapping; `None` for a table without a `key`.
pub fn keyed_table(config: &Config, table: &TableConfig) -> Result<Option<KeyedTable>, AppError> {
    let schema = Arc::new(TableSchema::load(&table.schema)?);
    keyed(config, table, &schema)
}

fn keyed(
    config: &Config,
    table: &TableConfig,
    schema: &Arc<TableSchema>,
) -> Result<Option<KeyedTable>, AppError> {
    if schema.key.is_empty() {
        return Ok(None);
    }
    let mut mappings = HashMap::new();
    for source in &table.sources {
        let mapping = Arc::new(Mapping::load(&source.mapping, schema)?);
        mappings.insert(source.topic.clone(), mapping);
    }
    let root = &config.storage.root;
    Ok(Some(KeyedTable {
        schema: schema.clone(),
        location: table_location(root, &schema.name),
        deletions_location: table_location(root, &deletions::table_name(&schema.name)),
        dead_letters_location: table_location(root, &dead_letters::table_name(&schema.name)),
        mappings,
    }))
}

/// The client of the configured schema registry, if there is one; shared by every table.
pub fn registry(config: &Config) -> Result<Option<Arc<Registry>>, AppError> {
    match &config.registry {
        None => Ok(None),
        Some(r) => Ok(Some(Registry::new(r.settings())?)),
    }
}

/// Reads and cross-checks a table's schema and mappings; sources in a registry format look
/// their schemas up in `registry`.
pub fn load_table(
    config: &Config,
    table: &TableConfig,
    registry: Option<&Arc<Registry>>,
) -> Result<LoadedTable, AppError> {
    let schema = Arc::new(TableSchema::load(&table.schema)?);
    if table.sources.is_empty() {
        return Err(AppError::Table {
            table: schema.name.clone(),
            reason: "no sources: configure at least one topic".into(),
        });
    }
    let mut decoders = HashMap::new();
    for source in &table.sources {
        let mapping = Arc::new(Mapping::load(&source.mapping, &schema)?);
        let registry = match source.format.schema_kind() {
            None => None,
            Some(_) => Some(registry.cloned().ok_or_else(|| AppError::Table {
                table: schema.name.clone(),
                reason: format!(
                    "topic {} has format = \"{}\", which needs a [registry] section",
                    source.topic,
                    source.format.as_str()
                ),
            })?),
        };
        let decoder = BodyDecoder::new(schema.clone(), mapping, config.ingest.input_limits())
            .with_format(source.format, registry);
        if decoders
            .insert(Arc::from(source.topic.as_str()), decoder)
            .is_some()
        {
            return Err(AppError::Table {
                table: schema.name.clone(),
                reason: format!("topic {} is listed twice", source.topic),
            });
        }
    }
    let keyed = keyed(config, table, &schema)?.map(Arc::new);
    Ok(LoadedTable {
        schema,
        decoders,
        keyed,
    })
}

/// A running writer and its progress feed.
pub struct RunningTable {
    /// Table name.
    pub name: String,
    /// Updated after every commit.
    pub progress: watch::Receiver<Progress>,
    /// Resolves when the writer stops.
    pub task: JoinHandle<Result<Progress, PipelineError>>,
    /// The writer's consumer, for lag measurements beside it.
    pub consumer: Arc<StreamConsumer<RebalanceContext>>,
    /// The table's object store, for reachability probes.
    pub store: ObjectStoreRef,
    /// The schema registry its sources read schemas from, if any.
    pub registry: Option<Arc<Registry>>,
}

/// Checks everything `sluice run` would read before touching Kafka or storage: every schema
/// and mapping file, and that `maintenance.zorder` names columns of every table. Returns the
/// table names.
pub fn check(config: &Config) -> Result<Vec<String>, AppError> {
    let mut names = Vec::new();
    let registry = registry(config)?;
    for table in &config.tables {
        let loaded = load_table(config, table, registry.as_ref())?;
        for column in &config.maintenance.zorder {
            if !loaded.schema.columns.iter().any(|c| &c.name == column) {
                return Err(AppError::Table {
                    table: loaded.schema.name.clone(),
                    reason: format!(
                        "maintenance.zorder names `{column}`, which is not a column of the table"
                    ),
                });
            }
        }
        if names.contains(&loaded.schema.name) {
            return Err(AppError::Table {
                table: loaded.schema.name.clone(),
                reason: "two configured tables have this name".into(),
            });
        }
        names.push(loaded.schema.name.clone());
    }
    Ok(names)
}

/// Opens (creating them when absent) a table and its dead-letter table, both recording
/// positions under the configured group's txn app ids; creates a keyed table's deletions
/// table too.
pub async fn open_sinks(
    config: &Config,
    schema: &Arc<TableSchema>,
) -> Result<(DeltaSink, DeltaSink), AppError> {
    let open = |location: String, schema: Arc<TableSchema>| async move {
        DeltaSink::open_or_create(
            &location,
            config.storage_options(),
            schema,
            &config.kafka.group_id,
            table_settings(&config.delta),
        )
        .await
        .map_err(|e| AppError::from(PipelineError::from(e)))
    };
    let table = open(
        table_location(&config.storage.root, &schema.name),
        schema.clone(),
    )
    .await?;
    let dead_letter_schema = Arc::new(dead_letters::schema(&schema.name)?);
    let dead_letters = open(
        table_location(&config.storage.root, &dead_letter_schema.name),
        dead_letter_schema,
    )
    .await?;
    // A keyed table's deletions table exists from the start, so Trino and `sluice sql` can
    // register it before maintenance first records anything in it.
    if !schema.key.is_empty() {
        let deletions_schema = Arc::new(deletions::schema(schema)?);
        open(
            table_location(&config.storage.root, &deletions_schema.name),
            deletions_schema,
        )
        .await?;
    }
    Ok((table, dead_letters))
}

/// Opens every table, subscribes its consumer and starts its writer task. Writers stop when
/// `shutdown` resolves, after committing what they buffered. Commits write checkpoints.
pub async fn start(
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Vec<RunningTable>, AppError> {
    let (running, _) = start_writers(config, shutdown, false).await?;
    Ok(running)
}

/// [`start`]; with `maintained`, commits write no checkpoints and tell the returned
/// [`MaintainedTable`]s each version instead (two per table: it and its dead letters).
async fn start_writers(
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    maintained: bool,
) -> Result<(Vec<RunningTable>, Vec<MaintainedTable>), AppError> {
    let shutdown: Shared<_> = shutdown.boxed().shared();
    let registry = registry(config)?;
    if let Some(registry) = &registry {
        // Lookups waiting for an unreachable registry give up when the service stops.
        let (registry, stop) = (registry.clone(), shutdown.clone());
        tokio::spawn(async move {
            stop.await;
            registry.close();
        });
    }
    let mut loaded = Vec::new();
    for table in &config.tables {
        loaded.push((load_table(config, table, registry.as_ref())?, table));
    }
    let mut running = Vec::new();
    let mut checkpointed = Vec::new();
    for (table, table_config) in loaded {
        let name = table.schema.name.clone();
        let location = table_location(&config.storage.root, &name);
        let opening = open_sinks(config, &table.schema);
        // Opening a table on an unreachable store retries for minutes; a shutdown then stops
        // the service at once, before anything was consumed.
        let opened = tokio::select! {
            biased;
            () = shutdown.clone() => None,
            opened = opening => Some(opened),
        };
        let Some(opened) = opened else {
            tracing::info!(table = %name, "shutdown requested while opening the table; nothing was consumed");
            return Ok((running, checkpointed));
        };
        let (mut sink, mut dead_letter_sink) = opened?;
        if maintained {
            let (tx, commits) = watch::channel(sink.version());
            sink = sink.checkpointed_by(tx);
            checkpointed.push(MaintainedTable {
                name: name.clone(),
                zorder: true,
                commits,
                keyed: table.keyed.clone(),
            });
            let (tx, commits) = watch::channel(dead_letter_sink.version());
            dead_letter_sink = dead_letter_sink.checkpointed_by(tx);
            checkpointed.push(MaintainedTable {
                name: dead_letters::table_name(&name),
                zorder: false,
                commits,
                keyed: None,
            });
        }
        let topics: Vec<String> = table_config
            .sources
            .iter()
            .map(|s| s.topic.clone())
            .collect();
        let store = sink.table().object_store();
        let (source, events) = KafkaSource::subscribe(
            &config.kafka.connection(),
            &config.kafka.consumer_group(&name),
            config.kafka.start_from,
            &topics,
        )
        .map_err(PipelineError::from)?;
        let consumer = source.receiver();
        let forwarder = match &table_config.dead_letter_topic {
            None => None,
            Some(topic) => Some(
                Forwarder::new(&config.kafka.connection(), topic, &name).map_err(|e| {
                    AppError::Table {
                        table: name.clone(),
                        reason: format!("cannot create the dead-letter topic producer: {e}"),
                    }
                })?,
            ),
        };
        let destination = Destination {
            table: sink,
            dead_letters: dead_letter_sink,
            forwarder,
        };
        let (writer, progress) = TableWriter::new(
            destination,
            source,
            events,
            table.decoders,
            config.batch,
            config.ingest.decoding(),
        );
        tracing::info!(table = %name, location = %location, topics = ?topics, "writer started");
        let stop = shutdown.clone();
        let task = tokio::spawn(writer.run(stop));
        running.push(RunningTable {
            name,
            progress,
            task,
            consumer,
            store,
            registry: registry.clone(),
        });
    }
    Ok((running, checkpointed))
}

/// [`start`] as the service does it: with `maintenance.enabled`, the maintenance threads
/// compact and checkpoint the tables (and their dead letters), and commits write no
/// checkpoints. Stop the threads after the writers.
pub async fn start_maintained(
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Vec<RunningTable>, Option<Maintenance>), AppError> {
    let (running, tables) = start_writers(config, shutdown, config.maintenance.enabled).await?;
    Ok((running, Maintenance::start(config, tables)))
}

/// Runs the service until `shutdown` resolves and every writer has committed its buffer.
/// With `health`, each table's lag is measured and its store probed, and readiness reported
/// there (the telemetry endpoint serves it).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    health: Option<Arc<Health>>,
) -> Result<Vec<Progress>, AppError> {
    check(&config)?;
    // A writer that fails stops the others too: the process then exits with the error, and
    // its supervisor (systemd, Kubernetes) restarts it, instead of a service that looks alive
    // while one table no longer moves.
    let (failed, on_failure) = watch::channel(false);
    let stop = async move {
        let mut on_failure = on_failure;
        tokio::select! {
            () = shutdown => {}
            _ = on_failure.wait_for(|failed| *failed) => {}
        }
    };
    let (running, maintenance) = start_maintained(&config, stop).await?;
    let mut helpers = Vec::new();
    for table in &running {
        if let Some(health) = &health {
            health.register(&table.name, table.progress.clone());
            health.watch_kafka(&table.name, table.consumer.context().watch().clone());
            if let Some(registry) = &table.registry {
                health.watch_registry(registry.clone());
            }
            helpers.push(tokio::spawn(probe_loop(
                health.clone(),
                table.name.clone(),
                table.store.clone(),
                table.progress.clone(),
                Duration::from_secs(config.health.probe_interval_s),
            )));
            helpers.push(tokio::spawn(lag_loop(
                table.name.clone(),
                table.consumer.clone(),
                table.progress.clone(),
                Duration::from_secs(config.metrics.lag_interval_s),
            )));
        }
    }
    let count = running.len();
    let mut results: Vec<Option<Progress>> = vec![None; count];
    let mut first_error = None;
    // As they end, not in table order: a failure is logged the moment it happens.
    let mut ending: futures::stream::FuturesUnordered<_> = running
        .into_iter()
        .enumerate()
        .map(|(index, table)| async move { (index, table.name, table.task.await) })
        .collect();
    while let Some((index, name, ended)) = ending.next().await {
        let error = match ended {
            Ok(Ok(progress)) => {
                results[index] = Some(progress);
                continue;
            }
            Ok(Err(e)) => {
                tracing::error!(table = %name, error = %e, "writer failed; stopping the other writers so that the service exits with the error");
                AppError::Pipeline(e)
            }
            Err(join) => {
                tracing::error!(table = %name, error = %join, "writer task panicked; stopping the other writers so that the service exits with the error");
                AppError::Panicked {
                    table: name,
                    message: join.to_string(),
                }
            }
        };
        failed.send_replace(true);
        first_error.get_or_insert(error);
    }
    let results: Vec<Progress> = results.into_iter().flatten().collect();
    for helper in helpers {
        helper.abort();
    }
    if let Some(m) = maintenance {
        let _ = tokio::task::spawn_blocking(move || m.stop()).await;
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(results),
    }
}
