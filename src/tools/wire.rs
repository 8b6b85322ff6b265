//! The registry wire formats for producers: the demo shapes' Avro and Protobuf schemas
//! (`schemas/registry/`), registered under a subject, and generated JSON posts encoded with
//! them behind the magic byte and schema id.

use std::collections::HashMap;

use prost::Message;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, Value as ProtoValue};
use serde_json::Value;

use crate::contract::mapping::segment_matches;
use crate::ingest::decode::Format;
use crate::ingest::registry::{MAGIC, Registry, RegistryError, SchemaKind};
use crate::tools::generator::Shape;

/// How a producer names the subject a schema is registered under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SubjectStrategy {
    /// `<topic>-value` (Confluent's TopicNameStrategy, the default).
    #[default]
    Topic,
    /// The record's full name, e.g. `sluice.demo.Tweet` (RecordNameStrategy).
    Record,
    /// `<topic>-<record full name>` (TopicRecordNameStrategy).
    TopicRecord,
}

impl SubjectStrategy {
    /// The subject for a record named `record` on `topic`.
    pub fn subject(self, topic: &str, record: &str) -> String {
        match self {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::Record => record.to_string(),
            SubjectStrategy::TopicRecord => format!("{topic}-{record}"),
        }
    }
}

/// The shipped schema of `shape` in `format`, and the full name of its record.
pub fn shape_schema(shape: Shape, format: Format) -> Option<(&'static str, &'static str)> {
    let record = match shape {
        Shape::Mastodon => "sluice.demo.MastodonStatus",
        Shape::Bluesky => "sluice.demo.JetstreamCommit",
        Shape::Tweets => "sluice.demo.Tweet",
    };
    let text = match (format, shape) {
        (Format::Avro, Shape::Mastodon) => include_str!("../../schemas/registry/mastodon.avsc"),
        (Format::Avro, Shape::Bluesky) => include_str!("../../schemas/registry/bluesky.avsc"),
        (Format::Avro, Shape::Tweets) => include_str!("../../schemas/registry/tweets.avsc"),
        (Format::Protobuf, Shape::Mastodon) => {
            include_str!("../../schemas/registry/mastodon.proto")
        }
        (Format::Protobuf, Shape::Bluesky) => include_str!("../../schemas/registry/bluesky.proto"),
        (Format::Protobuf, Shape::Tweets) => include_str!("../../schemas/registry/tweets.proto"),
        // Any object: the table's mapping and contracts do the checking.
        (Format::JsonSchema, _) => {
            r#"{"$schema":"http://json-schema.org/draft-07/schema#","type":"object"}"#
        }
        (Format::Json, _) => return None,
    };
    Some((text, record))
}

/// A schema ready to encode with.
#[derive(Debug, Clone)]
enum Writer {
    Avro(Value),
    Protobuf(MessageDescriptor),
    Json,
}

/// Encodes generated posts in a registry format, with the ids their schemas got.
#[derive(Debug, Clone, Default)]
pub struct WireEncoder {
    by_topic: HashMap<String, (u32, Writer)>,
}

/// Errors preparing an encoder.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Registration failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A schema does not compile (a bug in the shipped schemas or the caller's).
    #[error("schema for {subject}: {problem}")]
    Schema {
        /// Subject it was registered under.
        subject: String,
        /// What is wrong.
        problem: String,
    },
}

impl WireEncoder {
    /// Registers the schema of each (shape, topic) under the strategy's subject and returns an
    /// encoder for them.
    pub async fn register(
        registry: &Registry,
        format: Format,
        topics: &[(Shape, String)],
        strategy: SubjectStrategy,
    ) -> Result<WireEncoder, WireError> {
        let mut encoder = WireEncoder {
            by_topic: HashMap::new(),
        };
        for (shape, topic) in topics {
            let (text, record) =
                shape_schema(*shape, format).expect("registry formats have schemas");
            let subject = strategy.subject(topic, record);
            let kind = format
                .schema_kind()
                .expect("registry formats have a schema kind");
            let id = registry.register(&subject, kind, text).await?;
            encoder
                .add(topic, id, kind, text, record)
                .map_err(|problem| WireError::Schema {
                    subject: subject.clone(),
                    problem,
                })?;
        }
        Ok(encoder)
    }

