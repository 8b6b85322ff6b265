//! The deletions table's shape (`<table>_deletions`): what upstream deletes, newer versions and
//! erasure requests removed from a keyed table, one row per Kafka message accounted for there,
//! plus one per erasure request. Its key columns are the main table's (as text); the rest is the
//! same for every table. Maintenance and `sluice forget` fill it (`table::deletes`); the audit
//! and `sluice sql` read it.

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
/// An erasure request (`sluice forget`): every row with its key, or by its author, goes, now
/// and whenever it arrives; it has no Kafka position.
pub const FORGET: &str = "forget";
/// A row removed by an erasure request.
pub const FORGOTTEN: &str = "forgotten";
/// A dead letter removed by an erasure request.
pub const FORGOTTEN_DEAD_LETTER: &str = "forgotten dead letter";
/// The operations that account for a Kafka message by its absence: the removals.
pub const REMOVALS: [&str; 4] = [DELETED, REPLACED, FORGOTTEN, FORGOTTEN_DEAD_LETTER];

/// The columns after the key columns.
const COLUMNS: &str = r#"
[[columns]]
name = "operation"
type = "string"
nullable = false
doc = "delete: a delete message; deleted: a row its post's delete removed; replaced: a row a newer version of its post (an edit or a redelivery) replaced; forget: an erasure request (sluice forget); forgotten: a row it removed; forgotten dead letter: a dead letter it removed."

[[columns]]
name = "kafka_topic"
type = "string"
doc = "Where the message this record accounts for was read; null for an erasure request."

[[columns]]
name = "kafka_partition"
type = "int"

[[columns]]
name = "kafka_offset"
type = "long"

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

[[columns]]
name = "author"
type = "string"
doc = "An erasure request by author: the author; a row or dead letter it removed: that author."

[[columns]]
name = "reason"
type = "string"
doc = "An erasure request, and what it removed: the reason given to sluice forget (a ticket, a request id)."
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
            "\n[[columns]]\nname = \"{name}\"\ntype = \"string\"\ndoc = \"Key column of {}, as text; null for a dead letter or an erasure request by author.\"\n",
            main.name
        );
    }
    text.push_str(COLUMNS);
    TableSchema::parse(&text, Path::new("<built-in deletions schema>"))
}
