//! Upstream deletes and edits, and erasure requests, applied to a keyed table by copy-on-write.
//!
//! The writer records each delete message in the ledger of the commit that covers its offset
//! (exactly once, atomically with the txn versions) and appends every other message as a row.
//! Until a pass of [`apply`] runs, a deleted post is still readable and an edited or redelivered
//! one is there twice. A pass makes the table show what the upstream shows:
//! 1. it reads the deletes recorded in the commits after the version the deletions table has
//!    taken them through (its txn [`progress_app_id`]), up to the version it reads;
//! 2. it finds the rows to remove: every row an erasure request ([`forget`]: a key, or an
//!    author) names; every row of a deleted key, whenever it arrived (a deleted post never
//!    comes back, so a delete that arrives before its post still wins); and every row of a key
//!    that is not the key's newest version (`[table] version_by`, then the Kafka timestamp,
//!    partition and offset): edits and redeliveries. With erasure requests recorded, it also
//!    finds the dead letters they name;
//! 3. it records the new deletes and requests, and the removed rows and dead letters, in
//!    `<table>_deletions` with its txn moved to the version read, in one commit;
//! 4. it rewrites the files holding the removed rows (and dead letters) without them: one
//!    commit per table removing those files and adding their rewrites, pruned by partition and
//!    by the Kafka offsets' statistics.
//!
//! A crash between 3 and 4 leaves rows recorded as removed that are still there: the next pass
//! finds them again, does not record them twice, and removes them. Passes hold the compaction
//! lease (of the dead-letter table too, while rewriting it), so a compaction never rewrites
//! the same files meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

use crate::contract::dead_letters;
use crate::contract::deletions::{
    self, DELETE, DELETED, FORGET, FORGOTTEN, FORGOTTEN_DEAD_LETTER, REPLACED,
};
use crate::contract::mapping::Mapping;
use crate::contract::schema::{ColumnSource, TableSchema};
use crate::contract::values::UTC;
use crate::table::delta::{
    DeltaError, DeltaSink, TableSettings, arrow_schema_of, log, open_table, parquet_properties,
    register_table, txn_version,
};
use crate::table::lease::{self, Acquired, LeaseError};

/// A keyed table and its side tables, as a pass reads and rewrites them.
#[derive(Debug, Clone)]
pub struct KeyedTable {
    /// The table's definition (it has a `key`).
    pub schema: Arc<TableSchema>,
    /// Where the table is.
    pub location: String,
    /// Where its deletions table is (created by the first pass if the writer has not).
    pub deletions_location: String,
    /// Where its dead letters are.
    pub dead_letters_location: String,
    /// Each source topic's mapping: how an erasure request reads the key and author of a dead
    /// letter.
    pub mappings: HashMap<String, Arc<Mapping>>,
}

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Who takes the compaction lease.
    pub owner: String,
    /// How long the lease is taken for.
    pub lease_ttl: Duration,
    /// How the deletions table is created, and the zstd level of rewritten files.
    pub settings: TableSettings,
    /// Return at once, without the lease, when the deletions table has taken the table's
    /// latest version already (nothing new to apply). Only for a caller whose previous pass
    /// on the table succeeded: a pass interrupted between recording removals and rewriting
    /// leaves the versions equal with the rewrite still due.
    pub skip_when_idle: bool,
}

/// What an erasure request names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Forget {
    /// A key: its values as text, in the table's key order.
    Key(Vec<String>),
    /// An author: the value of the table's `author` column.
    Author(String),
}

