//! Upstream deletes and edits, applied to a keyed table by copy-on-write.
//!
//! The writer records each delete message in the ledger of the commit that covers its offset
//! (exactly once, atomically with the txn versions) and appends every other message as a row.
//! Until a pass of [`apply`] runs, a deleted post is still readable and an edited or redelivered
//! one is there twice. A pass makes the table show what the upstream shows:
//! 1. it reads the deletes recorded in the commits after the version the deletions table has
//!    taken them through (its txn [`progress_app_id`]), up to the version it reads;
//! 2. it finds the rows to remove: every row of a deleted key, whenever it arrived (a deleted
//!    post never comes back, so a delete that arrives before its post still wins), and every
//!    row of a key that is not the key's newest version (`[table] version_by`, then the Kafka
//!    timestamp, partition and offset): edits and redeliveries;
//! 3. it records the new deletes and the removed rows in `<table>_deletions` with its txn moved
//!    to the version read, in one commit;
//! 4. it rewrites the files holding the removed rows without them: one commit removing those
//!    files and adding their rewrites, pruned by partition and by the Kafka offsets' statistics.
//!
//! A crash between 3 and 4 leaves rows recorded as removed that are still there: the next pass
//! finds them again, does not record them twice, and removes them. Passes hold the compaction
//! lease, so a compaction never rewrites the same files meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::compute::{cast, concat_batches};
use deltalake::arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, TimeUnit};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::{DeltaTable, DeltaTableError};

use crate::contract::deletions::{self, DELETE, DELETED, REPLACED};
use crate::contract::schema::{ColumnSource, TableSchema};
use crate::contract::values::UTC;
use crate::table::delta::{
    DeltaError, DeltaSink, TableSettings, arrow_schema_of, log, open_table, parquet_properties,
    register_table,
};
use crate::table::lease::{self, Acquired, LeaseError};

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Who takes the compaction lease.
    pub owner: String,
    /// How long the lease is taken for.
    pub lease_ttl: Duration,
    /// How the deletions table is created, and the zstd level of rewritten files.
    pub settings: TableSettings,
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The main-table version the pass read.
    pub read_version: i64,
    /// Delete messages it recorded.
    pub deletes: u64,
    /// Rows it removed because their post was deleted.
    pub deleted: u64,
    /// Rows it removed because a newer version of their post is in the table.
    pub replaced: u64,
    /// Files it rewrote without those rows.
    pub files_rewritten: u64,
    /// The main-table version of the rewrite, if rows went.
    pub version: Option<i64>,
}

/// Whether a pass ran.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    /// It did.
    Applied(Applied),
    /// A compaction or another pass holds the lease.
    Busy {
        /// The holder.
        owner: String,
        /// When their lease runs out.
        expires_at: DateTime<Utc>,
    },
}

/// Why a pass failed; nothing it did is lost or done twice by the next one.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The table has no key: nothing names the rows a delete removes.
    #[error("table {table} declares no `key`: it takes no deletes")]
    NotKeyed {
        /// Table name.
        table: String,
    },
    /// The table lacks a Kafka provenance column the pass needs.
    #[error("table {table}: the schema has no column with source = \"{source_name}\"")]
    NoProvenance {
        /// Table name.
        table: String,
        /// The missing source.
        source_name: &'static str,
    },
    /// Reading or rewriting the table failed.
    #[error("applying deletes to {table}: {operation}: {source}")]
    Table {
        /// Table name.
        table: String,
        /// What the pass was doing.
        operation: &'static str,
        /// delta-rs' or DataFusion's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The deletions table failed.
    #[error(transparent)]
    Deletions(#[from] DeltaError),
    /// The lease could not be taken or kept.
    #[error("applying deletes to {table}: {source}")]
    Lease {
        /// Table name.
        table: String,
        /// What went wrong.
        source: LeaseError,
    },
}

/// The txn app id of the deletions table whose version is the main-table version its delete
/// records are complete through.
pub fn progress_app_id(main: &str) -> String {
    format!("sluice-apply-{main}")
}

/// The Kafka provenance columns of a schema: topic, partition, offset, timestamp.
fn provenance(schema: &TableSchema) -> Result<[String; 4], ApplyError> {
    let find = |source: ColumnSource, source_name: &'static str| {
        schema
            .source_column(source)
            .map(str::to_string)
            .ok_or(ApplyError::NoProvenance {
                table: schema.name.clone(),
                source_name,
            })
    };
    Ok([
        find(ColumnSource::KafkaTopic, "kafka_topic")?,
        find(ColumnSource::KafkaPartition, "kafka_partition")?,
        find(ColumnSource::KafkaOffset, "kafka_offset")?,
        find(ColumnSource::KafkaTimestamp, "kafka_timestamp")?,
    ])
}

