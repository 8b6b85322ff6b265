//! The writer loop for one table: source → decode → batch → Delta commit, composed here.
//!
//! Exactly-once rests on three rules, all enforced in this file:
//! 1. A partition is read from `txn version + 1` as recorded in the table, on every assignment.
//! 2. Before every commit the table's txn versions are re-read; a partition whose version moved
//!    (another writer took it over) loses its buffer and is re-read from the table's position.
//! 3. A commit carries the txn versions of exactly the partitions whose messages it holds, so
//!    rows and positions land atomically; a failed commit whose txn versions turn out to be in
//!    the table is recognised as landed, never written twice.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::Add;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::{mpsc, watch};

use crate::failpoint;
use crate::ingest::batch::{BatchLimits, Batcher, FlushReason};
use crate::ingest::dead_letters;
use crate::ingest::decode::{BodyDecoder, Chunk, DecodeError, Decoded, RejectReason, Rejection};
use crate::ingest::progress::Progress;
use crate::ingest::source::{KafkaSource, PartitionEvent, SourceError};
use crate::table::delta::{DeltaError, DeltaSink, Encoding, PartitionKey, PartitionLedger};

/// Longest wait between retries of a failing commit.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failed commit.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Rejections logged individually per flush before summarising.
const MAX_LOGGED_REJECTIONS: usize = 20;

/// Messages already fetched that one turn of the run loop takes before it looks at shutdown,
/// the batch age and partition events again.
const TAKEN_PER_TURN: usize = 64;

/// How a writer decodes: messages are buffered per partition in chunks, and full chunks are
/// decoded on `threads` blocking threads while the writer keeps consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoding {
    /// A partition's chunk is decoded when it holds this many messages, or when all
    /// partitions' chunks together hold this many (then the largest goes).
    pub chunk: usize,
    /// Chunks decoded at once; one more waits for the oldest.
    pub threads: usize,
}

/// Errors that stop the writer loop (transient ones are retried inside it).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A Delta operation failed in a way retrying cannot fix.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// Kafka positioning failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A decoder bug.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// One Kafka record as the writer sees it: from the consumer, or from a caller feeding the
/// writer directly ([`TableWriter::ingest`]).
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Kafka timestamp in milliseconds.
    pub timestamp_ms: Option<i64>,
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Message value.
    pub payload: Option<&'a [u8]>,
}

impl<'a> Record<'a> {
    fn from_kafka(message: &'a BorrowedMessage<'_>) -> Self {
        Record {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key(),
            payload: message.payload(),
        }
    }
}

/// Where a writer puts what it reads.
pub struct Destination {
    /// The main table: rows.
    pub table: DeltaSink,
    /// `<table>_dead_letters`: messages that could not become rows.
    pub dead_letters: DeltaSink,
    /// The optional dead-letter topic.
    pub forwarder: Option<dead_letters::Forwarder>,
}

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

/// Per-partition state of an owned partition.
struct PartitionState {
    /// Last offset in the table for this partition (`None`: never written).
    committed: Option<i64>,
    /// Messages received but not yet decoded.
    pending: Chunk,
    /// Decoded rows awaiting commit.
    decoded: Vec<RecordBatch>,
    /// Rejections awaiting commit.
    rejections: Vec<Rejection>,
    /// Whether this buffer's rejections are already in the dead-letter table.
    dead_letters_stored: bool,
    /// What the buffered messages cover.
    ledger: Option<PartitionLedger>,
    /// Payload bytes buffered (pending + decoded), for the batcher.
    bytes: usize,
    /// Messages buffered (pending + decoded + rejected), for the batcher.
    messages: usize,
    /// Newest Kafka timestamp (ms) buffered.
    newest_ms: Option<i64>,
    /// The partition's counters, registered once rather than looked up per message.
    counters: PartitionCounters,
    /// Renewed whenever the buffer is dropped (unique within the writer), so a decode started
    /// before is discarded.
    generation: u64,
    /// Dead letters an interrupted flush stored past `committed`, until the table passes them.
    interrupted: Option<Interrupted>,
    /// What went wrong with the partition's position at the broker, shown by readiness.
    problem: Option<String>,
    /// The broker's log is behind the table's position: nothing is consumed.
    stopped: bool,
}

