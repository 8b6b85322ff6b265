//! Decode: Kafka message bytes → rows of the table, or a rejection per message.
//!
//! One message yields exactly one row or exactly one [`Rejection`]; never both, never neither.
//! The fast path feeds a whole chunk of messages to one arrow-json `Decoder`. Anything odd (a
//! syntax error, two values in one message, a value of the wrong type) sends only the affected
//! messages down a slower per-message path, so one bad record costs its neighbours nothing.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use deltalake::arrow::array::AsArray;
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Int32Array, Int64Array, StringArray,
    TimestampMicrosecondArray, new_null_array,
};
use deltalake::arrow::compute::{concat_batches, filter_record_batch};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::json::ReaderBuilder;
use deltalake::arrow::json::reader::Decoder;
use deltalake::arrow::record_batch::RecordBatch;

use crate::contract::labels::Outcome;
use crate::contract::mapping::Mapping;
use crate::contract::schema::{ColumnSource, TableSchema};
use crate::contract::values::{self, Broken, Contract, UTC, violations};

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Why a message did not become a row. The set is closed and documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not parseable as JSON (including empty messages and truncated values).
    MalformedJson,
    /// Valid JSON, but the top-level value is not an object.
    NotAnObject,
    /// More than one JSON value in one message.
    MultipleValues,
    /// The payload is not valid UTF-8.
    InvalidUtf8,
    /// The payload is larger than the configured maximum.
    TooLarge,
    /// A column declared non-nullable has no value.
    MissingRequired,
    /// A field holds a value of the wrong JSON type for its column.
    TypeMismatch,
    /// Objects and arrays nest deeper than the configured maximum.
    TooDeep,
    /// A number is outside its column's range (NaN and infinities included).
    OutOfRange,
    /// A timestamp does not parse or lies outside its column's window.
    BadTimestamp,
    /// A list has another length than its column's dimension (embeddings).
    WrongDimension,
    /// Messages the broker removed (retention) before sluice read them: one dead letter per
    /// lost range, at its first offset, with the range in its detail and no payload.
    Lost,
}

impl RejectReason {
    /// The stable reason code, as stored and counted.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MultipleValues => "multiple_values",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::TooLarge => "too_large",
            RejectReason::MissingRequired => "missing_required",
            RejectReason::TypeMismatch => "type_mismatch",
            RejectReason::TooDeep => "too_deep",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::WrongDimension => "wrong_dimension",
            RejectReason::Lost => "lost",
        }
    }

    /// Every reason, in documentation order.
    pub const ALL: [RejectReason; 12] = [
        RejectReason::MalformedJson,
        RejectReason::NotAnObject,
        RejectReason::MultipleValues,
        RejectReason::InvalidUtf8,
        RejectReason::TooLarge,
        RejectReason::TooDeep,
        RejectReason::MissingRequired,
        RejectReason::TypeMismatch,
        RejectReason::OutOfRange,
        RejectReason::BadTimestamp,
        RejectReason::WrongDimension,
        RejectReason::Lost,
    ];
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A message that could not become a row: a dead letter, with the bytes as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Offset of the message in its partition.
    pub offset: i64,
    /// Kafka timestamp in milliseconds since the epoch, if the message has one.
    pub timestamp_ms: Option<i64>,
    /// The message key as received.
    pub key: Option<Vec<u8>>,
    /// The payload as received (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Reason code.
    pub reason: RejectReason,
    /// Human-readable explanation naming the field where there is one.
    pub detail: String,
}

/// One message's Kafka metadata; its payload lives in the chunk's shared buffer.
#[derive(Debug, Clone)]
pub struct MessageMeta {
    /// Offset in the partition.
    pub offset: i64,
    /// Kafka timestamp in milliseconds since the epoch, if the message has one.
    pub timestamp_ms: Option<i64>,
    /// Key, as a range of the chunk's key buffer.
    key: Option<(usize, usize)>,
    /// Payload, as a range of the chunk's payload buffer (`None` for a tombstone).
    range: Option<(usize, usize)>,
}

/// Consecutive messages of one topic partition, payloads packed into one buffer.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Topic the messages came from.
    pub topic: Arc<str>,
    /// Partition the messages came from.
    pub partition: i32,
    payload: Vec<u8>,
    keys: Vec<u8>,
    messages: Vec<MessageMeta>,
}

