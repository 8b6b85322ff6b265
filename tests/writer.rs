//! Exactly-once behaviour of the writer against a real Kafka protocol (librdkafka's mock
//! cluster) and a real Delta table on the local filesystem.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use deltalake::arrow::array::AsArray;
use deltalake::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};

use common::*;
use sluice::ingest::decode::Chunk;
use sluice::ingest::pipeline::{Destination, Record, TableWriter};
use sluice::service::app::{load_table, open_sinks};
use sluice::table::delta::{PartitionKey, open_table, table_location};
use sluice::tools::generator::{Generator, Shape};

const ALL: [Shape; 3] = Shape::ALL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_run_lands_every_message_once_from_all_three_shapes() {
    let kafka = Kafka::new(&ALL.map(|s| s.default_topic()), 2);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&kafka.brokers(), dir.path(), &ALL, limits(700, 1000));
    let mut writer = Writer::start(&config).await;
    let produced = publish(&kafka.brokers(), &ALL, 3000, 1, 0).await;
    writer.wait_committed(&produced.last_offsets).await;
    let progress = writer.stop().await;

    assert_eq!(progress.rows, 3000);
    assert!(progress.commits >= 4, "max_rows=700 forces several commits");
    let rows = table_offsets(dir.path()).await;
    assert_exactly_once(&rows, &produced.last_offsets, &BTreeSet::new());
    // checkpoint_interval = 5: the writer's own commits produced a checkpoint Trino can parse.
    let last_checkpoint: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("enriched_posts/_delta_log/_last_checkpoint"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(last_checkpoint["version"].as_i64().unwrap() >= 4);
    assert!(last_checkpoint.get("parts").is_none(), "{last_checkpoint}");

    // Each shape's own fields landed in the shared columns.
    let per_platform = query(
        dir.path(),
        "SELECT platform, count(*), count(text), count(created_at), count(author), \
                count(appropriateness), count(entities), count(embedding), count(impression_count), \
                count(toxicity_labels) \
         FROM enriched_posts GROUP BY platform ORDER BY platform",
    )
    .await;
    let b = &per_platform[0];
    let platforms = strings(b.column(0));
    assert_eq!(platforms, ["bluesky", "mastodon", "twitter"]);
    let col = |i: usize| -> Vec<i64> { b.column(i).as_primitive::<Int64Type>().values().to_vec() };
    assert_eq!(col(1), [1000, 1000, 1000]);
    for i in 2..=4 {
        assert_eq!(
            col(i),
            [1000, 1000, 1000],
            "column {i} populated for every shape"
        );
    }
    assert_eq!(col(5), [0, 1000, 0], "appropriateness comes from mastodon");
    assert_eq!(col(6), [1000, 0, 0], "entities come from bluesky");
    assert_eq!(col(7), [0, 0, 1000], "embeddings come from tweets");
    assert_eq!(col(8), [0, 0, 1000], "impressions come from tweets");
    assert_eq!(col(9), [1000, 0, 0], "toxicity labels come from bluesky");

    let dims = query(
        dir.path(),
        "SELECT min(array_length(embedding)), max(array_length(embedding)) FROM enriched_posts WHERE platform = 'twitter'",
    )
    .await;
    let d = dims[0]
        .column(0)
        .as_primitive::<deltalake::arrow::datatypes::UInt64Type>();
    assert_eq!(d.value(0), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_reads_back_with_declared_types_and_date_partitions() {
    let kafka = Kafka::new(&[Shape::Bluesky.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Bluesky],
        limits(10_000, 1000),
    );
    let mut writer = Writer::start(&config).await;
    let produced = publish(&kafka.brokers(), &[Shape::Bluesky], 300, 2, 0).await;
    writer.wait_committed(&produced.last_offsets).await;
    writer.stop().await;

    let location = table_location(&dir.path().to_string_lossy(), "enriched_posts");
    let table = open_table(&location, Default::default()).await.unwrap();
    let snapshot = table.snapshot().unwrap();
    let schema = snapshot.snapshot().arrow_schema();
    assert_eq!(
        schema.field_with_name("created_at").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    assert_eq!(
        schema.field_with_name("event_date").unwrap().data_type(),
        &DataType::Date32
    );
    let DataType::List(item) = schema.field_with_name("entities").unwrap().data_type() else {
        panic!("entities is a list")
    };
    assert!(matches!(item.data_type(), DataType::Struct(f) if f.len() == 3));
    let protocol = snapshot.protocol();
    // Reader 1 / writer 2, as the README promises: every Delta reader (Trino, Spark, DuckDB,
    // older delta-rs) can read and write it, no table feature required.
    assert_eq!(
        (protocol.min_reader_version(), protocol.min_writer_version()),
        (1, 2)
    );
    let dead_letters = open_table(
        &table_location(&dir.path().to_string_lossy(), "enriched_posts_dead_letters"),
        Default::default(),
    )
    .await
    .unwrap();
    let protocol = dead_letters.snapshot().unwrap().protocol().clone();
    assert_eq!(
        (protocol.min_reader_version(), protocol.min_writer_version()),
        (1, 2)
    );
    assert_eq!(
        snapshot.metadata().partition_columns(),
        &["event_date".to_string()]
    );

    // Partition folders in the spec's string form, matching the rows' dates.
    let folders: BTreeSet<String> = std::fs::read_dir(dir.path().join("enriched_posts"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("event_date="))
        .collect();
    let dates = query(
        dir.path(),
        "SELECT DISTINCT CAST(event_date AS VARCHAR) FROM enriched_posts",
    )
    .await;
    let expected: BTreeSet<String> = dates
        .iter()
        .flat_map(|b| strings(b.column(0)))
        .map(|d| format!("event_date={d}"))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(folders, expected);

    // event_date is the UTC date of created_at.
    let mismatched = query(
        dir.path(),
        "SELECT count(*) FROM enriched_posts WHERE event_date <> CAST(created_at AS DATE)",
    )
    .await;
    assert_eq!(scalar_i64(&mismatched), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_batch_then_restart_loses_and_duplicates_nothing() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 3);
    let dir = tempfile::tempdir().unwrap();
    // Age limit far away: only max_rows flushes, so a tail stays buffered when we crash.
    let config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(400, 600_000),
    );
    let mut writer = Writer::start(&config).await;
    let first = publish(&kafka.brokers(), &[Shape::Mastodon], 1000, 3, 0).await;
    tokio::time::timeout(CATCH_UP, writer.table.progress.wait_for(|p| p.commits >= 2))
        .await
        .expect("two commits")
        .unwrap();
    let before_crash = writer.table.progress.borrow().rows;
    assert!(before_crash < 1000, "some messages were still buffered");
    writer.crash().await;

    let second = publish(&kafka.brokers(), &[Shape::Mastodon], 500, 4, 0).await;
    let restarted_config = sluice::config::Config {
        batch: limits(400, 1000),
        ..config
    };
    let mut writer = Writer::start(&restarted_config).await;
    writer.wait_committed(&second.last_offsets).await;
    writer.stop().await;

    let mut all = first.last_offsets.clone();
    for (k, v) in second.last_offsets {
        let e = all.entry(k).or_insert(v);
        *e = (*e).max(v);
    }
    assert_exactly_once(&table_offsets(dir.path()).await, &all, &BTreeSet::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_uploaded_but_never_committed_are_not_read_and_not_rewritten_twice() {
    let kafka = Kafka::new(&[Shape::Tweets.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Tweets],
        limits(10_000, 1000),
    );
    let mut writer = Writer::start(&config).await;
    let first = publish(&kafka.brokers(), &[Shape::Tweets], 200, 5, 0).await;
    writer.wait_committed(&first.last_offsets).await;
    writer.stop().await;

    // The state a writer leaves when it dies after uploading Parquet but before its commit:
    // data files for the next offsets in the table folder, referenced by no commit.
    let second = publish(&kafka.brokers(), &[Shape::Tweets], 300, 6, 0).await;
    let loaded = load_table(&config, &config.tables[0], None).unwrap();
    let decoder = loaded.decoders.values().next().unwrap();
    let mut chunk = Chunk::new(Arc::from(Shape::Tweets.default_topic()), 0);
    let mut generator = Generator::new(6, 16, chrono::Utc::now().timestamp_millis(), 3);
    for offset in 200..500 {
        let (key, payload) = generator.next(Shape::Tweets);
        chunk.push(offset, Some(0), Some(key.as_bytes()), Some(&payload));
    }
    let now = chrono::Utc::now().timestamp_micros();
    let batch = decoder.decode(&chunk, now).unwrap().batch.unwrap();
    let location = table_location(&dir.path().to_string_lossy(), "enriched_posts");
    let table = open_table(&location, Default::default()).await.unwrap();
    let mut orphan_writer = RecordBatchWriter::for_table(&table).unwrap();
    orphan_writer.write(batch).await.unwrap();
    let orphans = orphan_writer.flush().await.unwrap();
    assert!(!orphans.is_empty());
    for add in &orphans {
        assert!(dir.path().join("enriched_posts").join(&add.path).exists());
    }

    let mut writer = Writer::start(&config).await;
    writer.wait_committed(&second.last_offsets).await;
    writer.stop().await;
    assert_exactly_once(
        &table_offsets(dir.path()).await,
        &second.last_offsets,
        &BTreeSet::new(),
    );
    let table = open_table(&location, Default::default()).await.unwrap();
    let live: BTreeSet<String> = table.get_file_uris().unwrap().collect();
    for add in &orphans {
        assert!(
            !live.iter().any(|u| u.ends_with(&add.path)),
            "orphan {} is not part of the table",
            add.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_in_one_group_through_a_rebalance() {
    let topics = [
        Shape::Mastodon.default_topic(),
        Shape::Bluesky.default_topic(),
    ];
    let shapes = [Shape::Mastodon, Shape::Bluesky];
    let kafka = Kafka::new(&topics, 4);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&kafka.brokers(), dir.path(), &shapes, limits(300, 1000));

    let mut a = Writer::start(&config).await;
    let first = publish(&kafka.brokers(), &shapes, 2000, 7, 0).await;
    a.wait_committed(&first.last_offsets).await;

    // B joins: the group rebalances and splits the partitions.
    let mut b = Writer::start(&config).await;
    tokio::time::timeout(
        CATCH_UP,
        b.table.progress.wait_for(|p| !p.committed.is_empty()),
    )
    .await
    .expect("the second writer is assigned partitions already in the table")
    .unwrap();
    let a_owned = a.table.progress.borrow().committed.len();
    assert!(
        a_owned < 8,
        "the first writer gave partitions up in the rebalance ({a_owned} of 8 left)"
    );
    let commits_before = a.table.progress.borrow().commits;
    let second = publish(&kafka.brokers(), &shapes, 2000, 8, 0).await;

    // A leaves mid-stream (crash), once it committed part of the second round: B must take
    // over A's partitions from the table's positions.
    tokio::time::timeout(
        CATCH_UP,
        a.table.progress.wait_for(|p| p.commits > commits_before),
    )
    .await
    .expect("the first writer commits some of the second round")
    .unwrap();
    a.crash().await;
    let third = publish(&kafka.brokers(), &shapes, 1000, 9, 0).await;
    b.wait_committed(&third.last_offsets).await;
    let progress_b = b.stop().await;
    assert!(progress_b.rows > 0, "the second writer did work");

    let all = latest_offsets(&[&first, &second, &third]);
    assert_exactly_once(&table_offsets(dir.path()).await, &all, &BTreeSet::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_counted_not_written_and_the_stream_goes_on() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 1000),
    );
    let mut writer = Writer::start(&config).await;
    // Every 7th message is hostile, in eight rotating kinds.
    let produced = publish(&kafka.brokers(), &[Shape::Mastodon], 700, 10, 7).await;
    writer.wait_committed(&produced.last_offsets).await;
    let progress = writer.stop().await;

    assert_eq!(progress.rejected, 100);
    assert_eq!(progress.rows, 600);
    let reasons: BTreeMap<&str, u64> = progress.rejected_by_reason.clone();
    assert_eq!(
        reasons,
        BTreeMap::from([
            ("bad_timestamp", 12),
            ("malformed_json", 25),
            ("multiple_values", 13),
            ("not_an_object", 13),
            ("out_of_range", 12),
            ("too_deep", 12),
            ("type_mismatch", 13),
        ])
    );
    // The bad ones are exactly the offsets of every 7th message; all others are rows.
    let missing: BTreeSet<(String, i32, i64)> = (1..=100)
        .map(|k| (Shape::Mastodon.default_topic().to_string(), 0, k * 7 - 1))
        .collect();
    assert_exactly_once(
        &table_offsets(dir.path()).await,
        &produced.last_offsets,
        &missing,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_leaves_a_table_with_every_good_record_and_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lakehouse");
    let options = sluice::tools::demo::DemoOptions {
        dir: out.clone(),
        records: 1500,
        rate: 0,
        partitions: 2,
        embedding_dim: 8,
        bad_every: 100,
        operations_every: 7,
        seed: 11,
        format: Default::default(),
        registry: None,
    };
    let report = sluice::tools::demo::run(&options).await.expect("demo runs");
    assert_eq!(report.produced.delivered, 1500);
    assert_eq!(report.written.rejected, 15);
    let ops = report.produced.operations;
    assert!(
        ops.edits > 0 && ops.redeliveries > 0 && ops.deletes > 0 && ops.replays > 0,
        "{ops:?}"
    );
    assert_eq!(report.written.deletions, ops.deletes);
    // Every post created once, less the deleted ones: edits, redeliveries and replays of
    // deleted posts leave no second row.
    let created = 1500 - 15 - ops.total();
    let live = (created - ops.deletes) as i64;
    assert_eq!(report.table_rows, live);
    let applied = report
        .applied
        .clone()
        .expect("the flagship table has a key");
    let removed = ops.edits + ops.redeliveries + ops.replays + ops.deletes;
    assert_eq!(applied.deleted + applied.replaced, removed, "{applied:?}");
    let total: i64 = report.sentiment_by_category.iter().map(|(_, _, n)| n).sum();
    assert_eq!(total, live);
    assert!(report.render().contains(&format!("{live} rows")));
    assert!(
        report.render().contains("upstream ops"),
        "{}",
        report.render()
    );
    let dead: i64 = report.dead_letters.iter().map(|(_, n)| n).sum();
    assert_eq!(dead, 15, "every hostile message is a stored dead letter");
    assert_eq!(
        report.audit,
        format!(
            "CLEAN: 1500 messages checked, {live} rows, 15 dead letters, {} deletes, {removed} removed, 0 missing, 0 duplicated",
            ops.deletes
        )
    );
    let fixed: i64 = report.labels.iter().map(|(_, fixed, _)| fixed).sum();
    assert!(fixed > 0, "the generator's messy labels were canonicalized");

    // The config it leaves loads and points at the table it wrote.
    let config = sluice::config::Config::load(&out.join("sluice.toml"), Vec::new()).unwrap();
    assert_eq!(config.tables[0].sources.len(), 3);
    assert!(out.join("enriched_posts/_delta_log").exists());

    // Running it again starts from an empty table instead of piling up.
    let again = sluice::tools::demo::run(&options)
        .await
        .expect("demo runs twice");
    assert_eq!(again.table_rows, live);
    let dead: i64 = again.dead_letters.iter().map(|(_, n)| n).sum();
    assert_eq!(dead, 15);
}

/// A writer fed directly (no broker) that owns `partitions` of the Mastodon topic, starting
/// from the table's positions as an assignment would.
async fn fed_writer(config: &sluice::config::Config, partitions: &[i32]) -> TableWriter {
    let loaded = load_table(config, &config.tables[0], None).unwrap();
    let (table, dead_letters) = open_sinks(config, &loaded.schema).await.unwrap();
    let owned = partitions
        .iter()
        .map(|&partition| PartitionKey {
            topic: Arc::from(Shape::Mastodon.default_topic()),
            partition,
        })
        .collect();
    let destination = Destination {
        table,
        dead_letters,
        forwarder: None,
    };
    let decoding = config.ingest.decoding();
    TableWriter::without_broker(destination, loaded.decoders, config.batch, decoding, owned)
        .await
        .unwrap()
        .0
}

/// Feeds `offsets` of `partition` to `writer`, post `offset` of `posts` at each.
async fn feed(
    writer: &mut TableWriter,
    posts: &[(String, Vec<u8>)],
    partition: i32,
    offsets: std::ops::Range<i64>,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for offset in offsets {
        let (key, payload) = &posts[offset as usize];
        let record = Record {
            topic: Shape::Mastodon.default_topic(),
            partition,
            offset,
            timestamp_ms: Some(now),
            key: Some(key.as_bytes()),
            payload: Some(payload),
        };
        writer.ingest(record).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_missed_a_takeover_of_an_idle_partition_rereads_it_instead_of_committing_it_again()
 {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        "127.0.0.1:1",
        dir.path(),
        &[Shape::Mastodon],
        limits(5, 600_000),
    );
    let mut generator = Generator::new(31, 16, 1_780_000_000_000, 3);
    let posts: Vec<_> = (0..10).map(|_| generator.next(Shape::Mastodon)).collect();

    // A owns partitions 0 and 1 and has read nothing of 1 yet.
    let mut a = fed_writer(&config, &[0, 1]).await;
    // B has taken partition 1 over (A has not been told) and commits offsets 0..10 of it.
    let mut b = fed_writer(&config, &[1]).await;
    feed(&mut b, &posts, 1, 0..10).await;
    b.finish().await.unwrap();
    // A commits a batch of partition 0: the table moved since A last looked, so this is when
    // A must learn where partition 1 stands.
    feed(&mut a, &posts, 0, 0..5).await;
    // Then A receives partition 1 from its old position, with nothing buffered in between.
    feed(&mut a, &posts, 1, 0..5).await;
    a.finish().await.unwrap();

    let rows = table_offsets(dir.path()).await;
    let expected = BTreeMap::from([
        ((Shape::Mastodon.default_topic().to_string(), 0), 4),
        ((Shape::Mastodon.default_topic().to_string(), 1), 9),
    ]);
    assert_exactly_once(&rows, &expected, &BTreeSet::new());
    assert_eq!(rows.len(), 15);
    let location = table_location(&dir.path().to_string_lossy(), "enriched_posts");
    let table = open_table(&location, Default::default()).await.unwrap();
    let position = sluice::table::delta::committed_offset(
        &table,
        "sluice-test",
        Shape::Mastodon.default_topic(),
        1,
    )
    .await
    .unwrap();
    assert_eq!(
        position,
        Some(9),
        "partition 1's position never moves backwards"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_fed_by_one_topic_each_get_all_of_it() {
    let topic = Shape::Mastodon.default_topic();
    let kafka = Kafka::new(&[topic], 4);
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(300, 500),
    );
    // A second table, `posts_archive`, reads the same topic with the same group_id.
    let schema = std::fs::read_to_string(repo().join("schemas/enriched_posts.toml"))
        .unwrap()
        .replacen("name = \"enriched_posts\"", "name = \"posts_archive\"", 1);
    assert!(schema.contains("name = \"posts_archive\""));
    let archive = dir.path().join("posts_archive.toml");
    std::fs::write(&archive, schema).unwrap();
    let mapping = std::fs::read_to_string(repo().join("schemas/mappings/mastodon.toml"))
        .unwrap()
        .replacen("table = \"enriched_posts\"", "table = \"posts_archive\"", 1);
    let archive_mapping = dir.path().join("posts_archive_mastodon.toml");
    std::fs::write(&archive_mapping, mapping).unwrap();
    let mut second = config.tables[0].clone();
    second.schema = archive;
    second.sources[0].mapping = archive_mapping;
    config.tables.push(second);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = sluice::service::app::start(&config, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let produced = publish(&kafka.brokers(), &[Shape::Mastodon], 1000, 33, 0).await;
    assert_eq!(
        produced.last_offsets.len(),
        4,
        "all four partitions have posts"
    );
    for table in &running {
        let mut progress = table.progress.clone();
        let covered = tokio::time::timeout(
            CATCH_UP,
            progress.wait_for(|p| p.covers(&produced.last_offsets)),
        )
        .await
        .is_ok();
        assert!(
            covered,
            "{} wrote only {:?} of {:?}",
            table.name,
            progress.borrow().committed,
            produced.last_offsets
        );
    }
    let _ = stop.send(());
    for table in running {
        table.task.await.unwrap().unwrap();
    }
    for name in ["enriched_posts", "posts_archive"] {
        let location = table_location(&dir.path().to_string_lossy(), name);
        let table = open_table(&location, Default::default()).await.unwrap();
        let ctx = deltalake::datafusion::prelude::SessionContext::new();
        sluice::table::delta::register_table(&ctx, "t", &table)
            .await
            .unwrap();
        let counts = ctx
            .sql("SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let column = |i: usize| counts[0].column(i).as_primitive::<Int64Type>().value(0);
        assert_eq!(
            (column(0), column(1)),
            (1000, 1000),
            "{name} holds every post once"
        );
    }
}
