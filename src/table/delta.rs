//! Delta: create the table, read back per-partition txn versions, write Parquet and commit.
//!
//! A commit holds the data files of one flush plus one `txn` action per Kafka partition whose
//! messages it covers (version = last offset covered). Those versions are the writer's only
//! source of truth for where to resume.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Fields, Schema, SchemaRef};
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion;
use deltalake::datafusion::catalog::{Session, TableProvider};
use deltalake::datafusion::common::{Constraints, Statistics};
use deltalake::datafusion::logical_expr::{
    Expr, LogicalPlan, TableProviderFilterPushDown, TableType,
};
use deltalake::datafusion::physical_plan::ExecutionPlan;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, MetadataValue, StructField, Transaction};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::errors::ParquetError;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, OutputMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use crate::contract::schema::{TableSchema, type_name};

/// Errors talking to a Delta table, with the table they concern.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// An invariant inside sluice broke; this is a bug.
    #[error("bug: table {table}: {message}")]
    Bug {
        /// Table name.
        table: String,
        /// What broke.
        message: String,
    },
    /// The storage location is not a valid URL or path.
    #[error("table {table}: invalid location {location}: {reason}")]
    Location {
        /// Table name.
        table: String,
        /// The location as configured.
        location: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A delta-rs operation failed (storage, log parsing, commit).
    #[error("table {table}: {operation}: {source}")]
    Delta {
        /// Table name.
        table: String,
        /// What sluice was doing.
        operation: &'static str,
        /// delta-rs' error (boxed: it is large and errors are rare).
        source: Box<DeltaTableError>,
    },
    /// Another writer committed a txn version for one of our partitions since we last read it.
    #[error("table {table}: another writer committed to the same Kafka partitions concurrently")]
    Conflict {
        /// Table name.
        table: String,
    },
    /// The object store does not support put-if-absent, so concurrent commits could overwrite
    /// each other.
    #[error(
        "table {table}: the object store at {location} does not honour conditional writes \
         (If-None-Match: *); refusing to commit, because concurrent writers could overwrite each \
         other's commits. Use MinIO, AWS S3 or another store that supports put-if-absent"
    )]
    UnsafeStore {
        /// Table name.
        table: String,
        /// The location probed.
        location: String,
    },
    /// The existing table's schema is not the one configured.
    #[error(
        "table {table}: the existing table's columns differ from the schema file {file}: {detail}"
    )]
    SchemaMismatch {
        /// Table name.
        table: String,
        /// Schema file.
        file: String,
        /// Which columns differ.
        detail: String,
    },
}

impl DeltaError {
    /// Whether retrying the same operation later may succeed (storage hiccups).
    pub fn is_transient(&self) -> bool {
        match self {
            DeltaError::Delta { source, .. } => matches!(
                source.as_ref(),
                DeltaTableError::ObjectStore { .. }
                    | DeltaTableError::Io { .. }
                    // The kernel reports storage failures while reading the log this way.
                    | DeltaTableError::KernelError(_)
                    | DeltaTableError::Kernel { .. }
                    | DeltaTableError::Transaction {
                        source: TransactionError::ObjectStore { .. }
                            | TransactionError::MaxCommitAttempts(_)
                            | TransactionError::VersionAlreadyExists(_)
                    }
                    | DeltaTableError::VersionAlreadyExists(_)
                    // Uploading a data file failed in the store (the Parquet writer wraps the
                    // store's error); encoding errors are other variants.
                    | DeltaTableError::Parquet {
                        source: ParquetError::External(_)
                    }
            ),
            _ => false,
        }
    }
}

/// The partition identity a txn app id is derived from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// Kafka topic.
    pub topic: Arc<str>,
    /// Kafka partition.
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What one commit covers for one Kafka partition; also written into the commit's info so the
/// ledger (rows + rejected = offsets consumed) can be audited from the log alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLedger {
    /// First offset covered.
    pub first_offset: i64,
    /// Last offset covered; becomes the txn version.
    pub last_offset: i64,
    /// Messages that became rows.
    pub rows: u64,
    /// Messages that were rejected.
    pub rejected: u64,
}

