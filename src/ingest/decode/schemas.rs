//! The schemas of registry formats: what a source's format is, a registered schema compiled
//! for decoding (Avro for arrow-avro, `.proto` text with protox), and the Confluent wire
//! format's Protobuf message indexes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use prost_reflect::{DescriptorPool, MessageDescriptor};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use serde::{Deserialize, Serialize};

use crate::ingest::registry::{RegisteredSchema, SchemaKind};

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

    /// Records the schema for `id`, or why there is none.
    pub(super) fn insert(&mut self, id: u32, compiled: Result<Arc<Compiled>, String>) {
        self.by_id.insert(id, compiled);
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

/// Compiled schemas by id, shared by every chunk of a topic.
#[derive(Debug, Default)]
pub(super) struct CompiledCache(Mutex<HashMap<u32, Arc<Compiled>>>);

impl CompiledCache {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Compiled>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn compile(format: Format, schema: &RegisteredSchema) -> Result<Compiled, String> {
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

pub(super) fn avro_decoder(
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

/// A compiled `.proto` schema: the pool of its file and imports, and the file's name in it.
#[derive(Debug)]
pub(super) struct ProtoSchema {
    pool: DescriptorPool,
    file: String,
}

/// The registry's schema and its references, served to protox by name.
struct Sources(Vec<(String, String)>);

impl FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.iter().find(|(n, _)| n == name) {
            Some((_, text)) => File::from_source(name, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

impl ProtoSchema {
    /// Compiles a registered `.proto` schema with its references (and Google's well-known
    /// types).
    pub(super) fn compile(schema: &RegisteredSchema) -> Result<ProtoSchema, String> {
        let file = format!("sluice-registry-schema-{}.proto", schema.id);
        let mut sources = schema.references.clone();
        sources.push((file.clone(), schema.text.clone()));
        let mut resolver = ChainFileResolver::new();
        resolver.add(Sources(sources));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler
            .open_file(&file)
            .map_err(|e| format!("Protobuf schema {} does not compile: {e}", schema.id))?;
        let pool = compiler.descriptor_pool();
        if pool
            .get_file_by_name(&file)
            .is_none_or(|f| f.messages().len() == 0)
        {
            return Err(format!("Protobuf schema {} declares no message", schema.id));
        }
        Ok(ProtoSchema { pool, file })
    }

    /// The message type the wire format's message indexes name: the first index picks a
    /// top-level message of the file, each further one a message nested in the previous.
    pub(super) fn message(&self, indexes: &[i64]) -> Result<MessageDescriptor, String> {
        let file = self
            .pool
            .get_file_by_name(&self.file)
            .expect("the compiled file is in its pool");
        let (first, rest) = indexes.split_first().expect("indexes are never empty");
        let pick = |found: Option<MessageDescriptor>, index: i64| {
            found.ok_or_else(|| format!("message index {index} is not in the schema"))
        };
        let mut message = pick(
            usize::try_from(*first)
                .ok()
                .and_then(|k| file.messages().nth(k)),
            *first,
        )?;
        for &index in rest {
            message = pick(
                usize::try_from(index)
                    .ok()
                    .and_then(|k| message.child_messages().nth(k)),
                index,
            )?;
        }
        Ok(message)
    }
}

/// The descriptors of a registered `.proto` schema (for producers that encode with it).
pub fn proto_pool(schema: &RegisteredSchema) -> Result<DescriptorPool, String> {
    ProtoSchema::compile(schema).map(|s| s.pool)
}

/// The message indexes after the schema id, and the message bytes after them. Confluent
/// writes a zig-zag varint count, then that many zig-zag varints; a count of 0 means `[0]`.
pub(super) fn split_indexes(mut body: &[u8]) -> Result<(Vec<i64>, &[u8]), String> {
    let mut next = || -> Result<i64, String> {
        let raw = prost::encoding::decode_varint(&mut body)
            .map_err(|_| "the message indexes after the schema id are cut off".to_string())?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    };
    let count = next()?;
    if !(0..=100).contains(&count) {
        return Err(format!("{count} message indexes after the schema id"));
    }
    let indexes = if count == 0 {
        vec![0]
    } else {
        (0..count).map(|_| next()).collect::<Result<Vec<_>, _>>()?
    };
    Ok((indexes, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_indexes_follow_confluent_framing() {
        assert_eq!(split_indexes(&[0, 7]).unwrap(), (vec![0], &[7u8][..]));
        // Count 2 (zig-zag 4), then 1 (2) and 0 (0).
        assert_eq!(
            split_indexes(&[4, 2, 0, 9]).unwrap(),
            (vec![1, 0], &[9u8][..])
        );
        assert!(split_indexes(&[]).unwrap_err().contains("cut off"));
        assert!(
            split_indexes(&[3])
                .unwrap_err()
                .contains("-2 message indexes")
        );
    }
}
