//! The writer loop for one table: source → decode → batch → Delta commit, composed here.
//!
//! Exactly-once rests on three rules, enforced in [`positions`] (1, 2) and [`flush`] (3):
//! 1. A partition is read from `txn version + 1` as recorded in the table, on every assignment.
//! 2. Before every commit the table's txn versions are re-read; a partition whose version moved
//!    (another writer took it over) loses its buffer and is re-read from the table's position.
//! 3. A commit carries the txn versions of exactly the partitions whose messages it holds, so
//!    rows and positions land atomically; a failed commit whose txn versions turn out to be in
//!    the table is recognised as landed, never written twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buffer::InFlight;
use deltalake::kernel::Add;
use futures::{FutureExt, StreamExt};
use positions::{PartitionCounters, PartitionState, advance};
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::{mpsc, watch};

use crate::failpoint;
use crate::ingest::batch::{BatchLimits, Batcher, FlushReason};
use crate::ingest::dead_letters;
use crate::ingest::decode::{BodyDecoder, DecodeError};
use crate::ingest::progress::Progress;
use crate::ingest::registry::RegistryError;
use crate::ingest::source::{KafkaSource, PartitionEvent, SourceError};
use crate::table::delta::{DeltaError, DeltaSink, Encoding, PartitionKey};

mod buffer;
mod flush;
mod positions;
pub mod trace;

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
    /// The service stopped while decoding waited for the schema registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
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

/// What the writer keeps per subscribed topic.
struct Topic {
    /// The decoder for the topic's JSON shape, shared with the decode threads.
    decoder: Arc<BodyDecoder>,
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
}
