//! Messages in the schema registry's wire format (a magic byte, the schema id, then the
//! encoded record): schemas are looked up by id before a chunk decodes, compiled once, and
//! Avro records decode straight to Arrow with arrow-avro.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use deltalake::arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::ingest::registry::{
    Lookup, RegisteredSchema, Registry, RegistryError, SchemaKind, split_frame,
};

use super::body::BodyDecoder;
use super::protobuf::ProtoSchema;
use super::{Chunk, RejectReason, Rejection};

/// How a topic's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Plain JSON objects.
    #[default]
    Json,
    /// Avro in the registry's wire format.
    Avro,
    /// Protocol Buffers in the registry's wire format (with message indexes).
    Protobuf,
    /// JSON in the registry's wire format (JSON Schema).
    JsonSchema,
}

impl Format {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
            Format::Protobuf => "protobuf",
            Format::JsonSchema => "json-schema",
        }
    }

    /// The registry schema type this format's messages are written with, if it uses one.
    pub fn schema_kind(self) -> Option<SchemaKind> {
        match self {
            Format::Json => None,
            Format::Avro => Some(SchemaKind::Avro),
            Format::Protobuf => Some(SchemaKind::Protobuf),
            Format::JsonSchema => Some(SchemaKind::Json),
        }
    }
}

/// A registered schema made ready to decode with.
#[derive(Debug)]
pub(super) enum Compiled {
    Avro(AvroSchema),
    Protobuf(ProtoSchema),
    /// JSON Schema messages decode as JSON; the schema itself is not needed.
    Json,
}

/// The schemas of one chunk's ids: compiled, or why a message with that id is a dead letter.
#[derive(Debug, Default)]
pub struct Schemas {
    by_id: HashMap<u32, Result<Arc<Compiled>, String>>,
}

impl Schemas {
    /// Schemas known up front rather than looked up (tests, benchmarks): each compiled for
    /// `format`, or the reason it cannot be used.
    pub fn known(format: Format, schemas: &[RegisteredSchema]) -> Schemas {
        Schemas {
            by_id: schemas
                .iter()
                .map(|s| (s.id, compile(format, s).map(Arc::new)))
                .collect(),
        }
    }

    /// The schema for `id`, or why there is none.
    pub(super) fn get(&self, id: u32) -> Result<&Arc<Compiled>, String> {
        match self.by_id.get(&id) {
            Some(Ok(compiled)) => Ok(compiled),
            Some(Err(why)) => Err(why.clone()),
            None => Err(format!("schema {id} was not looked up (a bug in sluice)")),
        }
    }
}

/// A message in the wire format: its schema id, the record after the header, its schema.
pub(super) struct Framed<'c> {
    pub(super) id: u32,
    pub(super) body: &'c [u8],
    pub(super) schema: &'c Arc<Compiled>,
}

/// Compiled schemas by id, shared by every chunk of a topic.
#[derive(Debug, Default)]
pub(super) struct CompiledCache(Mutex<HashMap<u32, Arc<Compiled>>>);

impl CompiledCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Compiled>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn compile(format: Format, schema: &RegisteredSchema) -> Result<Compiled, String> {
    let expected = format
        .schema_kind()
        .expect("framed formats have a schema kind");
    if schema.kind != expected {
        return Err(format!(
            "schema {} is {}, but the source reads {}",
            schema.id,
            schema.kind.as_str(),
            format.as_str()
        ));
    }
    match schema.kind {
        SchemaKind::Avro => {
            if !schema.references.is_empty() {
                return Err(format!(
                    "Avro schema {} references other schemas, which sluice does not resolve \
                     (register it self-contained)",
                    schema.id
                ));
            }
            let avro = AvroSchema::new(schema.text.clone());
            // Building a decoder checks that arrow-avro can read the schema.
            avro_decoder(schema.id, &avro, 1)
                .map_err(|e| format!("Avro schema {} cannot be read: {e}", schema.id))?;
            Ok(Compiled::Avro(avro))
        }
        SchemaKind::Protobuf => ProtoSchema::compile(schema).map(Compiled::Protobuf),
        SchemaKind::Json => Ok(Compiled::Json),
    }
}

fn avro_decoder(
    id: u32,
    schema: &AvroSchema,
    capacity: usize,
) -> Result<arrow_avro::reader::Decoder, String> {
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
    store
        .set(Fingerprint::Id(id), schema.clone())
        .map_err(|e| e.to_string())?;
    ReaderBuilder::new()
        .with_writer_schema_store(store)
        .with_batch_size(capacity.max(1) + 1)
        .build_decoder()
        .map_err(|e| e.to_string())
}

impl BodyDecoder {
    /// Looks up the schemas of `chunk`'s ids (cached after the first time), waiting while the
    /// registry cannot be reached. Plain JSON needs none.
    pub async fn resolve(&self, chunk: &Chunk) -> Result<Schemas, RegistryError> {
        let mut schemas = Schemas::default();
        let Some(registry) = &self.registry else {
            return Ok(schemas);
        };
        let ids: std::collections::BTreeSet<u32> = (0..chunk.len())
            .filter_map(|i| split_frame(chunk.payload(i)?).ok().map(|(id, _)| id))
            .collect();
        for id in ids {
            let cached = self.compiled.lock().get(&id).cloned();
            let compiled = match cached {
                Some(c) => Ok(c),
                None => self.lookup(registry, id).await?,
            };
            schemas.by_id.insert(id, compiled);
        }
        Ok(schemas)
    }