impl Chunk {
    /// An empty chunk for one topic partition.
    pub fn new(topic: Arc<str>, partition: i32) -> Self {
        Chunk {
            topic,
            partition,
            payload: Vec::new(),
            keys: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Appends a message (`payload = None` is a tombstone).
    pub fn push(
        &mut self,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) {
        // Keys and payloads are packed into two buffers: no allocation per message.
        let append = |buffer: &mut Vec<u8>, bytes: &[u8]| {
            let start = buffer.len();
            buffer.extend_from_slice(bytes);
            (start, buffer.len())
        };
        let range = payload.map(|p| append(&mut self.payload, p));
        let key = key.map(|k| append(&mut self.keys, k));
        self.messages.push(MessageMeta {
            offset,
            timestamp_ms,
            key,
            range,
        });
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when the chunk holds no messages.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    fn payload(&self, i: usize) -> Option<&[u8]> {
        self.messages[i].range.map(|(s, e)| &self.payload[s..e])
    }

    fn key(&self, meta: &MessageMeta) -> Option<&[u8]> {
        meta.key.map(|(s, e)| &self.keys[s..e])
    }
}

/// What a chunk decoded into.
#[derive(Debug)]
pub struct Decoded {
    /// Rows in table schema order (`None` when every message was rejected).
    pub batch: Option<RecordBatch>,
    /// Messages that did not become rows.
    pub rejections: Vec<Rejection>,
}

/// Errors that are bugs or configuration problems, never bad input.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Assembling the table batch failed: the schema and mapping disagree in a way validation
    /// should have caught. This is a bug in sluice.
    #[error("bug: could not assemble rows for table {table} from {topic}: {source}")]
    Assemble {
        /// Table being written.
        table: String,
        /// Topic of the chunk.
        topic: String,
        /// Arrow's error.
        source: ArrowError,
    },
}

/// Decodes chunks of one upstream shape into rows of one table.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    table: Arc<TableSchema>,
    mapping: Arc<Mapping>,
    table_schema: SchemaRef,
    source_schema: SchemaRef,
    limits: InputLimits,
    /// The columns with labels, resolved once.
    label_columns: Vec<LabelColumn>,
}

/// A label column's place in the table and its counters, so canonicalizing a chunk needs no
/// lookups.
#[derive(Debug, Clone)]
struct LabelColumn {
    /// Position of the label column.
    pos: usize,
    /// Position of its `<column>_raw` column.
    raw_pos: usize,
    /// One counter per [`Outcome`], registered once.
    counters: [metrics::Counter; 5],
}

/// Limits checked on raw bytes before any parsing, so hostile input costs little.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Largest accepted payload in bytes.
    pub max_message_bytes: usize,
    /// Deepest accepted nesting of objects and arrays.
    pub max_depth: usize,
}

