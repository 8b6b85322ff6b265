//! Opening a table for reading: its URL from a root and name, a snapshot, and a DataFusion table
//! provider that keeps filters on list columns above the scan (delta-rs would prune files by
//! statistics it does not have for them).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::datafusion;
use deltalake::datafusion::catalog::{Session, TableProvider};
use deltalake::datafusion::common::{Constraints, Statistics};
use deltalake::datafusion::logical_expr::{
    Expr, LogicalPlan, TableProviderFilterPushDown, TableType,
};
use deltalake::datafusion::physical_plan::ExecutionPlan;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

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

/// The Arrow schema of the table's loaded version, with the names delta-rs writes to Parquet.
pub fn arrow_schema_of(table: &DeltaTable) -> Result<SchemaRef, DeltaTableError> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// The location of a table under a storage root.
pub fn table_location(root: &str, table: &str) -> String {
    format!("{}/{}", root.trim_end_matches('/'), table)
}
