//! Creating a table from its schema file, evolving it when the file gains nullable columns
//! (never retyping one), and refusing a store that cannot put-if-absent, which Delta commits
//! rely on.

use std::collections::HashMap;
use std::time::Duration;

use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{MetadataValue, StructField};
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError, TableProperty};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::contract::schema::{TableSchema, type_name};

use super::DeltaError;
use super::read::arrow_schema_of;

/// How sluice sets up the tables it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSettings {
    /// `delta.checkpointInterval`: a checkpoint every this many commits.
    pub checkpoint_interval: u64,
    /// zstd level of data files.
    pub zstd_level: i32,
    /// `delta.deletedFileRetentionDuration`: how long checkpoints keep the `remove` tombstones
    /// of replaced files. Every reader of the table pays for each tombstone a checkpoint holds,
    /// so tables committing every second keep them for minutes, not Delta's default week
    /// (vacuum still keeps the files themselves for its own retention; see `maintain::vacuum`).
    pub tombstone_retention: Duration,
    /// `delta.logRetentionDuration`: how long commits (and the checkpoints log cleanup keeps)
    /// stay in `_delta_log`, which is how far back time travel reaches. A table committing
    /// twice a second writes ~3 GB of commits a day.
    pub log_retention: Duration,
}

/// Delta's own default of `delta.deletedFileRetentionDuration`.
pub const DEFAULT_TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Delta's own default of `delta.logRetentionDuration`.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

impl TableSettings {
    /// The table properties these settings stand for, as Delta spells them.
    fn properties(&self) -> HashMap<String, String> {
        HashMap::from([
            (
                TableProperty::CheckpointInterval.as_ref().to_string(),
                self.checkpoint_interval.to_string(),
            ),
            (
                TableProperty::DeletedFileRetentionDuration
                    .as_ref()
                    .to_string(),
                interval(self.tombstone_retention),
            ),
            (
                TableProperty::LogRetentionDuration.as_ref().to_string(),
                interval(self.log_retention),
            ),
        ])
    }
}

/// A duration as a Delta interval, in the largest unit that divides it.
fn interval(duration: Duration) -> String {
    match duration.as_secs() {
        s if s % 3600 == 0 => format!("interval {} hours", s / 3600),
        s if s % 60 == 0 => format!("interval {} minutes", s / 60),
        s => format!("interval {s} seconds"),
    }
}

pub(super) async fn create_table(
    table: &DeltaTable,
    schema: &TableSchema,
    settings: &TableSettings,
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
        .with_configuration(
            settings
                .properties()
                .into_iter()
                .map(|(key, value)| (key, Some(value))),
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

/// Brings an existing table's checkpoint interval, tombstone and log retention in line with
/// the settings (a configuration change applies to tables created before it). Returns whether it
/// committed a change.
pub(super) async fn align_properties(
    table: &mut DeltaTable,
    settings: &TableSettings,
) -> Result<bool, DeltaTableError> {
    let differs = |table: &DeltaTable| -> Result<bool, DeltaTableError> {
        let config = table.snapshot()?.table_config();
        Ok(
            config.checkpoint_interval().get() != settings.checkpoint_interval
                || config.deleted_file_retention_duration() != settings.tombstone_retention
                || config.log_retention_duration() != settings.log_retention,
        )
    };
    if !differs(table)? {
        return Ok(false);
    }
    match table
        .clone()
        .set_tbl_properties()
        .with_properties(settings.properties())
        .await
    {
        Ok(updated) => {
            *table = updated;
            Ok(true)
        }
        // Another instance, started with the same settings, changed them first.
        Err(e) => {
            table.update_incremental(None).await?;
            if differs(table)? { Err(e) } else { Ok(false) }
        }
    }
}

/// Brings the table's columns in line with the schema file: columns added to the file are
/// added to the table (old rows read them as null); a column removed from the file or given
/// another type is refused with what to do instead, never written over.
pub(super) async fn evolve_schema(
    table: &mut DeltaTable,
    schema: &TableSchema,
) -> Result<(), DeltaError> {
    let expected = schema.arrow_schema();
    let delta_err = |operation, source: DeltaTableError| DeltaError::Delta {
        table: schema.name.clone(),
        operation,
        source: source.into(),
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
pub(super) async fn probe_conditional_put(
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
        source: DeltaTableError::from(source).into(),
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