/// A successful commit.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The table version created.
    pub version: i64,
    /// Data files added.
    pub files: usize,
    /// Bytes of data files added.
    pub bytes: u64,
}

/// One Delta table as the writer sees it.
pub struct DeltaSink {
    table: DeltaTable,
    schema: Arc<TableSchema>,
    writer_properties: WriterProperties,
    group_id: String,
    query_id: String,
    /// Whether commits write checkpoints (every `delta.checkpointInterval` versions). Off when
    /// the service's maintenance thread writes them instead, off the commit path.
    checkpoints_on_commit: bool,
}

impl DeltaSink {
    /// Opens the table at `location`, creating it from `schema` when it does not exist.
    pub async fn open_or_create(
        location: &str,
        storage_options: HashMap<String, String>,
        schema: Arc<TableSchema>,
        group_id: &str,
        checkpoint_interval: u64,
        zstd_level: i32,
    ) -> Result<Self, DeltaError> {
        let name = schema.name.clone();
        let url = table_url(location).map_err(|reason| DeltaError::Location {
            table: name.clone(),
            location: location.to_string(),
            reason,
        })?;
        let delta_err = |operation| {
            let table = name.clone();
            move |source| DeltaError::Delta {
                table,
                operation,
                source: Box::new(source),
            }
        };
        let mut table = DeltaTableBuilder::from_url(url.clone())
            .map_err(delta_err("open"))?
            .with_storage_options(storage_options)
            .build()
            .map_err(delta_err("open"))?;
        if url.scheme() != "file" {
            probe_conditional_put(&table, &name, location).await?;
        }
        match table.load().await {
            Ok(()) => {}
            Err(DeltaTableError::NotATable(_)) => {
                match create_table(&table, &schema, checkpoint_interval).await {
                    Ok(created) => {
                        table = created;
                        tracing::info!(table = %name, location, "created Delta table");
                    }
                    // Another instance of the group, started at the same moment, created it
                    // between our load and our create: use theirs.
                    Err(e) => match table.load().await {
                        Ok(()) => tracing::info!(
                            table = %name,
                            location,
                            "another writer created the table first; using it"
                        ),
                        Err(_) => return Err(delta_err("create")(e)),
                    },
                }
            }
            Err(e) => return Err(delta_err("load")(e)),
        }
        evolve_schema(&mut table, &schema).await?;
        // The table's own Arrow schema names the Parquet columns as delta-rs writes them
        // (`embedding.list.element`; the schema file's lists say `item`).
        let written = arrow_schema_of(&table).map_err(delta_err("read schema"))?;
        let writer_properties =
            parquet_properties(zstd_level, &written).map_err(|e| DeltaError::Delta {
                table: name.clone(),
                operation: "configure zstd",
                source: Box::new(DeltaTableError::Generic(e.to_string())),
            })?;
        Ok(DeltaSink {
            table,
            schema,
            writer_properties,
            group_id: group_id.to_string(),
            query_id: format!("sluice-{group_id}-{name}"),
            checkpoints_on_commit: true,
        })
    }

    /// Leaves checkpoints to someone else (the maintenance thread) instead of the commit path.
    pub fn without_checkpoints(mut self) -> Self {
        self.checkpoints_on_commit = false;
        self
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.schema.name
    }

    /// The table's definition.
    pub fn schema(&self) -> &TableSchema {
        &self.schema
    }

    /// The delta-rs table at its last read version.
    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    /// The txn app id for a Kafka partition (see [`app_id`]).
    pub fn app_id(&self, key: &PartitionKey) -> String {
        app_id(&self.group_id, key)
    }

    /// Current table version.
    pub fn version(&self) -> i64 {
        self.table.version().map_or(-1, |v| v as i64)
    }

    /// Catches up with commits made by others since the last read.
    pub async fn refresh(&mut self) -> Result<(), DeltaError> {
        self.table
            .update_incremental(None)
            .await
            .map_err(|source| self.err("refresh", source))
    }

