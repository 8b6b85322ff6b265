//! Decode: Kafka message bytes → rows of the table, or a rejection per message.
//!
//! One message yields exactly one row, one [`Rejection`] or one [`Deletion`]; never two, never
//! none.
//! The fast path feeds a whole chunk of messages to one arrow-json `Decoder`. Anything odd (a
//! syntax error, two values in one message, a value of the wrong type) sends only the affected
//! messages down a slower per-message path, so one bad record costs its neighbours nothing.
//! Avro and Protobuf in the schema registry's wire format decode straight to Arrow too
//! ([`framed`]), and every format then maps through the same mapping files.

use std::fmt;
use std::sync::Arc;

use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;

pub use crate::table::delta::Deletion;
pub use body::BodyDecoder;
pub use schemas::{Format, Schemas, proto_pool};

mod body;
mod columns;
mod framed;
mod protobuf;
mod schemas;

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
    /// A source in a registry format got a message without the wire format's magic byte
    /// and schema id.
    NoSchemaId,
    /// The registry has no usable schema under the message's id (unknown id, another format
    /// than the source's, or a schema sluice cannot compile).
    UnknownSchema,
    /// The record does not decode with its schema (truncated, extra bytes, bad encoding).
    SchemaMismatch,
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
            RejectReason::NoSchemaId => "no_schema_id",
            RejectReason::UnknownSchema => "unknown_schema",
            RejectReason::SchemaMismatch => "schema_mismatch",
            RejectReason::Lost => "lost",
        }
    }

    /// Every reason, in documentation order.
    pub const ALL: [RejectReason; 15] = [
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
        RejectReason::NoSchemaId,
        RejectReason::UnknownSchema,
        RejectReason::SchemaMismatch,
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
    /// Messages that delete a post (the mapping's `[operation]`), in offset order.
    pub deletions: Vec<Deletion>,
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

/// Limits checked on raw bytes before any parsing, so hostile input costs little.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Largest accepted payload in bytes.
    pub max_message_bytes: usize,
    /// Deepest accepted nesting of objects and arrays.
    pub max_depth: usize,
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use crate::contract::mapping::Mapping;
    use crate::contract::schema::TableSchema;

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
            "commit":{"operation":"create","collection":"app.bsky.feed.post","rkey":"3k1","cid":"bafy1","record":{"text":"hello","langs":["en"]}},
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
                .column_by_name("post_id")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "at://did:plc:x/app.bsky.feed.post/3k1"
        );
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