/// One pass over the keyed table at `location` (see the module docs); its deletions table is
/// at `deletions_location`, created on the first pass.
pub async fn apply(
    location: &str,
    deletions_location: &str,
    storage_options: &std::collections::HashMap<String, String>,
    schema: &TableSchema,
    options: &ApplyOptions,
) -> Result<ApplyOutcome, ApplyError> {
    let name = schema.name.clone();
    if schema.key.is_empty() {
        return Err(ApplyError::NotKeyed { table: name });
    }
    let kafka = provenance(schema)?;
    let failed = |operation: &'static str| {
        let table = name.clone();
        move |source: DeltaTableError| ApplyError::Table {
            table,
            operation,
            source: source.into(),
        }
    };
    let main = open_table(location, storage_options.clone())
        .await
        .map_err(failed("open"))?;
    let held = match lease::acquire(
        main.object_store(),
        &options.owner,
        options.lease_ttl,
        Utc::now(),
    )
    .await
    .map_err(|source| ApplyError::Lease {
        table: name.clone(),
        source,
    })? {
        Acquired::Held(lease) => lease,
        Acquired::Busy { owner, expires_at } => {
            return Ok(ApplyOutcome::Busy { owner, expires_at });
        }
    };
    let outcome = pass(
        main,
        deletions_location,
        storage_options,
        schema,
        &kafka,
        options,
    )
    .await;
    let released = held.release().await;
    let applied = outcome?;
    released.map_err(|source| ApplyError::Lease {
        table: name.clone(),
        source,
    })?;
    Ok(ApplyOutcome::Applied(applied))
}

