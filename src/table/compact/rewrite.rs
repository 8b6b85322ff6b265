//! Rewriting one partition: its files read, Z-ordered or concatenated within the memory budget,
//! written near the target size, and committed as a rewrite that removes exactly the files read.

use chrono::Utc;
use deltalake::arrow::array::new_null_array;
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafile::DataFileReader;
use deltalake::datafile::reader::ParquetFileReader;
use deltalake::datafusion::scalar::ScalarValue;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;
use object_store::path::Path as ObjectPath;

use crate::table::delta::arrow_schema_of;

use super::{COMPACTION_APP_ID, CompactError, CompactedPartition, delta_error, partition_column};

/// A partition's small files rewritten into files near the target size: uploaded, not yet
/// committed (see [`commit_rewrite`]).
pub struct Rewrite {
    /// The table as read: the commit is checked against everything committed since.
    table: DeltaTable,
    location: String,
    /// The partition column, `None` for an unpartitioned table.
    column: Option<String>,
    partition: String,
    removes: Vec<Remove>,
    adds: Vec<Add>,
    target_size: u64,
}

impl Rewrite {
    /// Files the rewrite replaces.
    pub fn files_in(&self) -> usize {
        self.removes.len()
    }
}

/// The partition value in a Hive-style data file path (`event_date=2026-11-20/part-...`);
/// `""` for an unpartitioned table.
pub(super) fn partition_of(path: &str) -> String {
    path.split('/')
        .find_map(|segment| segment.split_once('=').map(|(_, v)| v.to_string()))
        .unwrap_or_default()
}

/// Reads the small files of `partition` (below `target_size`; when `tiered`, only the
/// smallest of them, as [`tiered_count`](super::tiered_count) says) and writes their rows into
/// new files near `target_size`, as `properties` say. `None` when fewer than two are chosen.
pub async fn rewrite_partition(
    table: &DeltaTable,
    location: &str,
    partition: &str,
    target_size: u64,
    tiered: bool,
    properties: WriterProperties,
) -> Result<Option<Rewrite>, CompactError> {
    let snapshot = table
        .snapshot()
        .map_err(delta_error(location, "snapshot"))?;
    let mut files: Vec<_> = snapshot
        .log_data()
        .iter()
        .filter(|f| partition_of(&f.path()) == partition && (f.size().max(0) as u64) < target_size)
        .collect();
    if tiered {
        files.sort_by_cached_key(|f| (f.size(), f.path().to_string()));
        let sizes: Vec<u64> = files.iter().map(|f| f.size().max(0) as u64).collect();
        files.truncate(super::tiered_count(&sizes));
    }
    if files.len() < 2 {
        return Ok(None);
    }
    let column = partition_column(table, location)?;
    let schema = arrow_schema_of(table).map_err(delta_error(location, "snapshot"))?;
    let invalid = |reason: String| CompactError::Invalid {
        table: location.to_string(),
        reason,
    };
    let mut writer = RecordBatchWriter::for_table(table)
        .map_err(delta_error(location, "open writer"))?
        .with_writer_properties(properties)
        .with_target_file_size(target_size);
    let reader = ParquetFileReader::new(table.object_store());
    for file in &files {
        let path = file.path().to_string();
        let mut batches = reader
            .read_file(ObjectPath::from(path.as_str()))
            .await
            .map_err(delta_error(location, &format!("read {path}")))?;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(delta_error(location, &format!("read {path}")))?;
            let batch = conform(&batch, &schema, column.as_deref(), partition).map_err(invalid)?;
            writer
                .write(batch)
                .await
                .map_err(delta_error(location, "write parquet"))?;
        }
    }
    let mut adds = writer
        .flush()
        .await
        .map_err(delta_error(location, "upload parquet"))?;
    for add in &mut adds {
        add.data_change = false;
    }
    Ok(Some(Rewrite {
        table: table.clone(),
        location: location.to_string(),
        column,
        partition: partition.to_string(),
        removes: files.iter().map(|f| f.remove_action(false)).collect(),
        adds,
        target_size,
    }))
}

/// Commits a rewrite: its files replace the small ones, `dataChange=false`, with a txn of
/// [`COMPACTION_APP_ID`]. [`CompactError::Concurrent`] when another compaction committed since
/// the rewrite read the table; its files then stay unreferenced (vacuum removes them).
pub async fn commit_rewrite(
    rewrite: Rewrite,
) -> Result<(DeltaTable, CompactedPartition), CompactError> {
    let Rewrite {
        mut table,
        location,
        column,
        partition,
        removes,
        adds,
        target_size,
    } = rewrite;
    let result = CompactedPartition {
        partition: partition.clone(),
        files_removed: removes.len() as u64,
        files_added: adds.len() as u64,
        bytes_removed: removes
            .iter()
            .map(|r| r.size.unwrap_or(0).max(0) as u64)
            .sum(),
        bytes_added: adds.iter().map(|a| a.size.max(0) as u64).sum(),
        version: 0,
        // Bin-packing streams file by file; it never sorts.
        spilled: false,
    };
    let now = Utc::now().timestamp_millis();
    let properties = CommitProperties::default()
        .with_application_transactions(vec![Transaction::new_with_last_update(
            COMPACTION_APP_ID,
            now,
            Some(now),
        )])
        .with_create_checkpoint(false)
        .with_cleanup_expired_logs(Some(false));
    let actions: Vec<Action> = removes
        .into_iter()
        .map(Action::Remove)
        .chain(adds.into_iter().map(Action::Add))
        .collect();
    let operation = DeltaOperation::Optimize {
        predicate: column.map(|c| format!("{c} = '{partition}'")),
        target_size: target_size.min(i64::MAX as u64) as i64,
    };
    let snapshot = table
        .snapshot()
        .map_err(delta_error(&location, "snapshot"))?;
    let committed = CommitBuilder::from(properties)
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await;
    match committed {
        Ok(finalized) => {
            let version = finalized.version() as i64;
            table.state = Some(finalized.snapshot());
            Ok((table, CompactedPartition { version, ..result }))
        }
        Err(DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_),
        }) => Err(CompactError::Concurrent {
            table: location,
            partition,
        }),
        Err(e) => Err(delta_error(
            &location,
            &format!("commit partition {partition}"),
        )(e)),
    }
}

/// `batch`, read from a data file, in the table's current schema: the partition column (not
/// stored in the files) holds `partition`, columns added since the file was written are null.
fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
    column: Option<&str>,
    partition: &str,
) -> Result<RecordBatch, String> {
    let rows = batch.num_rows();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let array = if column == Some(field.name().as_str()) {
            let value = if partition == NULL_PARTITION {
                ScalarValue::try_from(field.data_type())
            } else {
                ScalarValue::try_from_string(partition.to_string(), field.data_type())
            }
            .map_err(|e| format!("partition value {partition}: {e}"))?;
            value
                .to_array_of_size(rows)
                .map_err(|e| format!("partition value {partition}: {e}"))?
        } else {
            match batch.column_by_name(field.name()) {
                Some(a) if a.data_type() == field.data_type() => a.clone(),
                Some(a) => cast(a, field.data_type())
                    .map_err(|e| format!("column {}: {e}", field.name()))?,
                None => new_null_array(field.data_type(), rows),
            }
        };
        columns.push(array);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// How Hive-style paths spell a null partition value.
const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";
