//! Table schema files: the columns of a table, their types, and which ones sluice fills itself.
//!
//! A schema file is TOML (format in `schemas/README.md`). Loading it checks everything a Delta
//! table and Trino need (lower-case snake_case unique names, a `date` partition column, types
//! from a closed grammar) and reports the first problem with file, field and reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

use crate::contract::labels::{LabelSet, LabelSpec};
use crate::contract::values::{Contract, UTC, parse_duration_us, parse_timestamp};

/// Suffix of the column that keeps a label as received when it was not already canonical.
pub const RAW_SUFFIX: &str = "_raw";

/// Errors found while reading a schema file.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file could not be read.
    #[error(
        "schema file {file}: {source}{}",
        missing_file_hint(source, "schema", "a `[[tables]]` entry")
    )]
    Io {
        /// Path of the schema file.
        file: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the schema format.
    #[error("schema file {file}: {message}")]
    Syntax {
        /// Path of the schema file.
        file: PathBuf,
        /// Parser message, with line and column.
        message: String,
    },
    /// A column definition is wrong.
    #[error("schema file {file}: column `{field}`: {reason}")]
    Field {
        /// Path of the schema file.
        file: PathBuf,
        /// Column the problem is in.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// Values sluice computes itself instead of reading them from the message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnSource {
    /// The Kafka topic the message came from.
    KafkaTopic,
    /// The Kafka partition the message came from.
    KafkaPartition,
    /// The message's offset in its partition.
    KafkaOffset,
    /// The message's Kafka timestamp (create or log-append time).
    KafkaTimestamp,
    /// The message key, as UTF-8 (lossy).
    KafkaKey,
    /// When sluice decoded the message.
    IngestedAt,
    /// The UTC date of the column named by `event_time`, else of the Kafka timestamp.
    EventDate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    table: TableSection,
    columns: Vec<ColumnDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSection {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    partition_column: Option<String>,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default)]
    version_by: Vec<String>,
    #[serde(default)]
    author: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnDef {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default = "default_nullable")]
    nullable: bool,
    #[serde(default)]
    source: Option<ColumnSource>,
    #[serde(default)]
    event_time: Option<String>,
    #[serde(default)]
    doc: Option<String>,
    #[serde(default)]
    labels: Option<LabelSpec>,
    #[serde(default)]
    range: Option<[f64; 2]>,
    #[serde(default)]
    dimension: Option<usize>,
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    max_future: Option<String>,
}

fn default_nullable() -> bool {
    true
}

/// One column of a table.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name as stored in Delta (lower-case snake_case).
    pub name: String,
    /// Arrow type of the column.
    pub data_type: DataType,
    /// Whether rows may leave it null; a null in a non-nullable column rejects the message.
    pub nullable: bool,
    /// Set when sluice fills the column itself rather than a mapping.
    pub source: Option<ColumnSource>,
    /// For `source = "event_date"`: the timestamp column the date is taken from.
    pub event_time: Option<String>,
    /// Human description, copied into the Delta column comment.
    pub doc: Option<String>,
    /// Allowed labels, for enum-like string columns filled by LLMs.
    pub labels: Option<Arc<LabelSet>>,
    /// For a `<column>_raw` column: the label column whose raw values it keeps.
    pub raw_of: Option<String>,
    /// Promises on values beyond the type (ranges, dimension, timestamp window).
    pub contract: Contract,
}

/// A table definition loaded from a schema file.
#[derive(Debug, Clone)]
pub struct TableSchema {
    /// Table name; also the folder name under the storage root.
    pub name: String,
    /// Human description of the table.
    pub description: Option<String>,
    /// Columns in storage order.
    pub columns: Vec<Column>,
    /// The partition column, if the table is partitioned.
    pub partition_column: Option<String>,
    /// The columns that name a post across its versions (`[table] key`): an update replaces
    /// the row with the same key, a redelivery does not add one, a delete removes it. Empty
    /// for an append-only table.
    pub key: Vec<String>,
    /// The columns that order a key's versions, newest last (`[table] version_by`: an edit
    /// time, an event time); the Kafka timestamp and offset break ties.
    pub version_by: Vec<String>,
    /// The column naming who wrote a row (`[table] author`): `sluice forget --author` erases
    /// every row, past and future, whose value it is.
    pub author: Option<String>,
    /// Where the definition was read from, for error messages.
    pub file: PathBuf,
}

