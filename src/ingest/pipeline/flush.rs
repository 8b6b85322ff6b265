//! Flush and commit: dead letters first, then rows with their txn versions, each retried with
//! backoff while the store fails transiently, and progress published after each commit.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use crate::failpoint;
use crate::ingest::batch::FlushReason;
use crate::ingest::dead_letters;
use crate::ingest::decode::Rejection;
use crate::table::delta::{DeltaError, PartitionKey, PartitionLedger};

use super::trace::{self, FlushTrace};
use super::{PipelineError, TableWriter};

/// Longest wait between retries of a failing commit.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failed commit.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Why dead letters could not be stored yet.
enum StoreError {
    /// The dead-letter table commit failed.
    Delta(DeltaError),
    /// Publishing to the dead-letter topic failed (retried like a transient store error).
    Forward(rdkafka::error::KafkaError),
}

impl From<DeltaError> for StoreError {
    fn from(e: DeltaError) -> Self {
        StoreError::Delta(e)
    }
}

impl TableWriter {
    /// Commits everything buffered, retrying transient failures, re-checking ownership in the
    /// table before every attempt.
    #[tracing::instrument(name = "flush", level = "info", skip(self), fields(table = %self.sink.name(), reason = reason.as_str(), messages = self.batcher.rows()))]
    pub(super) async fn flush(&mut self, reason: FlushReason) -> Result<(), PipelineError> {
        let tracing_started = trace::enabled().then(trace::now_us);
        self.decode_all().await?;
        let decoded_us = trace::now_us();
        let mut backoff = FIRST_BACKOFF;
        let mut in_flight: BTreeMap<PartitionKey, i64> = BTreeMap::new();
        loop {
            match self.verify_positions(&in_flight).await {
                Ok(landed) if !landed.is_empty() => {
                    tracing::info!(table = %self.sink.name(), partitions = landed.len(), "a retried commit had already landed");
                    let version = self.sink.version();
                    self.on_committed(&landed, version, 0, 0, reason, Duration::ZERO);
                }
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    self.reposition()?;
                    tracing::warn!(table = %self.sink.name(), error = %e, backoff_ms = backoff.as_millis() as u64, "cannot read the table; retrying");
                    self.store_failed("refresh", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            self.reposition()?;
            match self.store_dead_letters().await {
                Ok(()) => {}
                Err(StoreError::Forward(e)) => {
                    tracing::warn!(table = %self.dead_letters.name(), error = %e, backoff_ms = backoff.as_millis() as u64,
                        "publishing dead letters to Kafka failed; retrying");
                    metrics::counter!("sluice_dead_letter_forward_errors_total", "table" => self.sink.name().to_string()).increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(StoreError::Delta(DeltaError::Conflict { .. })) => {
                    tracing::warn!(table = %self.dead_letters.name(), "dead-letter commit conflicted with another writer; re-checking positions");
                    metrics::counter!("sluice_commit_conflicts_total", "table" => self.dead_letters.name().to_string()).increment(1);
                    continue;
                }
                Err(StoreError::Delta(e)) if e.is_transient() => {
                    tracing::warn!(table = %self.dead_letters.name(), error = %e, backoff_ms = backoff.as_millis() as u64, "dead-letter commit failed; retrying");
                    metrics::counter!("sluice_commit_retries_total", "table" => self.dead_letters.name().to_string()).increment(1);
                    self.store_failed("commit", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(StoreError::Delta(e)) => return Err(e.into()),
            }
            let mut batches = Vec::new();
            let mut ledger = Vec::new();
            for (key, state) in &self.partitions {
                if let Some(l) = &state.ledger {
                    batches.extend(state.decoded.iter().cloned());
                    ledger.push((key.clone(), l.clone()));
                }
            }
            if ledger.is_empty() {
                self.forget_files();
                self.batcher.reset();
                self.publish();
                return Ok(());
            }
            in_flight = ledger
                .iter()
                .map(|(k, l)| (k.clone(), l.last_offset))
                .collect();
            self.epoch += 1;
            let started = Instant::now();
            let checked_us = trace::now_us();
            let mut encoded_us = None;
            let mut uploaded_us = checked_us;
            let result = match self.encoded_files(&batches).await {
                Ok((files, closing)) => {
                    failpoint::reached(self.failpoint.as_deref(), "after_upload");
                    (encoded_us, uploaded_us) = (closing, trace::now_us());
                    self.sink.commit_files(files, &ledger, self.epoch).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(committed) => {
                    failpoint::reached(self.failpoint.as_deref(), "after_row_commit");
                    let elapsed = started.elapsed();
                    // Only our commit landed since the last check: positions are still known.
                    if committed.version == self.verified_version + 1 {
                        self.verified_version = committed.version;
                    }
                    if let Some(started_us) = tracing_started {
                        trace::send(FlushTrace {
                            table: self.sink.name().to_string(),
                            version: committed.version,
                            received: self.take_received(&ledger),
                            started_us,
                            decoded_us,
                            checked_us,
                            encoded_us: encoded_us.unwrap_or(checked_us),
                            uploaded_us,
                            committed_us: trace::now_us(),
                        });
                    }
                    self.on_committed(
                        &ledger,
                        committed.version,
                        committed.files,
                        committed.bytes,
                        reason,
                        elapsed,
                    );
                    return Ok(());
                }
                Err(DeltaError::Conflict { .. }) => {
                    tracing::warn!(table = %self.sink.name(), "commit conflicted with another writer on the same partitions; re-checking positions");
                    metrics::counter!("sluice_commit_conflicts_total", "table" => self.sink.name().to_string()).increment(1);
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(table = %self.sink.name(), error = %e, backoff_ms = backoff.as_millis() as u64, "commit failed; retrying");
                    metrics::counter!("sluice_commit_retries_total", "table" => self.sink.name().to_string()).increment(1);
                    self.store_failed("commit", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The receive times of the messages `ledger` commits, for the freshness trace.
    fn take_received(
        &mut self,
        ledger: &[(PartitionKey, PartitionLedger)],
    ) -> Vec<(PartitionKey, i64, i64)> {
        let mut received = Vec::new();
        for (key, _) in ledger {
            if let Some(state) = self.partitions.get_mut(key) {
                received.extend(
                    std::mem::take(&mut state.received)
                        .into_iter()
                        .map(|(offset, at)| (key.clone(), offset, at)),
                );
            }
        }
        received
    }

    /// Commits the buffered rejections to the dead-letter table, before the rows (see
    /// [`crate::ingest::dead_letters`]). Dead letters at or below the dead-letter table's txn version for
    /// their partition were stored by an earlier attempt whose rows never landed: skipped.
    async fn store_dead_letters(&mut self) -> Result<(), StoreError> {
        let pending: Vec<PartitionKey> = self
            .partitions
            .iter()
            .filter(|(_, s)| !s.rejections.is_empty() && !s.dead_letters_stored)
            .map(|(k, _)| k.clone())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        self.dead_letters.refresh().await?;
        let mut letters: Vec<(&PartitionKey, &Rejection)> = Vec::new();
        let mut ledger = Vec::new();
        let mut already_stored = 0usize;
        let mut landed_earlier = 0u64;
        for key in &pending {
            let stored = self.dead_letters.txn_version(key).await?;
            let state = &self.partitions[key];
            // Dead letters at or below the dead-letter table's position but past the main
            // table's were stored by a flush whose rows never landed (a crash in between).
            // Which offsets exactly is read from the table, so a message that decodes
            // differently now (a changed contract) is stored rather than assumed stored.
            let ahead = stored.filter(|&d| state.committed.is_none_or(|m| d > m));
            let recovered = match ahead {
                Some(d) if state.rejections.iter().any(|r| r.offset <= d) => Some(
                    dead_letters::stored_offsets(
                        self.dead_letters.table(),
                        key,
                        state.committed,
                        d,
                    )
                    .await
                    .map_err(|source| DeltaError::Delta {
                        table: self.dead_letters.name().to_string(),
                        operation: "read stored dead letters",
                        source: source.into(),
                    })?,
                ),
                _ => None,
            };
            let before = letters.len();
            // Our own earlier attempt of this flush landed before its error surfaced.
            let ours = ahead.is_some() && ahead == self.dead_letters_attempted.get(key).copied();
            for r in &state.rejections {
                if recovered.as_ref().is_some_and(|s| s.contains(&r.offset)) {
                    already_stored += 1;
                    landed_earlier += u64::from(ours);
                } else {
                    letters.push((key, r));
                }
            }
            let count = (letters.len() - before) as u64;
            if count > 0 {
                let l = state.ledger.as_ref().expect("rejections have a ledger");
                ledger.push((
                    key.clone(),
                    PartitionLedger {
                        first_offset: l.first_offset,
                        // Never move the position back below what is already stored.
                        last_offset: l.last_offset.max(stored.unwrap_or(i64::MIN)),
                        rows: count,
                        rejected: 0,
                        deletions: Vec::new(),
                    },
                ));
            }
        }
        if landed_earlier > 0 {
            tracing::info!(table = %self.dead_letters.name(), dead_letters = landed_earlier,
                "a retried dead-letter commit had already landed");
            self.progress.dead_letters += landed_earlier;
        }
        self.dead_letters_attempted.clear();
        if already_stored as u64 > landed_earlier {
            tracing::info!(table = %self.dead_letters.name(), already_stored = already_stored as u64 - landed_earlier,
                "skipping dead letters an interrupted earlier flush already stored");
        }
        if !letters.is_empty() {
            let now = chrono::Utc::now().timestamp_micros();
            let batch =
                dead_letters::batch(self.dead_letters.schema(), &letters, now).map_err(|e| {
                    DeltaError::Bug {
                        table: self.dead_letters.name().to_string(),
                        message: format!("dead-letter batch does not match its schema: {e}"),
                    }
                })?;
            let stored = letters.len() as u64;
            if let Some(forwarder) = &self.forwarder {
                forwarder
                    .send(&letters)
                    .await
                    .map_err(StoreError::Forward)?;
                tracing::debug!(
                    topic = forwarder.topic(),
                    dead_letters = stored,
                    "published dead letters"
                );
            }
            self.epoch += 1;
            let started = Instant::now();
            self.dead_letters_attempted = ledger
                .iter()
                .map(|(k, l)| (k.clone(), l.last_offset))
                .collect();
            let committed = self
                .dead_letters
                .commit(&[batch], &ledger, self.epoch)
                .await?;
            self.dead_letters_attempted.clear();
            record_commit(
                self.dead_letters.name(),
                committed.files,
                committed.bytes,
                started.elapsed(),
            );
            tracing::info!(table = %self.dead_letters.name(), version = committed.version, dead_letters = stored, "committed dead letters");
            self.progress.dead_letters += stored;
            failpoint::reached(self.failpoint.as_deref(), "after_dead_letter_commit");
        }
        for key in &pending {
            if let Some(state) = self.partitions.get_mut(key) {
                state.dead_letters_stored = true;
            }
        }
        Ok(())
    }

    /// A transient object-store failure: counted, and shown by readiness until a commit
    /// succeeds.
    fn store_failed(&mut self, operation: &'static str, error: &DeltaError) {
        metrics::counter!("sluice_object_store_errors_total", "table" => self.sink.name().to_string(), "operation" => operation)
            .increment(1);
        self.progress.store_error = Some(format!("{operation}: {error}"));
        self.publish();
    }

    /// Publishes progress; ownership figures are derived from the partition map here.
    pub(super) fn publish(&mut self) {
        self.progress.buffered_since = self
            .batcher
            .oldest()
            .map(|t| SystemTime::now() - t.elapsed());
        self.progress.owned = self.partitions.keys().cloned().collect();
        self.progress.committed = self
            .partitions
            .iter()
            .filter_map(|(k, s)| s.committed.map(|c| (k.clone(), c)))
            .collect();
        self.progress.partition_problems = self
            .partitions
            .iter()
            .filter_map(|(k, s)| s.problem.clone().map(|p| (k.clone(), p)))
            .collect();
        let stopped = self.partitions.values().filter(|s| s.stopped).count();
        metrics::gauge!("sluice_partitions_stopped", "table" => self.sink.name().to_string())
            .set(stopped as f64);
        let _ = self.progress_tx.send(self.progress.clone());
    }

    /// Catches up with both tables, retrying while the store fails transiently.
    pub(super) async fn refresh_with_retry(&mut self) -> Result<(), DeltaError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let refreshed = match self.sink.refresh().await {
                Ok(()) => self.dead_letters.refresh().await,
                Err(e) => Err(e),
            };
            match refreshed {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    tracing::warn!(table = %self.sink.name(), error = %e, "cannot read the table; retrying");
                    self.store_failed("refresh", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Counts a commit of `table` (rows or dead letters) and its duration.
pub(super) fn record_commit(table: &str, files: usize, bytes: u64, elapsed: Duration) {
    let table = table.to_string();
    metrics::counter!("sluice_commits_total", "table" => table.clone()).increment(1);
    metrics::counter!("sluice_written_files_total", "table" => table.clone())
        .increment(files as u64);
    metrics::counter!("sluice_written_bytes_total", "table" => table.clone()).increment(bytes);
    metrics::histogram!("sluice_commit_duration_seconds", "table" => table)
        .record(elapsed.as_secs_f64());
}
