//! Mapping files: where each column's value is found in one upstream JSON shape.
//!
//! A mapping names a JSON path (or a constant) per column. From all paths of a mapping sluice
//! derives the nested Arrow schema that arrow-json decodes messages into, so the decoder reads
//! only what the table needs and ignores every other field; [`Mapping::project`] then lifts the
//! leaves out of that nested batch into table columns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, ListArray, RecordBatchOptions, StringArray, StructArray, make_array,
    new_null_array,
};
use deltalake::arrow::buffer::NullBuffer;
use deltalake::arrow::compute::{CastOptions, cast, cast_with_options};
use deltalake::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;
use serde::Deserialize;

use crate::contract::schema::TableSchema;
use crate::contract::values::timestamps_from_text;

/// Errors found while reading a mapping file.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The file could not be read.
    #[error(
        "mapping file {file}: {source}{}",
        crate::contract::schema::missing_file_hint(source, "mapping", "a table's `sources`")
    )]
    Io {
        /// Path of the mapping file.
        file: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the mapping format.
    #[error("mapping file {file}: {message}")]
    Syntax {
        /// Path of the mapping file.
        file: PathBuf,
        /// Parser message, with line and column.
        message: String,
    },
    /// A column entry is wrong for the table it maps into.
    #[error("mapping file {file}: column `{field}`: {reason}")]
    Field {
        /// Path of the mapping file.
        file: PathBuf,
        /// Column the problem is in.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    table: String,
    columns: BTreeMap<String, EntryDef>,
    #[serde(default)]
    operation: Option<OperationDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationDef {
    path: PathDef,
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    key: BTreeMap<String, PathDef>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PathDef {
    Dotted(String),
    Segments(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDef {
    #[serde(default)]
    path: Option<PathDef>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    unit: Option<String>,
}

/// Where one column's value comes from.
#[derive(Debug, Clone)]
enum ValueSource {
    /// A JSON path; `leaf` is the Arrow type arrow-json decodes it as.
    Path {
        segments: Vec<String>,
        leaf: DataType,
        unit: Option<TimeUnit>,
    },
    /// The same string for every row (e.g. the platform name).
    Constant(String),
    /// Text with `{path}` holes filled from the message (Bluesky's `at://did/collection/rkey`
    /// post URI); null when a hole's value is missing.
    Format(Vec<Piece>),
}

/// A part of a `format` template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Path(Vec<String>),
}

/// What a message does to the row its key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A create, an update or a redelivery: the message is a row, and the newest row of a key
    /// is the one the table keeps.
    Upsert,
    /// The post is gone upstream: every row with its key goes, now and whenever it arrives.
    Delete,
}

/// Where a mapping finds the operation of a message (`[operation]`), and where a delete finds
/// its key when it does not carry the row's fields.
#[derive(Debug, Clone)]
struct OperationSpec {
    segments: Vec<String>,
    /// Values that mean delete; `*` matches any value.
    delete: Vec<String>,
    /// Key column → path read instead of the column's own mapping on deletes.
    key: BTreeMap<String, Vec<String>>,
}

/// A validated mapping from one upstream JSON shape to the columns of one table.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Table this mapping fills.
    pub table: String,
    /// Where the mapping was read from, for error messages.
    pub file: PathBuf,
    entries: Vec<(String, ValueSource)>,
    operation: Option<OperationSpec>,
    source_schema: SchemaRef,
}

impl Mapping {
    /// Reads a mapping file and validates it against the table it maps into.
    pub fn load(file: &Path, table: &TableSchema) -> Result<Self, MappingError> {
        let text = std::fs::read_to_string(file).map_err(|source| MappingError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        Self::parse(&text, file, table)
    }

    /// Parses mapping text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path, table: &TableSchema) -> Result<Self, MappingError> {
        let raw: MappingFile = toml::from_str(text).map_err(|e| MappingError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let err = |field: &str, reason: String| MappingError::Field {
            file: file.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if raw.table != table.name {
            return Err(err(
                "table",
                format!(
                    "maps into `{}` but is configured for table `{}`",
                    raw.table, table.name
                ),
            ));
        }
        let mut entries = Vec::new();
        let mut tree = Node::default();
        for (name, def) in raw.columns {
            let column = table
                .column(&name)
                .ok_or_else(|| err(&name, format!("table `{}` has no such column", table.name)))?;
            if column.source.is_some() {
                return Err(err(
                    &name,
                    "is filled by sluice itself (source in the schema) and cannot be mapped".into(),
                ));
            }
            if let Some(label_column) = &column.raw_of {
                return Err(err(
                    &name,
                    format!(
                        "is filled by sluice with the raw labels of `{label_column}`; map `{label_column}` instead"
                    ),
                ));
            }
            if let Some(template) = def.format {
                if def.path.is_some() || def.value.is_some() || def.unit.is_some() {
                    return Err(err(
                        &name,
                        "`format` stands alone: no `path`, `value` or `unit` beside it".into(),
                    ));
                }
                if column.data_type != DataType::Utf8 {
                    return Err(err(&name, "`format` fills only string columns".into()));
                }
                let pieces = parse_format(&template).map_err(|reason| err(&name, reason))?;
                for piece in &pieces {
                    if let Piece::Path(segments) = piece {
                        tree.insert(segments, DataType::Utf8)
                            .map_err(|reason| err(&name, reason))?;
                    }
                }
                entries.push((name, ValueSource::Format(pieces)));
                continue;
            }
            let source = match (def.path, def.value) {
                (Some(_), Some(_)) => {
                    return Err(err(&name, "set either `path` or `value`, not both".into()));
                }
                (None, None) => {
                    return Err(err(&name, "needs a `path`, a `value` or a `format`".into()));
                }
                (None, Some(value)) => {
                    if column.data_type != DataType::Utf8 {
                        return Err(err(
                            &name,
                            "constant values are only allowed for string columns".into(),
                        ));
                    }
                    if def.unit.is_some() {
                        return Err(err(&name, "`unit` applies only to paths".into()));
                    }
                    ValueSource::Constant(value)
                }
                (Some(path), None) => {
                    let segments = path_segments(path).map_err(|reason| err(&name, reason))?;
                    let unit = match (&column.data_type, def.unit.as_deref()) {
                        (_, None) => None,
                        (DataType::Timestamp(_, _), Some(unit)) => Some(match unit {
                            "s" => TimeUnit::Second,
                            "ms" => TimeUnit::Millisecond,
                            "us" => TimeUnit::Microsecond,
                            "ns" => TimeUnit::Nanosecond,
                            other => {
                                return Err(err(
                                    &name,
                                    format!("unknown unit `{other}` (expected s, ms, us or ns)"),
                                ));
                            }
                        }),
                        (_, Some(_)) => {
                            return Err(err(
                                &name,
                                "`unit` applies only to timestamp columns".into(),
                            ));
                        }
                    };
                    // Timestamps are read as text (numbers are coerced to their digits) and
                    // parsed by sluice, which knows every form upstreams send.
                    let leaf = match &column.data_type {
                        DataType::Timestamp(_, _) => DataType::Utf8,
                        // Labelled booleans arrive as "yes", "Sarcastic", true...: read as text
                        // (JSON booleans are coerced to "true"/"false") and canonicalized.
                        DataType::Boolean if column.labels.is_some() => DataType::Utf8,
                        ty => ty.clone(),
                    };
                    tree.insert(&segments, leaf.clone())
                        .map_err(|reason| err(&name, reason))?;
                    ValueSource::Path {
                        segments,
                        leaf,
                        unit,
                    }
                }
            };
            entries.push((name, source));
        }
        let operation = match raw.operation {
            None => None,
            Some(def) => {
                let field = "operation";
                if table.key.is_empty() {
                    return Err(err(
                        field,
                        format!(
                            "table `{}` declares no `key`: deletes need one to name the rows they remove",
                            table.name
                        ),
                    ));
                }
                let segments = path_segments(def.path).map_err(|reason| err(field, reason))?;
                tree.insert(&segments, DataType::Utf8)
                    .map_err(|reason| err(field, reason))?;
                if def.delete.is_empty() {
                    return Err(err(field, "`delete` lists no value".into()));
                }
                let mut key = BTreeMap::new();
                for (column, path) in def.key {
                    if !table.key.contains(&column) {
                        return Err(err(
                            &format!("operation.key.{column}"),
                            format!("is not a key column of `{}`", table.name),
                        ));
                    }
                    let segments = path_segments(path).map_err(|reason| err(&column, reason))?;
                    tree.insert(&segments, DataType::Utf8)
                        .map_err(|reason| err(&column, reason))?;
                    key.insert(column, segments);
                }
                for column in &table.key {
                    if !key.contains_key(column) && !entries.iter().any(|(n, _)| n == column) {
                        return Err(err(
                            column,
                            "is a key column: map it, or give deletes a path in `[operation.key]`"
                                .into(),
                        ));
                    }
                }
                Some(OperationSpec {
                    segments,
                    delete: def.delete,
                    key,
                })
            }
        };
        Ok(Mapping {
            table: raw.table,
            file: file.to_path_buf(),
            entries,
            operation,
            source_schema: Arc::new(Schema::new(tree.into_fields())),
        })
    }

    /// Whether messages of this shape can delete (the mapping has an `[operation]`).
    pub fn has_operations(&self) -> bool {
        self.operation.is_some()
    }

    /// The operation of each row of a decoded source batch, and for deletes the key columns'
    /// values (as text; `None` when a key value is missing). Without `[operation]` every
    /// message is an upsert.
    pub fn operations(
        &self,
        source: &RecordBatch,
        table: &TableSchema,
    ) -> Vec<(Operation, Option<Vec<String>>)> {
        let rows = source.num_rows();
        let Some(spec) = &self.operation else {
            return vec![(Operation::Upsert, None); rows];
        };
        let ops = extract(source, &spec.segments);
        let ops = ops.as_ref().and_then(|a| a.as_string_opt::<i32>());
        let is_delete = |r: usize| -> bool {
            let Some(ops) = ops else { return false };
            ops.is_valid(r) && spec.delete.iter().any(|d| d == "*" || d == ops.value(r))
        };
        let keys: Vec<Option<ArrayRef>> = table
            .key
            .iter()
            .map(|column| match spec.key.get(column) {
                Some(segments) => extract(source, segments),
                None => {
                    let (_, value) = self.entries.iter().find(|(n, _)| n == column)?;
                    self.values(value, source).ok()
                }
            })
            .map(|a| a.and_then(|a| cast(&a, &DataType::Utf8).ok()))
            .collect();
        (0..rows)
            .map(|r| {
                if !is_delete(r) {
                    return (Operation::Upsert, None);
                }
                let key: Option<Vec<String>> = keys
                    .iter()
                    .map(|a| {
                        let a = a.as_ref()?.as_string::<i32>();
                        a.is_valid(r).then(|| a.value(r).to_string())
                    })
                    .collect();
                (Operation::Delete, key)
            })
            .collect()
    }

    /// The key (as text, in the table's key order) and the author a message names, read from
    /// its JSON as far as it goes: for messages that were not rows (dead letters), where the
    /// typed decoding failed. A delete message's key comes from `[operation.key]` as on the
    /// write path. `None` where a value is missing or the text is not JSON.
    pub fn identity(
        &self,
        payload: &[u8],
        table: &TableSchema,
    ) -> (Option<Vec<String>>, Option<String>) {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return (None, None);
        };
        let entry = |column: &str| -> Option<String> {
            let (_, value) = self.entries.iter().find(|(n, _)| n == column)?;
            match value {
                ValueSource::Path { segments, .. } => json_text(&json, segments),
                ValueSource::Constant(v) => Some(v.clone()),
                ValueSource::Format(pieces) => pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => Some(t.clone()),
                        Piece::Path(segments) => json_text(&json, segments),
                    })
                    .collect(),
            }
        };
        let delete = self.operation.as_ref().filter(|spec| {
            json_text(&json, &spec.segments)
                .is_some_and(|op| spec.delete.iter().any(|d| d == "*" || *d == op))
        });
        let key = table
            .key
            .iter()
            .map(
                |column| match delete.and_then(|spec| spec.key.get(column)) {
                    Some(segments) => json_text(&json, segments),
                    None => entry(column),
                },
            )
            .collect();
        (key, table.author.as_deref().and_then(entry))
    }

    /// The values one mapping entry gives a source batch, before casting to the table type.
    fn values(&self, value: &ValueSource, source: &RecordBatch) -> Result<ArrayRef, ArrowError> {
        let rows = source.num_rows();
        Ok(match value {
            ValueSource::Constant(v) => Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n(v.as_str(), rows),
            )),
            ValueSource::Format(pieces) => {
                let holes: Vec<Option<ArrayRef>> = pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Path(segments) => extract(source, segments),
                        Piece::Text(_) => None,
                    })
                    .collect();
                let mut out = deltalake::arrow::array::StringBuilder::new();
                let mut text = String::new();
                'rows: for r in 0..rows {
                    text.clear();
                    for (piece, hole) in pieces.iter().zip(&holes) {
                        match piece {
                            Piece::Text(t) => text.push_str(t),
                            Piece::Path(_) => {
                                match hole.as_ref().and_then(|h| h.as_string_opt::<i32>()) {
                                    Some(h) if h.is_valid(r) => text.push_str(h.value(r)),
                                    _ => {
                                        out.append_null();
                                        continue 'rows;
                                    }
                                }
                            }
                        }
                    }
                    out.append_value(&text);
                }
                Arc::new(out.finish())
            }
            ValueSource::Path { segments, leaf, .. } => {
                extract(source, segments).unwrap_or_else(|| new_null_array(leaf, rows))
            }
        })
    }

    /// The nested schema arrow-json decodes messages of this shape into.
    pub fn source_schema(&self) -> SchemaRef {
        self.source_schema.clone()
    }

    /// Lifts mapped columns out of a decoded source batch, cast to their table types.
    /// Columns the mapping does not mention are absent from the result. Timestamp texts that
    /// do not parse leave the value null and are reported with their row.
    pub fn project(
        &self,
        source: &RecordBatch,
        table: &TableSchema,
    ) -> Result<Projected, ArrowError> {
        let mut projected = Projected::default();
        for (name, value) in &self.entries {
            let target = &table
                .column(name)
                .expect("mapping columns were validated against the table")
                .data_type;
            let array: ArrayRef = match value {
                ValueSource::Constant(_) | ValueSource::Format(_) => self.values(value, source)?,
                ValueSource::Path { leaf, unit, .. } => {
                    let array = self.values(value, source)?;
                    if let (DataType::Timestamp(_, _), Some(texts)) =
                        (target, array.as_string_opt::<i32>())
                    {
                        let (ts, errors) = timestamps_from_text(texts, *unit, name);
                        projected.bad_timestamps.extend(errors);
                        Arc::new(ts)
                    } else if array.data_type() == target
                        || (*leaf == DataType::Utf8 && *target == DataType::Boolean)
                    {
                        // Labelled booleans stay text here; decode canonicalizes them.
                        array
                    } else {
                        cast(&array, target)?
                    }
                }
            };
            projected.columns.insert(name.clone(), array);
        }
        Ok(projected)
    }

    /// Reshapes a batch decoded from a schema'd format (Avro, Protobuf) into
    /// [`Self::source_schema`], so it maps like decoded JSON: each path is looked up by name
    /// (see [`segment_matches`]), fields the mapping does not name are dropped, missing ones are
    /// null, and leaves are cast to the types JSON decoding would give them. A value that does
    /// not fit its column fails the whole batch, naming the path: the caller retries row by
    /// row to find the messages to reject.
    pub fn conform(&self, decoded: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        let rows = decoded.num_rows();
        let columns = self
            .source_schema
            .fields()
            .iter()
            .map(|field| {
                let found = decoded
                    .schema()
                    .fields()
                    .iter()
                    .position(|f| segment_matches(field.name(), f.name()))
                    .map(|i| decoded.column(i));
                match found {
                    Some(array) => conform_array(array, field.data_type(), field.name()),
                    None => Ok(new_null_array(field.data_type(), rows)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new_with_options(
            self.source_schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )
    }
}

/// Whether a mapping path segment names a field. Avro and Protobuf names allow only letters,
/// digits and `_`, so a segment such as `appropriate language` also matches the field whose
/// name has each other character replaced by `_` (`appropriate_language`), the scrubbing
/// Confluent's converters apply.
pub fn segment_matches(segment: &str, field: &str) -> bool {
    segment == field
        || (segment.len() == field.len()
            && segment
                .bytes()
                .zip(field.bytes())
                .all(|(s, f)| s == f || (f == b'_' && !(s.is_ascii_alphanumeric() || s == b'_'))))
}

/// One decoded array reshaped to `target`: structs field by field by name, lists item by
/// item, leaves cast (strictly: a value that does not convert is an error naming `path`).
fn conform_array(array: &ArrayRef, target: &DataType, path: &str) -> Result<ArrayRef, ArrowError> {
    if array.data_type() == target {
        return Ok(array.clone());
    }
    let mismatch = |detail: String| ArrowError::CastError(format!("`{path}`: {detail}"));
    match target {
        DataType::Struct(fields) => {
            let Some(parent) = array.as_struct_opt() else {
                return Err(mismatch(format!(
                    "{} where an object is expected",
                    array.data_type()
                )));
            };
            let children = fields
                .iter()
                .map(|field| {
                    let child_path = format!("{path}.{}", field.name());
                    let found = parent
                        .fields()
                        .iter()
                        .position(|f| segment_matches(field.name(), f.name()));
                    match found {
                        Some(i) => conform_array(parent.column(i), field.data_type(), &child_path),
                        None => Ok(new_null_array(field.data_type(), parent.len())),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(StructArray::try_new(
                fields.clone(),
                children,
                parent.nulls().cloned(),
            )?))
        }
        DataType::List(item) => {
            let Some(list) = array.as_list_opt::<i32>() else {
                return Err(mismatch(format!(
                    "{} where a list is expected",
                    array.data_type()
                )));
            };
            let values = conform_array(list.values(), item.data_type(), &format!("{path}[]"))?;
            Ok(Arc::new(ListArray::try_new(
                item.clone(),
                list.offsets().clone(),
                values,
                list.nulls().cloned(),
            )?))
        }
        _ => {
            let options = CastOptions {
                safe: false,
                ..Default::default()
            };
            cast_with_options(array, target, &options).map_err(|e| mismatch(e.to_string()))
        }
    }
}

/// A path as dotted text or as segments, checked for empty segments.
fn path_segments(path: PathDef) -> Result<Vec<String>, String> {
    let segments = match path {
        PathDef::Dotted(s) => s.split('.').map(str::to_string).collect::<Vec<_>>(),
        PathDef::Segments(v) => v,
    };
    if segments.is_empty() || segments.iter().any(String::is_empty) {
        return Err("the path has an empty segment".into());
    }
    Ok(segments)
}

/// Splits a `format` template into text and `{dotted.path}` holes; `{{` and `}}` are braces.
fn parse_format(template: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut path = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => path.push(c),
                        None => return Err(format!("`{template}`: a `{{` is never closed")),
                    }
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Path(path_segments(PathDef::Dotted(path))?));
            }
            '}' => return Err(format!("`{template}`: a `}}` without its `{{`")),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Path(_))) {
        return Err(format!(
            "`{template}` has no `{{path}}`: use `value` for constant text"
        ));
    }
    Ok(pieces)
}