    /// Encodes `topic`'s messages with schema `id`, written in `kind`; `record` names the
    /// Protobuf message to write (its full name).
    pub fn add(
        &mut self,
        topic: &str,
        id: u32,
        kind: SchemaKind,
        text: &str,
        record: &str,
    ) -> Result<(), String> {
        let writer = match kind {
            SchemaKind::Avro => {
                Writer::Avro(serde_json::from_str(text).map_err(|e| e.to_string())?)
            }
            SchemaKind::Protobuf => {
                let schema = crate::ingest::registry::RegisteredSchema {
                    id,
                    kind,
                    text: text.to_string(),
                    references: Vec::new(),
                };
                let pool = crate::ingest::decode::proto_pool(&schema)?;
                Writer::Protobuf(
                    pool.get_message_by_name(record)
                        .ok_or_else(|| format!("no message {record} in the schema"))?,
                )
            }
            SchemaKind::Json => Writer::Json,
        };
        self.by_topic.insert(topic.to_string(), (id, writer));
        Ok(())
    }

    /// `post` (a generated post) in `topic`'s format behind the wire header. A post that does
    /// not fit the schema comes back as JSON text, unframed, as a broken producer would send
    /// it: sluice dead-letters it as `no_schema_id`. Fields the schema lacks are dropped.
    pub fn encode(&self, topic: &str, post: &Value) -> Vec<u8> {
        let json = || serde_json::to_vec(post).expect("JSON values serialize");
        let Some((id, writer)) = self.by_topic.get(topic) else {
            return json();
        };
        let mut out = vec![MAGIC];
        out.extend_from_slice(&id.to_be_bytes());
        let encoded = match writer {
            Writer::Avro(schema) => avro(schema, post, &mut HashMap::new(), &mut out),
            Writer::Protobuf(descriptor) => proto_message(descriptor, post).map(|message| {
                // Message indexes [0]: the file's first message, written as the single byte 0.
                out.push(0);
                out.extend(message.encode_to_vec());
            }),
            Writer::Json => post
                .is_object()
                .then(|| out.extend(json()))
                .ok_or_else(|| "not an object".to_string()),
        };
        match encoded {
            Ok(()) => out,
            Err(_) => json(),
        }
    }
}

/// The JSON value an Avro or Protobuf field `name` takes its value from: the key of that name,
/// or the key it is the scrubbed form of (`appropriate language` for `appropriate_language`).
fn member<'a>(object: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(k, _)| segment_matches(k, name))
            .map(|(_, v)| v)
    })
}

