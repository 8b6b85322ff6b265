//! Buffering and decode scheduling: messages wait in per-partition chunks, full chunks decode
//! on blocking threads while the writer keeps consuming, and decoded batches are encoded to
//! Parquet in the background so a flush finds its files mostly written.

use std::time::Instant;

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::Add;

use crate::ingest::batch::FlushReason;
use crate::ingest::decode::{Chunk, DecodeError, Decoded};
use crate::table::delta::{DeltaError, PartitionKey};

use super::{PipelineError, Record, TableWriter, trace};

/// A chunk being decoded on a blocking thread.
pub(super) struct InFlight {
    pub(super) key: PartitionKey,
    /// The partition's generation when the chunk left; a newer one discards the result.
    pub(super) generation: u64,
    pub(super) task: tokio::task::JoinHandle<Result<Decoded, DecodeError>>,
}

impl TableWriter {
    /// Buffers one message; returns a flush reason when a size limit is reached. Chunks due
    /// for decoding are left in `due` for [`Self::start_decodes`].
    pub(super) fn on_message(&mut self, message: Record<'_>) -> Option<FlushReason> {
        let name = self.topics.get_key_value(message.topic).map(|(n, _)| n)?;
        let key = PartitionKey {
            topic: name.clone(),
            partition: message.partition,
        };
        let offset = message.offset;
        let Some(state) = self.partitions.get_mut(&key) else {
            // A message fetched before its partition was revoked.
            return None;
        };
        state.counters.consumed.increment(1);
        if let Some(next) = state.next_offset() {
            if offset < next {
                // Already buffered or already in the table (a fetch from before a seek).
                return None;
            }
            if offset > next {
                // Not retention: a position below the log start is an out-of-range error
                // (`on_out_of_range`), never a jump.
                tracing::warn!(table = %self.sink.name(), partition = %key, expected = next, got = offset,
                    "offsets skipped by the broker: transaction markers, aborted transactions or a compacted topic");
                metrics::counter!("sluice_offsets_skipped_total", "table" => self.sink.name().to_string(),
                    "topic" => key.topic.to_string(), "partition" => key.partition.to_string())
                    .increment((offset - next) as u64);
            }
        }
        if state
            .interrupted
            .as_ref()
            .is_some_and(|i| i.stored.contains(&offset))
        {
            // Already a dead letter: an interrupted flush decided it and stored it.
            state.cover(offset);
            if let Some(l) = &mut state.ledger {
                l.rejected += 1;
            }
            state.messages += 1;
            return self.count_buffered(0);
        }
        let payload = message.payload;
        // Keys are buffered and copied into rows too: they count toward batch.max_bytes.
        let bytes = payload.map_or(0, <[u8]>::len) + message.key.map_or(0, <[u8]>::len);
        let timestamp = message.timestamp_ms;
        if let Some(t) = timestamp {
            state.newest_ms = Some(state.newest_ms.map_or(t, |n| n.max(t)));
        }
        state.pending.push(offset, timestamp, message.key, payload);
        if trace::enabled() {
            state.received.push((offset, trace::now_us()));
        }
        state.bytes += bytes;
        state.messages += 1;
        state.cover(offset);
        self.undecoded += 1;
        if state.pending.len() >= self.decoding.chunk {
            self.due.push(key);
        } else if self.undecoded >= self.decoding.chunk {
            // Many partitions, none with a full chunk: decode the fullest rather than let
            // everything wait for the flush.
            if let Some((fullest, _)) = self.partitions.iter().max_by_key(|(_, s)| s.pending.len())
            {
                self.due.push(fullest.clone());
            }
        }
        self.count_buffered(bytes)
    }

    /// Counts one more buffered message of `bytes` toward the batch limits.
    pub(super) fn count_buffered(&mut self, bytes: usize) -> Option<FlushReason> {
        let first = self.batcher.rows() == 0;
        let reason = self.batcher.add(1, bytes, Instant::now());
        if first {
            // Readiness watches how long buffered messages wait.
            self.publish();
        }
        reason
    }

    /// Hands the due chunks to decode threads, waiting for the oldest decode while every
    /// thread is busy (which holds back the consumer instead of piling up chunks).
    pub(super) async fn start_decodes(&mut self) -> Result<(), PipelineError> {
        while let Some(key) = self.due.pop() {
            self.start_decode(key).await?;
        }
        Ok(())
    }