/// What a flush that stored its dead letters but never its rows (a crash in between) decided
/// for its partition, read back from the dead-letter table. Those offsets stay dead letters
/// whatever decoding them again would say now (a contract, a limit or the clock may have
/// changed), so every offset of the range has exactly one outcome.
struct Interrupted {
    /// The dead-letter table's position for the partition: the end of the interrupted flush.
    through: i64,
    /// Offsets stored as dead letters past the table's position.
    stored: HashSet<i64>,
}

/// Counters labelled with a table, topic and partition.
#[derive(Clone)]
struct PartitionCounters {
    consumed: metrics::Counter,
    rows: metrics::Counter,
}

impl PartitionCounters {
    fn new(table: &str, key: &PartitionKey) -> Self {
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
    fn new(
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
        }
    }

    /// Drops the buffer; the position and what an interrupted flush decided stay.
    fn clear(&mut self, key: &PartitionKey, generation: u64) {
        let interrupted = self.interrupted.take();
        let (problem, stopped) = (self.problem.take(), self.stopped);
        *self = PartitionState::new(key, self.committed, self.counters.clone(), generation);
        self.interrupted = interrupted.filter(|i| self.committed.is_none_or(|c| i.through > c));
        (self.problem, self.stopped) = (problem, stopped);
    }

    /// The offset the partition's next message must have: after what is buffered, else after
    /// the table's position.
    fn next_offset(&self) -> Option<i64> {
        self.ledger
            .as_ref()
            .map(|l| l.last_offset + 1)
            .or(self.committed.map(|c| c + 1))
    }

    /// Takes `offset` into the buffer's ledger.
    fn cover(&mut self, offset: i64) {
        match &mut self.ledger {
            Some(l) => l.last_offset = offset,
            None => {
                self.ledger = Some(PartitionLedger {
                    first_offset: offset,
                    last_offset: offset,
                    rows: 0,
                    rejected: 0,
                })
            }
        }
    }
}

/// What the writer keeps per subscribed topic.
struct Topic {
    /// The decoder for the topic's JSON shape, shared with the decode threads.
    decoder: Arc<BodyDecoder>,
}

/// A chunk being decoded on a blocking thread.
struct InFlight {
    key: PartitionKey,
    /// The partition's generation when the chunk left; a newer one discards the result.
    generation: u64,
    task: tokio::task::JoinHandle<Result<Decoded, DecodeError>>,
}

/// Moves the writer's buffer generation on and returns the new one.
fn advance(generation: &mut u64) -> u64 {
    *generation += 1;
    *generation
}

/// Writes one table from its topics.
pub struct TableWriter {
    sink: DeltaSink,
    dead_letters: DeltaSink,
    /// Publishes dead letters to a Kafka topic too, when configured.
    forwarder: Option<dead_letters::Forwarder>,
    /// Test aid: abort the process at a named point (see [`crate::failpoint`]).
    failpoint: Option<String>,
    /// The consumer; `None` when the caller feeds records ([`TableWriter::without_broker`]).
    source: Option<KafkaSource>,
    events: mpsc::UnboundedReceiver<PartitionEvent>,
    topics: HashMap<Arc<str>, Topic>,
    batcher: Batcher,
    decoding: Decoding,
    /// Chunks being decoded, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Partitions whose chunk is due for decoding.
    due: Vec<PartitionKey>,
    /// Messages in all partitions' chunks not yet handed to a decode thread.
    undecoded: usize,
    /// The last partition buffer generation handed out; it moves whenever a buffer is
    /// dropped, which makes the encodings below stale.
    generation: u64,
    /// The Parquet files of everything decoded so far, written on another task as batches
    /// decode, with the generation they started at.
    encoding: Option<(u64, Encoding)>,
    /// Files written by an attempt of the current flush, reused by its retries.
    encoded: Option<(u64, Vec<Add>)>,
    partitions: BTreeMap<PartitionKey, PartitionState>,
    progress: Progress,
    progress_tx: watch::Sender<Progress>,
    epoch: i64,
    /// The dead-letter table positions an attempt of the current flush tried to commit; an
    /// attempt whose error surfaced after it landed is recognised by them on the retry.
    dead_letters_attempted: BTreeMap<PartitionKey, i64>,
    /// Table version at which every owned partition's txn version was last known to match our
    /// own; while the table stays there, re-reading them (a log replay each) is unnecessary.
    verified_version: i64,
    /// Partitions whose buffer was dropped for the table's newer position, to be re-read from
    /// there.
    repositions: Vec<(PartitionKey, Option<i64>)>,
}