/// Mapped columns of a batch.
#[derive(Debug, Default)]
pub struct Projected {
    /// Column name → values, in table types.
    pub columns: BTreeMap<String, ArrayRef>,
    /// Rows whose timestamp text did not parse, with the column and the text named.
    pub bad_timestamps: Vec<(usize, String)>,
}

/// Walks a path through nested structs, folding each parent's nulls into the child so a
/// missing parent object reads as a null leaf.
/// The text of a JSON path's value: strings as they are, numbers and booleans as written;
/// `None` for a missing value, null, an object or a list.
fn json_text(json: &serde_json::Value, segments: &[String]) -> Option<String> {
    let value = segments.iter().try_fold(json, |v, s| v.get(s))?;
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn extract(batch: &RecordBatch, segments: &[String]) -> Option<ArrayRef> {
    let mut current: ArrayRef = batch.column_by_name(&segments[0])?.clone();
    for segment in &segments[1..] {
        let parent = current.as_any().downcast_ref::<StructArray>()?;
        let child = parent.column_by_name(segment)?.clone();
        let nulls = NullBuffer::union(parent.nulls(), child.nulls());
        current = if nulls.as_ref() == child.nulls() {
            child
        } else {
            let data = child.to_data().into_builder().nulls(nulls).build().ok()?;
            make_array(data)
        };
    }
    Some(current)
}

/// The nested structure implied by a mapping's paths.
#[derive(Debug, Default)]
struct Node {
    children: Vec<(String, NodeKind)>,
}

#[derive(Debug)]
enum NodeKind {
    Leaf(DataType),
    Object(Node),
}

impl Node {
    fn insert(&mut self, segments: &[String], leaf: DataType) -> Result<(), String> {
        let (head, rest) = segments.split_first().expect("paths are non-empty");
        let existing = self.children.iter_mut().find(|(n, _)| n == head);
        match (existing, rest.is_empty()) {
            (None, true) => self.children.push((head.clone(), NodeKind::Leaf(leaf))),
            (None, false) => {
                let mut node = Node::default();
                node.insert(rest, leaf)?;
                self.children.push((head.clone(), NodeKind::Object(node)));
            }
            (Some((_, NodeKind::Leaf(existing))), true) => {
                if *existing != leaf {
                    return Err(format!(
                        "path `{}` is also mapped with another type ({existing} vs {leaf})",
                        segments.join(".")
                    ));
                }
            }
            (Some((_, NodeKind::Object(node))), false) => node.insert(rest, leaf)?,
            (Some(_), _) => {
                return Err(format!(
                    "path `{}` is used both as an object and as a value",
                    segments.join(".")
                ));
            }
        }
        Ok(())
    }

    fn into_fields(self) -> Fields {
        self.children
            .into_iter()
            .map(|(name, kind)| match kind {
                NodeKind::Leaf(ty) => Field::new(name, ty, true),
                NodeKind::Object(node) => {
                    Field::new(name, DataType::Struct(node.into_fields()), true)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagship() -> TableSchema {
        TableSchema::load(Path::new("schemas/enriched_posts.toml")).unwrap()
    }

    #[test]
    fn shipped_mappings_validate_against_the_flagship_table() {
        let table = flagship();
        for shape in ["mastodon", "bluesky", "tweets"] {
            let file = PathBuf::from(format!("schemas/mappings/{shape}.toml"));
            Mapping::load(&file, &table).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn source_schema_nests_paths_and_reads_timestamps_as_text() {
        let table = flagship();
        let m = Mapping::load(Path::new("schemas/mappings/bluesky.toml"), &table).unwrap();
        let schema = m.source_schema();
        let commit = schema.field_with_name("commit").unwrap();
        let DataType::Struct(fields) = commit.data_type() else {
            panic!("commit should be a struct")
        };
        assert!(fields.find("record").is_some());
        // Timestamps are decoded as text and parsed by sluice (see contract::parse_timestamp).
        assert_eq!(
            schema.field_with_name("time_us").unwrap().data_type(),
            &DataType::Utf8
        );
    }

    #[test]
    fn wrong_entries_are_reported_with_the_column() {
        let table = flagship();
        let f = Path::new("m.toml");
        let cases = [
            (
                "table = \"enriched_posts\"\n[columns]\nnope = { path = \"x\" }\n",
                "column `nope`: table `enriched_posts` has no such column",
            ),
            (
                "table = \"enriched_posts\"\n[columns]\nkafka_offset = { path = \"x\" }\n",
                "column `kafka_offset`: is filled by sluice itself",
            ),
            (
                "table = \"enriched_posts\"\n[columns]\nlike_count = { value = \"3\" }\n",
                "column `like_count`: constant values are only allowed for string columns",
            ),
            (
                "table = \"enriched_posts\"\n[columns]\ntext = { path = \"a\" }\nauthor = { path = \"a.b\" }\n",
                "is used both as an object and as a value",
            ),
            (
                "table = \"other\"\n[columns]\n",
                "column `table`: maps into `other`",
            ),
        ];
        for (text, expected) in cases {
            let e = Mapping::parse(text, f, &table).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }

    fn keyed() -> TableSchema {
        let table = flagship();
        assert_eq!(table.key, ["platform", "post_id"]);
        table
    }

    /// The flagship table without its key.
    fn unkeyed() -> TableSchema {
        let text = std::fs::read_to_string("schemas/enriched_posts.toml")
            .unwrap()
            .replace("key = [\"platform\", \"post_id\"]", "")
            .replace("version_by = [\"created_at\"]", "")
            .replace("author = \"author\"", "");
        TableSchema::parse(&text, Path::new("unkeyed.toml")).unwrap()
    }

    #[test]
    fn formats_fill_keys_and_operations_pick_the_deletes() {
        let table = keyed();
        let mapping = Mapping::parse(
            "table = \"enriched_posts\"\n[columns]\n\
             post_id = { format = \"at://{did}/{c.collection}/{c.rkey}\" }\n\
             platform = { value = \"bluesky\" }\nauthor = { path = \"did\" }\n\
             [operation]\npath = \"c.operation\"\ndelete = [\"delete\"]\n",
            Path::new("m.toml"),
            &table,
        )
        .unwrap();
        let mut decoder = deltalake::arrow::json::ReaderBuilder::new(mapping.source_schema())
            .build_decoder()
            .unwrap();
        decoder
            .decode(
                br#"{"did":"d1","c":{"operation":"create","collection":"post","rkey":"r1"}}
                {"did":"d1","c":{"operation":"delete","collection":"post","rkey":"r1"}}
                {"did":"d2","c":{"operation":"delete","collection":"post"}}"#,
            )
            .unwrap();
        let source = decoder.flush().unwrap().unwrap();
        let projected = mapping.project(&source, &table).unwrap();
        let ids = projected.columns["post_id"].as_string::<i32>();
        assert_eq!(ids.value(0), "at://d1/post/r1");
        assert!(ids.is_null(2), "a missing hole leaves the value null");
        let operations = mapping.operations(&source, &table);
        assert_eq!(operations[0], (Operation::Upsert, None));
        assert_eq!(
            operations[1],
            (
                Operation::Delete,
                Some(vec!["bluesky".to_string(), "at://d1/post/r1".to_string()])
            )
        );
        assert_eq!(operations[2], (Operation::Delete, None));
    }

    #[test]
    fn keys_formats_and_operations_that_cannot_work_are_refused() {
        let f = Path::new("m.toml");
        let head = "table = \"enriched_posts\"\n[columns]\npost_id = { path = \"id\" }\n";
        let cases = [
            (
                unkeyed(),
                format!("{head}[operation]\npath = \"op\"\ndelete = [\"delete\"]\n"),
                "declares no `key`",
            ),
            (
                keyed(),
                format!("{head}[operation]\npath = \"op\"\ndelete = [\"delete\"]\n"),
                "column `platform`: is a key column",
            ),
            (
                keyed(),
                format!("{head}platform = {{ value = \"x\" }}\n[operation]\npath = \"op\"\n"),
                "`delete` lists no value",
            ),
            (
                keyed(),
                "table = \"enriched_posts\"\n[columns]\npost_id = { format = \"id\" }\n".into(),
                "has no `{path}`",
            ),
            (
                keyed(),
                "table = \"enriched_posts\"\n[columns]\npost_id = { format = \"{id\" }\n".into(),
                "is never closed",
            ),
            (
                keyed(),
                "table = \"enriched_posts\"\n[columns]\nlike_count = { format = \"{a}\" }\n".into(),
                "`format` fills only string columns",
            ),
        ];
        for (table, text, expected) in cases {
            let e = Mapping::parse(&text, f, &table).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
        let bad_key = std::fs::read_to_string("schemas/enriched_posts.toml")
            .unwrap()
            .replace("key = [\"platform\", \"post_id\"]", "key = [\"author\"]");
        let e = TableSchema::parse(&bad_key, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`author` is nullable"), "{e}");
        for (author, expected) in [
            ("nope", "`nope` is not a column"),
            ("kafka_offset", "filled by sluice"),
            ("embedding", "must be a string or a long"),
        ] {
            let text = std::fs::read_to_string("schemas/enriched_posts.toml")
                .unwrap()
                .replace("author = \"author\"", &format!("author = \"{author}\""));
            let e = TableSchema::parse(&text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("table.author") && e.contains(expected), "{e}");
        }
        let e = TableSchema::parse(
            &unkeyed_text().replace("[table]", "[table]\nauthor = \"author\""),
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("declare `key` first"), "{e}");
    }

    fn unkeyed_text() -> String {
        std::fs::read_to_string("schemas/enriched_posts.toml")
            .unwrap()
            .replace("key = [\"platform\", \"post_id\"]", "")
            .replace("version_by = [\"created_at\"]", "")
            .replace("author = \"author\"", "")
    }

    #[test]
    fn dead_letters_tell_their_key_and_author_as_far_as_their_json_goes() {
        let table = keyed();
        let identity = |shape: &str, payload: &str| {
            let file = PathBuf::from(format!("schemas/mappings/{shape}.toml"));
            Mapping::load(&file, &table)
                .unwrap()
                .identity(payload.as_bytes(), &table)
        };
        let key = |platform: &str, id: &str| Some(vec![platform.to_string(), id.to_string()]);
        // A Jetstream post with a bad field: its key and author are still there.
        assert_eq!(
            identity(
                "bluesky",
                r#"{"did":"did:plc:a","time_us":"soon","commit":{"operation":"create","collection":"app.bsky.feed.post","rkey":"r1"}}"#
            ),
            (
                key("bluesky", "at://did:plc:a/app.bsky.feed.post/r1"),
                Some("did:plc:a".to_string())
            )
        );
        // An X compliance notice: the key comes from the delete's own path, as on the write
        // path; numbers read as written.
        assert_eq!(
            identity("tweets", r#"{"delete":{"status":{"id":1234567890123}}}"#),
            (key("twitter", "1234567890123"), None)
        );
        // A post without its commit names its author but no key; text that is not JSON names
        // nothing.
        assert_eq!(
            identity("bluesky", r#"{"did":"did:plc:a","kind":"commit"}"#),
            (None, Some("did:plc:a".to_string()))
        );
        assert_eq!(identity("mastodon", "{\"id\": "), (None, None));
    }
}