impl BodyDecoder {
    /// A decoder for `mapping` into `table`.
    pub fn new(table: Arc<TableSchema>, mapping: Arc<Mapping>, limits: InputLimits) -> Self {
        let label_columns = table
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.labels.is_some())
            .map(|(pos, c)| {
                let counter = |o: Outcome| {
                    metrics::counter!("sluice_labels_total", "table" => table.name.clone(),
                        "column" => c.name.clone(), "outcome" => o.as_str())
                };
                let raw_pos = table
                    .columns
                    .iter()
                    .position(|r| r.raw_of.as_deref() == Some(c.name.as_str()))
                    .expect("the schema adds a raw column for every label column");
                LabelColumn {
                    pos,
                    raw_pos,
                    counters: Outcome::ALL.map(counter),
                }
            })
            .collect();
        BodyDecoder {
            table_schema: table.arrow_schema(),
            source_schema: mapping.source_schema(),
            table,
            mapping,
            limits,
            label_columns,
        }
    }

    fn json_decoder(&self, capacity: usize) -> Decoder {
        ReaderBuilder::new(self.source_schema.clone())
            .with_batch_size(capacity.max(1) + 1)
            .with_coerce_primitive(true)
            .build_decoder()
            .expect("mapping-derived schemas contain only types arrow-json decodes")
    }

    /// Decodes every message of `chunk`; `ingested_at_us` stamps the rows.
    pub fn decode(&self, chunk: &Chunk, ingested_at_us: i64) -> Result<Decoded, DecodeError> {
        let mut rejections = Vec::new();
        let mut parts: Vec<(RecordBatch, Vec<usize>)> = Vec::new();
        let mut segment: Vec<usize> = Vec::new();
        let mut decoder = self.json_decoder(chunk.len());

        for i in 0..chunk.len() {
            let key_bytes = chunk.key(&chunk.messages[i]).map_or(0, <[u8]>::len);
            let payload = match self.precheck(key_bytes, chunk.payload(i)) {
                Ok(p) => p,
                Err((reason, detail)) => {
                    rejections.push(self.reject(chunk, i, reason, detail));
                    continue;
                }
            };
            let before = decoder.len();
            let anomaly = match decoder.decode(payload) {
                Err(e) => Some((RejectReason::MalformedJson, json_error_text(&e))),
                Ok(n) if n < payload.len() => Some((
                    RejectReason::MultipleValues,
                    "more JSON values follow the first one".to_string(),
                )),
                Ok(_) if decoder.has_partial_record() => Some((
                    RejectReason::MalformedJson,
                    "truncated JSON: the message ends inside a value".to_string(),
                )),
                Ok(_) if decoder.len() > before + 1 => Some((
                    RejectReason::MultipleValues,
                    format!("{} JSON values in one message", decoder.len() - before),
                )),
                Ok(_) if decoder.len() == before => Some((
                    RejectReason::MalformedJson,
                    "no JSON value in the message".to_string(),
                )),
                Ok(_) => None,
            };
            match anomaly {
                None => segment.push(i),
                Some((reason, detail)) => {
                    rejections.push(self.reject(chunk, i, reason, detail));
                    // The decoder's tape now holds part of the bad message: start over with the
                    // good messages of this segment, then flush them so each message is re-fed
                    // at most once.
                    decoder = self.json_decoder(chunk.len());
                    for &j in &segment {
                        let p = chunk.payload(j).expect("segment messages have payloads");
                        decoder
                            .decode(p)
                            .expect("a message that decoded once decodes again");
                    }
                    self.flush_segment(&mut decoder, chunk, &segment, &mut parts, &mut rejections);
                    segment.clear();
                }
            }
        }
        self.flush_segment(&mut decoder, chunk, &segment, &mut parts, &mut rejections);

        let batch = self
            .assemble(chunk, parts, ingested_at_us, &mut rejections)
            .map_err(|source| DecodeError::Assemble {
                table: self.table.name.clone(),
                topic: chunk.topic.to_string(),
                source,
            })?;
        rejections.sort_by_key(|r| r.offset);
        Ok(Decoded { batch, rejections })
    }

    /// Cheap checks before any parsing, so hostile input costs little.
    /// The limit is on the whole message, key and value, as Kafka's own is: a key is copied
    /// into the row (`kafka_key`) and counts toward memory like the value.
    fn precheck<'a>(
        &self,
        key_bytes: usize,
        payload: Option<&'a [u8]>,
    ) -> Result<&'a [u8], (RejectReason, String)> {
        let value_bytes = payload.map_or(0, <[u8]>::len);
        if key_bytes > 0 && key_bytes + value_bytes > self.limits.max_message_bytes {
            return Err((
                RejectReason::TooLarge,
                format!(
                    "key of {key_bytes} bytes and value of {value_bytes} bytes, over the limit \
                     of {} bytes",
                    self.limits.max_message_bytes
                ),
            ));
        }
        let Some(payload) = payload else {
            return Err((
                RejectReason::MalformedJson,
                "empty message (tombstone)".into(),
            ));
        };
        if payload.len() > self.limits.max_message_bytes {
            return Err((
                RejectReason::TooLarge,
                format!(
                    "{} bytes, over the limit of {} bytes",
                    payload.len(),
                    self.limits.max_message_bytes
                ),
            ));
        }
        if let Err(e) = std::str::from_utf8(payload) {
            return Err((
                RejectReason::InvalidUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            ));
        }
        if let Some(at) = too_deep(payload, self.limits.max_depth) {
            return Err((
                RejectReason::TooDeep,
                format!(
                    "objects and arrays nest deeper than {} levels (at byte {at})",
                    self.limits.max_depth
                ),
            ));
        }
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Err((RejectReason::MalformedJson, "empty message".into())),
            Some(0xEF) if payload.starts_with(b"\xEF\xBB\xBF") => Err((
                RejectReason::MalformedJson,
                "starts with a UTF-8 byte order mark, which JSON does not allow".into(),
            )),
            Some(b'{') => Ok(payload),
            // Not an object: only the rejection path pays for telling valid JSON from garbage.
            Some(_) => match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
                Ok(_) => Err((
                    RejectReason::NotAnObject,
                    "the top-level JSON value is not an object".into(),
                )),
                Err(e) => Err((RejectReason::MalformedJson, format!("not JSON: {e}"))),
            },
        }
    }

    /// Turns a segment of syntactically good messages into a source batch; messages whose values
    /// do not fit their columns are found one by one and rejected.
    fn flush_segment(
        &self,
        decoder: &mut Decoder,
        chunk: &Chunk,
        segment: &[usize],
        parts: &mut Vec<(RecordBatch, Vec<usize>)>,
        rejections: &mut Vec<Rejection>,
    ) {
        if segment.is_empty() {
            return;
        }
        match decoder.flush() {
            Ok(Some(batch)) => {
                parts.push((batch, segment.to_vec()));
                return;
            }
            Ok(None) => unreachable!("a non-empty segment flushes rows"),
            Err(_) => {}
        }
        *decoder = self.json_decoder(chunk.len());
        for &i in segment {
            let payload = chunk.payload(i).expect("segment messages have payloads");
            let result = decoder.decode(payload).and_then(|_| decoder.flush());
            match result {
                Ok(Some(batch)) => parts.push((batch, vec![i])),
                Ok(None) => unreachable!("a decoded message flushes one row"),
                Err(e) => {
                    rejections.push(self.reject(
                        chunk,
                        i,
                        RejectReason::TypeMismatch,
                        json_error_text(&e),
                    ));
                    *decoder = self.json_decoder(chunk.len());
                }
            }
        }
    }

    fn reject(&self, chunk: &Chunk, i: usize, reason: RejectReason, detail: String) -> Rejection {
        let meta = &chunk.messages[i];
        Rejection {
            offset: meta.offset,
            timestamp_ms: meta.timestamp_ms,
            key: chunk.key(meta).map(<[u8]>::to_vec),
            payload: chunk.payload(i).map(<[u8]>::to_vec),
            reason,
            detail,
        }
    }

    /// Builds the table batch: mapped columns with canonical labels, sluice's own columns, then
    /// the value contracts.
    fn assemble(
        &self,
        chunk: &Chunk,
        parts: Vec<(RecordBatch, Vec<usize>)>,
        ingested_at_us: i64,
        rejections: &mut Vec<Rejection>,
    ) -> Result<Option<RecordBatch>, ArrowError> {
        if parts.is_empty() {
            return Ok(None);
        }
        let mut rows: Vec<usize> = Vec::new();
        let mut batches = Vec::with_capacity(parts.len());
        for (batch, idx) in parts {
            batches.push(batch);
            rows.extend(idx);
        }
        let source = concat_batches(&self.source_schema, &batches)?;
        let n = source.num_rows();
        let projected = self.mapping.project(&source, &self.table)?;
        let mut mapped = projected.columns;
        let metas: Vec<&MessageMeta> = rows.iter().map(|&i| &chunk.messages[i]).collect();

        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.table.columns.len());
        for col in &self.table.columns {
            let array: ArrayRef = match col.source {
                None => mapped
                    .remove(&col.name)
                    .unwrap_or_else(|| new_null_array(&col.data_type, n)),
                Some(ColumnSource::KafkaTopic) => Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n(&*chunk.topic, n),
                )),
                Some(ColumnSource::KafkaPartition) => {
                    Arc::new(Int32Array::from_value(chunk.partition, n))
                }
                Some(ColumnSource::KafkaOffset) => {
                    Arc::new(Int64Array::from_iter_values(metas.iter().map(|m| m.offset)))
                }
                Some(ColumnSource::KafkaTimestamp) => Arc::new(
                    TimestampMicrosecondArray::from_iter(
                        metas
                            .iter()
                            .map(|m| m.timestamp_ms.and_then(values::kafka_micros)),
                    )
                    .with_timezone(UTC),
                ),
                Some(ColumnSource::KafkaKey) => Arc::new(StringArray::from_iter(
                    metas
                        .iter()
                        .map(|m| chunk.key(m).map(String::from_utf8_lossy)),
                )),
                Some(ColumnSource::IngestedAt) => Arc::new(
                    TimestampMicrosecondArray::from_value(ingested_at_us, n).with_timezone(UTC),
                ),
                // Filled below, once the event-time column exists.
                Some(ColumnSource::EventDate) => new_null_array(&col.data_type, n),
            };
            columns.push(array);
        }
        self.canonicalize_labels(&mut columns);
        // Instants outside years 1 to 9999 (a producer's CreateTime, an event time) have no date:
        // such a row is a dead letter, and its day below is only a placeholder. A Kafka
        // timestamp counts when the table stores it or a row's event_date falls back on it.
        let kafka_time_stored = self
            .table
            .columns
            .iter()
            .any(|c| c.source == Some(ColumnSource::KafkaTimestamp));
        let mut no_date: Vec<(usize, String)> = Vec::new();
        if kafka_time_stored {
            no_date.extend(
                (metas.iter().enumerate())
                    .filter_map(|(r, meta)| Some((r, kafka_time_problem(meta)?))),
            );
        }
        for (pos, col) in self.table.columns.iter().enumerate() {
            if col.source != Some(ColumnSource::EventDate) {
                continue;
            }
            let event_time = col.event_time.as_ref().and_then(|name| {
                let idx = self.table.columns.iter().position(|c| &c.name == name)?;
                columns[idx]
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .cloned()
                    .map(|a| (name, a))
            });
            let mut days = Vec::with_capacity(n);
            for (r, meta) in metas.iter().enumerate() {
                let event = event_time
                    .as_ref()
                    .filter(|(_, a)| a.is_valid(r))
                    .map(|(name, a)| (name, a.value(r)));
                let micros = match event {
                    Some((_, micros)) if values::instant_in_range(micros) => Some(micros),
                    Some((name, micros)) => {
                        no_date.push((
                            r,
                            format!(
                                "`{name}` ({micros} µs since the epoch) is outside {}",
                                values::INSTANT_RANGE
                            ),
                        ));
                        None
                    }
                    None => {
                        let micros = meta.timestamp_ms.and_then(values::kafka_micros);
                        if !kafka_time_stored && let Some(problem) = kafka_time_problem(meta) {
                            no_date.push((r, problem));
                        }
                        micros
                    }
                };
                let micros = micros.unwrap_or(ingested_at_us);
                days.push(micros.div_euclid(MICROS_PER_DAY) as i32);
            }
            columns[pos] = Arc::new(Date32Array::from_iter_values(days));
        }
        let batch = RecordBatch::try_new(self.table_schema.clone(), columns)?;
        let mut problems: Vec<Option<(RejectReason, String)>> = vec![None; n];
        for (row, detail) in no_date {
            problems[row].get_or_insert((RejectReason::BadTimestamp, detail));
        }
        for (row, detail) in projected.bad_timestamps {
            problems[row].get_or_insert((RejectReason::BadTimestamp, detail));
        }
        self.check_contracts(&batch, ingested_at_us, &mut problems);
        let mut keep = Vec::with_capacity(n);
        for (row, problem) in problems.into_iter().enumerate() {
            keep.push(problem.is_none());
            if let Some((reason, detail)) = problem {
                rejections.push(self.reject(chunk, rows[row], reason, detail));
            }
        }
        if keep.iter().all(|k| *k) {
            return Ok(Some(batch));
        }
        let filtered = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        Ok((filtered.num_rows() > 0).then_some(filtered))
    }

    /// Replaces raw labels with allowed values and fills each `<column>_raw` with the label as
    /// received when it was not already an allowed value.
    fn canonicalize_labels(&self, columns: &mut [ArrayRef]) {
        for LabelColumn {
            pos,
            raw_pos,
            counters,
        } in &self.label_columns
        {
            let labels = self.table.columns[*pos]
                .labels
                .as_ref()
                .expect("label columns have labels");
            let Some(raw) = columns[*pos].as_string_opt::<i32>() else {
                continue;
            };
            let mut counts = [0u64; 5];
            // Labels repeat endlessly: decide each distinct spelling once per chunk.
            let mut seen: HashMap<&str, (&str, Outcome)> = HashMap::new();
            let mut canonical = Vec::with_capacity(raw.len());
            let mut kept = Vec::with_capacity(raw.len());
            for value in raw.iter() {
                let Some(value) = value else {
                    canonical.push(None);
                    kept.push(None);
                    continue;
                };
                let (stored, outcome) = *seen
                    .entry(value)
                    .or_insert_with(|| labels.canonicalize(value));
                counts[outcome as usize] += 1;
                canonical.push(Some(stored));
                kept.push((outcome != Outcome::Exact).then_some(value));
            }
            let canonical: ArrayRef = if labels.is_boolean() {
                // An unrecognised yes/no is null, never a guess.
                Arc::new(BooleanArray::from_iter(canonical.into_iter().map(
                    |v| match v {
                        Some("true") => Some(true),
                        Some("false") => Some(false),
                        _ => None,
                    },
                )))
            } else {
                Arc::new(StringArray::from(canonical))
            };
            let kept: ArrayRef = Arc::new(StringArray::from(kept));
            columns[*pos] = canonical;
            columns[*raw_pos] = kept;
            for (counter, count) in counters.iter().zip(counts) {
                if count > 0 {
                    counter.increment(count);
                }
            }
        }
    }

    /// Records the first broken promise of each row: required columns, then value contracts.
    fn check_contracts(
        &self,
        batch: &RecordBatch,
        ingested_at_us: i64,
        problems: &mut [Option<(RejectReason, String)>],
    ) {
        for (pos, col) in self.table.columns.iter().enumerate() {
            let array = batch.column(pos);
            if !col.nullable && array.null_count() > 0 {
                for (row, problem) in problems.iter_mut().enumerate() {
                    if array.is_null(row) && problem.is_none() {
                        *problem = Some((
                            RejectReason::MissingRequired,
                            format!("required column `{}` is missing or null", col.name),
                        ));
                    }
                }
            }
            if col.contract == Contract::default() {
                continue;
            }
            for (row, broken, detail) in violations(array, &col.contract, &col.name, ingested_at_us)
            {
                let reason = match broken {
                    Broken::Range => RejectReason::OutOfRange,
                    Broken::Dimension => RejectReason::WrongDimension,
                    Broken::TimeWindow => RejectReason::BadTimestamp,
                };
                problems[row].get_or_insert((reason, detail));
            }
        }
    }
}

