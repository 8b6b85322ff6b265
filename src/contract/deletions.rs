//! The deletions table's shape (`<table>_deletions`): what upstream deletes and newer versions
//! removed from a keyed table, one row per Kafka message accounted for there. Its key columns
//! are the main table's (as text); the rest is the same for every table. Maintenance fills it
//! (`table::deletes`); the audit and `sluice sql` read it.

use std::fmt::Write as _;
use std::path::Path;

use crate::contract::schema::{SchemaError, TableSchema};

/// Suffix of a main table's deletions table.
pub const SUFFIX: &str = "_deletions";

/// A delete message: the post it names is gone upstream.
pub const DELETE: &str = "delete";
/// A row removed because its post was deleted.
pub const DELETED: &str = "deleted";
/// A row removed because a newer version of its post (an edit, or the same event delivered
/// again) is in the table.
pub const REPLACED: &str = "replaced";

/// The columns after the key columns.
const COLUMNS: &str = r#"
[[columns]]
name = "operation"
type = "string"
nullable = false
doc = "delete: a delete message; deleted: a row its post's delete removed; replaced: a row a newer version of its post (an edit or a redelivery) replaced."

[[columns]]
name = "kafka_topic"
type = "string"
nullable = false
doc = "Where the message this record accounts for was read."

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
name = "cause_topic"
type = "string"
doc = "For a removed row: the message that removed it (the delete, or the newer version)."

[[columns]]
name = "cause_partition"
type = "int"

[[columns]]
name = "cause_offset"
type = "long"

[[columns]]
name = "recorded_at"
type = "timestamp"
nullable = false
doc = "When maintenance recorded this; a removed row leaves the main table in the commit that follows."
"#;

/// The deletions table's name for a main table.
pub fn table_name(main: &str) -> String {
    format!("{main}{SUFFIX}")
}

/// The deletions table definition for a keyed main table: its key columns, then the record's.
pub fn schema(main: &TableSchema) -> Result<TableSchema, SchemaError> {
    let mut text = format!(
        "[table]\nname = \"{}\"\ndescription = \"What upstream deletes and newer versions removed from {}.\"\n",
        table_name(&main.name),
        main.name
    );
    for name in &main.key {
        let _ = write!(
            text,
            "\n[[columns]]\nname = \"{name}\"\ntype = \"string\"\nnullable = false\ndoc = \"Key column of {}, as text.\"\n",
            main.name
        );
    }
    text.push_str(COLUMNS);
    TableSchema::parse(&text, Path::new("<built-in deletions schema>"))
}
