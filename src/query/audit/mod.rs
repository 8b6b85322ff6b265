//! The audit: proves from the broker and the tables alone that every Kafka offset a table claims
//! to have written is there exactly once: as a row, as a dead letter, or as a delete the commit
//! recorded.
//!
//! For each partition of a table's topics it reads the message offsets the broker still has up
//! to the table's committed position (the txn version), reads every (topic, partition, offset)
//! of the table and of its dead letters from one snapshot each, and counts what is missing and
//! what is duplicated. Messages after the committed position are reported as pending, so the
//! audit can run against a live table while the writer works.

use std::collections::HashMap;
use std::fmt::Write as _;

use deltalake::DeltaTableError;

use crate::config::{Config, TableConfig};
use crate::contract::schema::{ColumnSource, TableSchema};
use crate::contract::{dead_letters, deletions};
use crate::ingest::kafka::{CONNECT_TIMEOUT, ClientError};
use crate::ingest::source::StartFrom;
use crate::table::delta::{committed_offset, log, log_accepted_at, open_table, table_location};

use broker::KafkaReader;
use tables::{lost_in, offsets_grouped, offsets_in, offsets_where, table_error};

mod broker;
mod tables;

/// Missing offsets listed per partition before summarising.
const LISTED_MISSING: usize = 10;

/// Errors that keep the audit from reaching a verdict.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The table cannot be read.
    #[error("audit of {table}: {operation}: {source}")]
    Table {
        /// Table name.
        table: String,
        /// What the audit was doing.
        operation: &'static str,
        /// delta-rs' or DataFusion's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The table has no Kafka provenance columns to audit against.
    #[error(
        "audit of {table}: the schema has no column with source = \"{source_name}\"; the audit \
         needs kafka_topic, kafka_partition and kafka_offset columns"
    )]
    NoProvenance {
        /// Table name.
        table: String,
        /// The missing source.
        source_name: &'static str,
    },
    /// The cluster cannot be reached (credentials, TLS, protocol, down).
    #[error("audit of {table}: {source}")]
    Connect {
        /// Table name.
        table: String,
        /// Where and why, without secrets.
        source: ClientError,
    },
    /// The broker could not be read.
    #[error("audit of {table}: kafka {topic}: {reason}")]
    Kafka {
        /// Table name.
        table: String,
        /// Topic being read.
        topic: String,
        /// What failed.
        reason: String,
    },
}

/// The verdict for one topic partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAudit {
    /// Kafka topic.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// First offset the broker still has.
    pub kafka_low: i64,
    /// Offset the broker will give the next message.
    pub kafka_high: i64,
    /// Last offset the table says it has written (its txn version), if any.
    pub committed: Option<i64>,
    /// Messages the broker has up to the committed position: the ones checked.
    pub checked: u64,
    /// Of those, how many are rows.
    pub rows: u64,
    /// Of those, how many are dead letters.
    pub dead_letters: u64,
    /// Of those, how many are deletes the commits recorded (they become no row).
    pub deletions: u64,
    /// Of those, how many are rows the deletes, newer versions and erasure requests removed,
    /// and dead letters erasure requests removed, as `<table>_deletions` records them.
    pub removed: u64,
    /// Rows and dead letters still there that a pass recorded as removed: its rewrite is yet
    /// to commit (or was interrupted; the next pass completes it).
    pub removal_pending: u64,
    /// Checked messages that are no row, dead letter or delete.
    pub missing: u64,
    /// Offsets present more than once across rows, dead letters and deletes.
    pub duplicated: u64,
    /// Offsets in the tables at or below the committed position that the broker does not have
    /// as messages although it still holds that range.
    pub unexpected: u64,
    /// Messages after the committed position, not written yet.
    pub pending: u64,
    /// The first missing offsets, to look up.
    pub first_missing: Vec<i64>,
    /// The broker has messages of this partition and the table none of them, while it holds
    /// other partitions of the topic (with `start_from = earliest`): another consumer takes
    /// them, or the writer has not reached them yet.
    pub never_written: bool,
    /// Offsets after the table's position that the broker no longer has (retention got there
    /// first): lost, and not recorded yet.
    pub gone: Option<(i64, i64)>,
    /// The table's position lies past the broker's end: the log went backwards (recreated
    /// topic, failover, unclean leader election).
    pub ahead_of_broker: bool,
    /// Ranges the writer found removed by the broker before it read them, as recorded in the
    /// dead-letter table (`lost`): first offset and what was lost.
    pub lost: Vec<(i64, String)>,
    /// When an operator accepted the partition's current log (`sluice accept-log`), in µs.
    pub log_accepted_at_us: Option<i64>,
    /// Rows and dead letters of the log it replaced, which are not audited.
    pub previous_log: u64,
}

