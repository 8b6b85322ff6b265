//! How sluice writes Parquet: zstd at a configured level, vectors stored plain.

use deltalake::arrow::datatypes::{DataType, Fields, Schema};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;

/// Default zstd level for Parquet files: level 1 encodes several times faster than the default
/// level 3 for a few percent more bytes, and compaction rewrites files anyway.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// How sluice writes Parquet: zstd at `zstd_level`, except vectors (lists of floats, such as
/// embeddings), which are stored plain: model output floats barely compress (zstd saved 8 % on
/// 384-dim embeddings) while decompressing them was a fifth of every scan that reads them, and
/// a dictionary of floats that never repeat is built only to be dropped.
pub fn parquet_properties(
    zstd_level: i32,
    schema: &Schema,
) -> Result<WriterProperties, deltalake::parquet::errors::ParquetError> {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?));
    for path in vector_columns(schema) {
        builder = builder
            .set_column_compression(path.clone(), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(path, false);
    }
    Ok(builder.build())
}

/// The Parquet paths of the float values of every list of floats (vectors), in structs too.
pub fn vector_columns(schema: &Schema) -> Vec<ColumnPath> {
    vector_paths(schema.fields(), &[])
}

fn vector_paths(fields: &Fields, parent: &[String]) -> Vec<ColumnPath> {
    let mut paths = Vec::new();
    for field in fields {
        let mut path = parent.to_vec();
        path.push(field.name().clone());
        match field.data_type() {
            DataType::List(item) | DataType::LargeList(item) if item.data_type().is_floating() => {
                // Parquet's three-level list: <column>.list.<item name>.
                path.extend(["list".to_string(), item.name().clone()]);
                paths.push(ColumnPath::new(path));
            }
            DataType::Struct(children) => paths.extend(vector_paths(children, &path)),
            _ => {}
        }
    }
    paths
}
