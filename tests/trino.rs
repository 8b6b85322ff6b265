//! What Trino's `delta_lake` connector needs from a table sluice wrote, checked on the table's
//! own files (Trino cannot run here): the log as Trino parses it, its checkpoints, the
//! partition values and the Parquet types. And the same table read by a Delta reader that is
//! not delta-rs, compared with `sluice sql`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::DataType;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::basic::{LogicalType, TimeUnit};
use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

/// Table features Trino's delta_lake connector reads (its documentation, "Delta Lake table
/// features"). `timestampNtz` is left out on purpose: sluice stores UTC `timestamp`s.
const TRINO_FEATURES: &[&str] = &[
    "appendOnly",
    "invariants",
    "checkConstraints",
    "changeDataFeed",
    "columnMapping",
    "deletionVectors",
    "vacuumProtocolCheck",
];

/// A table written by sluice (three days, nested columns, embeddings, a checkpoint every 5
/// commits, dead letters, edits and deletes applied by copy-on-write with their deletions
/// table), then one day compacted by `sluice compact`.
fn fixture() -> &'static Path {
    static FIXTURE: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = build_fixture_blocking("trino-fixture");
        let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["compact", "--config"])
            .arg(root.join("sluice.toml"))
            .args(["--partition", "2025-11-22"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "sluice compact: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        root
    })
}

fn tables() -> [PathBuf; 3] {
    let root = fixture();
    [
        root.join("enriched_posts"),
        root.join("enriched_posts_dead_letters"),
        root.join("enriched_posts_deletions"),
    ]
}

/// Every commit of a table, in version order, as the JSON actions Trino reads.
fn commits(table: &Path) -> Vec<(u64, Vec<Value>)> {
    let mut commits: Vec<(u64, Vec<Value>)> = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let version = name.strip_suffix(".json")?.parse().ok()?;
            let text = std::fs::read_to_string(table.join("_delta_log").join(&name)).unwrap();
            let actions = text
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect();
            Some((version, actions))
        })
        .collect();
    commits.sort_by_key(|(version, _)| *version);
    assert_eq!(
        commits.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        (0..commits.len() as u64).collect::<Vec<_>>(),
        "{}: the log has every version from 0",
        table.display()
    );
    commits
}

fn actions<'a>(commits: &'a [(u64, Vec<Value>)], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    commits
        .iter()
        .flat_map(|(_, actions)| actions)
        .filter_map(move |action| action.get(kind))
}

#[test]
fn the_protocol_and_its_features_are_ones_trino_reads() {
    for table in tables() {
        let commits = commits(&table);
        let protocols: Vec<&Value> = actions(&commits, "protocol").collect();
        assert!(!protocols.is_empty(), "{}: no protocol", table.display());
        for protocol in protocols {
            let reader = protocol["minReaderVersion"].as_u64().unwrap();
            let writer = protocol["minWriterVersion"].as_u64().unwrap();
            assert!(
                reader <= 3 && writer <= 7,
                "{}: {protocol}",
                table.display()
            );
            for key in ["readerFeatures", "writerFeatures"] {
                for feature in protocol[key].as_array().into_iter().flatten() {
                    let feature = feature.as_str().unwrap();
                    assert!(
                        TRINO_FEATURES.contains(&feature),
                        "{}: Trino does not read the `{feature}` feature",
                        table.display()
                    );
                }
            }
        }
    }
}