/// What to check when a file named in a config is missing: the key that names it, and where a
/// relative path starts. Empty for any other I/O error.
pub(crate) fn missing_file_hint(error: &std::io::Error, key: &str, entry: &str) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!(
            "; check `{key}` of {entry} in the config (a relative path starts from the config \
             file's folder)"
        )
    } else {
        String::new()
    }
}

impl TableSchema {
    /// Reads and validates a schema file.
    pub fn load(file: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(file).map_err(|source| SchemaError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        Self::parse(&text, file)
    }

    /// Parses and validates schema text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Self, SchemaError> {
        let raw: SchemaFile = toml::from_str(text).map_err(|e| SchemaError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let field_err = |field: &str, reason: String| SchemaError::Field {
            file: file.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        check_identifier(&raw.table.name).map_err(|r| field_err("table.name", r))?;
        if raw.columns.is_empty() {
            return Err(field_err(
                "columns",
                "a table needs at least one column".into(),
            ));
        }
        let mut columns: Vec<Column> = Vec::with_capacity(raw.columns.len());
        for def in &raw.columns {
            check_identifier(&def.name).map_err(|r| field_err(&def.name, r))?;
            if columns.iter().any(|c| c.name == def.name) {
                return Err(field_err(&def.name, "defined twice".into()));
            }
            let data_type =
                parse_type(&def.type_name).map_err(|r| field_err(&def.name, r.to_string()))?;
            if let Some(source) = def.source {
                let expected = source_type(source);
                if data_type != expected {
                    return Err(field_err(
                        &def.name,
                        format!(
                            "source `{}` needs type `{}`, not `{}`",
                            source_name(source),
                            type_name(&expected),
                            def.type_name
                        ),
                    ));
                }
            }
            if def.event_time.is_some() && def.source != Some(ColumnSource::EventDate) {
                return Err(field_err(
                    &def.name,
                    "`event_time` only applies to columns with source = \"event_date\"".into(),
                ));
            }
            let contract = parse_contract(def, &data_type).map_err(|r| field_err(&def.name, r))?;
            let labels = match &def.labels {
                None => None,
                Some(_) if !matches!(data_type, DataType::Utf8 | DataType::Boolean) => {
                    return Err(field_err(
                        &def.name,
                        "`labels` applies only to string and boolean columns".into(),
                    ));
                }
                Some(spec) if data_type == DataType::Boolean => Some(Arc::new(
                    LabelSet::boolean(spec)
                        .map_err(|r| field_err(&def.name, format!("labels: {r}")))?,
                )),
                Some(spec) => Some(Arc::new(
                    LabelSet::new(spec)
                        .map_err(|r| field_err(&def.name, format!("labels: {r}")))?,
                )),
            };
            let has_labels = labels.is_some();
            columns.push(Column {
                name: def.name.clone(),
                data_type,
                nullable: def.nullable,
                source: def.source,
                event_time: def.event_time.clone(),
                doc: def.doc.clone(),
                labels,
                raw_of: None,
                contract,
            });
            if has_labels {
                // The raw label travels next to the canonical one, so nothing is lost to folding.
                let raw_name = format!("{}{RAW_SUFFIX}", def.name);
                if raw.columns.iter().any(|d| d.name == raw_name) {
                    return Err(field_err(
                        &raw_name,
                        format!(
                            "is added automatically for the labels of `{}`; remove it",
                            def.name
                        ),
                    ));
                }
                columns.push(Column {
                    name: raw_name,
                    data_type: DataType::Utf8,
                    nullable: true,
                    source: None,
                    event_time: None,
                    doc: Some(format!(
                        "`{}` as the model wrote it, when that was not already an allowed value.",
                        def.name
                    )),
                    labels: None,
                    raw_of: Some(def.name.clone()),
                    contract: Contract::default(),
                });
            }
        }
        for col in &columns {
            if let Some(event_time) = &col.event_time {
                match columns.iter().find(|c| &c.name == event_time) {
                    Some(c) if c.data_type == timestamp_type() => {}
                    Some(_) => {
                        return Err(field_err(
                            &col.name,
                            format!("event_time column `{event_time}` must be a timestamp"),
                        ));
                    }
                    None => {
                        return Err(field_err(
                            &col.name,
                            format!("event_time column `{event_time}` is not defined"),
                        ));
                    }
                }
            }
        }
        if let Some(part) = &raw.table.partition_column {
            match columns.iter().find(|c| &c.name == part) {
                None => {
                    return Err(field_err(
                        "table.partition_column",
                        format!("`{part}` is not a column"),
                    ));
                }
                Some(c) if !matches!(c.data_type, DataType::Date32 | DataType::Utf8) => {
                    return Err(field_err(
                        part,
                        "a partition column must be a date or a string".into(),
                    ));
                }
                Some(_) => {}
            }
        }
        for (i, name) in raw.table.key.iter().enumerate() {
            let reason = match columns.iter().find(|c| &c.name == name) {
                None => Some(format!("`{name}` is not a column")),
                Some(c) if c.nullable => Some(format!(
                    "`{name}` is nullable: a key column needs `nullable = false`"
                )),
                Some(c) if c.source.is_some() => Some(format!(
                    "`{name}` is filled by sluice, not by the upstream: it cannot name a post"
                )),
                Some(c) if !matches!(c.data_type, DataType::Utf8 | DataType::Int64) => {
                    Some(format!("`{name}` must be a string or a long to be a key"))
                }
                Some(_) if raw.table.key[..i].contains(name) => {
                    Some(format!("`{name}` is named twice"))
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                return Err(field_err("table.key", reason));
            }
        }
        for name in &raw.table.version_by {
            let reason = match columns.iter().find(|c| &c.name == name) {
                _ if raw.table.key.is_empty() => {
                    Some("orders the versions of a key: declare `key` first".to_string())
                }
                None => Some(format!("`{name}` is not a column")),
                Some(c)
                    if matches!(
                        c.data_type,
                        DataType::List(_) | DataType::Struct(_) | DataType::Binary
                    ) =>
                {
                    Some(format!(
                        "`{name}` is a {}: it has no order",
                        type_name(&c.data_type)
                    ))
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                return Err(field_err("table.version_by", reason));
            }
        }
        if let Some(name) = &raw.table.author {
            let reason = match columns.iter().find(|c| &c.name == name) {
                _ if raw.table.key.is_empty() => Some(
                    "`sluice forget` erases through the deletes machinery: declare `key` first"
                        .to_string(),
                ),
                None => Some(format!("`{name}` is not a column")),
                Some(c) if c.source.is_some() => Some(format!(
                    "`{name}` is filled by sluice, not by the upstream: it names no author"
                )),
                Some(c) if !matches!(c.data_type, DataType::Utf8 | DataType::Int64) => Some(
                    format!("`{name}` must be a string or a long to name an author"),
                ),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                return Err(field_err("table.author", reason));
            }
        }
        Ok(TableSchema {
            name: raw.table.name,
            description: raw.table.description,
            columns,
            partition_column: raw.table.partition_column,
            key: raw.table.key,
            version_by: raw.table.version_by,
            author: raw.table.author,
            file: file.to_path_buf(),
        })
    }

    /// The Arrow schema of the table as written to Parquet and Delta.
    ///
    /// Every field is nullable at the Arrow level: non-null contracts are enforced per row by the
    /// decoder (a violation rejects one message), so a writer bug can never fail a whole batch.
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.clone(), true))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// The name of the column sluice fills from `source` (a Kafka position, the ingestion
    /// time), if the table has one.
    pub fn source_column(&self, source: ColumnSource) -> Option<&str> {
        self.columns
            .iter()
            .find(|c| c.source == Some(source))
            .map(|c| c.name.as_str())
    }

    /// Finds a column by name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Reads a column's value contract, refusing options that do not fit its type.
fn parse_contract(def: &ColumnDef, data_type: &DataType) -> Result<Contract, String> {
    let mut contract = Contract::default();
    if let Some([min, max]) = def.range {
        if !numeric_leaves(data_type) {
            return Err(
                "`range` applies only to numeric columns (or lists and structs of numbers)".into(),
            );
        }
        if min.is_nan() || max.is_nan() || min > max {
            return Err(format!("`range` [{min}, {max}] is empty"));
        }
        contract.range = Some((min, max));
    }
    if let Some(dim) = def.dimension {
        if !matches!(data_type, DataType::List(_)) {
            return Err("`dimension` applies only to list columns".into());
        }
        contract.dimension = Some(dim);
    }
    let is_timestamp = matches!(data_type, DataType::Timestamp(_, _));
    if let Some(text) = &def.not_before {
        if !is_timestamp {
            return Err("`not_before` applies only to timestamp columns".into());
        }
        contract.not_before_us =
            Some(parse_timestamp(text, None).map_err(|e| format!("not_before: {e}"))?);
    }
    if let Some(text) = &def.max_future {
        if !is_timestamp {
            return Err("`max_future` applies only to timestamp columns".into());
        }
        contract.max_future_us =
            Some(parse_duration_us(text).map_err(|e| format!("max_future: {e}"))?);
    }
    if def.source.is_some() && contract != Contract::default() {
        return Err("value contracts apply to mapped columns, not to sluice-filled ones".into());
    }
    Ok(contract)
}

/// Whether every leaf of a type is a number (so a range can apply to all of them).
fn numeric_leaves(ty: &DataType) -> bool {
    match ty {
        DataType::Int32 | DataType::Int64 | DataType::Float32 | DataType::Float64 => true,
        DataType::List(f) => numeric_leaves(f.data_type()),
        DataType::Struct(fields) => fields.iter().all(|f| numeric_leaves(f.data_type())),
        _ => false,
    }
}

/// The Arrow type sluice stores timestamps as: microseconds in UTC, i.e. Delta `timestamp`.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

fn source_type(source: ColumnSource) -> DataType {
    match source {
        ColumnSource::KafkaTopic | ColumnSource::KafkaKey => DataType::Utf8,
        ColumnSource::KafkaPartition => DataType::Int32,
        ColumnSource::KafkaOffset => DataType::Int64,
        ColumnSource::KafkaTimestamp | ColumnSource::IngestedAt => timestamp_type(),
        ColumnSource::EventDate => DataType::Date32,
    }
}

fn source_name(source: ColumnSource) -> &'static str {
    match source {
        ColumnSource::KafkaTopic => "kafka_topic",
        ColumnSource::KafkaPartition => "kafka_partition",
        ColumnSource::KafkaOffset => "kafka_offset",
        ColumnSource::KafkaTimestamp => "kafka_timestamp",
        ColumnSource::KafkaKey => "kafka_key",
        ColumnSource::IngestedAt => "ingested_at",
        ColumnSource::EventDate => "event_date",
    }
}

/// Column and struct-field names must be lower-case snake_case: Trino and the Hive Metastore
/// fold names to lower case, so anything else would be unreachable or ambiguous there.
fn check_identifier(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "`{name}` is not a lower-case snake_case name (a-z, 0-9, _; starting with a letter)"
        ));
    }
    Ok(())
}

