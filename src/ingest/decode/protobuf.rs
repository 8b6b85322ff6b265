//! Protobuf messages: `.proto` schemas from the registry compiled with protox, messages decoded
//! by reflection (prost-reflect), and the mapped fields built straight into Arrow arrays of
//! the shape decoded JSON has.
//!
//! Fields with presence (`optional`, messages, proto2) that are unset are null; proto3 scalars
//! without presence read as their default, as every Protobuf reader sees them. Enums land as
//! their value names, `google.protobuf.Timestamp` as an instant.

use std::borrow::Cow;
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    StringBuilder, StructArray, new_null_array,
};
use deltalake::arrow::buffer::{NullBuffer, OffsetBuffer};
use deltalake::arrow::datatypes::{DataType, Fields};
use deltalake::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};

use crate::contract::mapping::segment_matches;

use super::body::BodyDecoder;
use super::schemas::{Compiled, Schemas, split_indexes};
use super::{Chunk, RejectReason, Rejection};

impl BodyDecoder {
    /// Decodes a chunk of Protobuf messages into rows of the mapping's source shape.
    pub(super) fn decode_protobuf(
        &self,
        chunk: &Chunk,
        schemas: &Schemas,
        parts: &mut Vec<(RecordBatch, Vec<usize>)>,
        rejections: &mut Vec<Rejection>,
    ) {
        let mut messages: Vec<(usize, DynamicMessage)> = Vec::with_capacity(chunk.len());
        for i in 0..chunk.len() {
            let decoded = self.precheck_size(chunk, i).and_then(|()| {
                let framed = self.framed(chunk, i, schemas)?;
                let (id, body, compiled) = (framed.id, framed.body, framed.schema);
                let Compiled::Protobuf(schema) = &**compiled else {
                    unreachable!("a Protobuf source compiles Protobuf schemas only")
                };
                let mismatch = |detail: String| {
                    (
                        RejectReason::SchemaMismatch,
                        format!("Protobuf schema {id}: {detail}"),
                    )
                };
                let (indexes, bytes) = split_indexes(body).map_err(mismatch)?;
                let descriptor = schema.message(&indexes).map_err(mismatch)?;
                DynamicMessage::decode(descriptor.clone(), bytes).map_err(|e| {
                    mismatch(format!(
                        "does not decode as {}: {e}",
                        descriptor.full_name()
                    ))
                })
            });
            match decoded {
                Ok(message) => messages.push((i, message)),
                Err((reason, detail)) => rejections.push(self.reject(chunk, i, reason, detail)),
            }
        }
        // A value that does not fit its column rejects its message; build again without it.
        while !messages.is_empty() {
            match self.proto_batch(&messages) {
                Ok(batch) => {
                    parts.push((batch, messages.into_iter().map(|(i, _)| i).collect()));
                    return;
                }
                Err((row, detail)) => {
                    let (i, _) = messages.remove(row);
                    rejections.push(self.reject(chunk, i, RejectReason::TypeMismatch, detail));
                }
            }
        }
    }

    fn proto_batch(
        &self,
        messages: &[(usize, DynamicMessage)],
    ) -> Result<RecordBatch, (usize, String)> {
        let schema = self.mapping.source_schema();
        let rows: Vec<usize> = (0..messages.len()).collect();
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let values: Vec<Slot<'_>> = messages
                    .iter()
                    .map(|(_, m)| field_value(m, field.name()))
                    .collect();
                build(&values, &rows, field.data_type(), field.name())
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new_with_options(
            schema,
            columns,
            &RecordBatchOptions::new().with_row_count(Some(messages.len())),
        )
        .map_err(|e| (0, format!("bug: assembling Protobuf rows: {e}")))
    }
}

/// A field's value in one message, borrowed from the message where it can be.
type Slot<'a> = Option<Cow<'a, Value>>;

