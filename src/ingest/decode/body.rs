//! The decoder of one upstream shape: a chunk of messages is checked for size and depth,
//! parsed by arrow-json's `Decoder` in segments between bad messages, and each bad message
//! becomes one rejection with its reason.

use std::sync::Arc;

use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::json::ReaderBuilder;
use deltalake::arrow::json::reader::Decoder;
use deltalake::arrow::record_batch::RecordBatch;

use crate::contract::labels::Outcome;
use crate::contract::mapping::Mapping;
use crate::contract::schema::TableSchema;
use crate::ingest::registry::Registry;

use super::schemas::{CompiledCache, Format, Schemas};
use super::{Chunk, DecodeError, Decoded, InputLimits, RejectReason, Rejection};

/// Decodes chunks of one upstream shape into rows of one table.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    pub(super) table: Arc<TableSchema>,
    pub(super) mapping: Arc<Mapping>,
    pub(super) table_schema: SchemaRef,
    pub(super) source_schema: SchemaRef,
    limits: InputLimits,
    /// The columns with labels, resolved once.
    pub(super) label_columns: Vec<LabelColumn>,
    /// How the topic's messages are encoded.
    pub(super) format: Format,
    /// Where the schemas of framed formats come from.
    pub(super) registry: Option<Arc<Registry>>,
    /// Schemas compiled so far, by id.
    pub(super) compiled: Arc<CompiledCache>,
}

