//! sluice lands enriched Kafka streams in a Delta Lake "one big table", exactly once.
//!
//! Data flow, one writer per table:
//! ```text
//! Kafka ─► source ─► decode (JSON → Arrow via a mapping) ─► batch ─► delta (Parquet + commit)
//!            ▲ positions come from the table's txn versions, never from Kafka's offsets ─┘
//! ```
//!
//! Messages that cannot become rows go to `<table>_dead_letters`, committed before the rows with
//! their own txn versions, so every offset lands exactly once in one of the two tables.
//!
//! Layers, each a folder; imports run downward only (a layer never imports one above it):
//! ```text
//! tools ─┐                      (demo, bench, produce, generator)
//! service, query ─► config      (the running writer; reading the tables; typed configuration)
//!        └─► ingest ─► table ─► contract
//! ```
//! - [`contract`]: what a row must be. [`schema`](contract::schema) files,
//!   [`mapping`](contract::mapping) files (where a column is found in one upstream shape),
//!   [`labels`](contract::labels) (LLM labels → allowed values or `UNKNOWN`),
//!   [`values`](contract::values) (timestamp forms and windows, ranges, dimensions), and the
//!   [`dead-letter table`](contract::dead_letters)'s shape.
//! - [`table`]: Delta tables. The [`sink`](table::delta) (create, read txn versions, write
//!   Parquet, commit), [`compaction`](table::compact) under a [`lease`](table::lease), and
//!   [`maintenance`](table::maintain) (vacuum, checkpoints, `sluice inspect`).
//! - [`ingest`]: Kafka to rows. [`kafka`](ingest::kafka) clients (settings, secrets kept out of
//!   errors), the [`source`](ingest::source) consumer driven by the table,
//!   [`decode`](ingest::decode) (bytes → rows or a rejection with a reason code),
//!   [`batch`](ingest::batch) rules (rows, bytes, age; no I/O), [`dead
//!   letters`](ingest::dead_letters), and the [`pipeline`](ingest::pipeline) composing them
//!   with its exactly-once rules.
//! - [`config`]: the typed configuration (file, `SLUICE_*` environment, flags); hands each stage
//!   its own small options.
//! - [`service`]: the running writer. [`app`](service::app) (one writer per table),
//!   [`background`](service::background) maintenance, [`health`](service::health) and
//!   [`telemetry`](service::telemetry) (`/metrics`, `/healthz`, `/readyz`), and
//!   [`accept`](service::accept) (`sluice accept-log`).
//! - [`query`]: reading the tables. The [`sql`](query::sql) shell, [`trino`](query::trino)
//!   registration, and the [`audit`](query::audit) proving every offset landed exactly once.
//! - [`tools`]: the [`demo`](tools::demo), the [`bench`](tools::bench)mark, and
//!   [`generator`](tools::generator)/[`produce`](tools::produce) for realistic posts.
//! - Leaves any layer may use: [`meter`] (progress on a terminal, log lines otherwise) and
//!   [`failpoint`] (crash points the tests arm).
//!
//! The binary (`src/main.rs`, one file per subcommand under `src/cli/`) parses the command line
//! and calls into these layers.

pub mod config;
pub mod contract;
pub mod failpoint;
pub mod ingest;
pub mod meter;
pub mod query;
pub mod service;
pub mod table;
pub mod tools;
