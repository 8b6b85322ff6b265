//! From the mapping's columns to the table's: sluice-filled columns (Kafka position, times,
//! event date), labels made canonical, and the values' contracts checked, a broken one
//! rejecting its message.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::array::AsArray;
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Int32Array, Int64Array, StringArray,
    TimestampMicrosecondArray, UInt32Array, new_null_array,
};
use deltalake::arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;

use crate::contract::labels::Outcome;
use crate::contract::mapping::Operation;
use crate::contract::schema::ColumnSource;
use crate::contract::values::{self, Broken, Contract, UTC, violations};

use super::body::{BodyDecoder, LabelColumn};
use super::{Chunk, Deletion, MessageMeta, RejectReason, Rejection};

impl BodyDecoder {
    /// Builds the table batch: mapped columns with canonical labels, sluice's own columns, then
    /// the value contracts.
    pub(super) fn assemble(
        &self,
        chunk: &Chunk,
        parts: Vec<(RecordBatch, Vec<usize>)>,
        ingested_at_us: i64,
        rejections: &mut Vec<Rejection>,
        deletions: &mut Vec<Deletion>,
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
        let mut source = concat_batches(&self.source_schema, &batches)?;
        if !rows.is_sorted() {
            // Parts of several schemas interleave: put the rows back in offset order.
            let mut order: Vec<u32> = (0..rows.len() as u32).collect();
            order.sort_by_key(|&k| rows[k as usize]);
            source = take_record_batch(&source, &UInt32Array::from(order))?;
            rows.sort_unstable();
        }
        let n = source.num_rows();
        let operations = self.mapping.operations(&source, &self.table);
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
        for ((row, problem), (operation, key)) in problems.into_iter().enumerate().zip(operations) {
            // A delete is judged by its key alone: the rest of the message is not a row.
            let problem = match (operation, key) {
                (Operation::Upsert, _) => problem,
                (Operation::Delete, Some(key)) => {
                    let meta = metas[row];
                    deletions.push(Deletion {
                        offset: meta.offset,
                        timestamp_ms: meta.timestamp_ms,
                        key,
                    });
                    keep.push(false);
                    continue;
                }
                (Operation::Delete, None) => Some((
                    RejectReason::MissingRequired,
                    format!("a delete without its key ({})", self.table.key.join(", ")),
                )),
            };
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

const MICROS_PER_DAY: i64 = 86_400_000_000;

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
