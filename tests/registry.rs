//! Registry formats: Avro, Protobuf and JSON topics feeding one table land the rows their JSON
//! twins do, exactly once; a new schema version flows through without a restart; unframed
//! messages, unknown ids and broken records are dead letters with their reasons; and a
//! registry outage holds the writer back (readiness says why) without losing anything.
//! Against the in-process registry of `common::registry`; `tests/e2e.rs` repeats the main
//! scenario against a real Apicurio Registry.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::registry::TestRegistry;
use common::{Kafka, Writer, limits, query, send_raw, strings};
use deltalake::arrow::array::{AsArray, RecordBatch};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::Int64Type;

use sluice::config::{Config, RegistryConfig, SourceConfig};
use sluice::ingest::decode::Format;
use sluice::ingest::kafka::Connection;
use sluice::ingest::registry::{Registry, SchemaKind};
use sluice::service::health::Health;
use sluice::tools::generator::Shape;
use sluice::tools::produce::{ProduceOptions, ProduceReport, produce};
use sluice::tools::wire::{SubjectStrategy, WireEncoder, shape_schema};

const CLOCK_MS: i64 = 1_763_942_400_000; // 2025-11-24T00:00:00Z

fn registry_config(registry: &TestRegistry) -> RegistryConfig {
    RegistryConfig {
        url: registry.url(),
        username: None,
        password: None,
        ca_file: None,
        timeout_ms: 2_000,
    }
}

/// A config writing `enriched_posts` under `root` from `sources` (shape, topic, format).
fn framed_config(
    brokers: &str,
    root: &Path,
    sources: &[(Shape, &str, Format)],
    registry: &TestRegistry,
) -> Config {
    let mut config = common::config(brokers, root, &Shape::ALL, limits(200, 500));
    config.tables[0].sources = sources
        .iter()
        .map(|(shape, topic, format)| SourceConfig {
            topic: topic.to_string(),
            mapping: common::repo().join("schemas").join(shape.mapping_file()),
            format: *format,
        })
        .collect();
    config.registry = Some(registry_config(registry));
    config
}

async fn publish(
    brokers: &str,
    shapes: &[(Shape, &str)],
    count: u64,
    seed: u64,
    wire: Option<WireEncoder>,
) -> ProduceReport {
    produce(&ProduceOptions {
        connection: Connection::plain(brokers),
        shapes: shapes.iter().map(|(s, t)| (*s, t.to_string())).collect(),
        count,
        rate: 0,
        seed,
        embedding_dim: 16,
        bad_every: 13,
        operations_every: 0,
        spread_days: 3,
        clock_ms: Some(CLOCK_MS),
        progress: false,
        wire,
    })
    .await
    .expect("messages delivered")
}

/// Registers `shape`'s schema in `format` for `topic` and adds it to `encoder`; returns the id.
async fn register(
    registry: &Registry,
    encoder: &mut WireEncoder,
    shape: Shape,
    topic: &str,
    format: Format,
    text: Option<&str>,
) -> u32 {
    let (shipped, record) = shape_schema(shape, format).unwrap();
    let text = text.unwrap_or(shipped);
    let kind = format.schema_kind().unwrap();
    let subject = SubjectStrategy::Topic.subject(topic, record);
    let id = registry.register(&subject, kind, text).await.unwrap();
    encoder.add(topic, id, kind, text, record).unwrap();
    id
}

fn client(registry: &TestRegistry) -> Arc<Registry> {
    Registry::new(registry_config(registry).settings()).unwrap()
}

