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
//! Modules, one job each:
//! - [`config`]: the typed configuration (file, `SLUICE_*` environment, flags).
//! - [`schema`]: table schema files: columns, types, sluice-filled columns.
//! - [`mapping`]: mapping files: where each column is found in one upstream JSON shape.
//! - [`decode`]: message bytes → rows, or one rejection per message with a reason code.
//! - [`labels`]: LLM labels → allowed values (folding, aliases, closest match) or `UNKNOWN`.
//! - [`contract`]: promises on values: timestamp forms and windows, ranges, dimensions.
//! - [`dead_letters`]: the dead-letter table's rows and the optional dead-letter topic.
//! - [`batch`]: when to flush (rows, bytes, age); pure rules, no I/O.
//! - [`kafka`]: Kafka clients: settings, secrets kept out of errors, connection failures explained.
//! - [`source`]: the Kafka consumer; assignment driven by the table.
//! - [`delta`]: create the table, read txn versions, write Parquet, commit.
//! - [`pipeline`]: the writer loop composing the stages, and its exactly-once rules.
//! - [`app`]: the service: one writer per configured table.
//! - [`background`]: the service's maintenance thread: compaction and vacuum on a schedule.
//! - [`compact`]: bin-packing compaction of small files, partition by partition, under a lease.
//! - [`lease`]: one compactor per table, via put-if-absent records in the table's store.
//! - [`maintain`]: vacuum, checkpoints with log cleanup, and `sluice inspect`.
//! - [`audit`]: proof from the broker and the tables that every offset landed exactly once.
//! - [`generator`] and [`produce`]: realistic enriched posts, published to Kafka.
//! - [`progress`]: progress bars on a terminal, periodic log lines otherwise.
//! - [`sql`]: a read-only DataFusion session over the tables (`sluice sql`), vector functions.
//! - [`demo`]: the whole pipeline on an in-process Kafka and the local filesystem.
//! - [`bench`]: throughput, freshness and memory against the machine's limit (`sluice bench`).
//! - [`health`]: readiness checks and the gauges derived from writers' progress.
//! - [`telemetry`]: logs, the metric catalogue, and the `/metrics` `/healthz` `/readyz` endpoint.
//! - [`trino`]: the SQL that registers the tables in Trino (`sluice trino-sql`).

pub mod accept;
pub mod app;
pub mod audit;
pub mod background;
pub mod batch;
pub mod bench;
pub mod compact;
pub mod config;
pub mod contract;
pub mod dead_letters;
pub mod decode;
pub mod delta;
pub mod demo;
pub mod failpoint;
pub mod generator;
pub mod health;
pub mod kafka;
pub mod labels;
pub mod lease;
pub mod maintain;
pub mod mapping;
pub mod pipeline;
pub mod produce;
pub mod progress;
pub mod schema;
pub mod source;
pub mod sql;
pub mod telemetry;
pub mod trino;