/// `(path, type name)` of every field, nested ones as `parent.child` (list elements `[]`);
/// asserts that the names of each struct are lower-case snake_case and unique.
fn fields(data_type: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
    match data_type {
        Value::String(name) => out.push((prefix.to_string(), name.clone())),
        Value::Object(object) => match object["type"].as_str().unwrap() {
            "struct" => {
                let names: Vec<&str> = object["fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f["name"].as_str().unwrap())
                    .collect();
                let unique: BTreeSet<String> = names.iter().map(|n| n.to_lowercase()).collect();
                assert_eq!(
                    unique.len(),
                    names.len(),
                    "duplicate names in {prefix}: {names:?}"
                );
                for field in object["fields"].as_array().unwrap() {
                    let name = field["name"].as_str().unwrap();
                    assert!(
                        name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                            && name.chars().all(|c| {
                                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
                            }),
                        "field `{name}` in `{prefix}` is not lower-case snake_case"
                    );
                    let path = if prefix.is_empty() {
                        name.to_string()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    fields(&field["type"], &path, out);
                }
            }
            "array" => fields(&object["elementType"], &format!("{prefix}[]"), out),
            "map" => {
                fields(&object["keyType"], &format!("{prefix}.key"), out);
                fields(&object["valueType"], &format!("{prefix}.value"), out);
            }
            other => panic!("unknown type {other} at {prefix}"),
        },
        other => panic!("unexpected type {other} at {prefix}"),
    }
}

#[test]
fn columns_are_lower_case_unique_and_timestamps_are_utc() {
    for table in tables() {
        let commits = commits(&table);
        for metadata in actions(&commits, "metaData") {
            let schema: Value =
                serde_json::from_str(metadata["schemaString"].as_str().unwrap()).unwrap();
            let mut all = Vec::new();
            fields(&schema, "", &mut all);
            assert!(all.len() > 5, "{}: {all:?}", table.display());
            for (path, type_name) in &all {
                assert_ne!(
                    type_name,
                    "timestamp_ntz",
                    "{}: `{path}` would force the timestampNtz feature",
                    table.display()
                );
            }
            assert!(
                all.iter().any(|(_, t)| t == "timestamp"),
                "{}: timestamps are stored as UTC `timestamp`",
                table.display()
            );
            for column in metadata["partitionColumns"].as_array().unwrap() {
                let column = column.as_str().unwrap();
                assert!(all.iter().any(|(p, _)| p == column));
            }
        }
    }
}

/// The files live at `version` when the JSON log is replayed from 0.
fn live_files(commits: &[(u64, Vec<Value>)], version: u64) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for (_, actions) in commits.iter().filter(|(v, _)| *v <= version) {
        for action in actions {
            if let Some(add) = action.get("add") {
                live.insert(add["path"].as_str().unwrap().to_string());
            }
            if let Some(remove) = action.get("remove") {
                live.remove(remove["path"].as_str().unwrap());
            }
        }
    }
    live
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .map(|batch| batch.unwrap())
        .collect()
}

#[test]
fn last_checkpoint_names_a_single_part_checkpoint_that_matches_the_log() {
    // The deletions table has two commits: no checkpoint yet.
    for table in tables().into_iter().take(2) {
        let log = table.join("_delta_log");
        let hint: Value =
            serde_json::from_slice(&std::fs::read(log.join("_last_checkpoint")).unwrap()).unwrap();
        // Trino takes `parts` as a multi-part checkpoint and looks for files that do not exist.
        assert!(
            hint.get("parts").is_none(),
            "{}: _last_checkpoint {hint}",
            table.display()
        );
        let version = hint["version"].as_u64().unwrap();
        let checkpoint = log.join(format!("{version:020}.checkpoint.parquet"));
        let batches = read_parquet(&checkpoint);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(
            hint["size"].as_u64(),
            Some(rows as u64),
            "{}: size is the checkpoint's action count",
            table.display()
        );

        let mut protocols = 0;
        let mut metadata = 0;
        let mut added = BTreeSet::new();
        for batch in &batches {
            for (column, count) in [("protocol", &mut protocols), ("metaData", &mut metadata)] {
                let array = batch.column_by_name(column).unwrap();
                *count += array.len() - array.null_count();
            }
            let add = batch.column_by_name("add").unwrap().as_struct();
            let paths = add.column_by_name("path").unwrap().as_string::<i32>();
            let values = add.column_by_name("partitionValues").unwrap();
            assert!(
                matches!(values.data_type(), DataType::Map(..)),
                "partitionValues is a map: {:?}",
                values.data_type()
            );
            for row in 0..add.len() {
                if add.is_valid(row) {
                    added.insert(paths.value(row).to_string());
                }
            }
        }
        assert_eq!((protocols, metadata), (1, 1), "{}", table.display());
        let expected = live_files(&commits(&table), version);
        assert!(!expected.is_empty());
        assert_eq!(
            added,
            expected,
            "{}: the checkpoint at {version} holds the files the log has live there",
            table.display()
        );
        for path in &added {
            assert!(table.join(path).is_file(), "{path} exists");
        }
    }
}

#[test]
fn partition_values_are_spec_strings_that_match_the_file_paths() {
    let table = &tables()[0];
    let commits = commits(table);
    let mut days = BTreeSet::new();
    for add in actions(&commits, "add") {
        let values = add["partitionValues"].as_object().unwrap();
        let day = values["event_date"]
            .as_str()
            .expect("a date partition value is a string");
        let bytes = day.as_bytes();
        assert!(
            bytes.len() == 10
                && bytes[4] == b'-'
                && bytes[7] == b'-'
                && day.chars().filter(|c| c.is_ascii_digit()).count() == 8,
            "event_date `{day}` is not in the spec's YYYY-MM-DD form"
        );
        let path = add["path"].as_str().unwrap();
        assert!(
            path.starts_with(&format!("event_date={day}/")),
            "{path} lies in its partition's folder"
        );
        days.insert(day.to_string());
    }
    assert!(days.len() >= 3, "several partitions: {days:?}");
}

#[test]
fn data_files_store_timestamps_as_utc_microseconds() {
    let table = &tables()[0];
    let commits = commits(table);
    let path = live_files(&commits, commits.len() as u64 - 1)
        .into_iter()
        .next()
        .unwrap();
    let reader = SerializedFileReader::new(File::open(table.join(&path)).unwrap()).unwrap();
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let mut checked = Vec::new();
    for column in schema.columns() {
        let name = column.path().string();
        if let Some(LogicalType::Timestamp(timestamp)) = column.logical_type_ref() {
            assert!(timestamp.is_adjusted_to_u_t_c, "{name} is adjusted to UTC");
            assert!(
                matches!(timestamp.unit, TimeUnit::MICROS),
                "{name}: {:?}",
                timestamp.unit
            );
            checked.push(name);
        }
    }
    assert!(
        checked.contains(&"created_at".to_string()),
        "timestamp columns: {checked:?}"
    );
}

/// Query result rows, each as its columns' values.
type Rows = Vec<BTreeMap<String, Value>>;

/// Rows of `sql` from `sluice sql --format ndjson`.
fn sluice_sql(config: &Path, sql: &str) -> Rows {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["sql", "--config"])
        .arg(config)
        .args(["--format", "ndjson", "-c", sql])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "sluice sql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Numbers compared to 1e-9 relative (engines sum doubles in different orders).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// The queries of `scripts/independent_read.py`, which runs them on DuckDB over the table as
/// deltalake2db reads it (its own log replay and checkpoint reading; no delta-rs).
#[test]
#[ignore = "needs python3 with deltalake2db and duckdb (scripts/compat.sh installs them)"]
fn an_independent_reader_sees_the_rows_sluice_sql_sees() {
    let root = fixture();
    let output = Command::new("python3")
        .arg(repo().join("scripts/independent_read.py"))
        .arg(root)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "independent_read.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: Vec<(String, String, Rows)> = serde_json::from_slice(&output.stdout).unwrap();
    assert!(theirs.len() >= 3);
    for (name, sql, rows) in theirs {
        let ours = sluice_sql(&root.join("sluice.toml"), &sql);
        println!("{name}: {} rows; first {:?}", ours.len(), ours.first());
        assert!(!ours.is_empty(), "{name} returns rows");
        assert_eq!(ours.len(), rows.len(), "{name}: row count\n{sql}");
        for (mine, other) in ours.iter().zip(&rows) {
            assert_eq!(
                mine.keys().collect::<Vec<_>>(),
                other.keys().collect::<Vec<_>>(),
                "{name}: columns"
            );
            for (column, value) in mine {
                assert!(
                    same(value, &other[column]),
                    "{name}: {column} is {value} in sluice sql, {} in DuckDB\n{sql}",
                    other[column]
                );
            }
        }
    }
}
