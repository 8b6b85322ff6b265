//! What the tables hold: the offsets of one partition in the table and its dead letters, and
//! the lost ranges an operator accepted, read by SQL over each table's snapshot.

use std::collections::BTreeMap;

use deltalake::DeltaTable;
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int32Type, Int64Type};
use deltalake::datafusion::prelude::SessionContext;

use crate::ingest::decode::RejectReason;
use crate::table::delta::register_table;

use super::{AuditError, Found};

/// Turns an error of `operation` on table `name` into an [`AuditError`].
pub(super) fn table_error<E: std::error::Error + Send + Sync + 'static>(
    name: &str,
    operation: &'static str,
) -> impl Fn(E) -> AuditError {
    move |e| AuditError::Table {
        table: name.to_string(),
        operation,
        source: Box::new(e),
    }
}

/// Runs `sql` on `table`, registered as `t`; a failure names the table and `operation`.
async fn query_table(
    table: &DeltaTable,
    name: &str,
    operation: &'static str,
    sql: &str,
) -> Result<Vec<RecordBatch>, AuditError> {
    let ctx = SessionContext::new();
    register_table(&ctx, "t", table)
        .await
        .map_err(table_error(name, operation))?;
    ctx.sql(sql)
        .await
        .map_err(table_error(name, operation))?
        .collect()
        .await
        .map_err(table_error(name, operation))
}

/// Every (topic, partition) → offsets of a table, from one snapshot.
pub(super) async fn offsets_in(
    table: &DeltaTable,
    name: &str,
    columns: &[String; 3],
) -> Result<BTreeMap<(String, i32), Found>, AuditError> {
    let grouped = grouped(table, name, columns, None).await?;
    Ok(grouped
        .into_iter()
        .map(|(key, rows)| {
            (
                key,
                Found {
                    rows,
                    ..Found::default()
                },
            )
        })
        .collect())
}

/// Every (topic, partition) → offsets of the rows of a table with `kafka_*` columns that
/// match `filter` (SQL), from one snapshot.
pub(super) async fn offsets_grouped(
    table: &DeltaTable,
    name: &str,
    filter: &str,
) -> Result<BTreeMap<(String, i32), Vec<i64>>, AuditError> {
    let columns = ["kafka_topic", "kafka_partition", "kafka_offset"].map(String::from);
    grouped(table, name, &columns, Some(filter)).await
}

async fn grouped(
    table: &DeltaTable,
    name: &str,
    columns: &[String; 3],
    filter: Option<&str>,
) -> Result<BTreeMap<(String, i32), Vec<i64>>, AuditError> {
    let sql = format!(
        "SELECT \"{}\", \"{}\", \"{}\" FROM t WHERE {}",
        columns[0],
        columns[1],
        columns[2],
        filter.unwrap_or("true")
    );
    let batches = query_table(table, name, "query", &sql).await?;
    let mut out: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for batch in batches {
        let topics = cast(batch.column(0), &DataType::Utf8).map_err(table_error(name, "query"))?;
        let topics = topics.as_string::<i32>();
        let partitions = batch.column(1).as_primitive::<Int32Type>();
        let offsets = batch.column(2).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            if topics.is_null(row) || partitions.is_null(row) || offsets.is_null(row) {
                continue;
            }
            out.entry((topics.value(row).to_string(), partitions.value(row)))
                .or_default()
                .push(offsets.value(row));
        }
    }
    Ok(out)
}

/// The offsets in `offset_column` of the rows of `table` matching `filter` (SQL).
pub(super) async fn offsets_where(
    table: &DeltaTable,
    name: &str,
    offset_column: &str,
    filter: &str,
) -> Result<Vec<i64>, AuditError> {
    let sql = format!("SELECT \"{offset_column}\" FROM t WHERE {filter}");
    let batches = query_table(table, name, "query the new log's rows", &sql).await?;
    Ok(batches
        .iter()
        .flat_map(|b| {
            let offsets = b.column(0).as_primitive::<Int64Type>();
            offsets.iter().flatten().collect::<Vec<_>>()
        })
        .collect())
}

/// The `lost` dead letters of a dead-letter table per (topic, partition): offset and detail.
pub(super) async fn lost_in(
    table: &DeltaTable,
    name: &str,
) -> Result<BTreeMap<(String, i32), Vec<(i64, String)>>, AuditError> {
    let sql = format!(
        "SELECT kafka_topic, kafka_partition, kafka_offset, detail \
         FROM t WHERE reason = '{}' ORDER BY kafka_offset",
        RejectReason::Lost.code()
    );
    let batches = query_table(table, name, "query lost ranges", &sql).await?;
    let mut out: BTreeMap<(String, i32), Vec<(i64, String)>> = BTreeMap::new();
    for batch in batches {
        let text = |i: usize| {
            cast(batch.column(i), &DataType::Utf8).map_err(table_error(name, "query lost ranges"))
        };
        let (topics, details) = (text(0)?, text(3)?);
        let (topics, details) = (topics.as_string::<i32>(), details.as_string::<i32>());
        let partitions = batch.column(1).as_primitive::<Int32Type>();
        let offsets = batch.column(2).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            out.entry((topics.value(row).to_string(), partitions.value(row)))
                .or_default()
                .push((offsets.value(row), details.value(row).to_string()));
        }
    }
    Ok(out)
}
