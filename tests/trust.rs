//! Data you can trust: every message ends up as a row or a dead letter with its reason and
//! bytes, labels are canonical with the raw value kept, schemas evolve additively, and the audit
//! proves it from the broker and the tables.

mod common;

use std::collections::BTreeMap;

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int64Type};

use common::*;
use sluice::query::audit::audit_table;
use sluice::tools::generator::{Generator, Shape};

/// Reads `count` messages of a topic from the start: headers and payload of each.
async fn read_topic(
    brokers: &str,
    topic: &str,
    count: usize,
) -> Vec<(BTreeMap<String, String>, Option<Vec<u8>>)> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dead-letter-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    while out.len() < count {
        let m = tokio::time::timeout(CATCH_UP, consumer.recv())
            .await
            .expect("dead letters arrive on the topic")
            .unwrap();
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                headers.insert(header.key.to_string(), value.unwrap_or_default());
            }
        }
        out.push((headers, m.payload().map(<[u8]>::to_vec)));
    }
    out
}

/// Hostile payloads and the reason each must be stored with.
fn hostile_corpus() -> Vec<(Option<Vec<u8>>, &'static str)> {
    // 2 MiB against a 1 MiB limit: the mock broker keeps only ~5 MiB per partition, so the
    // 8 MiB case is in decode's unit tests.
    let mut big = b"{\"id\":\"big\",\"content\":\"".to_vec();
    big.resize(2 * 1024 * 1024, b'a');
    big.extend_from_slice(b"\"}");
    let deep = format!(
        "{{\"id\":\"deep\",\"x\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect();
    vec![
        (Some(big), "too_large"),
        (Some(deep.into_bytes()), "too_deep"),
        (
            Some(br#"{"id":"nan","favourites_count":NaN}"#.to_vec()),
            "malformed_json",
        ),
        (Some(noise), "invalid_utf8"),
        (
            Some(b"\xEF\xBB\xBF{\"id\":\"bom\"}".to_vec()),
            "malformed_json",
        ),
        (Some(br#"{"id":"a"}{"id":"b"}"#.to_vec()), "multiple_values"),
        (
            Some(br#"{"id":"neg","favourites_count":-5}"#.to_vec()),
            "out_of_range",
        ),
        (
            Some(br#"{"id":"when","created_at":"last tuesday"}"#.to_vec()),
            "bad_timestamp",
        ),
        (
            Some(br#"{"id":"old","created_at":"1970-01-02T00:00:00Z"}"#.to_vec()),
            "bad_timestamp",
        ),
        (Some(br#"{"content":"no id"}"#.to_vec()), "missing_required"),
        (
            Some(br#"{"id":"x","favourites_count":"many"}"#.to_vec()),
            "type_mismatch",
        ),
        (Some(b"[1,2,3]".to_vec()), "not_an_object"),
        (
            Some(br#"{"id":"cut","content":"unterminated"#.to_vec()),
            "malformed_json",
        ),
        (Some(Vec::new()), "malformed_json"),
        (None, "malformed_json"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_become_dead_letters_and_good_neighbours_become_rows() {
    let topic = Shape::Mastodon.default_topic();
    let kafka = Kafka::new(&[topic, "posts.dead"], 1);
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 500),
    );
    config.ingest.max_message_bytes = 1024 * 1024;
    config.tables[0].dead_letter_topic = Some("posts.dead".into());
    let mut writer = Writer::start(&config).await;

    // A good post before and after every hostile one.
    let mut generator = Generator::new(3, 8, chrono::Utc::now().timestamp_millis(), 2);
    let corpus = hostile_corpus();
    let mut payloads = Vec::new();
    let mut expected_reason = Vec::new();
    for (payload, reason) in &corpus {
        payloads.push(Some(generator.next(Shape::Mastodon).1));
        expected_reason.push(None);
        payloads.push(payload.clone());
        expected_reason.push(Some(*reason));
    }
    payloads.push(Some(generator.next(Shape::Mastodon).1));
    expected_reason.push(None);
    let offsets = send_raw(&kafka.brokers(), topic, &payloads).await;
    let last = BTreeMap::from([((topic.to_string(), 0), *offsets.last().unwrap())]);
    writer.wait_committed(&last).await;
    let progress = writer.stop().await;

    let dead = query(
        dir.path(),
        "SELECT kafka_offset, reason, payload, detail FROM enriched_posts_dead_letters ORDER BY kafka_offset",
    )
    .await;
    let mut stored = Vec::new();
    for b in &dead {
        let offs = b.column(0).as_primitive::<Int64Type>();
        let reasons = strings(b.column(1));
        let payload = cast(b.column(2), &DataType::Binary).unwrap();
        let payload = payload.as_binary::<i32>();
        let details = strings(b.column(3));
        for i in 0..b.num_rows() {
            let bytes = payload.is_valid(i).then(|| payload.value(i).to_vec());
            stored.push((offs.value(i), reasons[i].clone(), bytes, details[i].clone()));
        }
    }
    let mut expected = Vec::new();
    for (i, reason) in expected_reason.iter().enumerate() {
        if let Some(reason) = reason {
            expected.push((offsets[i], reason.to_string(), payloads[i].clone()));
        }
    }
    let stored_reasons: Vec<(i64, &str)> = stored.iter().map(|s| (s.0, s.1.as_str())).collect();
    let expected_reasons: Vec<(i64, &str)> = expected.iter().map(|e| (e.0, e.1.as_str())).collect();
    assert_eq!(stored_reasons, expected_reasons);
    assert_eq!(progress.dead_letters, corpus.len() as u64);
    for ((offset, reason, bytes, detail), (e_offset, e_reason, e_bytes)) in
        stored.iter().zip(&expected)
    {
        assert_eq!((offset, reason), (e_offset, e_reason), "{detail}");
        assert!(
            bytes == e_bytes,
            "offset {offset}: payload stored byte for byte"
        );
        assert!(!detail.is_empty());
    }
    let details: Vec<&str> = stored.iter().map(|s| s.3.as_str()).collect();
    assert!(
        details.iter().any(|d| d.contains("`like_count` is -5")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains("`created_at`: `last tuesday` is not a timestamp"))
    );

    let rows = query(
        dir.path(),
        "SELECT kafka_offset FROM enriched_posts ORDER BY kafka_offset",
    )
    .await;
    let row_offsets: Vec<i64> = rows
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    let good: Vec<i64> = expected_reason
        .iter()
        .zip(&offsets)
        .filter(|(r, _)| r.is_none())
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(row_offsets, good);

    // The dead-letter topic got each one too, with where it came from and why.
    let forwarded = read_topic(&kafka.brokers(), "posts.dead", corpus.len()).await;
    let mut from_topic: Vec<(i64, String)> = forwarded
        .iter()
        .map(|(headers, _)| {
            (
                headers["sluice.offset"].parse().unwrap(),
                headers["sluice.reason"].clone(),
            )
        })
        .collect();
    from_topic.sort();
    let stored_pairs: Vec<(i64, String)> = stored.iter().map(|s| (s.0, s.1.clone())).collect();
    assert_eq!(from_topic, stored_pairs);
    let big = forwarded
        .iter()
        .find(|(h, _)| h["sluice.reason"] == "too_large")
        .unwrap();
    assert_eq!(
        big.0["sluice.payload_omitted"],
        (2 * 1024 * 1024 + 2).to_string()
    );
    assert!(big.1.is_none(), "oversized payloads stay in the table only");

    let audit = audit_table(&config, &config.tables[0]).await.unwrap();
    assert!(audit.is_clean(), "{}", audit.render());
    let p = &audit.partitions[0];
    assert_eq!(
        (p.checked, p.rows, p.dead_letters),
        (
            payloads.len() as u64,
            good.len() as u64,
            corpus.len() as u64
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messy_llm_labels_land_canonical_with_the_raw_value_kept() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 2);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 500),
    );
    let mut writer = Writer::start(&config).await;
    let produced = publish(&kafka.brokers(), &[Shape::Mastodon], 2000, 5, 0).await;
    writer.wait_committed(&produced.last_offsets).await;
    writer.stop().await;

    let allowed = [
        (
            "sentiment",
            vec!["positive", "negative", "neutral", "mixed"],
        ),
        ("sarcasm", vec!["sarcastic", "not_sarcastic"]),
        ("appropriateness", vec!["appropriate", "inappropriate"]),
        (
            "category",
            vec![
                "technology",
                "politics",
                "sports",
                "entertainment",
                "science",
                "business",
                "health",
                "climate",
            ],
        ),
        ("language", vec!["en", "de", "es", "pt", "uk"]),
    ];
    for (column, values) in allowed {
        let found = counts_by_key(
            &query(
                dir.path(),
                &format!("SELECT {column}, count(*) FROM enriched_posts GROUP BY {column}"),
            )
            .await,
        );
        for value in found.keys() {
            assert!(
                values.contains(&value.as_str()) || value == "UNKNOWN",
                "{column} holds {value:?}: {found:?}"
            );
        }
        // The raw label is kept exactly when the stored one differs from it.
        let kept = query(
            dir.path(),
            &format!(
                "SELECT count(*) FROM enriched_posts WHERE {column}_raw IS NOT NULL AND {column}_raw = {column}"
            ),
        )
        .await;
        assert_eq!(
            scalar_i64(&kept),
            0,
            "{column}_raw only holds non-canonical labels"
        );
    }
    // Swapped letters, shouted ("NUETRAL"), land as the label they misspell in every column
    // the generator swaps them in.
    for column in ["sentiment", "category"] {
        let pairs = query(
            dir.path(),
            &format!(
                "SELECT {column}_raw, {column} FROM enriched_posts WHERE {column}_raw IS NOT NULL"
            ),
        )
        .await;
        let mut swapped = 0;
        for batch in &pairs {
            let raw = cast(batch.column(0), &DataType::Utf8).unwrap();
            let stored = cast(batch.column(1), &DataType::Utf8).unwrap();
            let (raw, stored) = (raw.as_string::<i32>(), stored.as_string::<i32>());
            for i in 0..batch.num_rows() {
                let (raw, stored) = (raw.value(i), stored.value(i));
                let mut letters: Vec<char> = raw.to_lowercase().chars().collect();
                let is_swap = raw == raw.to_uppercase()
                    && (0..letters.len().saturating_sub(1)).any(|at| {
                        letters.swap(at, at + 1);
                        let back: String = letters.iter().collect();
                        letters.swap(at, at + 1);
                        letters[at] != letters[at + 1] && back == stored
                    });
                swapped += usize::from(is_swap);
            }
        }
        assert!(swapped > 0, "no swapped {column} label was repaired");
    }
    // The generator's misspellings and shouting are folded or matched, not lost.
    let fixed = counts_by_key(
        &query(
            dir.path(),
            "SELECT appropriateness_raw, count(*) FROM enriched_posts WHERE appropriateness = 'inappropriate' AND appropriateness_raw IS NOT NULL GROUP BY appropriateness_raw",
        )
        .await,
    );
    assert!(fixed.contains_key("INAPROPRIATE"), "{fixed:?}");
    // Invented categories are UNKNOWN with the invention kept; "Sport" is close enough to sports.
    let unknown = counts_by_key(
        &query(
            dir.path(),
            "SELECT category_raw, count(*) FROM enriched_posts WHERE category = 'UNKNOWN' GROUP BY category_raw",
        )
        .await,
    );
    assert!(
        unknown
            .keys()
            .all(|k| k == "memes" || k == "Tech & Gadgets"),
        "{unknown:?}"
    );
    assert!(!unknown.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_to_the_schema_file_evolves_the_table_across_a_restart() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let repo = env!("CARGO_MANIFEST_DIR");
    let mut config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 500),
    );
    let mut writer = Writer::start(&config).await;
    let first = publish(&kafka.brokers(), &[Shape::Mastodon], 300, 8, 0).await;
    writer.wait_committed(&first.last_offsets).await;

    // Version 2 of the schema: a new nullable column, filled from the status URL.
    let schema = std::fs::read_to_string(format!("{repo}/schemas/enriched_posts.toml")).unwrap()
        + "\n[[columns]]\nname = \"url\"\ntype = \"string\"\ndoc = \"Link to the post.\"\n";
    let mapping = std::fs::read_to_string(format!("{repo}/schemas/mappings/mastodon.toml"))
        .unwrap()
        + "url = { path = \"url\" }\n";
    std::fs::write(dir.path().join("v2.toml"), &schema).unwrap();
    std::fs::write(dir.path().join("mastodon-v2.toml"), &mapping).unwrap();
    config.tables[0].schema = dir.path().join("v2.toml");
    config.tables[0].sources[0].mapping = dir.path().join("mastodon-v2.toml");

    // A rolling upgrade: another instance evolves the table while the old writer still runs
    // with the old schema file. The old writer keeps committing; its rows read the new column
    // as null.
    open_with_schema(dir.path(), "v2.toml", &schema)
        .await
        .unwrap();
    let meanwhile = publish(&kafka.brokers(), &[Shape::Mastodon], 50, 10, 0).await;
    writer.wait_committed(&meanwhile.last_offsets).await;
    writer.stop().await;

    let mut writer = Writer::start(&config).await;
    let second = publish(&kafka.brokers(), &[Shape::Mastodon], 200, 9, 0).await;
    writer.wait_committed(&second.last_offsets).await;
    writer.stop().await;

    let old = query(
        dir.path(),
        "SELECT count(*) FROM enriched_posts WHERE kafka_offset < 300 AND url IS NULL",
    )
    .await;
    assert_eq!(
        scalar_i64(&old),
        300,
        "old rows read the new column as null"
    );
    let new = query(
        dir.path(),
        "SELECT count(*) FROM enriched_posts WHERE kafka_offset >= 350 AND url LIKE 'https://%'",
    )
    .await;
    assert_eq!(scalar_i64(&new), 200, "new rows carry it");

    // Removing a column is refused with what to do instead.
    let without_author = schema
        .replace(
            "[[columns]]\nname = \"author\"\ntype = \"string\"\ndoc = \"Account handle or DID of the author.\"\n",
            "",
        )
        .lines()
        .filter(|l| !l.starts_with("author = "))
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(without_author, schema);
    let stripped_mapping = mapping.replace("author = { path = \"account.acct\" }\n", "");
    std::fs::write(dir.path().join("v3.toml"), without_author).unwrap();
    std::fs::write(dir.path().join("mastodon-v3.toml"), stripped_mapping).unwrap();
    config.tables[0].schema = dir.path().join("v3.toml");
    config.tables[0].sources[0].mapping = dir.path().join("mastodon-v3.toml");
    let err = match sluice::service::app::start(&config, std::future::pending()).await {
        Ok(_) => panic!("a removed column must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "`author` is in the table but not in the schema file; columns cannot be removed"
        ),
        "{err}"
    );
}

/// Opens (or creates) `enriched_posts` under `dir` from a schema file with `text`.
async fn open_with_schema(
    dir: &std::path::Path,
    name: &str,
    text: &str,
) -> Result<sluice::table::delta::DeltaSink, sluice::table::delta::DeltaError> {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let schema = sluice::contract::schema::TableSchema::load(&file).unwrap();
    open_sink(
        dir,
        schema,
        sluice::table::delta::DEFAULT_TOMBSTONE_RETENTION,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retyping_a_column_or_adding_a_required_one_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(repo().join("schemas/enriched_posts.toml")).unwrap();
    let created = open_with_schema(dir.path(), "v1.toml", &base)
        .await
        .unwrap();
    let version = created.version();
    let log = |dir: &std::path::Path| log_files(&dir.join("enriched_posts"));
    let before = log(dir.path());

    let author = "[[columns]]\nname = \"author\"\ntype = \"string\"\n";
    assert!(base.contains(author));
    let retyped = base.replace(author, "[[columns]]\nname = \"author\"\ntype = \"long\"\n");
    let err = match open_with_schema(dir.path(), "retyped.toml", &retyped).await {
        Ok(_) => panic!("a retyped column must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "`author` is `string` in the table but `long` in the schema file; a column's type \
             cannot change in place: restore the old type, or add a column with a new name"
        ),
        "{err}"
    );

    let required = format!(
        "{base}\n[[columns]]\nname = \"lang_confidence\"\ntype = \"double\"\nnullable = false\n"
    );
    let err = match open_with_schema(dir.path(), "required.toml", &required).await {
        Ok(_) => panic!("a new non-nullable column must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "`lang_confidence` is new and declared `nullable = false`, but the table's existing \
             rows have no value for it; add it as nullable"
        ),
        "{err}"
    );
    assert_eq!(log(dir.path()), before, "refusals wrote nothing to the log");

    // The same column, nullable, is an ordinary evolution.
    let optional = format!("{base}\n[[columns]]\nname = \"lang_confidence\"\ntype = \"double\"\n");
    let evolved = open_with_schema(dir.path(), "optional.toml", &optional)
        .await
        .unwrap();
    assert_eq!(evolved.version(), version + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_stay_exactly_once_through_a_rebalance_and_a_crash_audited_live() {
    let shapes = [Shape::Mastodon, Shape::Bluesky];
    let kafka = Kafka::new(&shapes.map(|s| s.default_topic()), 3);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&kafka.brokers(), dir.path(), &shapes, limits(250, 1000));

    let mut a = Writer::start(&config).await;
    let first = publish(&kafka.brokers(), &shapes, 2000, 31, 9).await;
    a.wait_committed(&first.last_offsets).await;
    let mut b = Writer::start(&config).await;
    let second = publish(&kafka.brokers(), &shapes, 2000, 32, 9).await;

    // While both writers work and the group rebalances, the audit sees no loss and no
    // duplicate: whatever is not committed yet is pending, not missing.
    let live = audit_table(&config, &config.tables[0]).await.unwrap();
    assert!(live.is_clean(), "{}", live.render());

    a.crash().await;
    let third = publish(&kafka.brokers(), &shapes, 1000, 33, 9).await;
    let all = latest_offsets(&[&first, &second, &third]);
    b.wait_committed(&all).await;
    b.stop().await;

    let audit = audit_table(&config, &config.tables[0]).await.unwrap();
    assert!(audit.is_clean(), "{}", audit.render());
    let totals = audit.partitions.iter().fold((0, 0, 0, 0), |t, p| {
        (
            t.0 + p.checked,
            t.1 + p.rows,
            t.2 + p.dead_letters,
            t.3 + p.pending,
        )
    });
    // 2000/9 + 2000/9 + 1000/9 hostile messages.
    assert_eq!(totals, (5000, 5000 - 555, 555, 0));
    let stored = query(
        dir.path(),
        "SELECT count(*) FROM enriched_posts_dead_letters",
    )
    .await;
    assert_eq!(scalar_i64(&stored), 555);
}

/// Instances of one group that start at the same moment on a table nobody has created yet (a
/// new deployment with two replicas) all open it: one creates it, the others use theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_starting_together_on_a_new_table_all_open_it() {
    let schema = std::sync::Arc::new(
        sluice::contract::schema::TableSchema::load(&repo().join("schemas/enriched_posts.toml"))
            .unwrap(),
    );
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let location =
            sluice::table::delta::table_location(&dir.path().to_string_lossy(), "enriched_posts");
        let opens = (0..8).map(|_| {
            let (location, schema) = (location.clone(), schema.clone());
            tokio::spawn(async move {
                sluice::table::delta::DeltaSink::open_or_create(
                    &location,
                    Default::default(),
                    schema,
                    "sluice-test",
                    sink_settings(),
                )
                .await
                .map(|sink| sink.table().version())
            })
        });
        for opened in futures::future::join_all(opens).await {
            let version = opened
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: a writer could not open: {e}"));
            assert_eq!(version, Some(0), "round {round}: one table, created once");
        }
    }
}

/// A Kafka CreateTime far in the future (a producer's clock bug, or a hostile client) is a
/// dead letter that keeps the timestamp as received, never a panic: before, one above
/// ~8.2e15 ms pushed `event_date` out of the date range and the writer died on every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_timestamp_beyond_every_date_is_a_dead_letter_not_a_crash() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = Shape::Mastodon.default_topic();
    let kafka = Kafka::new(&[topic], 1);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 500),
    );
    let now = chrono::Utc::now().timestamp_millis();
    let mut generator = Generator::new(5, 8, now, 2);
    // A good one; two beyond year 9999 (the second overflows i64 in microseconds); one beyond
    // year 9999 without `created_at`, so that event_date falls back on the Kafka timestamp;
    // a good one.
    let messages = [
        (now, true),
        (8_300_000_000_000_000, true),
        (9_300_000_000_000_000, true),
        (8_300_000_000_000_000, false),
        (now, true),
    ];
    let stamps: Vec<i64> = messages.iter().map(|(stamp, _)| *stamp).collect();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .expect("producer");
    let mut last = 0;
    for (stamp, with_event_time) in messages {
        let mut payload = generator.next(Shape::Mastodon).1;
        if !with_event_time {
            let mut post: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            post.as_object_mut().unwrap().remove("created_at");
            payload = serde_json::to_vec(&post).unwrap();
        }
        let record = FutureRecord::<str, [u8]>::to(topic)
            .partition(0)
            .payload(&payload)
            .timestamp(stamp);
        last = producer
            .send(record, std::time::Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered")
            .offset;
    }
    let targets = BTreeMap::from([((topic.to_string(), 0), last)]);
    // Twice: a restart must not meet the messages again as a crash either.
    for _ in 0..2 {
        let mut writer = Writer::start(&config).await;
        writer.wait_committed(&targets).await;
        writer.stop().await;
    }

    let rows = query(dir.path(), "SELECT count(*) FROM enriched_posts").await;
    assert_eq!(scalar_i64(&rows), 2, "the two good messages are rows");
    let dead = query(
        dir.path(),
        "SELECT kafka_offset, reason, detail FROM enriched_posts_dead_letters ORDER BY kafka_offset",
    )
    .await;
    let mut letters = Vec::new();
    for b in &dead {
        let offsets = b.column(0).as_primitive::<Int64Type>();
        let reasons = strings(b.column(1));
        let details = strings(b.column(2));
        for i in 0..b.num_rows() {
            letters.push((offsets.value(i), reasons[i].clone(), details[i].clone()));
        }
    }
    assert_eq!(letters.len(), 3, "{letters:?}");
    for ((offset, reason, detail), stamp) in letters.iter().zip(&stamps[1..4]) {
        assert_eq!(reason, "bad_timestamp", "offset {offset}: {detail}");
        assert!(
            detail.contains(&stamp.to_string()),
            "offset {offset}: the detail keeps the Kafka timestamp as received: {detail}"
        );
    }
}

/// Keys are part of a message: they count toward `batch.max_bytes` (they are buffered and
/// copied into `kafka_key`), and a key that makes the message larger than
/// `ingest.max_message_bytes` is a `too_large` dead letter. Before, only values counted: keys of
/// any size rode along, past the memory bound (and 4,096 keys of 600 KB overflowed an Arrow
/// string array).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_keys_count_toward_the_memory_bound_and_an_oversized_key_is_a_dead_letter() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = Shape::Mastodon.default_topic();
    let kafka = Kafka::new(&[topic], 1);
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(10_000, 60_000),
    );
    config.batch.max_bytes = 64 * 1024;
    config.ingest.max_message_bytes = 256 * 1024;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer");
    let mut generator = Generator::new(9, 8, chrono::Utc::now().timestamp_millis(), 2);
    // 30 posts with 20 KB keys (600 KB of keys, 25 KB of values), then one with a 300 KB key.
    let mut last = 0;
    for i in 0..31 {
        let key = if i < 30 {
            format!("{i:0>20000}")
        } else {
            "k".repeat(300 * 1024)
        };
        let payload = generator.next(Shape::Mastodon).1;
        last = producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(&key)
                    .payload(&payload),
                std::time::Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered")
            .offset;
    }
    let mut writer = Writer::start(&config).await;
    writer
        .wait_committed(&BTreeMap::from([((topic.to_string(), 0), last)]))
        .await;
    let progress = writer.stop().await;

    // 64 KiB of buffered bytes is three 20 KB keys: the batch flushes on bytes many times,
    // long before the 60 s age limit.
    assert!(
        progress.commits >= 8,
        "keys count toward batch.max_bytes: {} commits for 620 KB of keys",
        progress.commits
    );
    assert_eq!(progress.rows, 30);
    let dead = query(
        dir.path(),
        "SELECT reason, detail FROM enriched_posts_dead_letters",
    )
    .await;
    let reasons: Vec<String> = dead.iter().flat_map(|b| strings(b.column(0))).collect();
    let details: Vec<String> = dead.iter().flat_map(|b| strings(b.column(1))).collect();
    assert_eq!(reasons, ["too_large"], "{details:?}");
    assert!(
        details[0].contains("key of 307200 bytes"),
        "the detail names the key: {}",
        details[0]
    );
}

/// The broker's first and next offset of partition 0 of `topic`.
fn watermarks(brokers: &str, topic: &str) -> (i64, i64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, 0, std::time::Duration::from_secs(10))
        .unwrap()
}

/// Publishes `count` Mastodon posts to `kafka`, has a writer commit all of them to a table
/// under `root` and stops it; returns the writer's config.
async fn write_posts(
    kafka: &Kafka,
    root: &std::path::Path,
    count: u64,
    seed: u64,
) -> sluice::config::Config {
    let config = config(&kafka.brokers(), root, &[Shape::Mastodon], limits(500, 500));
    let mut writer = Writer::start(&config).await;
    let written = publish(&kafka.brokers(), &[Shape::Mastodon], count, seed, 0).await;
    writer.wait_committed(&written.last_offsets).await;
    writer.stop().await;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_retention_removed_before_the_writer_read_them_are_a_loud_recorded_loss() {
    let topic = Shape::Mastodon.default_topic();
    let kafka = Kafka::new(&[topic], 1);
    let dir = tempfile::tempdir().unwrap();
    let config = write_posts(&kafka, dir.path(), 200, 41).await;

    // While the writer is down, 6 MiB arrive; the broker keeps 5 MiB of the partition, so
    // retention removes the oldest messages, some of them never written.
    let filler: Vec<Option<Vec<u8>>> = (0..60).map(|_| Some(vec![b'x'; 100 * 1024])).collect();
    send_raw(&kafka.brokers(), topic, &filler).await;
    let (low, _) = watermarks(&kafka.brokers(), topic);
    assert!(
        low > 201,
        "retention removed unwritten messages (log starts at {low})"
    );
    let last = publish(&kafka.brokers(), &[Shape::Mastodon], 100, 42, 0).await;

    let mut writer = Writer::start(&config).await;
    writer.wait_committed(&last.last_offsets).await;
    let problems = writer.table.progress.borrow().partition_problems.clone();
    writer.stop().await;
    let range = format!("offsets 200..={}", low - 1);
    // Readiness shows it for as long as this writer owns the partition.
    let problem = problems
        .values()
        .next()
        .expect("readiness names the partition");
    assert!(problem.contains(&range), "{problem}");

    // Recorded where the audit and users see it: one `lost` dead letter naming the range.
    let lost = query(
        dir.path(),
        "SELECT kafka_offset, detail FROM enriched_posts_dead_letters WHERE reason = 'lost'",
    )
    .await;
    assert_eq!(lost.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    assert_eq!(lost[0].column(0).as_primitive::<Int64Type>().value(0), 200);
    assert!(strings(lost[0].column(1))[0].contains(&range));

    let audit = audit_table(&config, &config.tables[0]).await.unwrap();
    let report = audit.render();
    assert!(!audit.is_clean(), "{report}");
    assert!(report.contains(&range), "{report}");
    // Everything the broker still has was written once.
    assert!(report.contains("0 missing, 0 duplicated"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_went_backwards_stops_its_partition_instead_of_dropping_messages() {
    let topic = Shape::Mastodon.default_topic();
    let old = Kafka::new(&[topic], 1);
    let dir = tempfile::tempdir().unwrap();
    write_posts(&old, dir.path(), 300, 43).await;

    // A failover to a cluster whose log of the topic is shorter: offsets 0..100 are other
    // messages than the table's.
    let new = Kafka::new(&[topic], 1);
    publish(&new.brokers(), &[Shape::Mastodon], 100, 44, 0).await;
    let config = config(
        &new.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(500, 500),
    );
    let mut writer = Writer::start(&config).await;
    let stopped = tokio::time::timeout(
        CATCH_UP,
        writer
            .table
            .progress
            .wait_for(|p| !p.partition_problems.is_empty()),
    )
    .await
    .expect("the writer reports the partition")
    .unwrap()
    .partition_problems
    .clone();
    let problem = stopped.values().next().unwrap();
    assert!(problem.contains("stopped"), "{problem}");
    assert!(problem.contains("past the broker's end 100"), "{problem}");
    let progress = writer.stop().await;
    assert_eq!(
        progress.rows, 0,
        "nothing of the new log was taken for the old one"
    );
    assert_eq!(table_offsets(dir.path()).await.len(), 300);

    let audit = audit_table(&config, &config.tables[0]).await.unwrap();
    let report = audit.render();
    assert!(!audit.is_clean(), "{report}");
    assert!(report.contains("past the broker's end"), "{report}");

    // The operator accepts the new log; restarted, the writer reads it from its start.
    let accepted = sluice::service::accept::accept_log(&config, &config.tables[0], topic, 0)
        .await
        .unwrap();
    assert_eq!((accepted.old_position, accepted.new_start), (299, 0));
    let mut writer = Writer::start(&config).await;
    let new_log = BTreeMap::from([((topic.to_string(), 0), 99)]);
    writer.wait_committed(&new_log).await;
    assert!(writer.table.progress.borrow().partition_problems.is_empty());
    writer.stop().await;
    assert_eq!(
        table_offsets(dir.path()).await.len(),
        400,
        "the old log's rows stay"
    );
    let audit = audit_table(&config, &config.tables[0]).await.unwrap();
    let report = audit.render();
    assert!(audit.is_clean(), "{report}");
    assert!(
        report.contains("300 rows and dead letters of the previous log are not audited"),
        "{report}"
    );
    assert!(
        report.contains("CLEAN: 100 messages checked, 100 rows"),
        "{report}"
    );
    // Accepting a log that did not go backwards is refused.
    let again = sluice::service::accept::accept_log(&config, &config.tables[0], topic, 0).await;
    assert!(
        matches!(
            again,
            Err(sluice::service::accept::AcceptError::NotBehind { .. })
        ),
        "{again:?}"
    );
}