impl TableWriter {
    /// Composes a writer from its stages; `decoders` maps each topic to its shape's decoder.
    pub fn new(
        destination: Destination,
        source: KafkaSource,
        events: mpsc::UnboundedReceiver<PartitionEvent>,
        decoders: HashMap<Arc<str>, BodyDecoder>,
        limits: BatchLimits,
        decoding: Decoding,
    ) -> (Self, watch::Receiver<Progress>) {
        Self::compose(
            destination,
            Some(source),
            events,
            decoders,
            limits,
            decoding,
        )
    }

    /// A writer fed by its caller through [`TableWriter::ingest`] instead of a consumer, owning
    /// `partitions` from the table's positions as an assignment would (benchmarks measure the
    /// writer's own path this way, with no broker in the way).
    pub async fn without_broker(
        destination: Destination,
        decoders: HashMap<Arc<str>, BodyDecoder>,
        limits: BatchLimits,
        decoding: Decoding,
        partitions: Vec<PartitionKey>,
    ) -> Result<(Self, watch::Receiver<Progress>), PipelineError> {
        let (_, events) = mpsc::unbounded_channel();
        let (mut writer, progress) =
            Self::compose(destination, None, events, decoders, limits, decoding);
        writer
            .on_partition_event(PartitionEvent::Assigned(partitions))
            .await?;
        Ok((writer, progress))
    }

    /// Buffers one record of an owned partition; commits when a batch limit is reached or
    /// the oldest buffered record is due. Records must follow the table's positions.
    pub async fn ingest(&mut self, record: Record<'_>) -> Result<(), PipelineError> {
        let reason = self
            .on_message(record)
            .or_else(|| self.batcher.due(Instant::now()));
        self.start_decodes().await?;
        if let Some(reason) = reason {
            self.flush(reason).await?;
        }
        Ok(())
    }

    /// Commits what is buffered and returns what this writer did.
    pub async fn finish(mut self) -> Result<Progress, PipelineError> {
        self.flush(FlushReason::Shutdown).await?;
        Ok(self.progress)
    }

    fn compose(
        destination: Destination,
        source: Option<KafkaSource>,
        events: mpsc::UnboundedReceiver<PartitionEvent>,
        decoders: HashMap<Arc<str>, BodyDecoder>,
        limits: BatchLimits,
        decoding: Decoding,
    ) -> (Self, watch::Receiver<Progress>) {
        let Destination {
            table: sink,
            dead_letters,
            forwarder,
        } = destination;
        let progress = Progress {
            table_version: sink.version(),
            ..Progress::default()
        };
        let (progress_tx, progress_rx) = watch::channel(progress.clone());
        let topics = decoders
            .into_iter()
            .map(|(name, decoder)| {
                (
                    name,
                    Topic {
                        decoder: Arc::new(decoder),
                    },
                )
            })
            .collect();
        (
            TableWriter {
                sink,
                dead_letters,
                forwarder,
                failpoint: failpoint::armed(),
                source,
                events,
                topics,
                batcher: Batcher::new(limits),
                decoding: Decoding {
                    chunk: decoding.chunk.max(1),
                    threads: decoding.threads.max(1),
                },
                in_flight: VecDeque::new(),
                due: Vec::new(),
                undecoded: 0,
                generation: 0,
                encoding: None,
                encoded: None,
                partitions: BTreeMap::new(),
                progress,
                progress_tx,
                epoch: 0,
                dead_letters_attempted: BTreeMap::new(),
                verified_version: -1,
                repositions: Vec::new(),
            },
            progress_rx,
        )
    }

