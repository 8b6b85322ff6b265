//! The sink: one table's writer. Parquet files encoded as batches arrive, then one commit per
//! flush carrying the files and a `txn` per Kafka partition covered, retried as landed or not by
//! reading the txn versions back.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, Transaction};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, OutputMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use tokio::sync::watch;

use crate::contract::schema::TableSchema;

use super::create::{
    TableSettings, align_properties, create_table, evolve_schema, probe_conditional_put,
};
use super::parquet::parquet_properties;
use super::read::{arrow_schema_of, table_url};
use super::txn::{app_id, log_app_id};
use super::{DeltaError, PartitionKey, PartitionLedger};

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
    /// `None`: commits write checkpoints (every `delta.checkpointInterval` versions). `Some`:
    /// someone else does (the service's checkpoint thread), told of each committed version.
    checkpointer: Option<watch::Sender<i64>>,
}

impl DeltaSink {
    /// Opens the table at `location`, creating it from `schema` when it does not exist.
    pub async fn open_or_create(
        location: &str,
        storage_options: HashMap<String, String>,
        schema: Arc<TableSchema>,
        group_id: &str,
        settings: TableSettings,
    ) -> Result<Self, DeltaError> {
        let name = schema.name.clone();
        let url = table_url(location).map_err(|reason| DeltaError::Location {
            table: name.clone(),
            location: location.to_string(),
            reason,
        })?;
        let delta_err = |operation| {
            let table = name.clone();
            move |source: DeltaTableError| DeltaError::Delta {
                table,
                operation,
                source: source.into(),
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
                match create_table(&table, &schema, &settings).await {
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
        if align_properties(&mut table, &settings)
            .await
            .map_err(delta_err("set table properties"))?
        {
            tracing::info!(
                table = %name,
                checkpoint_interval = settings.checkpoint_interval,
                tombstone_retention_s = settings.tombstone_retention.as_secs(),
                "table properties brought in line with the configuration"
            );
        }
        evolve_schema(&mut table, &schema).await?;
        // The table's own Arrow schema names the Parquet columns as delta-rs writes them
        // (`embedding.list.element`; the schema file's lists say `item`).
        let written = arrow_schema_of(&table).map_err(delta_err("read schema"))?;
        let writer_properties =
            parquet_properties(settings.zstd_level, &written).map_err(|e| DeltaError::Delta {
                table: name.clone(),
                operation: "configure zstd",
                source: DeltaTableError::Generic(e.to_string()).into(),
            })?;
        Ok(DeltaSink {
            table,
            schema,
            writer_properties,
            group_id: group_id.to_string(),
            query_id: format!("sluice-{group_id}-{name}"),
            checkpointer: None,
        })
    }

    /// Leaves checkpoints to whoever holds the receiver of `checkpointer` (the service's
    /// checkpoint thread) instead of the commit path, and sends it each version committed.
    pub fn checkpointed_by(mut self, checkpointer: watch::Sender<i64>) -> Self {
        self.checkpointer = Some(checkpointer);
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

    /// The version of txn `app_id`: progress of maintenance rather than a Kafka position.
    pub async fn progress_version(&self, app_id: &str) -> Result<Option<i64>, DeltaError> {
        super::txn::txn_version(&self.table, app_id)
            .await
            .map_err(|source| self.err("read txn version", source))
    }

    /// Writes `batches` and commits them with txn `app_id` at `version` (see
    /// [`Self::progress_version`]) and `info` as the commit's `sluice` info.
    pub async fn commit_progress(
        &mut self,
        batches: &[RecordBatch],
        app_id: &str,
        version: i64,
        info: serde_json::Value,
    ) -> Result<Committed, DeltaError> {
        let files = self.encode(batches).await?;
        let bytes = files.iter().map(|a| a.size.max(0) as u64).sum();
        let actions: Vec<Action> = files.into_iter().map(Action::Add).collect();
        let files = actions.len();
        let txns = vec![Transaction::new_with_last_update(
            app_id,
            version,
            Some(chrono::Utc::now().timestamp_millis()),
        )];
        let version = self.commit_actions(actions, txns, info, 0).await?;
        Ok(Committed {
            version,
            files,
            bytes,
        })
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
        self.encoding_of(batches)?.finish().await
    }

    /// An [`Encoding`] already fed `batches`, to be finished by the caller.
    pub fn encoding_of(&self, batches: &[RecordBatch]) -> Result<Encoding, DeltaError> {
        let mut encoding = self.start_encoding()?;
        for batch in batches {
            encoding.push(batch.clone());
        }
        Ok(encoding)
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
        let closing = Closing::default();
        let closing_at = closing.clone();
        let task = tokio::spawn(async move {
            let mut writer = writer;
            let err = |operation, source: DeltaTableError| DeltaError::Delta {
                table: name.clone(),
                operation,
                source: source.into(),
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
            closing_at.mark();
            writer.flush().await.map_err(|s| err("upload parquet", s))
        });
        Ok(Encoding {
            sender: Some(sender),
            task,
            closing,
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
            .with_create_checkpoint(self.checkpointer.is_none())
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
                if let Some(checkpointer) = &self.checkpointer {
                    checkpointer.send_replace(version);
                }
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
            source: source.into(),
        }
    }
}

/// Parquet files being written on another task (see [`DeltaSink::start_encoding`]). Dropping
/// it stops the writing; files already uploaded stay unreferenced (vacuum removes them).
pub struct Encoding {
    sender: Option<tokio::sync::mpsc::UnboundedSender<RecordBatch>>,
    task: tokio::task::JoinHandle<Result<Vec<Add>, DeltaError>>,
    closing: Closing,
}

/// When an [`Encoding`] began closing its files (the last rows encoded, the uploads next), as
/// microseconds since the Unix epoch; shared with the encoding task.
#[derive(Debug, Clone, Default)]
pub struct Closing(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl Closing {
    fn mark(&self) {
        let now = chrono::Utc::now().timestamp_micros();
        self.0.store(now, std::sync::atomic::Ordering::Release);
    }

    /// The time, once the encoding began closing its files.
    pub fn get(&self) -> Option<i64> {
        let at = self.0.load(std::sync::atomic::Ordering::Acquire);
        (at != 0).then_some(at)
    }
}

impl Encoding {
    /// A handle on when this encoding begins closing its files.
    pub fn closing(&self) -> Closing {
        self.closing.clone()
    }

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