/// Why a message's Kafka timestamp has no instant (outside years 1 to 9999), if it has none.
fn kafka_time_problem(meta: &MessageMeta) -> Option<String> {
    let ms = meta.timestamp_ms?;
    values::kafka_micros(ms).is_none().then(|| {
        format!(
            "Kafka timestamp {ms} ms is outside {}",
            values::INSTANT_RANGE
        )
    })
}

/// Where nesting first exceeds `max_depth`, scanning bytes outside strings.
fn too_deep(payload: &[u8], max_depth: usize) -> Option<usize> {
    // Nesting never exceeds the number of `{` and `[` bytes; counting them is one vectorized
    // pass, so only payloads with that many openers walk the structure.
    let openers = payload.iter().filter(|&&b| b == b'{' || b == b'[').count();
    if openers <= max_depth {
        return None;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in payload.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Some(i);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// arrow-json prefixes its messages with "Json error: "; the reason code already says that.
fn json_error_text(e: &ArrowError) -> String {
    let text = e.to_string();
    text.strip_prefix("Json error: ")
        .map(str::to_string)
        .unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::Int64Type;

    use super::*;

    /// The limits the tests use unless they test a limit.
    const LIMITS: InputLimits = InputLimits {
        max_message_bytes: 4096,
        max_depth: 64,
    };

    fn decoder(shape: &str) -> BodyDecoder {
        decoder_with(shape, LIMITS)
    }

    fn decoder_with(shape: &str, limits: InputLimits) -> BodyDecoder {
        let table = Arc::new(TableSchema::load(Path::new("schemas/enriched_posts.toml")).unwrap());
        let mapping = Arc::new(
            Mapping::load(Path::new(&format!("schemas/mappings/{shape}.toml")), &table).unwrap(),
        );
        BodyDecoder::new(table, mapping, limits)
    }

    fn chunk(payloads: &[&[u8]]) -> Chunk {
        let mut c = Chunk::new("posts".into(), 3);
        for (i, p) in payloads.iter().enumerate() {
            c.push(100 + i as i64, Some(1_700_000_000_000), Some(b"k"), Some(p));
        }
        c
    }

    /// Ingestion time of the test messages: 2025-06-15.
    const NOW: i64 = 1_750_000_000_000_000;

    const GOOD: &[u8] = br#"{"id":"1","content":"hi","created_at":"2025-03-01T10:00:00Z","sentiment":"positive","account":{"acct":"a@b"},"favourites_count":3}"#;

    #[test]
    fn every_message_becomes_one_row_or_one_rejection() {
        let big = vec![b' '; 5000];
        let payloads: Vec<&[u8]> = vec![
            GOOD,
            b"{\"id\":\"2\"", // truncated
            GOOD,
            b"{\"id\":\"3\"}{\"id\":\"4\"}", // two values
            b"[1,2]",
            b"{\"id\":\"5\",\"favourites_count\":\"many\"}", // type mismatch
            b"\xff\xfe{}",
            &big,
            b"{\"content\":\"no id\"}", // post_id is required
            b"not json",
            GOOD,
        ];
        let decoded = decoder("mastodon").decode(&chunk(&payloads), NOW).unwrap();
        let batch = decoded.batch.unwrap();
        let offsets: Vec<i64> = batch
            .column_by_name("kafka_offset")
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(offsets, vec![100, 102, 110]);
        let reasons: Vec<(i64, &str)> = decoded
            .rejections
            .iter()
            .map(|r| (r.offset, r.reason.code()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (101, "malformed_json"),
                (103, "multiple_values"),
                (104, "not_an_object"),
                (105, "type_mismatch"),
                (106, "invalid_utf8"),
                (107, "too_large"),
                (108, "missing_required"),
                (109, "malformed_json"),
            ]
        );
        let mismatch = &decoded.rejections[3];
        assert!(
            mismatch.detail.contains("favourites_count"),
            "{}",
            mismatch.detail
        );
    }

    #[test]
    fn event_date_comes_from_created_at_in_utc() {
        let payload: &[u8] =
            br#"{"id":"1","created_at":"2025-03-01T23:30:00-05:00","content":"x"}"#;
        let decoded = decoder("mastodon").decode(&chunk(&[payload]), NOW).unwrap();
        let batch = decoded.batch.unwrap();
        let dates = batch
            .column_by_name("event_date")
            .unwrap()
            .as_primitive::<deltalake::arrow::datatypes::Date32Type>();
        // 2025-03-02 UTC is day 20149 since the epoch.
        assert_eq!(dates.value(0), 20149);
        assert_eq!(
            batch
                .column_by_name("platform")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "mastodon"
        );
    }

    #[test]
    fn jetstream_time_us_and_nested_enrichment_land_in_columns() {
        let payload: &[u8] = br#"{"did":"did:plc:x","time_us":1740823200000000,"kind":"commit",
            "commit":{"cid":"bafy1","record":{"text":"hello","langs":["en"]}},
            "enrichment":{"toxicity":{"score":0.25,"labels":{"insult":0.1}},
            "entities":[{"text":"Paris","label":"LOC","score":0.9}],"sentiment":{"label":"neutral","score":0.7}}}"#;
        let decoded = decoder("bluesky").decode(&chunk(&[payload]), NOW).unwrap();
        assert!(decoded.rejections.is_empty(), "{:?}", decoded.rejections);
        let batch = decoded.batch.unwrap();
        let created = batch
            .column_by_name("created_at")
            .unwrap()
            .as_primitive::<deltalake::arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(created.value(0), 1_740_823_200_000_000);
        let entities = batch.column_by_name("entities").unwrap().as_list::<i32>();
        assert_eq!(entities.value(0).len(), 1);
        assert_eq!(
            batch
                .column_by_name("text")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "hello"
        );
    }

    #[test]
    fn contracts_reject_with_the_field_named_and_labels_are_canonical() {
        let deep = format!(
            "{{\"id\":\"d\",\"x\":{}{}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        let payloads: Vec<&[u8]> = vec![
            br#"{"id":"1","created_at":"2025-03-01T10:00:00Z","sentiment":"Positive ","language":"pt-BR","category":"Technolgy","appropriate language":"INAPROPRIATE"}"#,
            br#"{"id":"2","created_at":"yesterday"}"#,
            br#"{"id":"3","created_at":"1999-01-01T00:00:00Z"}"#,
            br#"{"id":"4","favourites_count":-3}"#,
            deep.as_bytes(),
            b"\xEF\xBB\xBF{\"id\":\"5\"}",
            br#"{"id":"6","sentiment":"very positive","category":"memes","sarcasm":"not sarcastic"}"#,
        ];
        let decoded = decoder("mastodon").decode(&chunk(&payloads), NOW).unwrap();
        let reasons: Vec<(i64, &str)> = decoded
            .rejections
            .iter()
            .map(|r| (r.offset, r.reason.code()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (101, "bad_timestamp"),
                (102, "bad_timestamp"),
                (103, "out_of_range"),
                (104, "too_deep"),
                (105, "malformed_json"),
            ]
        );
        assert!(
            decoded.rejections[0]
                .detail
                .contains("`created_at`: `yesterday` is not a timestamp")
        );
        assert!(decoded.rejections[2].detail.contains("`like_count` is -3"));
        assert!(decoded.rejections[4].detail.contains("byte order mark"));
        assert_eq!(
            decoded.rejections[3].payload.as_deref(),
            Some(deep.as_bytes())
        );

        let batch = decoded.batch.unwrap();
        let text = |name: &str| -> Vec<Option<String>> {
            batch
                .column_by_name(name)
                .unwrap()
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect()
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(text("sentiment"), vec![s("positive"), s("UNKNOWN")]);
        assert_eq!(
            text("sentiment_raw"),
            vec![s("Positive "), s("very positive")]
        );
        assert_eq!(text("language"), vec![s("pt"), None]);
        assert_eq!(text("language_raw"), vec![s("pt-BR"), None]);
        assert_eq!(text("category"), vec![s("technology"), s("UNKNOWN")]);
        assert_eq!(text("category_raw"), vec![s("Technolgy"), s("memes")]);
        assert_eq!(text("appropriateness"), vec![s("inappropriate"), None]);
        assert_eq!(text("sarcasm"), vec![None, s("not_sarcastic")]);
    }

    #[test]
    fn hostile_sizes_and_depths_are_refused_before_parsing() {
        let decoder = decoder_with(
            "mastodon",
            InputLimits {
                max_message_bytes: 4 * 1024 * 1024,
                ..LIMITS
            },
        );
        let mut huge = b"{\"id\":\"1\",\"content\":\"".to_vec();
        huge.resize(8 * 1024 * 1024, b'x');
        huge.extend_from_slice(b"\"}");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_object = format!(
            "{{\"a\":{}1{}}}",
            "{\"b\":".repeat(100_000),
            "}".repeat(100_000)
        );
        // Brackets inside strings are text, not nesting.
        let shallow = format!("{{\"id\":\"1\",\"content\":\"{}\"}}", "[".repeat(1000));
        let payloads: Vec<&[u8]> = vec![
            &huge,
            deep.as_bytes(),
            deep_object.as_bytes(),
            shallow.as_bytes(),
        ];
        let decoded = decoder.decode(&chunk(&payloads), NOW).unwrap();
        let reasons: Vec<&str> = decoded.rejections.iter().map(|r| r.reason.code()).collect();
        assert_eq!(reasons, vec!["too_large", "too_deep", "too_deep"]);
        assert_eq!(decoded.batch.unwrap().num_rows(), 1);
    }

    #[test]
    fn labelled_booleans_accept_yes_no_and_keep_what_they_cannot_read() {
        let table = TableSchema::parse(
            "[table]\nname = \"t\"\n[[columns]]\nname = \"id\"\ntype = \"string\"\n\
             [[columns]]\nname = \"sarcastic\"\ntype = \"boolean\"\n\
             labels = { aliases = { sarcastic = \"true\", not_sarcastic = \"false\" } }\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let table = Arc::new(table);
        let mapping = Mapping::parse(
            "table = \"t\"\n[columns]\nid = { path = \"id\" }\nsarcastic = { path = \"s\" }\n",
            Path::new("m.toml"),
            &table,
        )
        .unwrap();
        let decoder = BodyDecoder::new(table, Arc::new(mapping), LIMITS);
        let payloads: Vec<&[u8]> = vec![
            br#"{"id":"1","s":true}"#,
            br#"{"id":"2","s":"Yes"}"#,
            br#"{"id":"3","s":"not sarcastic"}"#,
            br#"{"id":"4","s":"maybe"}"#,
            br#"{"id":"5"}"#,
        ];
        let decoded = decoder.decode(&chunk(&payloads), NOW).unwrap();
        assert!(decoded.rejections.is_empty(), "{:?}", decoded.rejections);
        let batch = decoded.batch.unwrap();
        let values: Vec<Option<bool>> = batch
            .column_by_name("sarcastic")
            .unwrap()
            .as_boolean()
            .iter()
            .collect();
        assert_eq!(
            values,
            vec![Some(true), Some(true), Some(false), None, None]
        );
        let raw: Vec<Option<&str>> = batch
            .column_by_name("sarcastic_raw")
            .unwrap()
            .as_string::<i32>()
            .iter()
            .collect();
        assert_eq!(
            raw,
            vec![
                None,
                Some("Yes"),
                Some("not sarcastic"),
                Some("maybe"),
                None
            ]
        );
    }
}
