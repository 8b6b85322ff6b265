//! The dead-letter table's shape: its name beside each main table and its columns, the same for
//! every main table. The writer fills it (`ingest::dead_letters`); the readers find it here.

use std::path::Path;

use crate::contract::schema::{SchemaError, TableSchema};

/// Suffix of a main table's dead-letter table.
pub const SUFFIX: &str = "_dead_letters";

/// The dead-letter table's columns; the same for every main table.
const SCHEMA: &str = r#"
[table]
name = "TABLE_dead_letters"
description = "Messages that could not become rows, with their raw bytes and why."
partition_column = "event_date"

[[columns]]
name = "kafka_topic"
type = "string"
nullable = false

[[columns]]
name = "kafka_partition"
type = "int"
nullable = false

[[columns]]
name = "kafka_offset"
type = "long"
nullable = false

[[columns]]
name = "kafka_timestamp"
type = "timestamp"

[[columns]]
name = "kafka_key"
type = "binary"
doc = "The message key as received."

[[columns]]
name = "payload"
type = "binary"
doc = "The message value as received, byte for byte (null for a tombstone)."

[[columns]]
name = "payload_bytes"
type = "long"
doc = "Size of the payload in bytes."

[[columns]]
name = "reason"
type = "string"
nullable = false
doc = "Reason code: malformed_json, not_an_object, multiple_values, invalid_utf8, too_large, too_deep, missing_required, type_mismatch, out_of_range, bad_timestamp, wrong_dimension, no_schema_id, unknown_schema, schema_mismatch, lost."

[[columns]]
name = "detail"
type = "string"
doc = "What exactly was wrong, naming the field where there is one."

[[columns]]
name = "dead_lettered_at"
type = "timestamp"
nullable = false
doc = "When sluice stored the dead letter."

[[columns]]
name = "event_date"
type = "date"
nullable = false
doc = "UTC date of the Kafka timestamp (else of dead_lettered_at); the partition column."
"#;

/// The dead-letter table's name for a main table.
pub fn table_name(main: &str) -> String {
    format!("{main}{SUFFIX}")
}

/// The dead-letter table definition for a main table.
pub fn schema(main: &str) -> Result<TableSchema, SchemaError> {
    let text = SCHEMA.replace("TABLE_dead_letters", &table_name(main));
    TableSchema::parse(&text, Path::new("<built-in dead-letter schema>"))
}
