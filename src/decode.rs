//! Decode: Kafka message bytes → rows of the table, or a rejection per message.
//!
//! One message yields exactly one row or exactly one [`Rejection`]; never both, never neither.
//! The fast path feeds a whole chunk of messages to one arrow-json `Decoder`. Anything odd (a
//! syntax error, two values in one message, a value of the wrong type) sends only the affected
//! messages down a slower per-message path, so one bad record costs its neighbours nothing.

use std::fmt;
use std::sync::Arc;

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

use crate::mapping::Mapping;
use crate::schema::{ColumnSource, TableSchema, UTC};

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
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A message that could not become a row, with enough context to find and explain it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Offset of the message in its partition.
    pub offset: i64,
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
    max_message_bytes: usize,
}

impl BodyDecoder {
    /// A decoder for `mapping` into `table`; messages over `max_message_bytes` are rejected
    /// before any parsing.
    pub fn new(table: Arc<TableSchema>, mapping: Arc<Mapping>, max_message_bytes: usize) -> Self {
        BodyDecoder {
            table_schema: table.arrow_schema(),
            source_schema: mapping.source_schema(),
            table,
            mapping,
            max_message_bytes,
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
            let payload = match self.precheck(chunk.payload(i)) {
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
    fn precheck<'a>(&self, payload: Option<&'a [u8]>) -> Result<&'a [u8], (RejectReason, String)> {
        let Some(payload) = payload else {
            return Err((
                RejectReason::MalformedJson,
                "empty message (tombstone)".into(),
            ));
        };
        if payload.len() > self.max_message_bytes {
            return Err((
                RejectReason::TooLarge,
                format!(
                    "{} bytes, over the limit of {} bytes",
                    payload.len(),
                    self.max_message_bytes
                ),
            ));
        }
        if let Err(e) = std::str::from_utf8(payload) {
            return Err((
                RejectReason::InvalidUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            ));
        }
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Err((RejectReason::MalformedJson, "empty message".into())),
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
        Rejection {
            offset: chunk.messages[i].offset,
            reason,
            detail,
        }
    }

    /// Builds the table batch: mapped columns, sluice's own columns, then the non-null contract.
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
        let mut mapped = self.mapping.project(&source, &self.table)?;
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
                        metas.iter().map(|m| m.timestamp_ms.map(|t| t * 1000)),
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
            });
            let days = (0..n).map(|r| {
                let micros = event_time
                    .as_ref()
                    .filter(|a| a.is_valid(r))
                    .map(|a| a.value(r))
                    .or(metas[r].timestamp_ms.map(|t| t * 1000))
                    .unwrap_or(ingested_at_us);
                Some(micros.div_euclid(MICROS_PER_DAY) as i32)
            });
            columns[pos] = Arc::new(Date32Array::from_iter(days));
        }
        let batch = RecordBatch::try_new(self.table_schema.clone(), columns)?;
        self.enforce_required(batch, &metas, rejections)
    }

    /// Rejects rows that leave a non-nullable column empty.
    fn enforce_required(
        &self,
        batch: RecordBatch,
        metas: &[&MessageMeta],
        rejections: &mut Vec<Rejection>,
    ) -> Result<Option<RecordBatch>, ArrowError> {
        let mut keep = vec![true; batch.num_rows()];
        for (pos, col) in self.table.columns.iter().enumerate() {
            let array = batch.column(pos);
            if col.nullable || array.null_count() == 0 {
                continue;
            }
            for (row, kept) in keep.iter_mut().enumerate() {
                if *kept && array.is_null(row) {
                    *kept = false;
                    rejections.push(Rejection {
                        offset: metas[row].offset,
                        reason: RejectReason::MissingRequired,
                        detail: format!("required column `{}` is missing or null", col.name),
                    });
                }
            }
        }
        if keep.iter().all(|k| *k) {
            return Ok(Some(batch));
        }
        let filtered = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        Ok((filtered.num_rows() > 0).then_some(filtered))
    }
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

    fn decoder(shape: &str) -> BodyDecoder {
        let table = Arc::new(TableSchema::load(Path::new("schemas/enriched_posts.toml")).unwrap());
        let mapping = Arc::new(
            Mapping::load(Path::new(&format!("schemas/mappings/{shape}.toml")), &table).unwrap(),
        );
        BodyDecoder::new(table, mapping, 4096)
    }

    fn chunk(payloads: &[&[u8]]) -> Chunk {
        let mut c = Chunk::new("posts".into(), 3);
        for (i, p) in payloads.iter().enumerate() {
            c.push(100 + i as i64, Some(1_700_000_000_000), Some(b"k"), Some(p));
        }
        c
    }

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
        let decoded = decoder("mastodon").decode(&chunk(&payloads), 0).unwrap();
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
        let decoded = decoder("mastodon").decode(&chunk(&[payload]), 0).unwrap();
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
        let decoded = decoder("bluesky").decode(&chunk(&[payload]), 0).unwrap();
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
}