/// A label column's place in the table and its counters, so canonicalizing a chunk needs no
/// lookups.
#[derive(Debug, Clone)]
pub(super) struct LabelColumn {
    /// Position of the label column.
    pub(super) pos: usize,
    /// Position of its `<column>_raw` column.
    pub(super) raw_pos: usize,
    /// One counter per [`Outcome`], registered once.
    pub(super) counters: [metrics::Counter; 5],
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
            format: Format::Json,
            registry: None,
            compiled: Arc::default(),
        }
    }

    /// Reads messages in `format`, whose schemas `registry` holds (plain JSON needs none).
    pub fn with_format(mut self, format: Format, registry: Option<Arc<Registry>>) -> Self {
        self.format = format;
        self.registry = registry;
        self
    }

    /// How the topic's messages are encoded.
    pub fn format(&self) -> Format {
        self.format
    }

    fn json_decoder(&self, capacity: usize) -> Decoder {
        ReaderBuilder::new(self.source_schema.clone())
            .with_batch_size(capacity.max(1) + 1)
            .with_coerce_primitive(true)
            .build_decoder()
            .expect("mapping-derived schemas contain only types arrow-json decodes")
    }

    /// Decodes every message of a plain JSON `chunk`; `ingested_at_us` stamps the rows.
    pub fn decode(&self, chunk: &Chunk, ingested_at_us: i64) -> Result<Decoded, DecodeError> {
        self.decode_with(chunk, &Schemas::default(), ingested_at_us)
    }

    /// Decodes every message of `chunk` with the schemas [`Self::resolve`] looked up for it;
    /// `ingested_at_us` stamps the rows.
    pub fn decode_with(
        &self,
        chunk: &Chunk,
        schemas: &Schemas,
        ingested_at_us: i64,
    ) -> Result<Decoded, DecodeError> {
        let mut rejections = Vec::new();
        let mut parts: Vec<(RecordBatch, Vec<usize>)> = Vec::new();
        match self.format {
            Format::Json | Format::JsonSchema => {
                self.decode_json(chunk, schemas, &mut parts, &mut rejections)
            }
            Format::Avro => self.decode_avro(chunk, schemas, &mut parts, &mut rejections),
            Format::Protobuf => self.decode_protobuf(chunk, schemas, &mut parts, &mut rejections),
        }
        let mut deletions = Vec::new();
        let batch = self
            .assemble(
                chunk,
                parts,
                ingested_at_us,
                &mut rejections,
                &mut deletions,
            )
            .map_err(|source| DecodeError::Assemble {
                table: self.table.name.clone(),
                topic: chunk.topic.to_string(),
                source,
            })?;
        rejections.sort_by_key(|r| r.offset);
        Ok(Decoded {
            batch,
            rejections,
            deletions,
        })
    }

    /// The JSON text of message `i`: the payload, or for JSON Schema what follows the frame.
    fn json_body<'c>(
        &self,
        chunk: &'c Chunk,
        i: usize,
        schemas: &'c Schemas,
    ) -> Result<Option<&'c [u8]>, (RejectReason, String)> {
        match self.format {
            Format::JsonSchema => self
                .framed(chunk, i, schemas)
                .map(|framed| Some(framed.body)),
            _ => Ok(chunk.payload(i)),
        }
    }

    /// Decodes JSON messages with arrow-json, in segments between bad messages.
    fn decode_json(
        &self,
        chunk: &Chunk,
        schemas: &Schemas,
        parts: &mut Vec<(RecordBatch, Vec<usize>)>,
        rejections: &mut Vec<Rejection>,
    ) {
        let mut segment: Vec<usize> = Vec::new();
        let mut decoder = self.json_decoder(chunk.len());
        let body = |i: usize| {
            self.json_body(chunk, i, schemas)
                .expect("segment messages have a body")
                .expect("segment messages have payloads")
        };

        for i in 0..chunk.len() {
            let checked = self
                .precheck_size(chunk, i)
                .and_then(|()| self.json_body(chunk, i, schemas))
                .and_then(|payload| self.precheck_json(payload));
            let payload = match checked {
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
                        decoder
                            .decode(body(j))
                            .expect("a message that decoded once decodes again");
                    }
                    self.flush_segment(&mut decoder, chunk, schemas, &segment, parts, rejections);
                    segment.clear();
                }
            }
        }
        self.flush_segment(&mut decoder, chunk, schemas, &segment, parts, rejections);
    }

    /// The size limit, checked before any parsing so hostile input costs little. It is on
    /// the whole message, key and value, as Kafka's own is: a key is copied into the row
    /// (`kafka_key`) and counts toward memory like the value.
    pub(super) fn precheck_size(
        &self,
        chunk: &Chunk,
        i: usize,
    ) -> Result<(), (RejectReason, String)> {
        let key_bytes = chunk.key(&chunk.messages[i]).map_or(0, <[u8]>::len);
        let value_bytes = chunk.payload(i).map_or(0, <[u8]>::len);
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
        if value_bytes > self.limits.max_message_bytes {
            return Err((
                RejectReason::TooLarge,
                format!(
                    "{value_bytes} bytes, over the limit of {} bytes",
                    self.limits.max_message_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Cheap checks of JSON text before parsing: encoding, nesting, the first byte.
    fn precheck_json<'a>(
        &self,
        payload: Option<&'a [u8]>,
    ) -> Result<&'a [u8], (RejectReason, String)> {
        let Some(payload) = payload else {
            return Err((
                RejectReason::MalformedJson,
                "empty message (tombstone)".into(),
            ));
        };
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
        schemas: &Schemas,
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
            let payload = self
                .json_body(chunk, i, schemas)
                .ok()
                .flatten()
                .expect("segment messages have a body");
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

    pub(super) fn reject(
        &self,
        chunk: &Chunk,
        i: usize,
        reason: RejectReason,
        detail: String,
    ) -> Rejection {
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
}

/// Where nesting first exceeds `max_depth`, scanning bytes outside strings.
pub(super) fn too_deep(payload: &[u8], max_depth: usize) -> Option<usize> {
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

/// arrow's cast errors start with "Cast error: "; the reason code already says that.
pub(super) fn cast_error_text(e: &ArrowError) -> String {
    let text = e.to_string();
    text.strip_prefix("Cast error: ")
        .map(str::to_string)
        .unwrap_or(text)
}