async fn pass(
    main: DeltaTable,
    deletions_location: &str,
    storage_options: &std::collections::HashMap<String, String>,
    schema: &TableSchema,
    kafka: &[String; 4],
    options: &ApplyOptions,
) -> Result<Applied, ApplyError> {
    let name = &schema.name;
    let failed = |operation: &'static str| {
        let table = name.clone();
        move |source: Box<dyn std::error::Error + Send + Sync>| ApplyError::Table {
            table,
            operation,
            source,
        }
    };
    let read_version = main.version().unwrap_or_default() as i64;
    let record_schema =
        deletions::schema(schema).map_err(|e| failed("deletions schema")(e.into()))?;
    let mut sink = DeltaSink::open_or_create(
        deletions_location,
        storage_options.clone(),
        Arc::new(record_schema.clone()),
        "apply",
        options.settings,
    )
    .await?;
    let app_id = progress_app_id(name);
    let through = sink.progress_version(&app_id).await?;
    let new_deletes = log::recorded_deletions(
        &main,
        through.map(|t| t.max(0) as u64),
        Some(read_version as u64),
    )
    .await
    .map_err(|e| failed("read the deletes in the log")(e.into()))?;

    // The SQL below sees the main table as `t`, the deletions recorded so far as `d` and the
    // deletes not recorded yet as `n`; keys compare as text.
    let ctx = SessionContext::new();
    register_table(&ctx, "t", &main)
        .await
        .map_err(|e| failed("read the table")(e.into()))?;
    register_table(&ctx, "d", sink.table())
        .await
        .map_err(|e| failed("read the deletions table")(e.into()))?;
    let fresh =
        fresh_deletes(schema, &new_deletes).map_err(|e| failed("read new deletes")(e.into()))?;
    let fresh_table = MemTable::try_new(fresh.schema(), vec![vec![fresh.clone()]])
        .map_err(|e| failed("read new deletes")(e.into()))?;
    ctx.register_table("n", Arc::new(fresh_table))
        .map_err(|e| failed("read new deletes")(e.into()))?;

    let removals = removals_sql(schema, kafka);
    let removed = ctx
        .sql(&removals)
        .await
        .map_err(|e| failed("find the rows to remove")(e.into()))?
        .collect()
        .await
        .map_err(|e| failed("find the rows to remove")(e.into()))?;
    let removed = if removed.is_empty() {
        None
    } else {
        Some(
            concat_batches(&removed[0].schema(), &removed)
                .map_err(|e| failed("find the rows to remove")(e.into()))?,
        )
    };

    // Step 3: the new deletes and the removals not recorded by an interrupted pass.
    let now = Utc::now().timestamp_micros();
    let records = records(&record_schema, &fresh, removed.as_ref(), now)
        .map_err(|e| failed("build the deletion records")(e.into()))?;
    let mut applied = Applied {
        read_version,
        deletes: new_deletes.len() as u64,
        ..Applied::default()
    };
    if records.num_rows() > 0 || through.is_none_or(|t| t < read_version) {
        let info = serde_json::json!({ "apply": {
            "table": name, "read_version": read_version, "records": records.num_rows() } });
        let batches = if records.num_rows() > 0 {
            vec![records]
        } else {
            Vec::new()
        };
        sink.commit_progress(&batches, &app_id, read_version, info)
            .await?;
    }

    // Step 4: rewrite the files that hold the removed rows.
    let Some(removed) = removed.filter(|r| r.num_rows() > 0) else {
        return Ok(applied);
    };
    let operations = text(&removed, "operation");
    applied.deleted = operations.iter().filter(|o| *o == Some(DELETED)).count() as u64;
    applied.replaced = operations.iter().filter(|o| *o == Some(REPLACED)).count() as u64;
    let predicate = rewrite_predicate(schema, kafka, &removed);
    let written = arrow_schema_of(&main).map_err(|e| failed("read the schema")(e.into()))?;
    let properties = parquet_properties(options.settings.zstd_level, &written)
        .map_err(|e| failed("configure zstd")(e.into()))?;
    let info = serde_json::json!({ "apply": {
        "read_version": read_version, "deleted": applied.deleted, "replaced": applied.replaced } });
    let (table, metrics) = main
        .delete()
        .with_predicate(predicate)
        .with_writer_properties(properties)
        .with_commit_properties(
            CommitProperties::default()
                .with_metadata([("sluice".to_string(), info)])
                .with_cleanup_expired_logs(Some(false)),
        )
        .await
        .map_err(|e| failed("rewrite the files")(e.into()))?;
    let removed_rows = applied.deleted + applied.replaced;
    if metrics
        .num_deleted_rows
        .is_some_and(|n| n as u64 != removed_rows)
    {
        tracing::warn!(table = %name, expected = removed_rows, removed = ?metrics.num_deleted_rows,
            "the rewrite removed another number of rows than were found");
    }
    applied.files_rewritten = metrics.num_removed_files as u64;
    applied.version = table.version().map(|v| v as i64);
    tracing::info!(table = %name, read_version, deletes = applied.deletes, deleted = applied.deleted,
        replaced = applied.replaced, files = applied.files_rewritten, version = ?applied.version,
        "applied deletes and edits");
    metrics::counter!("sluice_rows_removed_total", "table" => name.clone(), "operation" => DELETED)
        .increment(applied.deleted);
    metrics::counter!("sluice_rows_removed_total", "table" => name.clone(), "operation" => REPLACED)
        .increment(applied.replaced);
    Ok(applied)
}

/// The deletes not recorded yet, as a batch: key columns as text, then where each was read.
fn fresh_deletes(
    schema: &TableSchema,
    deletes: &[(
        crate::table::delta::PartitionKey,
        crate::table::delta::Deletion,
    )],
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let mut fields: Vec<Field> = schema
        .key
        .iter()
        .map(|k| Field::new(k, DataType::Utf8, false))
        .collect();
    fields.extend([
        Field::new("kafka_topic", DataType::Utf8, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new(
            "kafka_timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            true,
        ),
    ]);
    let mut columns: Vec<ArrayRef> = (0..schema.key.len())
        .map(|i| {
            Arc::new(StringArray::from_iter_values(
                deletes
                    .iter()
                    .map(|(_, d)| d.key.get(i).map_or("", String::as_str)),
            )) as ArrayRef
        })
        .collect();
    columns.push(Arc::new(StringArray::from_iter_values(
        deletes.iter().map(|(k, _)| &*k.topic),
    )));
    columns.push(Arc::new(Int32Array::from_iter_values(
        deletes.iter().map(|(k, _)| k.partition),
    )));
    columns.push(Arc::new(Int64Array::from_iter_values(
        deletes.iter().map(|(_, d)| d.offset),
    )));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from_iter(
            deletes
                .iter()
                .map(|(_, d)| d.timestamp_ms.map(|ms| ms.saturating_mul(1000))),
        )
        .with_timezone(UTC),
    ));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// A text column of a query result as `Utf8` (DataFusion may hand out `Utf8View`).
