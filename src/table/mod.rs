//! The table layer: Delta tables on an object store. The sink that writes Parquet and commits
//! with txn versions, compaction under a lease, and maintenance. Knows no Kafka and no CLI.

pub mod compact;
pub mod deletes;
pub mod delta;
pub mod lease;
pub mod maintain;
pub mod problem;