/// The value of the field `name` names, `None` when the message lacks the field or it is an
/// unset field with presence. Enum numbers become their names.
fn field_value<'a>(message: &'a DynamicMessage, name: &str) -> Slot<'a> {
    let descriptor = message.descriptor();
    let field = descriptor.get_field_by_name(name).or_else(|| {
        descriptor
            .fields()
            .find(|f| segment_matches(name, f.name()))
    })?;
    if field.supports_presence() && !message.has_field(&field) {
        return None;
    }
    let value = message.get_field(&field);
    Some(match field.kind() {
        Kind::Enum(e) => Cow::Owned(enum_names(&e, value.into_owned())),
        _ => value,
    })
}

fn enum_names(e: &prost_reflect::EnumDescriptor, value: Value) -> Value {
    let name = |n: i32| match e.get_value(n) {
        Some(v) => Value::String(v.name().to_string()),
        None => Value::I32(n),
    };
    match value {
        Value::EnumNumber(n) => name(n),
        Value::List(items) => Value::List(
            items
                .into_iter()
                .map(|v| match v {
                    Value::EnumNumber(n) => name(n),
                    other => other,
                })
                .collect(),
        ),
        other => other,
    }
}

/// What a value is, for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "a bool",
        Value::I32(_) | Value::I64(_) | Value::U32(_) | Value::U64(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a floating-point number",
        Value::String(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::EnumNumber(_) => "an enum",
        Value::Message(_) => "a message",
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
    }
}

