//! Positions and the exactly-once rules: each owned partition's state, reconciling it with the
//! table's txn versions before every commit, repositioning after another writer's commit or a
//! broker that lost or rewound its log, and recording what a commit made durable.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use deltalake::arrow::record_batch::RecordBatch;

use crate::ingest::batch::FlushReason;
use crate::ingest::dead_letters;
use crate::ingest::decode::{Chunk, RejectReason, Rejection};
use crate::ingest::source::SourceError;
use crate::table::delta::{DeltaError, PartitionKey, PartitionLedger};

use super::flush::record_commit;
use super::{PipelineError, TableWriter};

/// Rejections logged individually per flush before summarising.
const MAX_LOGGED_REJECTIONS: usize = 20;

/// Moves the writer's buffer generation on and returns the new one.
pub(super) fn advance(generation: &mut u64) -> u64 {
    *generation += 1;
    *generation
}

/// Per-partition state of an owned partition.
pub(super) struct PartitionState {
    /// Last offset in the table for this partition (`None`: never written).
    pub(super) committed: Option<i64>,
    /// Messages received but not yet decoded.
    pub(super) pending: Chunk,
    /// Decoded rows awaiting commit.
    pub(super) decoded: Vec<RecordBatch>,
    /// Rejections awaiting commit.
    pub(super) rejections: Vec<Rejection>,
    /// Whether this buffer's rejections are already in the dead-letter table.
    pub(super) dead_letters_stored: bool,
    /// What the buffered messages cover.
    pub(super) ledger: Option<PartitionLedger>,
    /// Payload bytes buffered (pending + decoded), for the batcher.
    pub(super) bytes: usize,
    /// Messages buffered (pending + decoded + rejected), for the batcher.
    pub(super) messages: usize,
    /// Newest Kafka timestamp (ms) buffered.
    pub(super) newest_ms: Option<i64>,
    /// The partition's counters, registered once rather than looked up per message.
    pub(super) counters: PartitionCounters,
    /// Renewed whenever the buffer is dropped (unique within the writer), so a decode started
    /// before is discarded.
    pub(super) generation: u64,
    /// Dead letters an interrupted flush stored past `committed`, until the table passes them.
    pub(super) interrupted: Option<Interrupted>,
    /// What went wrong with the partition's position at the broker, shown by readiness.
    pub(super) problem: Option<String>,
    /// The broker's log is behind the table's position: nothing is consumed.
    pub(super) stopped: bool,
    /// Offset and receive time (µs) of each buffered message, while a freshness trace is on.
    pub(super) received: Vec<(i64, i64)>,
}

/// What a flush that stored its dead letters but never its rows (a crash in between) decided
/// for its partition, read back from the dead-letter table. Those offsets stay dead letters
/// whatever decoding them again would say now (a contract, a limit or the clock may have
/// changed), so every offset of the range has exactly one outcome.
pub(super) struct Interrupted {
    /// The dead-letter table's position for the partition: the end of the interrupted flush.
    pub(super) through: i64,
    /// Offsets stored as dead letters past the table's position.
    pub(super) stored: HashSet<i64>,
}

/// Counters labelled with a table, topic and partition.
#[derive(Clone)]
pub(super) struct PartitionCounters {
    pub(super) consumed: metrics::Counter,
    pub(super) rows: metrics::Counter,
}

impl PartitionCounters {
    pub(super) fn new(table: &str, key: &PartitionKey) -> Self {
        let labels = [
            ("table", table.to_string()),
            ("topic", key.topic.to_string()),
            ("partition", key.partition.to_string()),
        ];
        PartitionCounters {
            consumed: metrics::counter!("sluice_messages_consumed_total", &labels),
            rows: metrics::counter!("sluice_rows_written_total", &labels),
        }
    }
}

impl PartitionState {
    pub(super) fn new(
        key: &PartitionKey,
        committed: Option<i64>,
        counters: PartitionCounters,
        generation: u64,
    ) -> Self {
        PartitionState {
            committed,
            pending: Chunk::new(key.topic.clone(), key.partition),
            decoded: Vec::new(),
            rejections: Vec::new(),
            dead_letters_stored: false,
            ledger: None,
            bytes: 0,
            messages: 0,
            newest_ms: None,
            counters,
            generation,
            interrupted: None,
            problem: None,
            stopped: false,
            received: Vec::new(),
        }
    }