impl PartitionAudit {
    /// Whether this partition is complete and free of duplicates.
    pub fn is_clean(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && !self.never_written
            && self.gone.is_none()
            && !self.ahead_of_broker
            && self.lost.is_empty()
    }
}

/// The verdict for one table and its dead letters.
#[derive(Debug, Clone)]
pub struct TableAudit {
    /// Table name.
    pub table: String,
    /// Table version audited.
    pub version: u64,
    /// Dead-letter table version audited (`None` if it does not exist).
    pub dead_letter_version: Option<u64>,
    /// One entry per topic partition.
    pub partitions: Vec<PartitionAudit>,
}

impl TableAudit {
    /// Whether every partition is clean.
    pub fn is_clean(&self) -> bool {
        self.partitions.iter().all(PartitionAudit::is_clean)
    }

    /// A table a user can read (and paste).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let dl = self
            .dead_letter_version
            .map_or("none".to_string(), |v| format!("version {v}"));
        let _ = writeln!(
            out,
            "table {} (version {}; dead letters: {dl})",
            self.table, self.version
        );
        let _ = writeln!(
            out,
            "{:<24} {:>4} {:>22} {:>12} {:>10} {:>10} {:>8} {:>8} {:>6} {:>8}",
            "topic",
            "part",
            "kafka offsets",
            "written to",
            "checked",
            "rows",
            "dead",
            "missing",
            "dup",
            "pending"
        );
        for p in &self.partitions {
            let written = p.committed.map_or("-".to_string(), |c| c.to_string());
            let _ = writeln!(
                out,
                "{:<24} {:>4} {:>22} {:>12} {:>10} {:>10} {:>8} {:>8} {:>6} {:>8}",
                p.topic,
                p.partition,
                format!("{}..{}", p.kafka_low, p.kafka_high),
                written,
                p.checked,
                p.rows,
                p.dead_letters,
                p.missing,
                p.duplicated,
                p.pending
            );
            if p.deletions + p.removed > 0 {
                let _ = writeln!(
                    out,
                    "    of the checked messages {} are deletes and {} rows removed by deletes and newer versions{}",
                    p.deletions,
                    p.removed,
                    if p.removal_pending > 0 {
                        format!(
                            " ({} more recorded as removed, still in the table)",
                            p.removal_pending
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if !p.first_missing.is_empty() {
                let _ = writeln!(out, "    first missing offsets: {:?}", p.first_missing);
            }
            if p.unexpected > 0 {
                let _ = writeln!(
                    out,
                    "    {} offsets in the tables are not messages in Kafka",
                    p.unexpected
                );
            }
            if p.never_written {
                let _ = writeln!(
                    out,
                    "    never written: the table holds other partitions of {} but none of this \
                     one's {} messages (another consumer in the table's group takes them, or the \
                     writer has not reached them yet)",
                    p.topic,
                    p.kafka_high - p.kafka_low
                );
            }
            if let Some((from, to)) = p.gone {
                let _ = writeln!(
                    out,
                    "    lost: offsets {from}..={to} were never written and the broker no longer has them"
                );
            }
            if p.ahead_of_broker {
                let _ = writeln!(
                    out,
                    "    the table's position is past the broker's end: the log went backwards \
                     (recreated topic, failover, unclean leader election); see `sluice accept-log`"
                );
            }
            if let Some(at) = p.log_accepted_at_us {
                let when = chrono::DateTime::from_timestamp_micros(at)
                    .map_or(at.to_string(), |t| t.to_rfc3339());
                let _ = writeln!(
                    out,
                    "    new log accepted at {when}: {} rows and dead letters of the previous log are not audited",
                    p.previous_log
                );
            }
            for (offset, detail) in &p.lost {
                let _ = writeln!(out, "    lost (recorded at offset {offset}): {detail}");
            }
        }
        let totals = self.partitions.iter().fold((0, 0, 0, 0, 0), |t, p| {
            (
                t.0 + p.checked,
                t.1 + p.rows,
                t.2 + p.dead_letters,
                t.3 + p.missing,
                t.4 + p.duplicated,
            )
        });
        let deletions: u64 = self.partitions.iter().map(|p| p.deletions).sum();
        let removed: u64 = self.partitions.iter().map(|p| p.removed).sum();
        let deletions = if deletions + removed > 0 {
            format!(", {deletions} deletes, {removed} removed")
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{}: {} messages checked, {} rows, {} dead letters{deletions}, {} missing, {} duplicated",
            if self.is_clean() {
                "CLEAN"
            } else {
                "NOT CLEAN"
            },
            totals.0,
            totals.1,
            totals.2,
            totals.3,
            totals.4
        );
        out
    }
}

/// Audits one configured table against the broker.
pub async fn audit_table(config: &Config, table: &TableConfig) -> Result<TableAudit, AuditError> {
    let schema = TableSchema::load(&table.schema).map_err(table_error(
        &table.schema.display().to_string(),
        "read schema",
    ))?;
    let name = schema.name.clone();
    let err = |operation: &'static str| table_error::<DeltaTableError>(&name, operation);
    let provenance = |source: ColumnSource, source_name: &'static str| {
        schema
            .source_column(source)
            .map(str::to_string)
            .ok_or(AuditError::NoProvenance {
                table: name.clone(),
                source_name,
            })
    };
    let columns = [
        provenance(ColumnSource::KafkaTopic, "kafka_topic")?,
        provenance(ColumnSource::KafkaPartition, "kafka_partition")?,
        provenance(ColumnSource::KafkaOffset, "kafka_offset")?,
    ];

    // The main table first: the dead-letter table, read after it, covers everything it covers.
    let location = table_location(&config.storage.root, &name);
    let main = open_table(&location, config.storage_options())
        .await
        .map_err(err("open table"))?;
    let version = main.version().unwrap_or_default();
    let mut tables = offsets_in(&main, &name, &columns).await?;
    let dl_name = dead_letters::table_name(&name);
    let dl_location = table_location(&config.storage.root, &dl_name);
    let dead_letter_version = match open_table(&dl_location, config.storage_options()).await {
        Ok(dl) => {
            let dl_columns = ["kafka_topic", "kafka_partition", "kafka_offset"].map(String::from);
            for (key, found) in offsets_in(&dl, &dl_name, &dl_columns).await? {
                tables.entry(key).or_default().dead_letters = found.rows;
            }
            for (key, lost) in lost_in(&dl, &dl_name).await? {
                tables.entry(key).or_default().lost = lost;
            }
            dl.version()
        }
        Err(DeltaTableError::NotATable(_)) => None,
        Err(e) => return Err(err("open dead-letter table")(e)),
    };
    // A table with a key takes deletes: each is recorded in the ledger of the commit that
    // covers its offset.
    // Maintenance then records them and the rows they and newer versions removed in the
    // deletions table, read after the main table: a row recorded there and still in the table
    // is a removal about to commit.
    if !schema.key.is_empty() {
        for (key, deletion) in log::recorded_deletions(&main, None, None)
            .await
            .map_err(err("read the deletes in the log"))?
        {
            let found = tables
                .entry((key.topic.to_string(), key.partition))
                .or_default();
            found.deletions.push(deletion.offset);
        }
        let name = deletions::table_name(&name);
        let location = table_location(&config.storage.root, &name);
        match open_table(&location, config.storage_options()).await {
            Ok(records) => {
                let removals = deletions::REMOVALS.map(|op| format!("'{op}'")).join(", ");
                for (filter, into_deletes) in [
                    (format!("operation = '{}'", deletions::DELETE), true),
                    (format!("operation IN ({removals})"), false),
                ] {
                    for (key, offsets) in offsets_grouped(&records, &name, &filter).await? {
                        let found = tables.entry(key).or_default();
                        if into_deletes {
                            found.deletions.extend(offsets);
                        } else {
                            found.removed.extend(offsets);
                        }
                    }
                }
            }
            Err(DeltaTableError::NotATable(_)) => {}
            Err(e) => return Err(err("open the deletions table")(e)),
        }
        // A delete is in the ledger of its commit and, once applied, in the deletions table:
        // one fact, counted once.
        for found in tables.values_mut() {
            found.deletions.sort_unstable();
            found.deletions.dedup();
        }
    }
    // Partitions whose log was replaced (`sluice accept-log`): the rows of the old log stay in
    // the tables; only what was ingested since the new log was accepted is checked against it.
    let keys: Vec<(String, i32)> = tables.keys().cloned().collect();
    for (topic, partition) in keys {
        let Some(at) = log_accepted_at(&main, &config.kafka.group_id, &topic, partition)
            .await
            .map_err(err("read txn version"))?
        else {
            continue;
        };
        let ingested = provenance(ColumnSource::IngestedAt, "ingested_at")?;
        let filter = |time_column: &str| {
            format!(
                "\"{}\" = '{}' AND \"{}\" = {partition} AND CAST(\"{time_column}\" AS BIGINT) >= {at}",
                columns[0],
                topic.replace('\'', "''"),
                columns[1],
            )
        };
        let rows = offsets_where(&main, &name, &columns[2], &filter(&ingested)).await?;
        let found = tables.entry((topic.clone(), partition)).or_default();
        found.previous_log = (found.rows.len() - rows.len()) as u64;
        found.rows = rows;
        found.accepted_at_us = Some(at);
        if dead_letter_version.is_some() {
            let dl = open_table(&dl_location, config.storage_options())
                .await
                .map_err(err("open dead-letter table"))?;
            let dl_filter = format!(
                "kafka_topic = '{}' AND kafka_partition = {partition} AND CAST(dead_lettered_at AS BIGINT) >= {at}",
                topic.replace('\'', "''")
            );
            let letters = offsets_where(&dl, &dl_name, "kafka_offset", &dl_filter).await?;
            found.previous_log += (found.dead_letters.len() - letters.len()) as u64;
            found.lost.retain(|(o, _)| letters.contains(o));
            found.dead_letters = letters;
        }
    }

    config
        .kafka
        .connection()
        .check(CONNECT_TIMEOUT)
        .await
        .map_err(|source| AuditError::Connect {
            table: name.clone(),
            source,
        })?;
    let mut partitions = Vec::new();
    for source in &table.sources {
        let topic = source.topic.clone();
        let kafka = KafkaReader::new(config, &name, &topic)?;
        let ranges = kafka.watermarks().await?;
        let mut plan = Vec::new();
        for (partition, (low, high)) in ranges {
            let committed = committed_offset(&main, &config.kafka.group_id, &topic, partition)
                .await
                .map_err(err("read txn version"))?;
            plan.push((partition, low, high, committed));
        }
        let wanted: Vec<(i32, i64, i64)> = plan
            .iter()
            .filter_map(|&(p, low, _, c)| {
                // Read up to the committed position even past the listed end: the reader
                // stops at the partition's real end, and some brokers (Tansu 0.6) list the
                // last batch's base offset as the end.
                let end = c.map_or(low, |c| c + 1);
                (end > low).then_some((p, low, end))
            })
            .collect();
        let mut read = kafka.read_offsets(wanted).await?;
        let topic_written = plan.iter().any(|&(_, _, _, c)| c.is_some());
        for (partition, low, listed_high, committed) in plan {
            let found = tables
                .remove(&(topic.clone(), partition))
                .unwrap_or_default();
            let in_kafka = read.remove(&partition).unwrap_or_default();
            let high = in_kafka
                .last()
                .map_or(listed_high, |&o| listed_high.max(o + 1));
            let mut verdict = judge(&topic, partition, low, high, committed, &in_kafka, &found);
            verdict.never_written = committed.is_none()
                && high > low
                && topic_written
                && config.kafka.start_from == StartFrom::Earliest;
            partitions.push(verdict);
        }
    }
    Ok(TableAudit {
        table: name,
        version,
        dead_letter_version,
        partitions,
    })
}

/// Offsets found in the two tables for one partition.
#[derive(Debug, Default)]
struct Found {
    rows: Vec<i64>,
    dead_letters: Vec<i64>,
    /// Offsets of deletes recorded in the commits' ledgers or the deletions table.
    deletions: Vec<i64>,
    /// Offsets of rows the deletions table records as removed.
    removed: Vec<i64>,
    /// `lost` dead letters: offset and detail.
    lost: Vec<(i64, String)>,
    /// When the partition's current log was accepted, if it replaced another.
    accepted_at_us: Option<i64>,
    /// Rows and dead letters of the log it replaced, not audited.
    previous_log: u64,
}

fn judge(
    topic: &str,
    partition: i32,
    low: i64,
    high: i64,
    committed: Option<i64>,
    in_kafka: &[i64],
    found: &Found,
) -> PartitionAudit {
    // Per offset: how often it is a row, a dead letter, a delete, a removed row.
    let mut counts: HashMap<i64, [u32; 4]> = HashMap::with_capacity(
        found.rows.len() + found.dead_letters.len() + found.deletions.len() + found.removed.len(),
    );
    for (kind, offsets) in [
        &found.rows,
        &found.dead_letters,
        &found.deletions,
        &found.removed,
    ]
    .into_iter()
    .enumerate()
    {
        for &o in offsets {
            counts.entry(o).or_default()[kind] += 1;
        }
    }
    // A row or dead letter recorded as removed whose rewrite has not committed yet counts as
    // the row or dead letter.
    let outcomes =
        |[r, d, x, m]: &[u32; 4]| r + d + x + if r + d > 0 { m.saturating_sub(1) } else { *m };
    let duplicated = counts.values().filter(|c| outcomes(c) > 1).count() as u64;
    let removal_pending = counts
        .values()
        .filter(|[r, d, _, m]| r + d > 0 && *m > 0)
        .count() as u64;
    let (mut rows, mut dead_letters, mut deletions, mut removed, mut missing) = (0, 0, 0, 0, 0);
    let mut first_missing = Vec::new();
    for o in in_kafka {
        match counts.get(o) {
            Some([r, _, _, _]) if *r > 0 => rows += 1,
            Some([_, d, _, _]) if *d > 0 => dead_letters += 1,
            Some([_, _, x, _]) if *x > 0 => deletions += 1,
            Some([_, _, _, m]) if *m > 0 => removed += 1,
            _ => {
                missing += 1;
                if first_missing.len() < LISTED_MISSING {
                    first_missing.push(*o);
                }
            }
        }
    }
    // Offsets in the tables inside the range the broker still holds but that it does not have.
    // `in_kafka` is in offset order: one partition's messages arrive in order.
    let unexpected = committed.map_or(0, |c| {
        let end = (c + 1).min(high);
        counts
            .keys()
            .filter(|&&o| o >= low && o < end && in_kafka.binary_search(&o).is_err())
            .count() as u64
    });
    let next = committed.map_or(low, |c| (c + 1).max(low));
    let position = committed.map(|c| c + 1);
    PartitionAudit {
        topic: topic.to_string(),
        partition,
        kafka_low: low,
        kafka_high: high,
        committed,
        checked: in_kafka.len() as u64,
        rows,
        dead_letters,
        deletions,
        removed,
        removal_pending,
        missing,
        duplicated,
        unexpected,
        pending: (high - next).max(0) as u64,
        first_missing,
        never_written: false,
        gone: position.filter(|&p| p < low).map(|p| (p, low - 1)),
        ahead_of_broker: position.is_some_and(|p| p > high),
        lost: found.lost.clone(),
        log_accepted_at_us: found.accepted_at_us,
        previous_log: found.previous_log,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_duplicated_and_pending_are_counted_per_partition() {
        let found = Found {
            rows: vec![0, 1, 3, 3, 7],
            dead_letters: vec![2, 7, 9],
            deletions: vec![4, 0],
            ..Found::default()
        };
        let kafka: Vec<i64> = (0..8).collect();
        let a = judge("posts", 0, 0, 12, Some(7), &kafka, &found);
        assert_eq!(a.checked, 8);
        assert_eq!(a.rows, 4); // 0, 1, 3, 7
        assert_eq!(a.dead_letters, 1); // 2
        assert_eq!(a.deletions, 1); // 4
        assert_eq!(a.missing, 2); // 5, 6
        assert_eq!(a.first_missing, vec![5, 6]);
        // 0 as a row and a delete; 3 twice as a row; 7 as a row and a dead letter
        assert_eq!(a.duplicated, 3);
        assert_eq!(a.pending, 4); // 8..12
        assert!(!a.is_clean());

        let clean = Found {
            rows: vec![5, 8],
            dead_letters: vec![7, 10], // 10 is past the position: a dead letter whose rows are pending
            deletions: vec![6],
            ..Found::default()
        };
        let kafka: Vec<i64> = vec![5, 6, 7, 8];
        let a = judge("posts", 1, 5, 11, Some(8), &kafka, &clean);
        assert!(a.is_clean(), "{a:?}");
        assert_eq!(
            (a.rows, a.dead_letters, a.deletions, a.pending),
            (2, 1, 1, 2)
        );
    }

    #[test]
    fn a_position_outside_the_brokers_range_is_never_clean() {
        let found = Found {
            rows: vec![0, 1, 2, 3],
            ..Found::default()
        };
        // Retention removed 4..=9 before the writer got there.
        let behind = judge("posts", 0, 10, 15, Some(3), &[], &found);
        assert_eq!(behind.gone, Some((4, 9)));
        assert!(!behind.is_clean());
        // The broker's log ends at 2 although the table wrote up to 3: it went backwards.
        let ahead = judge("posts", 0, 0, 2, Some(3), &[0, 1], &found);
        assert!(ahead.ahead_of_broker);
        assert!(!ahead.is_clean());
        let caught_up = judge("posts", 0, 0, 4, Some(3), &[0, 1, 2, 3], &found);
        assert!(caught_up.is_clean(), "{caught_up:?}");
    }
}
