//! Messages in the schema registry's wire format (a magic byte, the schema id, then the
//! encoded record): schemas are looked up by id before a chunk decodes, compiled once, and
//! Avro records decode straight to Arrow with arrow-avro.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_avro::schema::AvroSchema;
use deltalake::arrow::record_batch::RecordBatch;

use crate::ingest::registry::{Lookup, Registry, RegistryError, split_frame};

use super::body::BodyDecoder;
use super::schemas::{Compiled, Schemas, avro_decoder, compile};
use super::{Chunk, RejectReason, Rejection};

/// A message in the wire format: its schema id, the record after the header, its schema.
pub(super) struct Framed<'c> {
    pub(super) id: u32,
    pub(super) body: &'c [u8],
    pub(super) schema: &'c Arc<Compiled>,
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
            schemas.insert(id, compiled);
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