    /// Drops the buffer; the position and what an interrupted flush decided stay.
    pub(super) fn clear(&mut self, key: &PartitionKey, generation: u64) {
        let interrupted = self.interrupted.take();
        let (problem, stopped) = (self.problem.take(), self.stopped);
        *self = PartitionState::new(key, self.committed, self.counters.clone(), generation);
        self.interrupted = interrupted.filter(|i| self.committed.is_none_or(|c| i.through > c));
        (self.problem, self.stopped) = (problem, stopped);
    }

    /// The offset the partition's next message must have: after what is buffered, else after
    /// the table's position.
    pub(super) fn next_offset(&self) -> Option<i64> {
        self.ledger
            .as_ref()
            .map(|l| l.last_offset + 1)
            .or(self.committed.map(|c| c + 1))
    }

    /// Takes `offset` into the buffer's ledger.
    pub(super) fn cover(&mut self, offset: i64) {
        match &mut self.ledger {
            Some(l) => l.last_offset = offset,
            None => {
                self.ledger = Some(PartitionLedger {
                    first_offset: offset,
                    last_offset: offset,
                    rows: 0,
                    rejected: 0,
                    deletions: Vec::new(),
                })
            }
        }
    }
}

impl TableWriter {
    /// Re-reads txn versions and reconciles every buffered partition with the table. Returns
    /// the ledgers of partitions an earlier attempt of this flush committed after all.
    pub(super) async fn verify_positions(
        &mut self,
        in_flight: &BTreeMap<PartitionKey, i64>,
    ) -> Result<Vec<(PartitionKey, PartitionLedger)>, DeltaError> {
        self.sink.refresh().await?;
        if self.sink.version() == self.verified_version {
            // Nobody committed since our positions were last confirmed.
            return Ok(Vec::new());
        }
        // Every owned partition, buffered or not: the version is marked verified below, and a
        // partition another writer moved while this one had nothing of it buffered would
        // otherwise be committed later from its old position. Stopped partitions are neither
        // consumed nor committed; a restart takes them up again.
        let keys = self.consumed_partitions();
        let mut landed = Vec::new();
        for key in keys {
            let actual = self.sink.txn_version(&key).await?;
            let state = self
                .partitions
                .get_mut(&key)
                .expect("key taken from the map");
            if actual == state.committed {
                continue;
            }
            let ours = in_flight.get(&key).copied();
            if let Some(ledger) = &state.ledger
                && actual.is_some()
                && actual == ours
            {
                // An earlier attempt of this very flush landed before its error surfaced.
                landed.push((key, ledger.clone()));
                continue;
            }
            tracing::warn!(table = %self.sink.name(), partition = %key, believed = ?state.committed, actual = ?actual,
                dropped = state.messages, "the table holds another position for this partition; dropping its buffer and re-reading from there");
            metrics::counter!("sluice_position_resets_total", "table" => self.sink.name().to_string(),
                "topic" => key.topic.to_string(), "partition" => key.partition.to_string())
                .increment(1);
            self.batcher.remove(state.messages, state.bytes);
            state.committed = actual;
            state.clear(&key, advance(&mut self.generation));
            // The writer that moved it may have been interrupted in turn.
            self.dead_letters.refresh().await?;
            let interrupted = self.interrupted_flush(&key, actual).await?;
            let state = self
                .partitions
                .get_mut(&key)
                .expect("key taken from the map");
            state.interrupted = interrupted;
            self.repositions.push((key, actual));
        }
        self.recount_undecoded();
        self.verified_version = self.sink.version();
        Ok(landed)
    }

