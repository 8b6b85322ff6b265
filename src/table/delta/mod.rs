//! Delta: create the table, read back per-partition txn versions, write Parquet and commit.
//!
//! A commit holds the data files of one flush plus one `txn` action per Kafka partition whose
//! messages it covers (version = last offset covered). Those versions are the writer's only
//! source of truth for where to resume.
//!
//! The [`DeltaSink`] writes and commits (`sink`), a new or changed schema file creates or
//! evolves the table (`create`), txn versions are read back per partition (`txn`), readers
//! open snapshots and DataFusion providers (`read`), and Parquet is written one way (`parquet`).

use std::sync::Arc;

use deltalake::DeltaTableError;
use deltalake::kernel::transaction::TransactionError;
use deltalake::parquet::errors::ParquetError;

use crate::table::problem::StorageError;

pub use create::{DEFAULT_LOG_RETENTION, DEFAULT_TOMBSTONE_RETENTION, TableSettings};
pub use parquet::{DEFAULT_ZSTD_LEVEL, parquet_properties, vector_columns};
pub use read::{
    arrow_schema_of, open_table, register_table, table_location, table_provider, table_url,
};
pub use sink::{Committed, DeltaSink, Encoding};
pub use txn::{app_id, committed_offset, log_accepted_at, log_app_id, txn_version};

mod create;
pub mod log;
mod parquet;
mod read;
mod sink;
mod txn;

/// Errors talking to a Delta table, with the table they concern.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// An invariant inside sluice broke; this is a bug.
    #[error("bug: table {table}: {message}")]
    Bug {
        /// Table name.
        table: String,
        /// What broke.
        message: String,
    },
    /// The storage location is not a valid URL or path.
    #[error("table {table}: invalid location {location}: {reason}")]
    Location {
        /// Table name.
        table: String,
        /// The location as configured.
        location: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A delta-rs operation failed (storage, log parsing, commit).
    #[error("table {table}: {operation}: {source}")]
    Delta {
        /// Table name.
        table: String,
        /// What sluice was doing.
        operation: &'static str,
        /// delta-rs' error (boxed: it is large and errors are rare).
        source: StorageError<Box<DeltaTableError>>,
    },
    /// Another writer committed a txn version for one of our partitions since we last read it.
    #[error("table {table}: another writer committed to the same Kafka partitions concurrently")]
    Conflict {
        /// Table name.
        table: String,
    },
    /// The object store does not support put-if-absent, so concurrent commits could overwrite
    /// each other.
    #[error(
        "table {table}: the object store at {location} does not honour conditional writes \
         (If-None-Match: *); refusing to commit, because concurrent writers could overwrite each \
         other's commits. Use MinIO, AWS S3 or another store that supports put-if-absent"
    )]
    UnsafeStore {
        /// Table name.
        table: String,
        /// The location probed.
        location: String,
    },
    /// The existing table's schema is not the one configured.
    #[error(
        "table {table}: the existing table's columns differ from the schema file {file}: {detail}"
    )]
    SchemaMismatch {
        /// Table name.
        table: String,
        /// Schema file.
        file: String,
        /// Which columns differ.
        detail: String,
    },
}

impl DeltaError {
    /// Whether retrying the same operation later may succeed (storage hiccups).
    pub fn is_transient(&self) -> bool {
        match self {
            DeltaError::Delta { source, .. } => matches!(
                source.0.as_ref(),
                DeltaTableError::ObjectStore { .. }
                    | DeltaTableError::Io { .. }
                    // The kernel reports storage failures while reading the log this way.
                    | DeltaTableError::KernelError(_)
                    | DeltaTableError::Kernel { .. }
                    | DeltaTableError::Transaction {
                        source: TransactionError::ObjectStore { .. }
                            | TransactionError::MaxCommitAttempts(_)
                            | TransactionError::VersionAlreadyExists(_)
                    }
                    | DeltaTableError::VersionAlreadyExists(_)
                    // Uploading a data file failed in the store (the Parquet writer wraps the
                    // store's error); encoding errors are other variants.
                    | DeltaTableError::Parquet {
                        source: ParquetError::External(_)
                    }
            ),
            _ => false,
        }
    }
}

/// The partition identity a txn app id is derived from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// Kafka topic.
    pub topic: Arc<str>,
    /// Kafka partition.
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What one commit covers for one Kafka partition; also written into the commit's info so the
/// ledger (rows + rejected = offsets consumed) can be audited from the log alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLedger {
    /// First offset covered.
    pub first_offset: i64,
    /// Last offset covered; becomes the txn version.
    pub last_offset: i64,
    /// Messages that became rows.
    pub rows: u64,
    /// Messages that were rejected.
    pub rejected: u64,
    /// Messages that deleted a post, recorded in the commit that covers them so the record is
    /// exactly once with the offsets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deletions: Vec<Deletion>,
}

/// A message that deletes a post upstream: the key it names and where it was read. It becomes
/// no row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deletion {
    /// Offset of the message in its partition.
    pub offset: i64,
    /// Kafka timestamp in milliseconds since the epoch, if the message has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timestamp_ms: Option<i64>,
    /// The values of the table's key columns, in `[table] key` order, as text.
    pub key: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_data_file_upload_is_retried_but_a_bad_encoding_is_not() {
        let delta = |source: ParquetError| DeltaError::Delta {
            table: "t".into(),
            operation: "upload parquet",
            source: DeltaTableError::Parquet { source }.into(),
        };
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(delta(ParquetError::External(Box::new(refused))).is_transient());
        assert!(!delta(ParquetError::General("bad page".into())).is_transient());
    }
}