/// An erasure request (`sluice forget`): every row and dead letter it names goes, now and
/// whenever one arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetRequest {
    /// What goes.
    pub target: Forget,
    /// Why, as recorded with the request and everything it removes (a ticket, a request id).
    pub reason: String,
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The main-table version the pass read.
    pub read_version: i64,
    /// Delete messages it recorded.
    pub deletes: u64,
    /// Erasure requests it recorded (a request recorded before is not recorded again).
    pub forget_requests: u64,
    /// Rows it removed because their post was deleted.
    pub deleted: u64,
    /// Rows it removed because a newer version of their post is in the table.
    pub replaced: u64,
    /// Rows it removed because an erasure request names them.
    pub forgotten: u64,
    /// Dead letters it removed because an erasure request names them.
    pub forgotten_dead_letters: u64,
    /// Files of the table it rewrote without those rows.
    pub files_rewritten: u64,
    /// Files of the dead-letter table it rewrote without those dead letters.
    pub dead_letter_files_rewritten: u64,
    /// The main-table version of the rewrite, if rows went.
    pub version: Option<i64>,
    /// Dead letters recorded as forgotten that are still there because a compaction of the
    /// dead-letter table held its lease: the next pass removes them.
    pub dead_letters_pending: u64,
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
    /// An erasure request the table cannot take.
    #[error("forget in {table}: {reason}")]
    BadRequest {
        /// Table name.
        table: String,
        /// What is wrong with it.
        reason: String,
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

/// One pass over a keyed table (see the module docs). With `skip_when_idle`, a pass with
/// nothing new to read returns at once, without the lease.
pub async fn apply(
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    options: &ApplyOptions,
) -> Result<ApplyOutcome, ApplyError> {
    run(table, storage_options, options, &[]).await
}

/// Records erasure requests and runs a pass that applies them (with whatever else is due):
/// the rows they name leave the table and the dead letters they name leave the dead-letter
/// table. A request recorded before is not recorded again; every later pass applies it to
/// rows and dead letters that arrive after it.
pub async fn forget(
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    options: &ApplyOptions,
    requests: &[ForgetRequest],
) -> Result<ApplyOutcome, ApplyError> {
    let schema = &table.schema;
    for request in requests {
        let reason = match &request.target {
            Forget::Key(values) if values.len() != schema.key.len() => Some(format!(
                "a key has {} values ({}), not {}",
                schema.key.len(),
                schema.key.join(", "),
                values.len()
            )),
            Forget::Key(values) if values.iter().any(String::is_empty) => {
                Some("a key value is empty".to_string())
            }
            Forget::Author(_) if schema.author.is_none() => Some(
                "the schema declares no `author` column ([table] author = \"...\"): it cannot \
                 forget by author"
                    .to_string(),
            ),
            Forget::Author(a) if a.is_empty() => Some("the author is empty".to_string()),
            _ => None,
        };
        if let Some(reason) = reason {
            return Err(ApplyError::BadRequest {
                table: schema.name.clone(),
                reason,
            });
        }
    }
    run(table, storage_options, options, requests).await
}

async fn run(
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    options: &ApplyOptions,
    requests: &[ForgetRequest],
) -> Result<ApplyOutcome, ApplyError> {
    let schema = &table.schema;
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
    let main = open_table(&table.location, storage_options.clone())
        .await
        .map_err(failed("open"))?;
    if options.skip_when_idle && requests.is_empty() && is_idle(table, storage_options, &main).await
    {
        return Ok(ApplyOutcome::Applied(Applied {
            read_version: main.version().unwrap_or_default() as i64,
            ..Applied::default()
        }));
    }
    let lease_err = |source| ApplyError::Lease {
        table: name.clone(),
        source,
    };
    let held = match lease::acquire(
        main.object_store(),
        &options.owner,
        options.lease_ttl,
        Utc::now(),
    )
    .await
    .map_err(lease_err)?
    {
        Acquired::Held(lease) => lease,
        Acquired::Busy { owner, expires_at } => {
            return Ok(ApplyOutcome::Busy { owner, expires_at });
        }
    };
    let outcome = pass(main, table, storage_options, &kafka, options, requests).await;
    let released = held.release().await;
    let applied = outcome?;
    released.map_err(lease_err)?;
    Ok(ApplyOutcome::Applied(applied))
}

/// Whether the deletions table has taken the table's latest version already: then no delete,
/// edit, row or dead letter is new (the writer commits dead letters before the rows whose
/// commit moves the table's version).
async fn is_idle(
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    main: &DeltaTable,
) -> bool {
    let Some(version) = main.version() else {
        return true;
    };
    let Ok(deletions) = open_table(&table.deletions_location, storage_options.clone()).await else {
        return false;
    };
    let app_id = progress_app_id(&table.schema.name);
    let through = txn_version(&deletions, &app_id).await.ok().flatten();
    through == Some(version as i64)
}

async fn pass(
    main: DeltaTable,
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    kafka: &[String; 4],
    options: &ApplyOptions,
    requests: &[ForgetRequest],
) -> Result<Applied, ApplyError> {
    let schema = table.schema.as_ref();
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
        &table.deletions_location,
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

    // The SQL below sees the main table as `t`, the deletions recorded so far as `d`, the
    // deletes not recorded yet as `n` and the erasure requests not recorded yet as `q`; keys
    // compare as text.
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
    let recorded_requests = recorded_requests(&ctx, schema)
        .await
        .map_err(|e| failed("read the erasure requests")(e.into()))?;
    let mut new_requests: Vec<&ForgetRequest> = Vec::new();
    for request in requests {
        let known = recorded_requests.iter().any(|(t, _)| *t == request.target)
            || new_requests.iter().any(|r| r.target == request.target);
        if !known {
            new_requests.push(request);
        }
    }
    let asked = requests_batch(schema, &new_requests)
        .map_err(|e| failed("read the erasure requests")(e.into()))?;
    let asked_table = MemTable::try_new(asked.schema(), vec![vec![asked.clone()]])
        .map_err(|e| failed("read the erasure requests")(e.into()))?;
    ctx.register_table("q", Arc::new(asked_table))
        .map_err(|e| failed("read the erasure requests")(e.into()))?;

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

    // The dead letters every erasure request, old or new, names.
    let mut forgets: BTreeMap<Forget, String> = recorded_requests.into_iter().collect();
    for request in &new_requests {
        forgets.insert(request.target.clone(), request.reason.clone());
    }
    let dead_letters = if forgets.is_empty() {
        None
    } else {
        forgotten_dead_letters(table, storage_options, &ctx, &forgets)
            .await
            .map_err(|e| failed("find the dead letters to forget")(e))?
    };

    // Step 3: the new deletes and requests, and the removals not recorded by an interrupted
    // pass.
    let now = Utc::now().timestamp_micros();
    let parts = [
        (Some(&fresh), Some(DELETE)),
        (Some(&asked), Some(FORGET)),
        (removed.as_ref(), None),
        (
            dead_letters.as_ref().map(|d| &d.records),
            Some(FORGOTTEN_DEAD_LETTER),
        ),
    ];
    let records = records(&record_schema, &parts, now)
        .map_err(|e| failed("build the deletion records")(e.into()))?;
    let mut applied = Applied {
        read_version,
        deletes: new_deletes.len() as u64,
        forget_requests: new_requests.len() as u64,
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

    // Step 4: rewrite the files that hold the removed rows and dead letters.
    if let Some(found) = dead_letters {
        let present = found.present.num_rows() as u64;
        match rewrite_dead_letters(table, storage_options, options, &found)
            .await
            .map_err(|e| failed("rewrite the dead letters")(e))?
        {
            Some(files) => {
                applied.forgotten_dead_letters = present;
                applied.dead_letter_files_rewritten = files;
            }
            None => applied.dead_letters_pending = present,
        }
    }
    let Some(removed) = removed.filter(|r| r.num_rows() > 0) else {
        return Ok(applied);
    };
    let operations = text(&removed, "operation");
    let count = |op: &str| operations.iter().filter(|o| *o == Some(op)).count() as u64;
    applied.deleted = count(DELETED);
    applied.replaced = count(REPLACED);
    applied.forgotten = count(FORGOTTEN);
    let predicate = rewrite_predicate(
        schema.partition_column.as_deref(),
        [&kafka[0], &kafka[1], &kafka[2]],
        &removed,
    );
    let written = arrow_schema_of(&main).map_err(|e| failed("read the schema")(e.into()))?;
    let properties = parquet_properties(options.settings.zstd_level, &written)
        .map_err(|e| failed("configure zstd")(e.into()))?;
    let info = serde_json::json!({ "apply": {
        "read_version": read_version, "deleted": applied.deleted, "replaced": applied.replaced,
        "forgotten": applied.forgotten } });
    let (rewritten, metrics) = main
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
    let removed_rows = applied.deleted + applied.replaced + applied.forgotten;
    if metrics
        .num_deleted_rows
        .is_some_and(|n| n as u64 != removed_rows)
    {
        tracing::warn!(table = %name, expected = removed_rows, removed = ?metrics.num_deleted_rows,
            "the rewrite removed another number of rows than were found");
    }
    applied.files_rewritten = metrics.num_removed_files as u64;
    applied.version = rewritten.version().map(|v| v as i64);
    tracing::info!(table = %name, read_version, deletes = applied.deletes, deleted = applied.deleted,
        replaced = applied.replaced, forgotten = applied.forgotten,
        forgotten_dead_letters = applied.forgotten_dead_letters,
        files = applied.files_rewritten, version = ?applied.version,
        "applied deletes, edits and erasure requests");
    for (operation, n) in [
        (DELETED, applied.deleted),
        (REPLACED, applied.replaced),
        (FORGOTTEN, applied.forgotten),
    ] {
        metrics::counter!("sluice_rows_removed_total", "table" => name.clone(), "operation" => operation)
            .increment(n);
    }
    Ok(applied)
}

/// The erasure requests the deletions table holds, with their reasons.
async fn recorded_requests(
    ctx: &SessionContext,
    schema: &TableSchema,
) -> Result<Vec<(Forget, String)>, deltalake::datafusion::error::DataFusionError> {
    let keys: Vec<String> = schema
        .key
        .iter()
        .map(|k| format!("CAST({} AS VARCHAR) AS {}", quoted(k), quoted(k)))
        .collect();
    let sql = format!(
        "SELECT {}, CAST(author AS VARCHAR) AS author, CAST(reason AS VARCHAR) AS reason \
         FROM d WHERE operation = '{FORGET}'",
        keys.join(", ")
    );
    let mut found = Vec::new();
    for batch in ctx.sql(&sql).await?.collect().await? {
        let keys: Vec<StringArray> = schema.key.iter().map(|k| text(&batch, k)).collect();
        let authors = text(&batch, "author");
        let reasons = text(&batch, "reason");
        for r in 0..batch.num_rows() {
            let target = if authors.is_valid(r) {
                Forget::Author(authors.value(r).to_string())
            } else {
                Forget::Key(keys.iter().map(|k| k.value(r).to_string()).collect())
            };
            let reason = reasons.is_valid(r).then(|| reasons.value(r).to_string());
            found.push((target, reason.unwrap_or_default()));
        }
    }
    Ok(found)
}

/// Erasure requests as a batch: key columns (null for an author), author, reason.
fn requests_batch(
    schema: &TableSchema,
    requests: &[&ForgetRequest],
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let mut fields: Vec<Field> = schema
        .key
        .iter()
        .map(|k| Field::new(k, DataType::Utf8, true))
        .collect();
    fields.push(Field::new("author", DataType::Utf8, true));
    fields.push(Field::new("reason", DataType::Utf8, true));
    let mut columns: Vec<ArrayRef> = (0..schema.key.len())
        .map(|i| {
            Arc::new(StringArray::from_iter(requests.iter().map(
                |r| match &r.target {
                    Forget::Key(values) => values.get(i).cloned(),
                    Forget::Author(_) => None,
                },
            ))) as ArrayRef
        })
        .collect();
    columns.push(Arc::new(StringArray::from_iter(requests.iter().map(
        |r| match &r.target {
            Forget::Author(a) => Some(a.clone()),
            Forget::Key(_) => None,
        },
    ))));
    columns.push(Arc::new(StringArray::from_iter_values(
        requests.iter().map(|r| r.reason.as_str()),
    )));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The dead letters erasure requests name, as deletions records, and where they are.
struct DeadLetters {
    /// Records of the ones no pass recorded yet: position, key, author, reason.
    records: RecordBatch,
    /// Every one still in the dead-letter table, recorded or not: its partition value (the
    /// dead-letter date), topic, partition and offset.
    present: RecordBatch,
}

/// Reads the dead letters and picks those an erasure request names: by the key and author
/// their topic's mapping reads from the payload (as far as it goes: a dead letter is a message
/// that did not decode), or, for an author, by the author appearing in the payload as a word.
async fn forgotten_dead_letters(
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    ctx: &SessionContext,
    forgets: &BTreeMap<Forget, String>,
) -> Result<Option<DeadLetters>, Box<dyn std::error::Error + Send + Sync>> {
    let dead_letters = match open_table(&table.dead_letters_location, storage_options.clone()).await
    {
        Ok(t) => t,
        Err(DeltaTableError::NotATable(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    register_table(ctx, "dl", &dead_letters).await?;
    let recorded_sql = format!(
        "SELECT DISTINCT kafka_topic, kafka_partition, kafka_offset FROM d \
         WHERE operation = '{FORGOTTEN_DEAD_LETTER}'"
    );
    let mut recorded: BTreeSet<(String, i32, i64)> = BTreeSet::new();
    for batch in ctx.sql(&recorded_sql).await?.collect().await? {
        let topics = text(&batch, "kafka_topic");
        let partitions = batch.column(1).as_primitive::<Int32Type>();
        let offsets = batch.column(2).as_primitive::<Int64Type>();
        for r in 0..batch.num_rows() {
            recorded.insert((
                topics.value(r).to_string(),
                partitions.value(r),
                offsets.value(r),
            ));
        }
    }
    let authors: Vec<&str> = forgets
        .keys()
        .filter_map(|f| match f {
            Forget::Author(a) => Some(a.as_str()),
            Forget::Key(_) => None,
        })
        .collect();
    let batches = ctx
        .sql(
            "SELECT kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, payload, \
             CAST(event_date AS VARCHAR) AS part FROM dl WHERE payload IS NOT NULL",
        )
        .await?
        .collect()
        .await?;
    let schema = table.schema.as_ref();
    let mut rows: Vec<(String, i32, i64, Option<i64>, Forget)> = Vec::new();
    let mut present: Vec<(String, String, i32, i64)> = Vec::new();
    for batch in &batches {
        let topics = text(batch, "kafka_topic");
        let partitions = batch.column(1).as_primitive::<Int32Type>();
        let offsets = batch.column(2).as_primitive::<Int64Type>();
        let times = cast(
            batch.column(3),
            &DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        )?;
        let times = times.as_primitive::<deltalake::arrow::datatypes::TimestampMicrosecondType>();
        let payloads = cast(batch.column(4), &DataType::Binary)?;
        let payloads = payloads.as_binary::<i32>();
        let parts = text(batch, "part");
        for r in 0..batch.num_rows() {
            let topic = topics.value(r);
            let payload = payloads.value(r);
            let (key, author) = table
                .mappings
                .get(topic)
                .map_or((None, None), |m| m.identity(payload, schema));
            let by_key = key.map(Forget::Key).filter(|k| forgets.contains_key(k));
            let by_author = author
                .map(Forget::Author)
                .filter(|a| forgets.contains_key(a));
            let by_word = || {
                authors
                    .iter()
                    .find(|a| contains_word(payload, a.as_bytes()))
                    .map(|a| Forget::Author(a.to_string()))
            };
            let Some(target) = by_key.or(by_author).or_else(by_word) else {
                continue;
            };
            let (partition, offset) = (partitions.value(r), offsets.value(r));
            present.push((
                parts.value(r).to_string(),
                topic.to_string(),
                partition,
                offset,
            ));
            if recorded.contains(&(topic.to_string(), partition, offset)) {
                continue;
            }
            let time = times.is_valid(r).then(|| times.value(r));
            rows.push((topic.to_string(), partition, offset, time, target));
        }
    }
    if present.is_empty() {
        return Ok(None);
    }
    let mut fields = key_and_position_fields(schema, true);
    fields.extend([
        Field::new("author", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
    ]);
    let mut columns: Vec<ArrayRef> = (0..schema.key.len())
        .map(|i| {
            Arc::new(StringArray::from_iter(rows.iter().map(|r| match &r.4 {
                Forget::Key(values) => values.get(i).cloned(),
                Forget::Author(_) => None,
            }))) as ArrayRef
        })
        .collect();
    columns.push(Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.0.as_str()),
    )));
    columns.push(Arc::new(Int32Array::from_iter_values(
        rows.iter().map(|r| r.1),
    )));
    columns.push(Arc::new(Int64Array::from_iter_values(
        rows.iter().map(|r| r.2),
    )));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from_iter(rows.iter().map(|r| r.3)).with_timezone(UTC),
    ));
    columns.push(Arc::new(StringArray::from_iter(rows.iter().map(
        |r| match &r.4 {
            Forget::Author(a) => Some(a.clone()),
            Forget::Key(_) => None,
        },
    ))));
    columns.push(Arc::new(StringArray::from_iter(
        rows.iter().map(|r| forgets.get(&r.4).cloned()),
    )));
    let records = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let present = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("part", DataType::Utf8, true),
            Field::new("kafka_topic", DataType::Utf8, false),
            Field::new("kafka_partition", DataType::Int32, false),
            Field::new("kafka_offset", DataType::Int64, false),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(
                present.iter().map(|p| p.0.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                present.iter().map(|p| p.1.as_str()),
            )),
            Arc::new(Int32Array::from_iter_values(present.iter().map(|p| p.2))),
            Arc::new(Int64Array::from_iter_values(present.iter().map(|p| p.3))),
        ],
    )?;
    Ok(Some(DeadLetters { records, present }))
}