    /// The owned partitions that are consumed (all but the stopped ones).
    fn consumed_partitions(&self) -> Vec<PartitionKey> {
        self.partitions
            .iter()
            .filter(|(_, s)| !s.stopped)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Moves the consumer to the table's position of every partition whose buffer was dropped
    /// for it. A seek that fails ends the writer with the error: consuming on from where the
    /// dropped buffer ended would take the offsets in between as skipped.
    pub(super) fn reposition(&mut self) -> Result<(), SourceError> {
        for (key, position) in std::mem::take(&mut self.repositions) {
            if let Some(source) = &self.source
                && self.partitions.get(&key).is_some_and(|s| !s.stopped)
            {
                source.seek(&key, source.start_offset(position))?;
            }
        }
        Ok(())
    }

    /// The broker cannot serve a partition's position (librdkafka says so without saying
    /// which): each owned partition's position is compared with the broker's offsets. Below
    /// the log start, the messages in between are lost: recorded as a `lost` dead letter,
    /// loudly, and the partition goes on from the log start. Past the log end, the log went
    /// backwards (recreated topic, failover, unclean leader election): the partition stops.
    pub(super) async fn on_out_of_range(&mut self) -> Result<(), PipelineError> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let table = self.sink.name().to_string();
        let keys = self.consumed_partitions();
        let mut lost_ranges = 0;
        for key in keys {
            let Some(next) = self.partitions[&key].next_offset() else {
                continue;
            };
            let (low, high) = match source.watermarks(&key).await {
                Ok(marks) => marks,
                Err(e) => {
                    // Assigned again below, the partition fails again and this is retried.
                    tracing::warn!(table = %table, partition = %key, error = %e, "cannot read the broker's offsets for an out-of-range position; retrying");
                    continue;
                }
            };
            let labels = [
                ("table", table.clone()),
                ("topic", key.topic.to_string()),
                ("partition", key.partition.to_string()),
            ];
            let state = self
                .partitions
                .get_mut(&key)
                .expect("key taken from the map");
            if next < low {
                let last = low - 1;
                tracing::error!(table = %table, partition = %key, from = next, to = last, lost = low - next,
                    "messages the table never wrote are gone from the broker (retention removed them before sluice read them); recording the range as a `lost` dead letter and going on from the broker's first offset");
                metrics::counter!("sluice_offsets_lost_total", &labels)
                    .increment((low - next) as u64);
                state.problem = Some(format!(
                    "offsets {next}..={last} were removed by the broker before sluice read them (lost; recorded as a dead letter)"
                ));
                state.cover(next);
                state.cover(last);
                if let Some(l) = &mut state.ledger {
                    l.rejected += 1;
                }
                state.rejections.push(Rejection {
                    offset: next,
                    timestamp_ms: None,
                    key: None,
                    payload: None,
                    reason: RejectReason::Lost,
                    detail: format!(
                        "offsets {next}..={last} were removed by the broker (retention) before sluice read them"
                    ),
                });
                state.messages += 1;
                lost_ranges += 1;
            } else if next > high {
                tracing::error!(table = %table, partition = %key, position = next - 1, broker_end = high,
                    "the table's position is past the broker's end of this partition: the topic was recreated, the cluster failed over, or an unclean leader election dropped messages; the partition is stopped until an operator accepts the new log (sluice accept-log)");
                state.problem = Some(format!(
                    "stopped: the table's position {} is past the broker's end {high} (recreated topic, failover or unclean leader election); see `sluice accept-log`",
                    next - 1
                ));
                state.stopped = true;
            }
            // Otherwise in range again (the log moved meanwhile): fetched from the position.
        }
        // librdkafka stopped fetching the partition, and a seek cannot restart it: the
        // assignment is made again, every partition at the offset its next message must have
        // (a lost range's end, for one that lost some), the stopped ones left out.
        let positions = self
            .partitions
            .iter()
            .filter(|(_, s)| !s.stopped)
            .map(|(k, s)| {
                let offset = match s.next_offset() {
                    Some(next) => rdkafka::Offset::Offset(next),
                    None => source.start_offset(None),
                };
                (k.clone(), offset)
            })
            .collect();
        source.assign(&positions)?;
        // Each lost range is a dead letter waiting for the next commit (the batch age bounds it).
        for _ in 0..lost_ranges {
            self.count_buffered(0);
        }
        self.publish();
        Ok(())
    }