    /// The last offset committed for a partition, as recorded in the table.
    pub async fn txn_version(&self, key: &PartitionKey) -> Result<Option<i64>, DeltaError> {
        let snapshot = self.table.snapshot().map_err(|s| self.err("snapshot", s))?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), self.app_id(key))
            .await
            .map_err(|source| self.err("read txn version", source))
    }

    /// Writes `batches` as Parquet (one file per partition value) and commits them together with
    /// one txn per entry of `ledger`. A concurrent commit touching the same partitions returns
    /// [`DeltaError::Conflict`] and leaves the files unreferenced.
    pub async fn commit(
        &mut self,
        batches: &[RecordBatch],
        ledger: &[(PartitionKey, PartitionLedger)],
        epoch: i64,
    ) -> Result<Committed, DeltaError> {
        let files = self.encode(batches).await?;
        self.commit_files(files, ledger, epoch).await
    }

    /// Writes `batches` as Parquet files (one per partition value) that no version references
    /// yet.
    pub async fn encode(&self, batches: &[RecordBatch]) -> Result<Vec<Add>, DeltaError> {
        let mut encoding = self.start_encoding()?;
        for batch in batches {
            encoding.push(batch.clone());
        }
        encoding.finish().await
    }

    /// Starts writing Parquet files on another task, fed batch by batch while the caller goes
    /// on (decoding the next messages); [`Encoding::finish`] returns the files.
    pub fn start_encoding(&self) -> Result<Encoding, DeltaError> {
        let writer = RecordBatchWriter::for_table(&self.table)
            .map_err(|s| self.err("open writer", s))?
            .with_writer_properties(self.writer_properties.clone());
        let table_schema = arrow_schema_of(&self.table).map_err(|s| self.err("snapshot", s))?;
        let (sender, mut batches) = tokio::sync::mpsc::unbounded_channel::<RecordBatch>();
        let name = self.schema.name.clone();
        let task = tokio::spawn(async move {
            let mut writer = writer;
            let err = |operation, source| DeltaError::Delta {
                table: name.clone(),
                operation,
                source: Box::new(source),
            };
            // Decoded batches can be small (a chunk of one of many partitions); the Parquet
            // writer's cost per write is high, so they are gathered into bigger ones first.
            let mut gathered: Vec<RecordBatch> = Vec::new();
            let mut rows = 0;
            let mut open = true;
            while open {
                let next = batches.recv().await;
                open = next.is_some();
                if let Some(batch) = next {
                    rows += batch.num_rows();
                    gathered.push(batch);
                }
                if rows >= ENCODE_ROWS || (!open && rows > 0) {
                    let batch = gather(&name, std::mem::take(&mut gathered))?;
                    rows = 0;
                    let batch = with_added_columns(&name, &batch, &table_schema)?;
                    writer
                        .write(batch)
                        .await
                        .map_err(|s| err("write parquet", s))?;
                }
            }
            writer.flush().await.map_err(|s| err("upload parquet", s))
        });
        Ok(Encoding {
            sender: Some(sender),
            task,
        })
    }

    /// Commits `files` (from [`Self::encode`] or an [`Encoding`]) together with one txn per
    /// entry of `ledger`. A concurrent commit touching the same partitions returns
    /// [`DeltaError::Conflict`] and leaves the files unreferenced.
    #[tracing::instrument(name = "commit", level = "info", skip_all, fields(
        table = %self.schema.name,
        partitions = %ledger.iter().map(|(k, l)| format!("{k}@{}", l.last_offset)).collect::<Vec<_>>().join(","),
        epoch = epoch,
        version = tracing::field::Empty,
    ))]
    pub async fn commit_files(
        &mut self,
        files: Vec<Add>,
        ledger: &[(PartitionKey, PartitionLedger)],
        epoch: i64,
    ) -> Result<Committed, DeltaError> {
        let bytes = files.iter().map(|a| a.size.max(0) as u64).sum();
        let actions: Vec<Action> = files.into_iter().map(Action::Add).collect();
        let files = actions.len();
        let txns: Vec<Transaction> = ledger
            .iter()
            .map(|(key, l)| {
                Transaction::new_with_last_update(
                    self.app_id(key),
                    l.last_offset,
                    Some(chrono::Utc::now().timestamp_millis()),
                )
            })
            .collect();
        let ledger_json: serde_json::Map<String, serde_json::Value> = ledger
            .iter()
            .map(|(key, l)| {
                (
                    key.to_string(),
                    serde_json::to_value(l).expect("ledger serializes"),
                )
            })
            .collect();
        let committed = self
            .commit_actions(
                actions,
                txns,
                serde_json::json!({ "ledger": ledger_json }),
                epoch,
            )
            .await?;
        Ok(Committed {
            version: committed,
            files,
            bytes,
        })
    }

    /// Moves `key`'s position to `position` (`new start - 1`) and records when its new log was
    /// accepted (`at_us`, µs since the epoch), after the broker's log of the partition went
    /// backwards (see `sluice accept-log`). Returns the new table version.
    pub async fn accept_log(
        &mut self,
        key: &PartitionKey,
        position: i64,
        at_us: i64,
    ) -> Result<i64, DeltaError> {
        let now = Some(chrono::Utc::now().timestamp_millis());
        let txns = vec![
            Transaction::new_with_last_update(self.app_id(key), position, now),
            Transaction::new_with_last_update(log_app_id(&self.group_id, key), at_us, now),
        ];
        let info = serde_json::json!({ "accept_log": {
            "partition": key.to_string(), "position": position, "accepted_at_us": at_us } });
        self.commit_actions(Vec::new(), txns, info, 0).await
    }

    /// Commits `actions` with `txns`, `sluice` commit info and the streaming operation.
    async fn commit_actions(
        &mut self,
        actions: Vec<Action>,
        txns: Vec<Transaction>,
        info: serde_json::Value,
        epoch: i64,
    ) -> Result<i64, DeltaError> {
        let properties = CommitProperties::default()
            .with_application_transactions(txns)
            .with_metadata([("sluice".to_string(), info)])
            .with_create_checkpoint(self.checkpoints_on_commit)
            .with_cleanup_expired_logs(Some(false));
        let operation = DeltaOperation::StreamingUpdate {
            output_mode: OutputMode::Append,
            query_id: self.query_id.clone(),
            epoch_id: epoch,
        };
        let snapshot = self.table.snapshot().map_err(|s| self.err("snapshot", s))?;
        let result = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await;
        match result {
            Ok(finalized) => {
                let version = finalized.version() as i64;
                tracing::Span::current().record("version", version);
                self.table.state = Some(finalized.snapshot());
                Ok(version)
            }
            Err(DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_),
            }) => Err(DeltaError::Conflict {
                table: self.schema.name.clone(),
            }),
            Err(source) => Err(self.err("commit", source)),
        }
    }

    fn err(&self, operation: &'static str, source: DeltaTableError) -> DeltaError {
        DeltaError::Delta {
            table: self.schema.name.clone(),
            operation,
            source: Box::new(source),
        }
    }
}