    /// Runs until `shutdown` resolves, then commits what is buffered and returns.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Progress, PipelineError> {
        let table = self.sink.name().to_string();
        let receiver = self
            .source
            .as_ref()
            .expect("run() needs the consumer; fed writers use ingest()")
            .receiver();
        // One stream for the whole run: `recv()` would register and drop a waker slot per
        // message.
        let mut messages = receiver.stream();
        tokio::pin!(shutdown);
        // One timer for the batch age, moved only when the deadline moves (not a new timer per
        // message).
        let age = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(age);
        loop {
            let deadline = self.batcher.deadline().map(tokio::time::Instant::from_std);
            if let Some(d) = deadline
                && age.deadline() != d
            {
                age.as_mut().reset(d);
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(event) = self.events.recv() => self.on_partition_event(event).await?,
                () = &mut age, if deadline.is_some() => {
                    if let Some(reason) = self.batcher.due(Instant::now()) {
                        self.flush(reason).await?;
                    }
                }
                received = messages.next() => {
                    let mut received = received.expect("kafka streams never end");
                    // Messages librdkafka already holds are taken in this turn, without a
                    // select! and a waker per message, up to TAKEN_PER_TURN; a partition
                    // event waiting stops the run, so a revocation still comes before any
                    // message fetched after it.
                    let mut taken = 0;
                    loop {
                        match received {
                            Ok(message) => {
                                let reason = self.on_message(Record::from_kafka(&message));
                                // The message borrows librdkafka's buffer; release it before
                                // awaiting.
                                drop(message);
                                self.start_decodes().await?;
                                if let Some(reason) = reason {
                                    self.flush(reason).await?;
                                }
                            }
                            Err(rdkafka::error::KafkaError::MessageConsumption(
                                rdkafka::types::RDKafkaErrorCode::AutoOffsetReset,
                            )) => {
                                self.on_out_of_range().await?;
                                break;
                            }
                            Err(e) => {
                                // A connection failure is logged once, by the consumer's watch;
                                // anything else here each time.
                                if !receiver.context().watch().report_code(&e) {
                                    tracing::warn!(table = %table, error = %e, "kafka receive error; retrying");
                                }
                                metrics::counter!("sluice_kafka_errors_total", "table" => table.clone()).increment(1);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                break;
                            }
                        }
                        taken += 1;
                        if taken == TAKEN_PER_TURN || !self.events.is_empty() {
                            break;
                        }
                        match messages.next().now_or_never() {
                            Some(next) => received = next.expect("kafka streams never end"),
                            None => break,
                        }
                    }
                }
            }
        }
        // Rebalance events that arrived meanwhile decide what we still own.
        while let Ok(event) = self.events.try_recv() {
            self.on_partition_event(event).await?;
        }
        self.flush(FlushReason::Shutdown).await?;
        tracing::info!(table = %table, rows = self.progress.rows, commits = self.progress.commits, "writer stopped");
        Ok(self.progress)
    }

    async fn on_partition_event(&mut self, event: PartitionEvent) -> Result<(), PipelineError> {
        match event {
            PartitionEvent::Revoked(keys) => {
                for key in keys {
                    if let Some(state) = self.partitions.remove(&key) {
                        self.batcher.remove(state.messages, state.bytes);
                        if state.messages > 0 {
                            tracing::info!(table = %self.sink.name(), partition = %key, dropped = state.messages,
                                "partition revoked; its buffered messages are left to the new owner");
                        }
                    }
                }
                advance(&mut self.generation);
                self.encoding = None;
                self.recount_undecoded();
                self.publish();
            }
            PartitionEvent::Assigned(keys) => {
                // The eager protocol revokes everything before it assigns; anything still
                // buffered is dropped too and re-read from the table's position.
                for (_, old) in std::mem::take(&mut self.partitions) {
                    self.batcher.remove(old.messages, old.bytes);
                }
                self.encoding = None;
                self.refresh_with_retry().await?;
                let mut positions = BTreeMap::new();
                for key in keys {
                    let committed = self.sink.txn_version(&key).await?;
                    if let Some(source) = &self.source {
                        positions.insert(key.clone(), source.start_offset(committed));
                    }
                    let counters = PartitionCounters::new(self.sink.name(), &key);
                    let generation = advance(&mut self.generation);
                    let mut state = PartitionState::new(&key, committed, counters, generation);
                    state.interrupted = self.interrupted_flush(&key, committed).await?;
                    self.partitions.insert(key.clone(), state);
                }
                self.recount_undecoded();
                self.progress.assigned_once = true;
                tracing::info!(table = %self.sink.name(), positions = ?positions.iter().map(|(k, o)| format!("{k}@{o:?}")).collect::<Vec<_>>(),
                    "assigning partitions at the table's positions");
                if let Some(source) = &self.source {
                    source.assign(&positions)?;
                }
                self.publish();
            }
        }
        Ok(())
    }

    /// Buffers one message; returns a flush reason when a size limit is reached. Chunks due
    /// for decoding are left in `due` for [`Self::start_decodes`].
    fn on_message(&mut self, message: Record<'_>) -> Option<FlushReason> {
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
    fn count_buffered(&mut self, bytes: usize) -> Option<FlushReason> {
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
    async fn start_decodes(&mut self) -> Result<(), PipelineError> {
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
        let ingested_at = chrono::Utc::now().timestamp_micros();
        let task = tokio::task::spawn_blocking(move || {
            let _span =
                tracing::debug_span!("decode", topic = %chunk.topic, partition = chunk.partition)
                    .entered();
            decoder.decode(&chunk, ingested_at)
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
    async fn encoded_files(&mut self, batches: &[RecordBatch]) -> Result<Vec<Add>, DeltaError> {
        if let Some((generation, files)) = &self.encoded
            && *generation == self.generation
        {
            return Ok(files.clone());
        }
        let files = match self.encoding.take() {
            Some((generation, encoding)) if generation == self.generation => {
                encoding.finish().await?
            }
            _ => self.sink.encode(batches).await?,
        };
        self.encoded = Some((self.generation, files.clone()));
        Ok(files)
    }

    /// Decodes everything buffered and waits for it.
    async fn decode_all(&mut self) -> Result<(), PipelineError> {
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
    fn forget_files(&mut self) {
        self.encoding = None;
        self.encoded = None;
    }

    /// Recounts undecoded messages after partitions were dropped wholesale.
    fn recount_undecoded(&mut self) {
        self.undecoded = self.partitions.values().map(|s| s.pending.len()).sum();
        let partitions = &self.partitions;
        self.due.retain(|k| partitions.contains_key(k));
    }

    /// Commits everything buffered, retrying transient failures, re-checking ownership in the
    /// table before every attempt.
    #[tracing::instrument(name = "flush", level = "info", skip(self), fields(table = %self.sink.name(), reason = reason.as_str(), messages = self.batcher.rows()))]
    async fn flush(&mut self, reason: FlushReason) -> Result<(), PipelineError> {
        self.decode_all().await?;
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
            let result = match self.encoded_files(&batches).await {
                Ok(files) => {
                    failpoint::reached(self.failpoint.as_deref(), "after_upload");
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
                        source: Box::new(source),
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

    /// Re-reads txn versions and reconciles every buffered partition with the table. Returns
    /// the ledgers of partitions an earlier attempt of this flush committed after all.
    async fn verify_positions(
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
    fn reposition(&mut self) -> Result<(), SourceError> {
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
    async fn on_out_of_range(&mut self) -> Result<(), PipelineError> {
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

    fn on_committed(
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
            .record((rows + rejected) as f64);
        metrics::histogram!("sluice_batch_bytes", "table" => table.clone())
            .record(payload_bytes as f64);
        tracing::info!(table = %table, version, rows, rejected, files, bytes, reason = reason.as_str(),
            commit_ms = elapsed.as_millis() as u64, "committed batch");
        self.publish();
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
    fn publish(&mut self) {
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
    async fn refresh_with_retry(&mut self) -> Result<(), DeltaError> {
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

    /// The dead letters a flush stored past `committed` before it was interrupted, read from
    /// the dead-letter table as last refreshed.
    async fn interrupted_flush(
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
                    source: Box::new(source),
                })?;
        tracing::info!(table = %self.sink.name(), partition = %key, position = ?committed, through, dead_letters = stored.len(),
            "an interrupted flush stored dead letters past the table's position; they stay dead letters");
        Ok(Some(Interrupted { through, stored }))
    }
}

/// Counts a commit of `table` (rows or dead letters) and its duration.
fn record_commit(table: &str, files: usize, bytes: u64, elapsed: Duration) {
    let table = table.to_string();
    metrics::counter!("sluice_commits_total", "table" => table.clone()).increment(1);
    metrics::counter!("sluice_written_files_total", "table" => table.clone())
        .increment(files as u64);
    metrics::counter!("sluice_written_bytes_total", "table" => table.clone()).increment(bytes);
    metrics::histogram!("sluice_commit_duration_seconds", "table" => table)
        .record(elapsed.as_secs_f64());
}