/// Whether `word` occurs in `text` with no letter or digit right before or after it (an
/// author `alice` is in `"@alice:"` but not in `"malice"`).
fn contains_word(text: &[u8], word: &[u8]) -> bool {
    if word.is_empty() || word.len() > text.len() {
        return false;
    }
    let boundary = |b: Option<&u8>| b.is_none_or(|b| !b.is_ascii_alphanumeric());
    (0..=text.len() - word.len()).any(|i| {
        text[i..].starts_with(word)
            && boundary(i.checked_sub(1).and_then(|j| text.get(j)))
            && boundary(text.get(i + word.len()))
    })
}

/// Removes the named dead letters from the dead-letter table under that table's compaction
/// lease. Returns the files rewritten, or `None` when a compaction held the lease: then they
/// stay recorded for the next pass to remove.
async fn rewrite_dead_letters(
    table: &KeyedTable,
    storage_options: &HashMap<String, String>,
    options: &ApplyOptions,
    found: &DeadLetters,
) -> Result<Option<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let dead_letters = open_table(&table.dead_letters_location, storage_options.clone()).await?;
    let held = match lease::acquire(
        dead_letters.object_store(),
        &options.owner,
        options.lease_ttl,
        Utc::now(),
    )
    .await?
    {
        Acquired::Held(lease) => lease,
        Acquired::Busy { owner, .. } => {
            tracing::info!(table = %table.schema.name, %owner,
                "the dead-letter table's lease is held; forgotten dead letters go next pass");
            return Ok(None);
        }
    };
    let dead_letters_schema = dead_letters::schema(&table.schema.name)?;
    let predicate = rewrite_predicate(
        dead_letters_schema.partition_column.as_deref(),
        ["kafka_topic", "kafka_partition", "kafka_offset"],
        &found.present,
    );
    let written = arrow_schema_of(&dead_letters)?;
    let properties = parquet_properties(options.settings.zstd_level, &written)?;
    let outcome = dead_letters
        .delete()
        .with_predicate(predicate)
        .with_writer_properties(properties)
        .with_commit_properties(
            CommitProperties::default()
                .with_metadata([(
                    "sluice".to_string(),
                    serde_json::json!({ "forget": { "dead_letters": found.present.num_rows() } }),
                )])
                .with_cleanup_expired_logs(Some(false)),
        )
        .await;
    let released = held.release().await;
    let (_, metrics) = outcome?;
    released?;
    Ok(Some(metrics.num_removed_files as u64))
}