fn text(batch: &RecordBatch, name: &str) -> StringArray {
    let column = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("the removals query selects {name}"));
    cast(column, &DataType::Utf8)
        .expect("text casts to Utf8")
        .as_string::<i32>()
        .clone()
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The query finding every row to remove: its key, why (`deleted`, `replaced`), where it was
/// read, what caused it, its partition value, and whether an interrupted pass already recorded
/// it.
fn removals_sql(schema: &TableSchema, kafka: &[String; 4]) -> String {
    let keys: Vec<String> = schema.key.iter().map(|k| quoted(k)).collect();
    let on = |a: &str, b: &str| {
        keys.iter()
            .map(|k| format!("{a}.{k} = {b}.{k}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let key_list = keys.join(", ");
    let mut keyed = String::from("SELECT ");
    for k in &keys {
        let _ = write!(keyed, "CAST({k} AS VARCHAR) AS {k}, ");
    }
    let [topic, partition, offset, timestamp] = kafka.each_ref().map(|c| quoted(c));
    let _ = write!(
        keyed,
        "{topic} AS kafka_topic, {partition} AS kafka_partition, {offset} AS kafka_offset, \
         {timestamp} AS kafka_timestamp, {} AS part",
        schema.partition_column.as_deref().map_or(
            "CAST(NULL AS VARCHAR)".to_string(),
            |p| format!("CAST({} AS VARCHAR)", quoted(p))
        )
    );
    let mut order = String::new();
    for (i, v) in schema.version_by.iter().enumerate() {
        let _ = write!(keyed, ", {} AS v{i}", quoted(v));
        let _ = write!(order, "v{i} DESC NULLS LAST, ");
    }
    order.push_str("kafka_timestamp DESC NULLS LAST, kafka_partition DESC, kafka_offset DESC");
    keyed.push_str(" FROM t");
    let cause = "ORDER BY kafka_topic, kafka_partition, kafka_offset";
    format!(
        "WITH keyed AS ({keyed}), \
         tomb AS (SELECT {key_list}, kafka_topic, kafka_partition, kafka_offset FROM d \
                  WHERE operation = '{DELETE}' \
                  UNION ALL SELECT {key_list}, kafka_topic, kafka_partition, kafka_offset FROM n), \
         cause AS (SELECT {key_list}, first_value(kafka_topic {cause}) AS cause_topic, \
                   first_value(kafka_partition {cause}) AS cause_partition, \
                   first_value(kafka_offset {cause}) AS cause_offset FROM tomb GROUP BY {key_list}), \
         live AS (SELECT keyed.* FROM keyed LEFT ANTI JOIN cause ON {live_on}), \
         dups AS (SELECT {key_list} FROM live GROUP BY {key_list} HAVING count(*) > 1), \
         ranked AS (SELECT live.*, \
                    row_number() OVER (PARTITION BY {live_keys} ORDER BY {order}) AS n, \
                    first_value(kafka_topic) OVER (PARTITION BY {live_keys} ORDER BY {order}) AS cause_topic, \
                    first_value(kafka_partition) OVER (PARTITION BY {live_keys} ORDER BY {order}) AS cause_partition, \
                    first_value(kafka_offset) OVER (PARTITION BY {live_keys} ORDER BY {order}) AS cause_offset \
                    FROM live LEFT SEMI JOIN dups ON {dups_on}), \
         removals AS ( \
           SELECT {keyed_keys}, '{DELETED}' AS operation, keyed.kafka_topic, keyed.kafka_partition, \
                  keyed.kafka_offset, keyed.kafka_timestamp, cause.cause_topic, cause.cause_partition, \
                  cause.cause_offset, keyed.part \
           FROM keyed JOIN cause ON {cause_on} \
           UNION ALL \
           SELECT {key_list}, '{REPLACED}' AS operation, kafka_topic, kafka_partition, kafka_offset, \
                  kafka_timestamp, cause_topic, cause_partition, cause_offset, part \
           FROM ranked WHERE n > 1), \
         recorded AS (SELECT DISTINCT kafka_topic, kafka_partition, kafka_offset FROM d \
                      WHERE operation <> '{DELETE}') \
         SELECT removals.*, recorded.kafka_offset IS NOT NULL AS recorded \
         FROM removals LEFT JOIN recorded ON removals.kafka_topic = recorded.kafka_topic \
           AND removals.kafka_partition = recorded.kafka_partition \
           AND removals.kafka_offset = recorded.kafka_offset",
        live_on = on("keyed", "cause"),
        live_keys = keys.join(", "),
        dups_on = on("live", "dups"),
        cause_on = on("keyed", "cause"),
        keyed_keys = keys
            .iter()
            .map(|k| format!("keyed.{k}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The deletions-table rows a pass stores: the new deletes, then the removals no interrupted
/// pass recorded.
fn records(
    record_schema: &TableSchema,
    fresh: &RecordBatch,
    removed: Option<&RecordBatch>,
    now_us: i64,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let target = record_schema.arrow_schema();
    let mut parts = Vec::new();
    let mut build = |batch: &RecordBatch,
                     operation: Option<&str>|
     -> Result<(), deltalake::arrow::error::ArrowError> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let mut columns = Vec::with_capacity(target.fields().len());
        for field in target.fields() {
            let name = field.name().as_str();
            let column: ArrayRef = match (name, operation) {
                ("operation", Some(op)) => {
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(op, n)))
                }
                ("recorded_at", _) => {
                    Arc::new(TimestampMicrosecondArray::from_value(now_us, n).with_timezone(UTC))
                }
                _ => match batch.column_by_name(name) {
                    Some(c) => cast(c, field.data_type())?,
                    None => deltalake::arrow::array::new_null_array(field.data_type(), n),
                },
            };
            columns.push(column);
        }
        parts.push(RecordBatch::try_new(target.clone(), columns)?);
        Ok(())
    };
    build(fresh, Some(DELETE))?;
    if let Some(removed) = removed {
        let unrecorded = removed
            .column_by_name("recorded")
            .expect("removals say whether they are recorded")
            .as_boolean();
        let keep = deltalake::arrow::compute::not(unrecorded)?;
        let unrecorded = deltalake::arrow::compute::filter_record_batch(removed, &keep)?;
        build(&unrecorded, None)?;
    }
    concat_batches(&target, &parts)
}

/// The predicate matching exactly the removed rows, in a form delta-rs prunes files with: per
/// partition value, topic and Kafka partition, the offsets' range (which file statistics can
/// rule out) and the offsets themselves.
fn rewrite_predicate(schema: &TableSchema, kafka: &[String; 4], removed: &RecordBatch) -> String {
    let topics = text(removed, "kafka_topic");
    let partitions = removed
        .column_by_name("kafka_partition")
        .unwrap()
        .as_primitive::<Int32Type>();
    let offsets = removed
        .column_by_name("kafka_offset")
        .unwrap()
        .as_primitive::<Int64Type>();
    let parts = text(removed, "part");
    let mut groups: BTreeMap<(Option<&str>, &str, i32), BTreeSet<i64>> = BTreeMap::new();
    for r in 0..removed.num_rows() {
        let part = parts.is_valid(r).then(|| parts.value(r));
        groups
            .entry((part, topics.value(r), partitions.value(r)))
            .or_default()
            .insert(offsets.value(r));
    }
    let [topic, partition, offset, _] = kafka.each_ref().map(|c| quoted(c));
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    groups
        .into_iter()
        .map(|((part, t, p), set)| {
            let lo = set.first().expect("groups are not empty");
            let hi = set.last().expect("groups are not empty");
            let list = set
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let mut clause = String::from("(");
            if let (Some(column), Some(value)) = (&schema.partition_column, part) {
                let _ = write!(clause, "{} = {} AND ", quoted(column), literal(value));
            }
            let _ = write!(
                clause,
                "{topic} = {} AND {partition} = {p} AND {offset} >= {lo} AND {offset} <= {hi} \
                 AND {offset} IN ({list}))",
                literal(t)
            );
            clause
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}