/// Parquet files being written on another task (see [`DeltaSink::start_encoding`]). Dropping
/// it stops the writing; files already uploaded stay unreferenced (vacuum removes them).
pub struct Encoding {
    sender: Option<tokio::sync::mpsc::UnboundedSender<RecordBatch>>,
    task: tokio::task::JoinHandle<Result<Vec<Add>, DeltaError>>,
}

impl Encoding {
    /// Queues a batch; an encoding error surfaces from [`Encoding::finish`].
    pub fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        if let Some(sender) = &self.sender {
            // A send fails only when the task ended early with an error: `finish` reports it.
            let _ = sender.send(batch);
        }
    }

    /// Waits for every queued batch to be written and returns the files.
    pub async fn finish(mut self) -> Result<Vec<Add>, DeltaError> {
        self.sender = None;
        match (&mut self.task).await {
            Ok(files) => files,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("parquet encoding task cancelled: {e}"),
        }
    }
}

impl Drop for Encoding {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Rows gathered before a write to the Parquet writer.
const ENCODE_ROWS: usize = 8192;

/// One batch of `batches` (all of the table's schema).
fn gather(table: &str, batches: Vec<RecordBatch>) -> Result<RecordBatch, DeltaError> {
    if batches.len() == 1 {
        return Ok(batches.into_iter().next().expect("one batch"));
    }
    let schema = batches[0].schema();
    deltalake::arrow::compute::concat_batches(&schema, &batches).map_err(|e| DeltaError::Bug {
        table: table.to_string(),
        message: format!("decoded batches of one table differ in schema: {e}"),
    })
}

/// Fills columns another instance added to the table since this writer started (a rolling
/// upgrade to a newer schema file) with nulls, as additive evolution promises readers.
fn with_added_columns(
    table: &str,
    batch: &RecordBatch,
    table_schema: &deltalake::arrow::datatypes::SchemaRef,
) -> Result<RecordBatch, DeltaError> {
    let added: Vec<_> = table_schema
        .fields()
        .iter()
        .filter(|f| batch.schema().field_with_name(f.name()).is_err())
        .collect();
    if added.is_empty() {
        return Ok(batch.clone());
    }
    tracing::warn!(table, columns = ?added.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "the table gained columns since this writer started; writing them as null until it restarts with the new schema file");
    let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
    let mut columns = batch.columns().to_vec();
    for field in added {
        fields.push(field.clone());
        columns.push(deltalake::arrow::array::new_null_array(
            field.data_type(),
            batch.num_rows(),
        ));
    }
    let schema = Arc::new(deltalake::arrow::datatypes::Schema::new(fields));
    RecordBatch::try_new(schema, columns).map_err(|e| DeltaError::Bug {
        table: table.to_string(),
        message: format!("cannot null-fill added columns: {e}"),
    })
}

/// The txn app id for a Kafka partition: group, topic and partition, so two groups writing one
/// table keep separate positions.
pub fn app_id(group_id: &str, key: &PartitionKey) -> String {
    format!("sluice-{group_id}-{}-{}", key.topic, key.partition)
}

/// The txn app id recording when a new log of a partition was accepted (`sluice accept-log`);
/// its version is that moment in µs since the epoch. Rows of the partition ingested before it
/// belong to the log that went away.
pub fn log_app_id(group_id: &str, key: &PartitionKey) -> String {
    format!("{}.log", app_id(group_id, key))
}

/// When a new log of `topic`/`partition` was accepted for `group_id` in `table` (µs), if ever.
pub async fn log_accepted_at(
    table: &DeltaTable,
    group_id: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, DeltaTableError> {
    txn_version(table, &log_app_id(group_id, &key_of(topic, partition))).await
}

/// The last offset of `topic`/`partition` that `group_id` committed to `table` (its txn
/// version), as of the table's loaded snapshot.
pub async fn committed_offset(
    table: &DeltaTable,
    group_id: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, DeltaTableError> {
    txn_version(table, &app_id(group_id, &key_of(topic, partition))).await
}

fn key_of(topic: &str, partition: i32) -> PartitionKey {
    PartitionKey {
        topic: Arc::from(topic),
        partition,
    }
}

/// The version of txn `app_id` in `table`'s loaded snapshot.
async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>, DeltaTableError> {
    table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
}

/// Turns a configured location (local path or URL) into a table URL.
pub fn table_url(location: &str) -> Result<Url, String> {
    if location.contains("://") {
        return Url::parse(location).map_err(|e| e.to_string());
    }
    let path = std::path::Path::new(location);
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| e.to_string())?
            .join(path)
    };
    std::fs::create_dir_all(&absolute).map_err(|e| format!("cannot create folder: {e}"))?;
    Url::from_directory_path(&absolute).map_err(|()| "not an absolute path".to_string())
}

/// Opens an existing table at a configured location (local path or URL).
pub async fn open_table(
    location: &str,
    storage_options: HashMap<String, String>,
) -> Result<DeltaTable, DeltaTableError> {
    let url = table_url(location).map_err(DeltaTableError::InvalidTableLocation)?;
    deltalake::open_table_with_storage_options(url, storage_options).await
}

/// Registers a table in a DataFusion session under `name`. The provider reads exactly the files
/// of the table's loaded version (never files compaction already removed).
pub async fn register_table(
    ctx: &SessionContext,
    name: &str,
    table: &DeltaTable,
) -> Result<(), DeltaTableError> {
    table.update_datafusion_session(&ctx.state())?;
    ctx.register_table(name, table_provider(table).await?)?;
    Ok(())
}

/// The table as DataFusion reads it: delta-rs' provider, except that filters on columns with
/// repeated values (lists, maps, and structs holding them: `embedding IS NOT NULL`,
/// `cardinality(entities) > 2`) are evaluated above the scan instead of inside the Parquet
/// reader.
///
/// Pushed into the reader, such a filter decodes its column once per filter and again for the
/// output, because the reader's decoded-column cache skips nested columns; delta-rs also
/// pushes each filter twice (as the scan's predicate and again from the plan's filter). A
/// filter on a 384-float embedding then costs three decodes of 77 million floats per 200,000
/// rows. Above the scan it costs one. Filters on plain columns and on struct fields (one value
/// per row, cheap to decode twice) still reach the reader and the file statistics. When one
/// does, delta-rs turns the reader's filtering on and DataFusion moves the list filter in
/// behind it, so the list column is decoded twice, but only for the rows the other filter
/// kept.
pub async fn table_provider(table: &DeltaTable) -> Result<Arc<dyn TableProvider>, DeltaTableError> {
    Ok(Arc::new(ListFiltersAbove {
        inner: table.table_provider().await?,
    }))
}

/// See [`table_provider`].
#[derive(Debug)]
struct ListFiltersAbove {
    inner: Arc<dyn TableProvider>,
}

impl ListFiltersAbove {
    fn on_repeated_values(&self, filter: &Expr) -> bool {
        let schema = self.inner.schema();
        filter.column_refs().iter().any(|column| {
            schema
                .field_with_name(&column.name)
                .is_ok_and(|field| repeats(field.data_type()))
        })
    }
}

/// Whether a column of this type holds a variable number of values per row.
fn repeats(data_type: &DataType) -> bool {
    match data_type {
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::ListView(_)
        | DataType::LargeListView(_)
        | DataType::Map(..) => true,
        DataType::Struct(fields) => fields.iter().any(|f| repeats(f.data_type())),
        _ => false,
    }
}

#[async_trait::async_trait]
impl TableProvider for ListFiltersAbove {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.inner.constraints()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn get_table_definition(&self) -> Option<&str> {
        self.inner.get_table_definition()
    }