/// The key columns (as text) and the Kafka position of a batch of deletion records.
fn key_and_position_fields(schema: &TableSchema, key_nullable: bool) -> Vec<Field> {
    let mut fields: Vec<Field> = schema
        .key
        .iter()
        .map(|k| Field::new(k, DataType::Utf8, key_nullable))
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
    fields
}

/// The deletes not recorded yet, as a batch: key columns as text, then where each was read.
fn fresh_deletes(
    schema: &TableSchema,
    deletes: &[(
        crate::table::delta::PartitionKey,
        crate::table::delta::Deletion,
    )],
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let fields = key_and_position_fields(schema, false);
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

/// The query finding every row to remove: its key, why (`forgotten`, `deleted`, `replaced`),
/// where it was read, what caused it, its partition value, and whether an interrupted pass
/// already recorded it. An erasure request wins over a delete, a delete over a newer version.
fn removals_sql(schema: &TableSchema, kafka: &[String; 4]) -> String {
    let keys: Vec<String> = schema.key.iter().map(|k| quoted(k)).collect();
    let on = |a: &str, b: &str| {
        keys.iter()
            .map(|k| format!("{a}.{k} = {b}.{k}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let at = |a: &str, b: &str| {
        ["kafka_topic", "kafka_partition", "kafka_offset"]
            .map(|c| format!("{a}.{c} = {b}.{c}"))
            .join(" AND ")
    };
    let of = |t: &str| {
        keys.iter()
            .map(|k| format!("{t}.{k}"))
            .collect::<Vec<_>>()
            .join(", ")
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
         {timestamp} AS kafka_timestamp, {} AS part, {} AS author",
        schema.partition_column.as_deref().map_or(
            "CAST(NULL AS VARCHAR)".to_string(),
            |p| format!("CAST({} AS VARCHAR)", quoted(p))
        ),
        schema
            .author
            .as_deref()
            .map_or("CAST(NULL AS VARCHAR)".to_string(), |a| format!(
                "CAST({} AS VARCHAR)",
                quoted(a)
            ))
    );
    let mut order = String::new();
    for (i, v) in schema.version_by.iter().enumerate() {
        let _ = write!(keyed, ", {} AS v{i}", quoted(v));
        let _ = write!(order, "v{i} DESC NULLS LAST, ");
    }
    order.push_str("kafka_timestamp DESC NULLS LAST, kafka_partition DESC, kafka_offset DESC");
    keyed.push_str(" FROM t");
    let cause = "ORDER BY kafka_topic, kafka_partition, kafka_offset";
    let window =
        |f: &str| format!("first_value({f}) OVER (PARTITION BY {key_list} ORDER BY {order})");
    let no_cause = "CAST(NULL AS VARCHAR) AS cause_topic, CAST(NULL AS INT) AS cause_partition, \
                    CAST(NULL AS BIGINT) AS cause_offset";
    format!(
        "WITH keyed AS ({keyed}), \
         forgets AS (SELECT {key_list}, author, reason FROM d WHERE operation = '{FORGET}' \
                     UNION ALL SELECT {key_list}, author, reason FROM q), \
         forgot AS (SELECT kafka_topic, kafka_partition, kafka_offset, min(reason) AS reason, \
                    min(by_author) AS by_author FROM ( \
                      SELECT keyed.kafka_topic, keyed.kafka_partition, keyed.kafka_offset, \
                             forgets.reason, CAST(NULL AS VARCHAR) AS by_author \
                      FROM keyed JOIN forgets ON {forget_on} \
                      UNION ALL \
                      SELECT keyed.kafka_topic, keyed.kafka_partition, keyed.kafka_offset, \
                             forgets.reason, forgets.author AS by_author \
                      FROM keyed JOIN forgets ON keyed.author = forgets.author) \
                    GROUP BY kafka_topic, kafka_partition, kafka_offset), \
         kept AS (SELECT keyed.* FROM keyed LEFT ANTI JOIN forgot ON {kept_at}), \
         tomb AS (SELECT {key_list}, kafka_topic, kafka_partition, kafka_offset FROM d \
                  WHERE operation = '{DELETE}' \
                  UNION ALL SELECT {key_list}, kafka_topic, kafka_partition, kafka_offset FROM n), \
         cause AS (SELECT {key_list}, first_value(kafka_topic {cause}) AS cause_topic, \
                   first_value(kafka_partition {cause}) AS cause_partition, \
                   first_value(kafka_offset {cause}) AS cause_offset FROM tomb GROUP BY {key_list}), \
         live AS (SELECT kept.* FROM kept LEFT ANTI JOIN cause ON {live_on}), \
         dups AS (SELECT {key_list} FROM live GROUP BY {key_list} HAVING count(*) > 1), \
         ranked AS (SELECT live.*, \
                    row_number() OVER (PARTITION BY {key_list} ORDER BY {order}) AS n, \
                    {first_topic} AS cause_topic, {first_partition} AS cause_partition, \
                    {first_offset} AS cause_offset \
                    FROM live LEFT SEMI JOIN dups ON {dups_on}), \
         removals AS ( \
           SELECT {keyed_keys}, '{FORGOTTEN}' AS operation, keyed.kafka_topic, keyed.kafka_partition, \
                  keyed.kafka_offset, keyed.kafka_timestamp, {no_cause}, keyed.part, \
                  forgot.by_author AS author, forgot.reason \
           FROM keyed JOIN forgot ON {forgot_at} \
           UNION ALL \
           SELECT {kept_keys}, '{DELETED}' AS operation, kept.kafka_topic, kept.kafka_partition, \
                  kept.kafka_offset, kept.kafka_timestamp, cause.cause_topic, cause.cause_partition, \
                  cause.cause_offset, kept.part, CAST(NULL AS VARCHAR) AS author, \
                  CAST(NULL AS VARCHAR) AS reason \
           FROM kept JOIN cause ON {cause_on} \
           UNION ALL \
           SELECT {key_list}, '{REPLACED}' AS operation, kafka_topic, kafka_partition, kafka_offset, \
                  kafka_timestamp, cause_topic, cause_partition, cause_offset, part, \
                  CAST(NULL AS VARCHAR) AS author, CAST(NULL AS VARCHAR) AS reason \
           FROM ranked WHERE n > 1), \
         recorded AS (SELECT DISTINCT kafka_topic, kafka_partition, kafka_offset FROM d \
                      WHERE operation IN ('{DELETED}', '{REPLACED}', '{FORGOTTEN}')) \
         SELECT removals.*, recorded.kafka_offset IS NOT NULL AS recorded \
         FROM removals LEFT JOIN recorded ON {recorded_at}",
        forget_on = on("keyed", "forgets"),
        kept_at = at("keyed", "forgot"),
        live_on = on("kept", "cause"),
        dups_on = on("live", "dups"),
        cause_on = on("kept", "cause"),
        forgot_at = at("keyed", "forgot"),
        recorded_at = at("removals", "recorded"),
        keyed_keys = of("keyed"),
        kept_keys = of("kept"),
        first_topic = window("kafka_topic"),
        first_partition = window("kafka_partition"),
        first_offset = window("kafka_offset"),
    )
}

/// The deletions-table rows a pass stores, from batches naming their columns as the deletions
/// table does: each with its operation, or with an `operation` column of its own; a batch
/// with a `recorded` column contributes the rows an interrupted pass did not record.
fn records(
    record_schema: &TableSchema,
    parts: &[(Option<&RecordBatch>, Option<&str>)],
    now_us: i64,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let target = record_schema.arrow_schema();
    let mut built = Vec::new();
    for (batch, operation) in parts {
        let Some(batch) = batch else { continue };
        let batch = match batch.column_by_name("recorded") {
            Some(recorded) => {
                let keep = deltalake::arrow::compute::not(recorded.as_boolean())?;
                deltalake::arrow::compute::filter_record_batch(batch, &keep)?
            }
            None => (*batch).clone(),
        };
        let n = batch.num_rows();
        if n == 0 {
            continue;
        }
        let mut columns = Vec::with_capacity(target.fields().len());
        for field in target.fields() {
            let name = field.name().as_str();
            let column: ArrayRef = match (name, operation) {
                ("operation", Some(op)) => {
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(*op, n)))
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
        built.push(RecordBatch::try_new(target.clone(), columns)?);
    }
    concat_batches(&target, &built)
}

/// The predicate matching exactly the rows of `removed` (columns `part`, `kafka_topic`,
/// `kafka_partition`, `kafka_offset`), in a form delta-rs prunes files with: per partition
/// value, topic and Kafka partition, the offsets' range (which file statistics can rule out)
/// and the offsets themselves. `columns` name the topic, partition and offset in the table.
fn rewrite_predicate(
    partition_column: Option<&str>,
    columns: [&str; 3],
    removed: &RecordBatch,
) -> String {
    let topics = text(removed, "kafka_topic");
    let partitions = removed
        .column_by_name("kafka_partition")
        .expect("removals have a kafka_partition")
        .as_primitive::<Int32Type>();
    let offsets = removed
        .column_by_name("kafka_offset")
        .expect("removals have a kafka_offset")
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
    let [topic, partition, offset] = columns.map(quoted);
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
            if let (Some(column), Some(value)) = (partition_column, part) {
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

#[cfg(test)]
mod tests {
    use super::contains_word;

    #[test]
    fn an_author_is_found_as_a_whole_word_only() {
        for (text, found) in [
            (r#"{"did":"did:plc:alice"}"#, true),
            ("did:plc:alice", true),
            ("by @did:plc:alice, again", true),
            (r#"{"did":"did:plc:alice2"}"#, false),
            ("xdid:plc:alice", false),
            ("did:plc:alic", false),
        ] {
            assert_eq!(
                contains_word(text.as_bytes(), b"did:plc:alice"),
                found,
                "{text}"
            );
        }
        assert!(!contains_word(b"anything", b""));
    }
}