/// Parses a type from the schema grammar:
/// `string | boolean | int | long | float | double | timestamp | date | binary | list<T> |
/// struct<name:T,...>`.
pub fn parse_type(text: &str) -> Result<DataType, String> {
    let mut parser = TypeParser { src: text, pos: 0 };
    let ty = parser.parse()?;
    parser.skip_ws();
    if parser.pos != text.len() {
        return Err(format!(
            "unexpected `{}` after the type in `{text}`",
            &text[parser.pos..]
        ));
    }
    Ok(ty)
}

/// The schema-grammar spelling of an Arrow type (inverse of [`parse_type`]).
pub fn type_name(ty: &DataType) -> String {
    match ty {
        DataType::Utf8 => "string".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "long".into(),
        DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Timestamp(_, _) => "timestamp".into(),
        DataType::Date32 => "date".into(),
        DataType::Binary => "binary".into(),
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())),
        DataType::Struct(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|f| format!("{}:{}", f.name(), type_name(f.data_type())))
                .collect();
            format!("struct<{}>", inner.join(","))
        }
        other => format!("{other}"),
    }
}

struct TypeParser<'a> {
    src: &'a str,
    pos: usize,
}

impl TypeParser<'_> {
    fn skip_ws(&mut self) {
        while self.src[self.pos..].starts_with(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn word(&mut self) -> &str {
        self.skip_ws();
        let start = self.pos;
        while self.src[self.pos..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        &self.src[start..self.pos]
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        self.skip_ws();
        if self.src[self.pos..].starts_with(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!(
                "expected `{c}` at position {} in `{}`",
                self.pos, self.src
            ))
        }
    }

    fn peek(&mut self, c: char) -> bool {
        self.skip_ws();
        self.src[self.pos..].starts_with(c)
    }

    fn parse(&mut self) -> Result<DataType, String> {
        let word = self.word().to_string();
        Ok(match word.as_str() {
            "string" => DataType::Utf8,
            "boolean" => DataType::Boolean,
            "int" => DataType::Int32,
            "long" => DataType::Int64,
            "float" => DataType::Float32,
            "double" => DataType::Float64,
            "timestamp" => timestamp_type(),
            "date" => DataType::Date32,
            "binary" => DataType::Binary,
            "list" => {
                self.expect('<')?;
                let inner = self.parse()?;
                self.expect('>')?;
                DataType::List(Arc::new(Field::new("item", inner, true)))
            }
            "struct" => {
                self.expect('<')?;
                let mut fields: Vec<Field> = Vec::new();
                loop {
                    let name = self.word().to_string();
                    check_identifier(&name).map_err(|r| format!("struct field {r}"))?;
                    if fields.iter().any(|f| f.name() == &name) {
                        return Err(format!("struct field `{name}` defined twice"));
                    }
                    self.expect(':')?;
                    let ty = self.parse()?;
                    fields.push(Field::new(name, ty, true));
                    if self.peek(',') {
                        self.expect(',')?;
                    } else {
                        break;
                    }
                }
                self.expect('>')?;
                DataType::Struct(Fields::from(fields))
            }
            "" => return Err(format!("missing type name in `{}`", self.src)),
            other => {
                return Err(format!(
                    "unknown type `{other}` (expected string, boolean, int, long, float, double, \
                     timestamp, date, binary, list<T> or struct<name:T,...>)"
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TableSchema, SchemaError> {
        TableSchema::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn flagship_schema_loads_with_trino_friendly_types() {
        let schema = TableSchema::load(Path::new("schemas/enriched_posts.toml")).unwrap();
        assert_eq!(schema.name, "enriched_posts");
        assert_eq!(schema.partition_column.as_deref(), Some("event_date"));
        let created = schema.column("created_at").unwrap();
        assert_eq!(created.data_type, timestamp_type());
        let entities = schema.column("entities").unwrap();
        assert_eq!(
            type_name(&entities.data_type),
            "list<struct<text:string,label:string,score:double>>"
        );
        assert_eq!(
            schema.column("embedding").unwrap().data_type,
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
        );
    }

    #[test]
    fn nested_types_round_trip_through_the_grammar() {
        for t in [
            "string",
            "list<float>",
            "struct<a:long,b:list<struct<c:string,d:double>>>",
        ] {
            assert_eq!(type_name(&parse_type(t).unwrap()), t);
        }
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let bad_type = "[table]\nname = \"t\"\n[[columns]]\nname = \"score\"\ntype = \"decimal\"\n";
        let err = parse(bad_type).unwrap_err().to_string();
        assert!(
            err.starts_with("schema file t.toml: column `score`: unknown type `decimal`"),
            "{err}"
        );

        let upper = "[table]\nname = \"t\"\n[[columns]]\nname = \"PostId\"\ntype = \"string\"\n";
        let err = parse(upper).unwrap_err().to_string();
        assert!(
            err.contains("column `PostId`: `PostId` is not a lower-case snake_case name"),
            "{err}"
        );

        let bad_part = "[table]\nname = \"t\"\npartition_column = \"day\"\n[[columns]]\nname = \"a\"\ntype = \"string\"\n";
        let err = parse(bad_part).unwrap_err().to_string();
        assert!(
            err.contains("column `table.partition_column`: `day` is not a column"),
            "{err}"
        );

        let unknown_key = "[table]\nname = \"t\"\n[[columns]]\nname = \"a\"\ntype = \"string\"\nnullabel = false\n";
        let err = parse(unknown_key).unwrap_err().to_string();
        assert!(err.contains("unknown field `nullabel`"), "{err}");

        let bad_source = "[table]\nname = \"t\"\n[[columns]]\nname = \"o\"\ntype = \"string\"\nsource = \"kafka_offset\"\n";
        let err = parse(bad_source).unwrap_err().to_string();
        assert!(
            err.contains("column `o`: source `kafka_offset` needs type `long`"),
            "{err}"
        );
    }
}