    fn get_logical_plan(&self) -> Option<Cow<'_, LogicalPlan>> {
        self.inner.get_logical_plan()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        // DataFusion hands a scan only the filters it may push: list filters never arrive.
        self.inner.scan(state, projection, filters, limit).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        let mut answers = self.inner.supports_filters_pushdown(filters)?;
        for (answer, filter) in answers.iter_mut().zip(filters) {
            if self.on_repeated_values(filter) {
                *answer = TableProviderFilterPushDown::Unsupported;
            }
        }
        Ok(answers)
    }

    fn statistics(&self) -> Option<Statistics> {
        self.inner.statistics()
    }
}

/// Default zstd level for Parquet files: level 1 encodes several times faster than the default
/// level 3 for a few percent more bytes, and compaction rewrites files anyway.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// How sluice writes Parquet: zstd at `zstd_level`, except vectors (lists of floats, such as
/// embeddings), which are stored plain: model output floats barely compress (zstd saved 8 % on
/// 384-dim embeddings) while decompressing them was a fifth of every scan that reads them, and
/// a dictionary of floats that never repeat is built only to be dropped.
pub fn parquet_properties(
    zstd_level: i32,
    schema: &Schema,
) -> Result<WriterProperties, deltalake::parquet::errors::ParquetError> {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?));
    for path in vector_columns(schema) {
        builder = builder
            .set_column_compression(path.clone(), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(path, false);
    }
    Ok(builder.build())
}