    pub(super) fn on_committed(
        &mut self,
        ledger: &[(PartitionKey, PartitionLedger)],
        version: i64,
        files: usize,
        bytes: u64,
        reason: FlushReason,
        elapsed: Duration,
    ) {
        let table = self.sink.name().to_string();
        let mut rows = 0;
        let mut rejected = 0;
        let mut deletions = 0;
        let mut payload_bytes = 0;
        let mut newest = None;
        let mut offsets = Vec::with_capacity(ledger.len());
        for (key, l) in ledger {
            let state = self
                .partitions
                .get_mut(key)
                .expect("committed partitions are owned");
            let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
            for r in &state.rejections {
                tracing::debug!(table = %table, topic = %key.topic, partition = key.partition, offset = r.offset,
                    reason = r.reason.code(), detail = %r.detail, "dead letter");
                *by_reason.entry(r.reason.code()).or_default() += 1;
            }
            for (reason, n) in by_reason {
                *self.progress.rejected_by_reason.entry(reason).or_default() += n;
                metrics::counter!("sluice_dead_letters_total", "table" => table.clone(), "topic" => key.topic.to_string(),
                    "partition" => key.partition.to_string(), "reason" => reason)
                    .increment(n);
            }
            for r in state.rejections.iter().take(MAX_LOGGED_REJECTIONS) {
                tracing::warn!(table = %table, topic = %key.topic, partition = key.partition, offset = r.offset,
                    reason = r.reason.code(), detail = %r.detail, "dead letter");
            }
            rows += l.rows;
            rejected += l.rejected;
            deletions += l.deletions.len() as u64;
            payload_bytes += state.bytes;
            if let Some(t) = state.newest_ms {
                newest = Some(newest.map_or(t, |n: i64| n.max(t)));
            }
            state.counters.rows.increment(l.rows);
            state.committed = Some(l.last_offset);
            state.clear(key, advance(&mut self.generation));
            offsets.push((key.clone(), l.last_offset));
        }
        self.batcher.reset();
        self.forget_files();
        if let Some(source) = &self.source {
            source.report_committed(&offsets);
        }
        self.progress.table_version = version;
        self.progress.commits += 1;
        self.progress.rows += rows;
        self.progress.rejected += rejected;
        self.progress.deletions += deletions;
        self.progress.files += files as u64;
        self.progress.bytes += bytes;
        self.progress.last_commit_at = Some(SystemTime::now());
        self.progress.store_error = None;
        if newest > self.progress.newest_committed_ms {
            self.progress.newest_committed_ms = newest;
        }
        record_commit(&table, files, bytes, elapsed);
        metrics::counter!("sluice_flushes_total", "table" => table.clone(), "reason" => reason.as_str()).increment(1);
        metrics::histogram!("sluice_batch_messages", "table" => table.clone())
            .record((rows + rejected + deletions) as f64);
        metrics::histogram!("sluice_batch_bytes", "table" => table.clone())
            .record(payload_bytes as f64);
        tracing::info!(table = %table, version, rows, rejected, files, bytes, reason = reason.as_str(),
            commit_ms = elapsed.as_millis() as u64, "committed batch");
        self.publish();
    }

    /// The dead letters a flush stored past `committed` before it was interrupted, read from
    /// the dead-letter table as last refreshed.
    pub(super) async fn interrupted_flush(
        &self,
        key: &PartitionKey,
        committed: Option<i64>,
    ) -> Result<Option<Interrupted>, DeltaError> {
        let Some(through) = self.dead_letters.txn_version(key).await? else {
            return Ok(None);
        };
        if committed.is_some_and(|c| through <= c) {
            return Ok(None);
        }
        let stored =
            dead_letters::stored_offsets(self.dead_letters.table(), key, committed, through)
                .await
                .map_err(|source| DeltaError::Delta {
                    table: self.dead_letters.name().to_string(),
                    operation: "read stored dead letters",
                    source: source.into(),
                })?;
        tracing::info!(table = %self.sink.name(), partition = %key, position = ?committed, through, dead_letters = stored.len(),
            "an interrupted flush stored dead letters past the table's position; they stay dead letters");
        Ok(Some(Interrupted { through, stored }))
    }
}