fn zigzag(n: i64, out: &mut Vec<u8>) {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Avro's binary encoding of `value` with `schema` (named types are remembered in `names`).
fn avro(
    schema: &Value,
    value: &Value,
    names: &mut HashMap<String, Value>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let wrong = || format!("{value} does not fit {schema}");
    match schema {
        Value::Array(branches) => {
            let (index, branch) = branches
                .iter()
                .enumerate()
                .find(|(_, b)| avro(b, value, names, &mut Vec::new()).is_ok())
                .ok_or_else(wrong)?;
            zigzag(index as i64, out);
            avro(branch, value, names, out)
        }
        Value::String(name) => match name.as_str() {
            "null" => value.is_null().then_some(()).ok_or_else(wrong),
            "boolean" => {
                out.push(u8::from(value.as_bool().ok_or_else(wrong)?));
                Ok(())
            }
            "int" | "long" => {
                zigzag(value.as_i64().ok_or_else(wrong)?, out);
                Ok(())
            }
            "float" => {
                out.extend((value.as_f64().ok_or_else(wrong)? as f32).to_le_bytes());
                Ok(())
            }
            "double" => {
                out.extend(value.as_f64().ok_or_else(wrong)?.to_le_bytes());
                Ok(())
            }
            "string" | "bytes" => {
                let text = value.as_str().ok_or_else(wrong)?;
                zigzag(text.len() as i64, out);
                out.extend_from_slice(text.as_bytes());
                Ok(())
            }
            named => {
                let defined = names.get(named).cloned().ok_or_else(wrong)?;
                avro(&defined, value, names, out)
            }
        },
        Value::Object(definition) => {
            let ty = definition.get("type").and_then(Value::as_str).unwrap_or("");
            if let Some(name) = definition.get("name").and_then(Value::as_str) {
                names.insert(name.to_string(), schema.clone());
            }
            match (ty, definition.get("logicalType").and_then(Value::as_str)) {
                ("long", Some(unit @ ("timestamp-millis" | "timestamp-micros"))) => {
                    let instant = match value {
                        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
                            .map_err(|_| wrong())?
                            .to_utc(),
                        _ => return Err(wrong()),
                    };
                    zigzag(
                        if unit == "timestamp-millis" {
                            instant.timestamp_millis()
                        } else {
                            instant.timestamp_micros()
                        },
                        out,
                    );
                    Ok(())
                }
                ("record", _) => {
                    let object = value.as_object().ok_or_else(wrong)?;
                    let fields = definition["fields"].as_array().ok_or_else(wrong)?;
                    for field in fields {
                        let name = field["name"].as_str().ok_or_else(wrong)?;
                        let v = member(object, name)
                            .or_else(|| field.get("default"))
                            .ok_or_else(|| format!("no value for field {name}"))?;
                        avro(&field["type"], v, names, out)?;
                    }
                    Ok(())
                }
                ("array", _) => {
                    let items = value.as_array().ok_or_else(wrong)?;
                    if !items.is_empty() {
                        zigzag(items.len() as i64, out);
                        for item in items {
                            avro(&definition["items"], item, names, out)?;
                        }
                    }
                    zigzag(0, out);
                    Ok(())
                }
                ("enum", _) => {
                    let symbol = value.as_str().ok_or_else(wrong)?;
                    let symbols = definition["symbols"].as_array().ok_or_else(wrong)?;
                    let index = symbols
                        .iter()
                        .position(|s| s.as_str() == Some(symbol))
                        .ok_or_else(wrong)?;
                    zigzag(index as i64, out);
                    Ok(())
                }
                (primitive, _) => avro(&Value::String(primitive.to_string()), value, names, out),
            }
        }
        _ => Err(wrong()),
    }
}

/// A Protobuf message of `descriptor` holding `value`'s fields.
fn proto_message(descriptor: &MessageDescriptor, value: &Value) -> Result<DynamicMessage, String> {
    let object = value.as_object().ok_or("not an object")?;
    if descriptor.full_name() == "google.protobuf.Timestamp" {
        return Err("timestamps are built from text".into());
    }
    let mut message = DynamicMessage::new(descriptor.clone());
    for field in descriptor.fields() {
        let Some(v) = member(object, field.name()) else {
            continue;
        };
        if v.is_null() {
            continue;
        }
        let converted = if field.is_list() {
            let items = v.as_array().ok_or("not a list")?;
            ProtoValue::List(
                items
                    .iter()
                    .map(|item| proto_value(&field.kind(), item))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            proto_value(&field.kind(), v)?
        };
        message.set_field(&field, converted);
    }
    Ok(message)
}

fn proto_value(kind: &Kind, value: &Value) -> Result<ProtoValue, String> {
    let wrong = || format!("{value} does not fit {kind:?}");
    Ok(match kind {
        Kind::String => ProtoValue::String(value.as_str().ok_or_else(wrong)?.to_string()),
        Kind::Bool => ProtoValue::Bool(value.as_bool().ok_or_else(wrong)?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            ProtoValue::I64(value.as_i64().ok_or_else(wrong)?)
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            ProtoValue::I32(i32::try_from(value.as_i64().ok_or_else(wrong)?).map_err(|_| wrong())?)
        }
        Kind::Double => ProtoValue::F64(value.as_f64().ok_or_else(wrong)?),
        Kind::Float => ProtoValue::F32(value.as_f64().ok_or_else(wrong)? as f32),
        Kind::Enum(e) => ProtoValue::EnumNumber(
            e.get_value_by_name(value.as_str().ok_or_else(wrong)?)
                .ok_or_else(wrong)?
                .number(),
        ),
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            let instant = chrono::DateTime::parse_from_rfc3339(value.as_str().ok_or_else(wrong)?)
                .map_err(|_| wrong())?;
            let mut t = DynamicMessage::new(m.clone());
            t.set_field_by_name("seconds", ProtoValue::I64(instant.timestamp()));
            t.set_field_by_name(
                "nanos",
                ProtoValue::I32(instant.timestamp_subsec_nanos() as i32),
            );
            ProtoValue::Message(t)
        }
        Kind::Message(m) => ProtoValue::Message(proto_message(m, value)?),
        _ => return Err(wrong()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avro_encoding_follows_the_spec() {
        let schema: Value = serde_json::from_str(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"},
            {"name":"b","type":["null","string"]},{"name":"c","type":{"type":"array","items":"int"}}]}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        avro(
            &schema,
            &serde_json::json!({"a": -2, "b": "hi", "c": [1]}),
            &mut HashMap::new(),
            &mut out,
        )
        .unwrap();
        // -2 zig-zags to 3; union branch 1; "hi" is length 2 (4); one block of one item, then 0.
        assert_eq!(out, vec![3, 2, 4, b'h', b'i', 2, 2, 0]);
        let mut out = Vec::new();
        assert!(
            avro(
                &schema,
                &serde_json::json!({"a": "x"}),
                &mut HashMap::new(),
                &mut out
            )
            .is_err()
        );
    }

    #[test]
    fn subjects_follow_the_strategy() {
        assert_eq!(
            SubjectStrategy::Topic.subject("posts", "a.B"),
            "posts-value"
        );
        assert_eq!(SubjectStrategy::Record.subject("posts", "a.B"), "a.B");
        assert_eq!(
            SubjectStrategy::TopicRecord.subject("posts", "a.B"),
            "posts-a.B"
        );
    }
}