/// The Parquet paths of the float values of every list of floats (vectors), in structs too.
pub fn vector_columns(schema: &Schema) -> Vec<ColumnPath> {
    vector_paths(schema.fields(), &[])
}

fn vector_paths(fields: &Fields, parent: &[String]) -> Vec<ColumnPath> {
    let mut paths = Vec::new();
    for field in fields {
        let mut path = parent.to_vec();
        path.push(field.name().clone());
        match field.data_type() {
            DataType::List(item) | DataType::LargeList(item) if item.data_type().is_floating() => {
                // Parquet's three-level list: <column>.list.<item name>.
                path.extend(["list".to_string(), item.name().clone()]);
                paths.push(ColumnPath::new(path));
            }
            DataType::Struct(children) => paths.extend(vector_paths(children, &path)),
            _ => {}
        }
    }
    paths
}

/// The Arrow schema of the table's loaded version, with the names delta-rs writes to Parquet.
pub fn arrow_schema_of(table: &DeltaTable) -> Result<SchemaRef, DeltaTableError> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// The location of a table under a storage root.
pub fn table_location(root: &str, table: &str) -> String {
    format!("{}/{}", root.trim_end_matches('/'), table)
}

async fn create_table(
    table: &DeltaTable,
    schema: &TableSchema,
    checkpoint_interval: u64,
) -> Result<DeltaTable, DeltaTableError> {
    let arrow = schema.arrow_schema();
    let mut fields = Vec::with_capacity(arrow.fields().len());
    for (field, column) in arrow.fields().iter().zip(&schema.columns) {
        fields.push(delta_field(field, column)?);
    }
    let mut create = table
        .create()
        // A create that finds version 0 taken must fail, not retry as version 1: a second
        // CREATE on top of another instance's table would replace its metadata (a new table id).
        .with_commit_properties(CommitProperties::default().with_max_retries(0))
        .with_table_name(&schema.name)
        .with_columns(fields)
        .with_configuration_property(
            deltalake::TableProperty::CheckpointInterval,
            Some(checkpoint_interval.to_string()),
        )
        // Log cleanup lists the whole _delta_log; maintenance does it, not the commit path.
        .with_configuration_property(
            deltalake::TableProperty::EnableExpiredLogCleanup,
            Some("false"),
        );
    if let Some(description) = &schema.description {
        create = create.with_comment(description);
    }
    if let Some(part) = &schema.partition_column {
        create = create.with_partition_columns([part.clone()]);
    }
    create.await
}