    async fn lookup(
        &self,
        registry: &Registry,
        id: u32,
    ) -> Result<Result<Arc<Compiled>, String>, RegistryError> {
        Ok(match registry.schema(id).await? {
            Lookup::Unknown(why) => Err(why),
            Lookup::Found(schema) => match compile(self.format, &schema) {
                Ok(compiled) => {
                    let compiled = Arc::new(compiled);
                    self.compiled.lock().insert(id, compiled.clone());
                    Ok(compiled)
                }
                Err(why) => Err(why),
            },
        })
    }

    /// The record bytes after the frame and the schema of a message, or why it has none.
    pub(super) fn framed<'c>(
        &self,
        chunk: &'c Chunk,
        i: usize,
        schemas: &'c Schemas,
    ) -> Result<Framed<'c>, (RejectReason, String)> {
        let Some(payload) = chunk.payload(i) else {
            return Err((RejectReason::NoSchemaId, "empty message (tombstone)".into()));
        };
        let (id, body) = split_frame(payload).map_err(|e| (RejectReason::NoSchemaId, e))?;
        let compiled = schemas
            .get(id)
            .map_err(|why| (RejectReason::UnknownSchema, why))?;
        Ok(Framed {
            id,
            body,
            schema: compiled,
        })
    }

    /// Decodes a chunk of Avro messages: one arrow-avro decoder per schema id, each message
    /// checked to be exactly one record; the rows are then shaped like decoded JSON.
    pub(super) fn decode_avro(
        &self,
        chunk: &Chunk,
        schemas: &Schemas,
        parts: &mut Vec<(RecordBatch, Vec<usize>)>,
        rejections: &mut Vec<Rejection>,
    ) {
        struct Group {
            decoder: arrow_avro::reader::Decoder,
            schema: AvroSchema,
            rows: Vec<usize>,
        }
        let mut groups: BTreeMap<u32, Group> = BTreeMap::new();
        for i in 0..chunk.len() {
            let checked = self.precheck_size(chunk, i).and_then(|()| {
                let framed = self.framed(chunk, i, schemas)?;
                let (id, compiled) = (framed.id, framed.schema);
                match &**compiled {
                    Compiled::Avro(schema) => Ok((id, schema)),
                    _ => unreachable!("an Avro source compiles Avro schemas only"),
                }
            });
            let (id, schema) = match checked {
                Ok(found) => found,
                Err((reason, detail)) => {
                    rejections.push(self.reject(chunk, i, reason, detail));
                    continue;
                }
            };
            let group = match groups.entry(id) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(Group {
                    decoder: avro_decoder(id, schema, chunk.len())
                        .expect("the schema built a decoder when it was compiled"),
                    schema: schema.clone(),
                    rows: Vec::new(),
                }),
            };
            let payload = chunk.payload(i).expect("framed messages have payloads");
            let before = group.decoder.capacity();
            let anomaly = match group.decoder.decode(payload) {
                Err(e) => Some(format!("does not decode with Avro schema {id}: {e}")),
                Ok(_) if group.decoder.capacity() == before => Some(format!(
                    "the record ends early for Avro schema {id} (truncated?)"
                )),
                Ok(n) if n < payload.len() || group.decoder.capacity() + 1 < before => Some(
                    format!("bytes follow the record of Avro schema {id} (more than one record?)"),
                ),
                Ok(_) => None,
            };
            let Some(detail) = anomaly else {
                group.rows.push(i);
                continue;
            };
            rejections.push(self.reject(chunk, i, RejectReason::SchemaMismatch, detail));
            // The decoder holds part of the bad record: start over with the group's good ones.
            group.decoder = avro_decoder(id, &group.schema, chunk.len())
                .expect("the schema built a decoder when it was compiled");
            for &j in &group.rows {
                let p = chunk.payload(j).expect("decoded messages have payloads");
                group
                    .decoder
                    .decode(p)
                    .expect("a message that decoded once decodes again");
            }
        }
        for (id, mut group) in groups {
            if group.rows.is_empty() {
                continue;
            }
            let batch = group
                .decoder
                .flush()
                .unwrap_or_else(|e| panic!("Avro schema {id}: decoded records flush: {e}"))
                .expect("a group with rows flushes a batch");
            self.conform_rows(chunk, &batch, group.rows, parts, rejections);
        }
    }

    /// Shapes a decoded batch like decoded JSON; rows whose values do not fit their columns are
    /// found one by one and rejected.
    pub(super) fn conform_rows(
        &self,
        chunk: &Chunk,
        batch: &RecordBatch,
        rows: Vec<usize>,
        parts: &mut Vec<(RecordBatch, Vec<usize>)>,
        rejections: &mut Vec<Rejection>,
    ) {
        match self.mapping.conform(batch) {
            Ok(conformed) => parts.push((conformed, rows)),
            Err(_) => {
                for (r, i) in rows.into_iter().enumerate() {
                    match self.mapping.conform(&batch.slice(r, 1)) {
                        Ok(one) => parts.push((one, vec![i])),
                        Err(e) => rejections.push(self.reject(
                            chunk,
                            i,
                            RejectReason::TypeMismatch,
                            super::body::cast_error_text(&e),
                        )),
                    }
                }
            }
        }
    }
}