    async fn start_decode(&mut self, key: PartitionKey) -> Result<(), PipelineError> {
        while self.in_flight.len() >= self.decoding.threads {
            self.finish_oldest_decode().await?;
        }
        let Some(state) = self.partitions.get_mut(&key) else {
            return Ok(());
        };
        if state.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(
            &mut state.pending,
            Chunk::new(key.topic.clone(), key.partition),
        );
        self.undecoded -= chunk.len();
        let generation = state.generation;
        let decoder = self
            .topics
            .get(&key.topic)
            .expect("consumer only subscribes to configured topics")
            .decoder
            .clone();
        // Schemas of registry formats are looked up here, waiting while the registry is
        // unreachable (which holds back the consumer; readiness says why).
        let schemas = decoder.resolve(&chunk).await?;
        let ingested_at = chrono::Utc::now().timestamp_micros();
        let task = tokio::task::spawn_blocking(move || {
            let _span =
                tracing::debug_span!("decode", topic = %chunk.topic, partition = chunk.partition)
                    .entered();
            decoder.decode_with(&chunk, &schemas, ingested_at)
        });
        self.in_flight.push_back(InFlight {
            key,
            generation,
            task,
        });
        Ok(())
    }

    /// Waits for the oldest decode and buffers its rows and rejections, unless its partition
    /// was dropped meanwhile.
    async fn finish_oldest_decode(&mut self) -> Result<(), PipelineError> {
        let Some(InFlight {
            key,
            generation,
            task,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        let decoded = match task.await {
            Ok(decoded) => decoded?,
            // A panicking decoder is a bug: surface it as if it had run here.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("decode task cancelled: {e}"),
        };
        let Some(state) = self.partitions.get_mut(&key) else {
            return Ok(());
        };
        if state.generation != generation {
            return Ok(());
        }
        let ledger = state
            .ledger
            .as_mut()
            .expect("decoded messages have a ledger");
        ledger.rejected += decoded.rejections.len() as u64;
        ledger.deletions.extend(decoded.deletions);
        state.rejections.extend(decoded.rejections);
        if let Some(batch) = decoded.batch {
            ledger.rows += batch.num_rows() as u64;
            state.decoded.push(batch.clone());
            self.encode_later(batch);
        }
        Ok(())
    }

    /// Hands a newly buffered batch to the background encoding; (re)starts it with every
    /// buffered batch when there is none or a dropped buffer made it stale. Should it fail to
    /// start, the flush writes the files itself (and meets the error there).
    fn encode_later(&mut self, batch: RecordBatch) {
        if let Some((generation, encoding)) = &mut self.encoding
            && *generation == self.generation
        {
            encoding.push(batch);
            return;
        }
        self.encoding = None;
        let Ok(mut encoding) = self.sink.start_encoding() else {
            return;
        };
        for state in self.partitions.values() {
            for buffered in &state.decoded {
                encoding.push(buffered.clone());
            }
        }
        self.encoding = Some((self.generation, encoding));
    }

    /// The data files of the buffered `batches`: those of an earlier attempt of this flush
    /// when no buffer was dropped since, else the background encoding's, else written now.
    /// The files of the current flush, and when (µs since the epoch) the Parquet writer began
    /// closing them (`None` when an earlier attempt's files are reused).
    pub(super) async fn encoded_files(
        &mut self,
        batches: &[RecordBatch],
    ) -> Result<(Vec<Add>, Option<i64>), DeltaError> {
        if let Some((generation, files)) = &self.encoded
            && *generation == self.generation
        {
            return Ok((files.clone(), None));
        }
        let encoding = match self.encoding.take() {
            Some((generation, encoding)) if generation == self.generation => encoding,
            _ => self.sink.encoding_of(batches)?,
        };
        let closing = encoding.closing();
        let files = encoding.finish().await?;
        self.encoded = Some((self.generation, files.clone()));
        Ok((files, closing.get()))
    }

    /// Decodes everything buffered and waits for it.
    pub(super) async fn decode_all(&mut self) -> Result<(), PipelineError> {
        self.due.clear();
        let keys: Vec<PartitionKey> = self
            .partitions
            .iter()
            .filter(|(_, s)| !s.pending.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.start_decode(key).await?;
        }
        while !self.in_flight.is_empty() {
            self.finish_oldest_decode().await?;
        }
        Ok(())
    }

    /// Ends the current flush's encoding and files, once they are committed or moot.
    pub(super) fn forget_files(&mut self) {
        self.encoding = None;
        self.encoded = None;
    }

    /// Recounts undecoded messages after partitions were dropped wholesale.
    pub(super) fn recount_undecoded(&mut self) {
        self.undecoded = self.partitions.values().map(|s| s.pending.len()).sum();
        let partitions = &self.partitions;
        self.due.retain(|k| partitions.contains_key(k));
    }
}