/// Brings the table's columns in line with the schema file: columns added to the file are
/// added to the table (old rows read them as null); a column removed from the file or given
/// another type is refused with what to do instead, never written over.
async fn evolve_schema(table: &mut DeltaTable, schema: &TableSchema) -> Result<(), DeltaError> {
    let expected = schema.arrow_schema();
    let delta_err = |operation, source| DeltaError::Delta {
        table: schema.name.clone(),
        operation,
        source: Box::new(source),
    };
    let existing = arrow_schema_of(table).map_err(|source| delta_err("read schema", source))?;
    let mut problems = Vec::new();
    let mut added = Vec::new();
    for (field, column) in expected.fields().iter().zip(&schema.columns) {
        match existing.field_with_name(field.name()) {
            Err(_) if !column.nullable => problems.push(format!(
                "`{}` is new and declared `nullable = false`, but the table's existing rows have \
                 no value for it; add it as nullable",
                field.name()
            )),
            Err(_) => added.push((field.clone(), column)),
            Ok(f) if !types_match(f.data_type(), field.data_type()) => problems.push(format!(
                "`{}` is `{}` in the table but `{}` in the schema file; a column's type cannot \
                 change in place: restore the old type, or add a column with a new name",
                field.name(),
                type_name(f.data_type()),
                type_name(field.data_type())
            )),
            Ok(_) => {}
        }
    }
    for field in existing.fields() {
        if expected.field_with_name(field.name()).is_err() {
            problems.push(format!(
                "`{}` is in the table but not in the schema file; columns cannot be removed \
                 (readers and old files still have it): put it back, it may stay unmapped",
                field.name()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(DeltaError::SchemaMismatch {
            table: schema.name.clone(),
            file: schema.file.display().to_string(),
            detail: problems.join("; "),
        });
    }
    if added.is_empty() {
        return Ok(());
    }
    let mut fields = Vec::with_capacity(added.len());
    for (field, column) in &added {
        fields.push(delta_field(field, column).map_err(|e| delta_err("add columns", e))?);
    }
    let names: Vec<&str> = added.iter().map(|(f, _)| f.name().as_str()).collect();
    let evolved = table
        .clone()
        .add_columns()
        .with_fields(fields)
        .await
        .map_err(|source| delta_err("add columns", source))?;
    *table = evolved;
    tracing::info!(table = %schema.name, columns = ?names, version = table.version(), "added columns from the schema file");
    Ok(())
}

/// A Delta column for an Arrow field, with the schema file's doc as its comment.
fn delta_field(
    field: &deltalake::arrow::datatypes::Field,
    column: &crate::contract::schema::Column,
) -> Result<StructField, DeltaTableError> {
    let mut f =
        StructField::try_from_arrow(field).map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    if let Some(doc) = &column.doc {
        f = f.with_metadata([("comment", MetadataValue::String(doc.clone()))]);
    }
    Ok(f)
}

/// Compares types ignoring nested field names and nullability, which Delta and Arrow spell
/// differently (`element` vs `item`).
fn types_match(
    a: &deltalake::arrow::datatypes::DataType,
    b: &deltalake::arrow::datatypes::DataType,
) -> bool {
    use deltalake::arrow::datatypes::DataType as T;
    match (a, b) {
        (T::List(x), T::List(y))
        | (T::LargeList(x), T::List(y))
        | (T::List(x), T::LargeList(y)) => types_match(x.data_type(), y.data_type()),
        (T::Struct(x), T::Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(f, g)| f.name() == g.name() && types_match(f.data_type(), g.data_type()))
        }
        (T::Utf8 | T::LargeUtf8 | T::Utf8View, T::Utf8 | T::LargeUtf8 | T::Utf8View) => true,
        _ => a == b,
    }
}

/// Writes a probe object twice with put-if-absent; a store that lets the second write succeed
/// would let two writers claim the same table version.
async fn probe_conditional_put(
    table: &DeltaTable,
    name: &str,
    location: &str,
) -> Result<(), DeltaError> {
    let store = table.object_store();
    let path = object_store::path::Path::from(format!(
        "_delta_log/_sluice_probe_{}",
        uuid::Uuid::new_v4()
    ));
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let io = |source: object_store::Error| DeltaError::Delta {
        table: name.to_string(),
        operation: "probe conditional writes",
        source: Box::new(DeltaTableError::from(source)),
    };
    store
        .put_opts(&path, PutPayload::from_static(b"probe"), create())
        .await
        .map_err(io)?;
    let second = store
        .put_opts(&path, PutPayload::from_static(b"probe"), create())
        .await;
    let _ = store.delete(&path).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(io(e)),
        Ok(_) => Err(DeltaError::UnsafeStore {
            table: name.to_string(),
            location: location.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_data_file_upload_is_retried_but_a_bad_encoding_is_not() {
        let delta = |source: ParquetError| DeltaError::Delta {
            table: "t".into(),
            operation: "upload parquet",
            source: Box::new(DeltaTableError::Parquet { source }),
        };
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(delta(ParquetError::External(Box::new(refused))).is_transient());
        assert!(!delta(ParquetError::General("bad page".into())).is_transient());
    }
}
