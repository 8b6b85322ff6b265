//! Output formats of `sluice sql`: an aligned table for people, CSV, a JSON array and
//! newline-delimited JSON for programs, and sqllogictest-style rows for golden files.

use std::io::Write;
use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
use deltalake::arrow::util::pretty::pretty_format_batches_with_options;

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table with a header.
    #[default]
    Table,
    /// CSV with a header row; nested values are written as text.
    Csv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// Writes `batches` (with `schema`, so an empty result still has its header) in `format`.
pub fn write(
    out: &mut dyn Write,
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(), ArrowError> {
    let batches: Vec<RecordBatch> = if batches.iter().all(|b| b.num_rows() == 0) {
        vec![RecordBatch::new_empty(schema.clone())]
    } else {
        batches.to_vec()
    };
    match format {
        Format::Table => {
            let options = FormatOptions::new().with_null("NULL");
            let table = pretty_format_batches_with_options(&batches, &options)?;
            writeln!(out, "{table}")?;
        }
        Format::Csv => {
            let mut writer = deltalake::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            for batch in &batches {
                writer.write(&nested_as_text(batch)?)?;
            }
        }
        Format::Json => {
            let mut writer = deltalake::arrow::json::ArrayWriter::new(&mut *out);
            for batch in &batches {
                writer.write(batch)?;
            }
            // An empty result is written as `[]` by the writer itself.
            writer.finish()?;
            drop(writer);
            writeln!(out)?;
        }
        Format::Ndjson => {
            let mut writer = deltalake::arrow::json::LineDelimitedWriter::new(out);
            for batch in &batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(())
}

/// Lists, structs and maps as their display text (`[0.1, 0.2]`, `{insult: 0.3, ...}`): CSV has
/// no nested values.
fn nested_as_text(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let nested = |t: &DataType| t.is_nested();
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| nested(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if nested(field.data_type()) {
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(as_text(column, &FormatOptions::new())?);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

fn as_text(column: &ArrayRef, options: &FormatOptions) -> Result<ArrayRef, ArrowError> {
    let formatter = ArrayFormatter::try_new(column.as_ref(), options)?;
    let mut text = StringBuilder::new();
    for row in 0..column.len() {
        if column.is_null(row) {
            text.append_null();
        } else {
            text.append_value(formatter.value(row).try_to_string()?);
        }
    }
    Ok(Arc::new(text.finish()))
}

/// A sqllogictest result block: `query <types>`, `----`, then one line per row with values
/// separated by a space; `NULL` for null and `(empty)` for an empty string, as sqllogictest
/// writes them. Types: `I` integer, `R` floating point, `T` text, `?` anything else.
pub fn logictest(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String, ArrowError> {
    let types: String = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            t if t.is_integer() => 'I',
            t if t.is_floating() || matches!(t, DataType::Decimal128(..)) => 'R',
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => 'T',
            _ => '?',
        })
        .collect();
    let mut out = format!("query {types}\n----\n");
    let options = FormatOptions::new().with_null("NULL");
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            let cells = formatters
                .iter()
                .map(|f| {
                    f.value(row).try_to_string().map(|s| {
                        if s.is_empty() {
                            "(empty)".to_string()
                        } else {
                            s
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push_str(&cells.join(" "));
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use deltalake::arrow::array::{Float64Array, Int64Array, ListArray, StringArray};
    use deltalake::arrow::datatypes::Float32Type;

    use super::*;

    fn sample() -> RecordBatch {
        let embedding = ListArray::from_iter_primitive::<Float32Type, _, _>([
            Some(vec![Some(0.5), Some(-1.0)]),
            None,
        ]);
        RecordBatch::try_from_iter([
            (
                "post_id",
                Arc::new(StringArray::from(vec![Some("a,1"), None])) as ArrayRef,
            ),
            ("likes", Arc::new(Int64Array::from(vec![3, 4]))),
            ("score", Arc::new(Float64Array::from(vec![0.25, 1.5]))),
            ("embedding", Arc::new(embedding)),
        ])
        .unwrap()
    }

    fn render(format: Format, batches: &[RecordBatch], schema: &SchemaRef) -> String {
        let mut out = Vec::new();
        write(&mut out, format, schema, batches).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_format_carries_the_rows() {
        let batch = sample();
        let schema = batch.schema();
        let table = render(Format::Table, std::slice::from_ref(&batch), &schema);
        assert!(
            table.contains("| a,1     | 3     | 0.25  | [0.5, -1.0] |"),
            "{table}"
        );
        assert!(
            table.contains("| NULL    | 4     | 1.5   | NULL        |"),
            "{table}"
        );
        assert_eq!(
            render(Format::Csv, std::slice::from_ref(&batch), &schema),
            "post_id,likes,score,embedding\n\"a,1\",3,0.25,\"[0.5, -1.0]\"\n,4,1.5,\n"
        );
        assert_eq!(
            render(Format::Ndjson, std::slice::from_ref(&batch), &schema),
            "{\"post_id\":\"a,1\",\"likes\":3,\"score\":0.25,\"embedding\":[0.5,-1.0]}\n\
             {\"likes\":4,\"score\":1.5}\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(Format::Json, &[batch], &schema)).unwrap();
        assert_eq!(json[1]["likes"], 4);
    }

    #[test]
    fn empty_results_keep_their_header() {
        let schema = sample().schema();
        assert!(
            render(Format::Table, &[], &schema).contains("| post_id | likes | score | embedding |")
        );
        assert_eq!(
            render(Format::Csv, &[], &schema),
            "post_id,likes,score,embedding\n"
        );
        assert_eq!(render(Format::Json, &[], &schema), "[]\n");
        assert_eq!(render(Format::Ndjson, &[], &schema), "");
    }

    #[test]
    fn logictest_rows_name_types_nulls_and_empty_strings() {
        let batch = RecordBatch::try_from_iter([
            (
                "t",
                Arc::new(StringArray::from(vec![Some(""), None])) as ArrayRef,
            ),
            ("n", Arc::new(Int64Array::from(vec![1, 2]))),
            ("r", Arc::new(Float64Array::from(vec![0.5, 2.0]))),
        ])
        .unwrap();
        assert_eq!(
            logictest(&batch.schema(), &[batch]).unwrap(),
            "query TIR\n----\n(empty) 1 0.5\nNULL 2 2.0\n"
        );
    }
}