/// `google.protobuf.Timestamp` as RFC 3339 text, which the timestamp columns parse.
fn timestamp_text(message: &DynamicMessage) -> Option<String> {
    if message.descriptor().full_name() != "google.protobuf.Timestamp" {
        return None;
    }
    let seconds = message.get_field_by_name("seconds")?.as_i64()?;
    let nanos = message.get_field_by_name("nanos")?.as_i32()?;
    let instant = chrono::DateTime::from_timestamp(seconds, u32::try_from(nanos).ok()?)?;
    Some(instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// Builds the array of `ty` from one value per element; `rows` names each element's message
/// (its index in the batch) for the error, which also names `path`.
fn build(
    values: &[Slot<'_>],
    rows: &[usize],
    ty: &DataType,
    path: &str,
) -> Result<ArrayRef, (usize, String)> {
    let wrong = |k: usize, v: &Value| {
        (
            rows[k],
            format!("`{path}`: {} where {ty} is expected", kind_of(v)),
        )
    };
    macro_rules! scalars {
        ($array:ty, $convert:expr) => {{
            let mut out = Vec::with_capacity(values.len());
            for (k, v) in values.iter().enumerate() {
                out.push(match v.as_deref() {
                    None => None,
                    Some(v) => Some($convert(v).ok_or_else(|| wrong(k, v))?),
                });
            }
            Ok(Arc::new(<$array>::from(out)) as ArrayRef)
        }};
    }
    match ty {
        DataType::Utf8 => {
            let mut out = StringBuilder::with_capacity(values.len(), values.len() * 16);
            for (k, v) in values.iter().enumerate() {
                match v.as_deref() {
                    None => out.append_null(),
                    Some(Value::String(s)) => out.append_value(s),
                    Some(Value::Bool(b)) => out.append_value(if *b { "true" } else { "false" }),
                    Some(Value::I32(n)) => out.append_value(n.to_string()),
                    Some(Value::I64(n)) => out.append_value(n.to_string()),
                    Some(Value::U32(n)) => out.append_value(n.to_string()),
                    Some(Value::U64(n)) => out.append_value(n.to_string()),
                    Some(Value::F32(n)) => out.append_value(n.to_string()),
                    Some(Value::F64(n)) => out.append_value(n.to_string()),
                    Some(v @ Value::Message(m)) => {
                        out.append_value(timestamp_text(m).ok_or_else(|| wrong(k, v))?)
                    }
                    Some(v) => return Err(wrong(k, v)),
                }
            }
            Ok(Arc::new(out.finish()) as ArrayRef)
        }
        DataType::Int64 => scalars!(Int64Array, |v: &Value| match v {
            Value::I32(n) => Some(i64::from(*n)),
            Value::I64(n) => Some(*n),
            Value::U32(n) => Some(i64::from(*n)),
            Value::U64(n) => i64::try_from(*n).ok(),
            _ => None,
        }),
        DataType::Int32 => scalars!(Int32Array, |v: &Value| match v {
            Value::I32(n) => Some(*n),
            Value::I64(n) => i32::try_from(*n).ok(),
            Value::U32(n) => i32::try_from(*n).ok(),
            Value::U64(n) => i32::try_from(*n).ok(),
            _ => None,
        }),
        DataType::Float64 => scalars!(Float64Array, |v: &Value| match v {
            Value::F32(n) => Some(f64::from(*n)),
            Value::F64(n) => Some(*n),
            Value::I32(n) => Some(f64::from(*n)),
            Value::I64(n) => Some(*n as f64),
            _ => None,
        }),
        DataType::Float32 => scalars!(Float32Array, |v: &Value| match v {
            Value::F32(n) => Some(*n),
            Value::F64(n) => Some(*n as f32),
            _ => None,
        }),
        DataType::Boolean => scalars!(BooleanArray, |v: &Value| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        }),
        DataType::Struct(fields) => build_struct(values, rows, fields, path),
        DataType::List(item) => {
            let mut offsets = Vec::with_capacity(values.len() + 1);
            let mut items: Vec<Slot<'_>> = Vec::new();
            let mut item_rows: Vec<usize> = Vec::new();
            let mut valid = Vec::with_capacity(values.len());
            offsets.push(0i32);
            for (k, v) in values.iter().enumerate() {
                match v.as_deref() {
                    None => valid.push(false),
                    Some(Value::List(list)) => {
                        valid.push(true);
                        items.extend(list.iter().map(|item| Some(Cow::Borrowed(item))));
                        item_rows.extend(std::iter::repeat_n(rows[k], list.len()));
                    }
                    Some(other) => return Err(wrong(k, other)),
                }
                offsets.push(
                    i32::try_from(items.len())
                        .map_err(|_| (rows[k], format!("`{path}`: too many items")))?,
                );
            }
            let values = build(&items, &item_rows, item.data_type(), &format!("{path}[]"))?;
            ListArray::try_new(
                item.clone(),
                OffsetBuffer::new(offsets.into()),
                values,
                Some(NullBuffer::from(valid)),
            )
            .map(|a| Arc::new(a) as ArrayRef)
            .map_err(|e| (rows.first().copied().unwrap_or(0), format!("`{path}`: {e}")))
        }
        other => match values.iter().position(Option::is_some) {
            None => Ok(new_null_array(other, values.len())),
            Some(k) => Err((
                rows[k],
                format!("`{path}`: sluice does not read Protobuf values into {other} columns"),
            )),
        },
    }
}

fn build_struct(
    values: &[Slot<'_>],
    rows: &[usize],
    fields: &Fields,
    path: &str,
) -> Result<ArrayRef, (usize, String)> {
    let mut valid = Vec::with_capacity(values.len());
    for (k, v) in values.iter().enumerate() {
        match v.as_deref() {
            None => valid.push(false),
            Some(Value::Message(_)) => valid.push(true),
            Some(other) => {
                return Err((
                    rows[k],
                    format!("`{path}`: {} where a message is expected", kind_of(other)),
                ));
            }
        }
    }
    let children = fields
        .iter()
        .map(|field| {
            let child: Vec<Slot<'_>> = values
                .iter()
                .map(|v| match v.as_deref() {
                    Some(Value::Message(m)) => field_value(m, field.name()),
                    _ => None,
                })
                .collect();
            build(
                &child,
                rows,
                field.data_type(),
                &format!("{path}.{}", field.name()),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    StructArray::try_new(fields.clone(), children, Some(NullBuffer::from(valid)))
        .map(|a| Arc::new(a) as ArrayRef)
        .map_err(|e| (rows.first().copied().unwrap_or(0), format!("`{path}`: {e}")))
}