/// Every column but the topic and the ingestion time, in one batch ordered by post.
async fn rows(root: &Path) -> RecordBatch {
    let batches = query(
        root,
        "SELECT * EXCEPT (kafka_topic, ingested_at) FROM enriched_posts \
         ORDER BY post_id, kafka_partition, kafka_offset",
    )
    .await;
    concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Asserts two batches hold the same values, naming the first column and row that differ.
fn assert_same_rows(framed: &RecordBatch, twin: &RecordBatch) {
    if framed.num_rows() != twin.num_rows() {
        let ids = |b: &RecordBatch| -> std::collections::BTreeSet<(String, String)> {
            strings(b.column(0))
                .into_iter()
                .zip(strings(b.column(1)))
                .collect()
        };
        let (a, b) = (ids(framed), ids(twin));
        panic!(
            "row counts differ: {} vs {}; only with the registry formats: {:?}; only in the twin: {:?}",
            framed.num_rows(),
            twin.num_rows(),
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>()
        );
    }
    for (i, field) in framed.schema().fields().iter().enumerate() {
        let (a, b) = (framed.column(i), twin.column(i));
        if a == b {
            continue;
        }
        let row = (0..a.len())
            .find(|&r| a.slice(r, 1) != b.slice(r, 1))
            .unwrap_or(0);
        let show = |array: &dyn deltalake::arrow::array::Array| {
            deltalake::arrow::util::display::array_value_to_string(array, row).unwrap()
        };
        panic!(
            "column {} differs at row {row} (of post {}): registry format {:?}, JSON twin {:?}",
            field.name(),
            show(twin.column(0)),
            show(a),
            show(b)
        );
    }
}

async fn dead_letter_reasons(root: &Path) -> Vec<(String, i64, String)> {
    let batches = query(
        root,
        "SELECT kafka_topic, kafka_offset, reason FROM enriched_posts_dead_letters \
         ORDER BY kafka_topic, kafka_offset",
    )
    .await;
    let mut out = Vec::new();
    for b in &batches {
        let offsets = b.column(1).as_primitive::<Int64Type>();
        for (i, (topic, reason)) in strings(b.column(0))
            .into_iter()
            .zip(strings(b.column(2)))
            .enumerate()
        {
            out.push((topic, offsets.value(i), reason));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_protobuf_and_json_topics_land_the_rows_of_their_json_twins() {
    // Each upstream twice: in its registry format, and as plain JSON for the twin table.
    let upstreams = [
        (Shape::Mastodon, "json.mastodon", Format::Json),
        (Shape::Bluesky, "avro.bluesky", Format::Avro),
        (Shape::Tweets, "proto.tweets", Format::Protobuf),
        // Avro names cannot hold the space of `appropriate language`: the scrubbed name maps.
        (Shape::Mastodon, "avro.mastodon", Format::Avro),
        (Shape::Tweets, "jsonschema.tweets", Format::JsonSchema),
    ];
    let twin_topic = |topic: &str| format!("twin.{topic}");
    let mut topics: Vec<String> = upstreams.iter().map(|(_, t, _)| t.to_string()).collect();
    topics.extend(upstreams.iter().map(|(_, t, _)| twin_topic(t)));
    let kafka = Kafka::new(&topics.iter().map(String::as_str).collect::<Vec<_>>(), 3);
    let brokers = kafka.brokers();
    let test_registry = TestRegistry::start().await;
    let registry = client(&test_registry);

    let twin_topics: Vec<String> = upstreams.iter().map(|(_, t, _)| twin_topic(t)).collect();
    let twin_shapes: Vec<(Shape, &str)> = (upstreams.iter().zip(&twin_topics))
        .map(|((shape, _, _), topic)| (*shape, topic.as_str()))
        .collect();
    let twin_report = publish(&brokers, &twin_shapes, 600, 11, None).await;
    let mut encoder = WireEncoder::default();
    for (shape, topic, format) in upstreams {
        if format != Format::Json {
            register(&registry, &mut encoder, shape, topic, format, None).await;
        }
    }
    let framed_shapes: Vec<(Shape, &str)> = upstreams.iter().map(|(s, t, _)| (*s, *t)).collect();
    let framed_report = publish(&brokers, &framed_shapes, 600, 11, Some(encoder)).await;

    let twin_dir = tempfile::tempdir().unwrap();
    let twin_sources: Vec<(Shape, &str, Format)> = twin_shapes
        .iter()
        .map(|(shape, topic)| (*shape, *topic, Format::Json))
        .collect();
    let twin = framed_config(&brokers, twin_dir.path(), &twin_sources, &test_registry);
    let mut writer = Writer::start(&twin).await;
    writer.wait_committed(&twin_report.last_offsets).await;
    writer.stop().await;

    let framed_dir = tempfile::tempdir().unwrap();
    let framed = framed_config(&brokers, framed_dir.path(), &upstreams, &test_registry);
    let mut writer = Writer::start(&framed).await;
    writer.wait_committed(&framed_report.last_offsets).await;
    writer.stop().await;

    // Exactly once: every offset is a row or a dead letter, once.
    let offsets = common::offsets_in_table(framed_dir.path(), "enriched_posts").await;
    let dead = dead_letter_reasons(framed_dir.path()).await;
    let dead_keys: std::collections::BTreeSet<(String, i32, i64)> = query(
        framed_dir.path(),
        "SELECT kafka_topic, kafka_partition, kafka_offset FROM enriched_posts_dead_letters",
    )
    .await
    .iter()
    .flat_map(|b| {
        let topics = strings(b.column(0));
        let partitions = b
            .column(1)
            .as_primitive::<deltalake::arrow::datatypes::Int32Type>();
        let offsets = b.column(2).as_primitive::<Int64Type>();
        (0..b.num_rows())
            .map(|i| (topics[i].clone(), partitions.value(i), offsets.value(i)))
            .collect::<Vec<_>>()
    })
    .collect();
    common::assert_exactly_once(&offsets, &framed_report.last_offsets, &dead_keys);
    assert_eq!(offsets.len() + dead.len(), 600);

    // The same rows, column for column, as the JSON twin.
    let framed_rows = rows(framed_dir.path()).await;
    let twin_rows = rows(twin_dir.path()).await;
    assert!(framed_rows.num_rows() > 500, "{}", framed_rows.num_rows());
    assert_same_rows(&framed_rows, &twin_rows);

    // The hostile messages, sent unframed to the registry topics, are dead letters there.
    let twin_dead = dead_letter_reasons(twin_dir.path()).await;
    assert_eq!(dead.len(), twin_dead.len());
    let mut framed_reasons: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (topic, _, reason) in &dead {
        *framed_reasons
            .entry((topic.clone(), reason.clone()))
            .or_default() += 1;
    }
    for (shape, topic, format) in upstreams {
        let reasons: Vec<&String> = (framed_reasons.keys())
            .filter(|(t, _)| t == topic)
            .map(|(_, r)| r)
            .collect();
        assert!(
            !reasons.is_empty(),
            "{topic} ({shape:?}) has hostile messages"
        );
        if format != Format::Json {
            assert_eq!(reasons, ["no_schema_id"], "{topic}: {framed_reasons:?}");
        }
    }
}

/// One topic in a registry format with its shape's schema registered, and a config writing
/// `enriched_posts` from it.
struct OneTopic {
    _kafka: Kafka,
    brokers: String,
    test_registry: TestRegistry,
    registry: Arc<Registry>,
    dir: tempfile::TempDir,
    config: Config,
    /// Encodes with the registered schema.
    encoder: WireEncoder,
}

async fn one_topic(shape: Shape, topic: &str, format: Format, partitions: i32) -> OneTopic {
    let kafka = Kafka::new(&[topic], partitions);
    let brokers = kafka.brokers();
    let test_registry = TestRegistry::start().await;
    let registry = client(&test_registry);
    let dir = tempfile::tempdir().unwrap();
    let config = framed_config(
        &brokers,
        dir.path(),
        &[(shape, topic, format)],
        &test_registry,
    );
    let mut encoder = WireEncoder::default();
    register(&registry, &mut encoder, shape, topic, format, None).await;
    OneTopic {
        _kafka: kafka,
        brokers,
        test_registry,
        registry,
        dir,
        config,
        encoder,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_schema_version_flows_without_a_restart_and_broken_messages_are_dead_letters() {
    let topic = "avro.bluesky";
    let OneTopic {
        _kafka,
        brokers,
        test_registry: _test_registry,
        registry,
        dir,
        config,
        encoder: v1,
    } = one_topic(Shape::Bluesky, topic, Format::Avro, 1).await;
    let first = publish(
        &brokers,
        &[(Shape::Bluesky, topic)],
        40,
        3,
        Some(v1.clone()),
    )
    .await;
    let mut writer = Writer::start(&config).await;
    writer.wait_committed(&first.last_offsets).await;

    // Version 2 adds an optional field the table does not have; the writer keeps running.
    let (shipped, _) = shape_schema(Shape::Bluesky, Format::Avro).unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(shipped).unwrap();
    schema["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "client", "type": ["null", "string"], "default": null}));
    let mut v2 = WireEncoder::default();
    let v2_id = register(
        &registry,
        &mut v2,
        Shape::Bluesky,
        topic,
        Format::Avro,
        Some(&schema.to_string()),
    )
    .await;
    let second = publish(
        &brokers,
        &[(Shape::Bluesky, topic)],
        40,
        4,
        Some(v2.clone()),
    )
    .await;

    let (_, post) =
        sluice::tools::generator::Generator::new(5, 16, CLOCK_MS, 3).next_value(Shape::Bluesky);
    let good = v2.encode(topic, &post.unwrap());
    assert_eq!(&good[1..5], &v2_id.to_be_bytes());
    let mut unknown = good.clone();
    unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
    let truncated = good[..good.len() - 3].to_vec();
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[7, 7, 7]);
    let bad = send_raw(
        &brokers,
        topic,
        &[
            Some(unknown),
            Some(br#"{"did":"plain json"}"#.to_vec()),
            Some(truncated),
            Some(trailing),
            None,
            Some(good),
        ],
    )
    .await;
    let mut last = second.last_offsets.clone();
    last.insert((topic.to_string(), 0), *bad.last().unwrap());
    writer.wait_committed(&last).await;
    writer.stop().await;

    let dead: Vec<(i64, String)> = dead_letter_reasons(dir.path())
        .await
        .into_iter()
        .map(|(_, offset, reason)| (offset, reason))
        .filter(|(offset, _)| *offset >= bad[0])
        .collect();
    assert_eq!(
        dead,
        vec![
            (bad[0], "unknown_schema".to_string()),
            (bad[1], "no_schema_id".to_string()),
            (bad[2], "schema_mismatch".to_string()),
            (bad[3], "schema_mismatch".to_string()),
            (bad[4], "no_schema_id".to_string()),
        ]
    );
    // Every good message of both versions, and the good one after the bad ones, is a row.
    let rows = common::offsets_in_table(dir.path(), "enriched_posts").await;
    let hostile = dead_letter_reasons(dir.path()).await.len() - dead.len();
    assert_eq!(rows.len(), 80 - hostile + 1);
    assert!(rows.iter().any(|(_, _, o)| *o == bad[5]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_holds_the_writer_back_and_loses_nothing() {
    let topic = "proto.tweets";
    let OneTopic {
        _kafka,
        brokers,
        test_registry,
        registry: _,
        dir,
        config,
        encoder,
    } = one_topic(Shape::Tweets, topic, Format::Protobuf, 2).await;
    let report = publish(&brokers, &[(Shape::Tweets, topic)], 50, 8, Some(encoder)).await;

    test_registry.set_down(true);
    let mut writer = Writer::start(&config).await;
    let health = Health::new(1, Duration::from_secs(3600));
    health.register("enriched_posts", writer.table.progress.clone());
    let writer_registry = writer
        .table
        .registry
        .clone()
        .expect("the table uses the registry");
    health.watch_registry(writer_registry.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while writer_registry.outage().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outage was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let readiness = health.readiness(SystemTime::now());
    assert!(!readiness.ready, "{}", readiness.render());
    let check = readiness
        .checks
        .iter()
        .find(|c| c.name == "schema registry")
        .expect("a registry check");
    assert!(!check.ok && check.detail.contains("503"), "{check:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writer.table.progress.borrow().rows, 0);
    assert_eq!(writer.table.progress.borrow().rejected, 0);

    test_registry.set_down(false);
    writer.wait_committed(&report.last_offsets).await;
    let progress = writer.stop().await;
    let hostile = dead_letter_reasons(dir.path()).await;
    assert!(
        hostile.iter().all(|(_, _, r)| r == "no_schema_id"),
        "{hostile:?}"
    );
    assert_eq!(progress.rows as usize + hostile.len(), 50);
    assert!(
        health
            .readiness(SystemTime::now())
            .checks
            .iter()
            .any(|c| c.name == "schema registry" && c.ok)
    );
}

#[tokio::test]
async fn a_registry_without_the_id_or_of_another_format_is_told_apart_from_an_outage() {
    let test_registry = TestRegistry::start().await;
    let registry = client(&test_registry);
    let id = registry
        .register(
            "t-value",
            SchemaKind::Avro,
            shape_schema(Shape::Tweets, Format::Avro).unwrap().0,
        )
        .await
        .unwrap();
    match registry.schema(id).await.unwrap() {
        sluice::ingest::registry::Lookup::Found(s) => assert_eq!(s.kind, SchemaKind::Avro),
        other => panic!("{other:?}"),
    }
    match registry.schema(4242).await.unwrap() {
        sluice::ingest::registry::Lookup::Unknown(why) => assert!(why.contains("4242"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A wrong URL (no registry error body) is an outage, not a missing schema.
    let wrong = Registry::new(sluice::ingest::registry::RegistrySettings {
        url: format!("{}/not/the/api", test_registry.url()),
        username: None,
        password: None,
        ca_file: None,
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    let lookup = tokio::time::timeout(Duration::from_secs(1), wrong.schema(id)).await;
    assert!(lookup.is_err(), "a wrong URL must be retried, not answered");
    assert!(wrong.outage().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_in_avro() {
    let test_registry = TestRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let options = sluice::tools::demo::DemoOptions {
        dir: dir.path().join("lakehouse"),
        records: 1500,
        rate: 0,
        partitions: 2,
        embedding_dim: 8,
        bad_every: 100,
        operations_every: 0,
        seed: 11,
        format: Format::Avro,
        registry: Some(test_registry.url()),
    };
    let report = sluice::tools::demo::run(&options).await.expect("demo runs");
    assert_eq!(report.table_rows, 1485);
    assert_eq!(report.dead_letters, vec![("no_schema_id".to_string(), 15)]);
    assert!(report.audit.starts_with("CLEAN"), "{}", report.audit);
    let config = std::fs::read_to_string(&report.config_file).unwrap();
    assert!(
        config.contains("format = \"avro\"") && config.contains("[registry]"),
        "{config}"
    );
}
