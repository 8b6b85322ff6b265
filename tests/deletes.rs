//! Upstream deletes and edits: a table with a key and a mapping with an `[operation]` records
//! delete events in the commits that cover them (never as rows), exactly once through a crash;
//! a maintenance pass then leaves exactly the live posts at their latest version, records every
//! operation and its effect in `<table>_deletions`, and the audit accounts for every offset.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deltalake::arrow::array::Array;

use common::{Kafka, Writer, config, limits, query, send_raw, strings};
use sluice::config::Config;
use sluice::query::audit::audit_table;
use sluice::service::app::keyed_table;
use sluice::table::deletes::{Applied, ApplyOptions, ApplyOutcome, apply};
use sluice::table::delta::log::recorded_deletions;
use sluice::table::delta::{open_table, table_location};
use sluice::tools::generator::Shape;

const TOPIC: &str = "posts.bluesky";

/// The same configuration as a file, for `sluice run`.
fn config_file(cfg: &Config, dir: &Path) -> PathBuf {
    let table = &cfg.tables[0];
    let file = dir.join("sluice.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{}"
[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[storage]
root = "{}"
[batch]
max_rows = 100
max_age_ms = 200
[[tables]]
schema = "{}"
sources = [{{ topic = "{TOPIC}", mapping = "{}" }}]
"#,
            cfg.kafka.brokers,
            cfg.kafka.group_id,
            cfg.storage.root,
            table.schema.display(),
            table.sources[0].mapping.display(),
        ),
    )
    .unwrap();
    file
}

/// The flagship table (keyed by platform and post id) fed by Jetstream events through the
/// shipped Bluesky mapping (posts named by their `at://` URI).
fn keyed_config(brokers: &str, dir: &Path) -> Config {
    config(
        brokers,
        &dir.join("lake"),
        &[Shape::Bluesky],
        limits(4, 200),
    )
}

/// A Jetstream commit event for post `rkey` of `did`.
fn event(did: &str, rkey: &str, operation: &str, text: &str, time_us: i64) -> Option<Vec<u8>> {
    let record = if operation == "delete" {
        String::new()
    } else {
        format!(r#","cid":"bafy{rkey}{time_us}","record":{{"text":"{text}","langs":["en"]}}"#)
    };
    Some(
        format!(
            r#"{{"did":"{did}","time_us":{time_us},"kind":"commit","commit":{{"rev":"r{time_us}","operation":"{operation}","collection":"app.bsky.feed.post","rkey":"{rkey}"{record}}}}}"#
        )
        .into_bytes(),
    )
}

fn uri(did: &str, rkey: &str) -> String {
    format!("at://{did}/app.bsky.feed.post/{rkey}")
}

/// Offsets of the rows of `sql`'s first column (a long), in order.
async fn offsets_of(root: &Path, sql: &str) -> Vec<i64> {
    query(root, sql)
        .await
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect()
}

async fn apply_once(cfg: &Config) -> Applied {
    let keyed = keyed_table(cfg, &cfg.tables[0]).unwrap().unwrap();
    let options = ApplyOptions {
        owner: "test".into(),
        lease_ttl: std::time::Duration::from_secs(60),
        settings: common::sink_settings(),
        skip_when_idle: false,
    };
    match apply(&keyed, &Default::default(), &options).await.unwrap() {
        ApplyOutcome::Applied(applied) => applied,
        ApplyOutcome::Busy { owner, .. } => panic!("lease held by {owner}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deletes_edits_and_redeliveries_leave_the_live_posts_at_their_latest_version() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::new(&[TOPIC], 1);
    let cfg = keyed_config(&kafka.brokers(), dir.path());
    let t = 1_764_000_000_000_000_i64;
    let (alice, bob) = ("did:plc:alice", "did:plc:bob");
    let first = vec![
        event(alice, "a1", "create", "first post", t),
        event(alice, "a2", "create", "second post", t + 1),
        event(alice, "a1", "update", "first post, edited", t + 2),
        event(bob, "b1", "delete", "", t + 3), // deleted before it arrives
        event(alice, "a2", "create", "second post", t + 1), // redelivered
        event(alice, "a2", "delete", "", t + 4),
        // A delete whose key is incomplete cannot name a post: a dead letter.
        Some(
            format!(r#"{{"did":"{bob}","time_us":{t},"kind":"commit","commit":{{"operation":"delete","collection":"app.bsky.feed.post"}}}}"#)
                .into_bytes(),
        ),
        event(bob, "b1", "create", "late create", t),
        event(bob, "b2", "create", "bob's post", t + 8),
        event(bob, "b2", "update", "bob's post, edited", t + 9),
        event(bob, "b2", "update", "bob's post, edited", t + 9), // redelivered
    ];
    let offsets = send_raw(&kafka.brokers(), TOPIC, &first).await;
    let mut writer = Writer::start(&cfg).await;
    let last = |o: &[i64]| BTreeMap::from([((TOPIC.to_string(), 0), *o.last().unwrap())]);
    writer.wait_committed(&last(&offsets)).await;
    writer.stop().await;
    // A process killed after its dead letters are committed and before its rows and deletes
    // are: the restarted writer reads the same messages again and records each delete once.
    let second = vec![
        event(alice, "a3", "create", "third post", t + 5),
        event(alice, "a3", "delete", "", t + 6),
        Some(b"{not json".to_vec()),
        event(alice, "a4", "create", "fourth post", t + 7),
    ];
    let more = send_raw(&kafka.brokers(), TOPIC, &second).await;
    let crashed = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(config_file(&cfg, dir.path()))
        .env("SLUICE_FAILPOINT", "after_dead_letter_commit")
        .output()
        .unwrap();
    assert!(
        !crashed.status.success(),
        "the failpoint aborts the writer: {}",
        String::from_utf8_lossy(&crashed.stderr)
    );
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&last(&more)).await;
    let progress = writer.stop().await;
    assert_eq!(
        progress.deletions, 1,
        "the restarted writer records the delete"
    );
    assert_eq!(
        progress.dead_letters, 0,
        "the stored dead letter is not stored again"
    );

    let root = dir.path().join("lake");
    let location = table_location(&root.to_string_lossy(), "enriched_posts");
    let table = open_table(&location, Default::default()).await.unwrap();
    let recorded: Vec<(i64, Vec<String>)> = recorded_deletions(&table, None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|(key, d)| {
            assert_eq!((&*key.topic, key.partition), (TOPIC, 0));
            (d.offset, d.key)
        })
        .collect();
    let key = |did: &str, rkey: &str| vec!["bluesky".to_string(), uri(did, rkey)];
    assert_eq!(
        recorded,
        vec![
            (offsets[3], key(bob, "b1")),
            (offsets[5], key(alice, "a2")),
            (more[1], key(alice, "a3")),
        ]
    );
    // Before maintenance applies them, every other message is a row.
    let all_rows = "SELECT kafka_offset FROM enriched_posts ORDER BY kafka_offset";
    let mut expected_rows: Vec<i64> = [0, 1, 2, 4, 7, 8, 9, 10].map(|i| offsets[i]).to_vec();
    expected_rows.extend([more[0], more[3]]);
    assert_eq!(offsets_of(&root, all_rows).await, expected_rows);
    let audit = audit_table(&cfg, &cfg.tables[0]).await.unwrap();
    assert!(audit.is_clean(), "{}", audit.render());

    // One pass: the table then holds exactly the live posts, each at its latest version.
    let applied = apply_once(&cfg).await;
    assert_eq!(
        (applied.deletes, applied.deleted, applied.replaced),
        (3, 4, 3),
        "{applied:?}"
    );
    let live = query(
        &root,
        "SELECT post_id, text, kafka_offset FROM enriched_posts ORDER BY post_id",
    )
    .await;
    let live: Vec<(String, String)> = live
        .iter()
        .flat_map(|b| strings(b.column(0)).into_iter().zip(strings(b.column(1))))
        .collect();
    assert_eq!(
        live,
        vec![
            (uri(alice, "a1"), "first post, edited".to_string()),
            (uri(alice, "a4"), "fourth post".to_string()),
            (uri(bob, "b2"), "bob's post, edited".to_string()),
        ]
    );
    assert_eq!(
        offsets_of(&root, all_rows).await,
        vec![offsets[2], offsets[10], more[3]],
        "of two equal versions the later delivery stays"
    );
    // Every operation and its effect is recorded once, with what caused it.
    let records = query(
        &root,
        "SELECT operation, kafka_offset, cause_offset FROM enriched_posts_deletions \
         ORDER BY kafka_offset",
    )
    .await;
    let records: Vec<(String, i64, Option<i64>)> = records
        .iter()
        .flat_map(|b| {
            let ops = strings(b.column(0));
            let offsets = b
                .column(1)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .unwrap()
                .clone();
            let causes = b
                .column(2)
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .unwrap()
                .clone();
            (0..b.num_rows())
                .map(move |i| {
                    (
                        ops[i].clone(),
                        offsets.value(i),
                        causes.is_valid(i).then(|| causes.value(i)),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let op = |o: &str, at: i64, cause: Option<i64>| (o.to_string(), at, cause);
    assert_eq!(
        records,
        vec![
            op("replaced", offsets[0], Some(offsets[2])),
            op("deleted", offsets[1], Some(offsets[5])),
            op("delete", offsets[3], None),
            op("deleted", offsets[4], Some(offsets[5])),
            op("delete", offsets[5], None),
            op("deleted", offsets[7], Some(offsets[3])),
            op("replaced", offsets[8], Some(offsets[10])),
            op("replaced", offsets[9], Some(offsets[10])),
            op("deleted", more[0], Some(more[1])),
            op("delete", more[1], None),
        ]
    );
    let audit = audit_table(&cfg, &cfg.tables[0]).await.unwrap();
    let rendered = audit.render();
    assert!(audit.is_clean(), "{rendered}");
    let p = &audit.partitions[0];
    assert_eq!(
        (p.checked, p.rows, p.dead_letters, p.deletions, p.removed),
        (15, 3, 2, 3, 7),
        "{rendered}"
    );
    assert!(rendered.contains(", 3 deletes, 7 removed,"), "{rendered}");

    // A second pass finds nothing; a deleted post delivered again later is removed again.
    let again = apply_once(&cfg).await;
    assert_eq!(
        (again.deletes, again.deleted, again.replaced, again.version),
        (0, 0, 0, None)
    );
    let late = send_raw(
        &kafka.brokers(),
        TOPIC,
        &[event(alice, "a2", "create", "second post", t + 1)],
    )
    .await;
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&last(&late)).await;
    writer.stop().await;
    let applied = apply_once(&cfg).await;
    assert_eq!((applied.deletes, applied.deleted), (0, 1));
    assert_eq!(
        offsets_of(&root, all_rows).await,
        vec![offsets[2], offsets[10], more[3]]
    );
    let audit = audit_table(&cfg, &cfg.tables[0]).await.unwrap();
    assert!(audit.is_clean(), "{}", audit.render());
}

/// Values of `column` in every Parquet file under `dir` (all versions' files, live or removed),
/// as text (binary payloads decoded lossily).
fn values_in_files(dir: &Path, column: &str) -> Vec<String> {
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet")
                && !path.to_string_lossy().contains("_delta_log")
            {
                let file = std::fs::File::open(&path).unwrap();
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap()
                    .build()
                    .unwrap();
                for batch in reader {
                    let batch = batch.unwrap();
                    let values = deltalake::arrow::compute::cast(
                        batch.column_by_name(column).unwrap(),
                        &deltalake::arrow::datatypes::DataType::Binary,
                    )
                    .unwrap();
                    let values = values
                        .as_any()
                        .downcast_ref::<deltalake::arrow::array::BinaryArray>()
                        .unwrap();
                    found.extend(
                        values
                            .iter()
                            .flatten()
                            .map(|v| String::from_utf8_lossy(v).into_owned()),
                    );
                }
            }
        }
    }
    found
}

/// Runs `sluice forget` with `args` against the config file; returns its stdout.
fn sluice_forget(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["forget", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sluice forget {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn forget_erases_an_author_and_a_post_from_the_table_and_its_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::new(&[TOPIC], 1);
    let cfg = keyed_config(&kafka.brokers(), dir.path());
    let file = config_file(&cfg, dir.path());
    let root = dir.path().join("lake");
    let t = 1_764_000_000_000_000_i64;
    let (alice, bob) = ("did:plc:alice", "did:plc:bob");
    // A dead letter that still names its author in JSON: a post without its commit.
    let headless = |did: &str| {
        Some(format!(r#"{{"did":"{did}","time_us":{t},"kind":"commit"}}"#).into_bytes())
    };
    let first = vec![
        event(alice, "a1", "create", "alice's first", t),
        event(alice, "a2", "create", "alice's second", t + 1),
        event(alice, "a2", "update", "alice's second, edited", t + 2),
        event(bob, "b1", "create", "bob's first", t + 3),
        event(bob, "b2", "create", "bob's regret", t + 4),
        headless(alice),
        // Not JSON: found by the author's DID as a word, not by a longer DID containing it.
        Some(format!(r#"{{"did":"{alice}","kind":"#).into_bytes()),
        Some(format!(r#"{{"did":"{alice}2","kind":"#).into_bytes()),
        Some(b"{not json".to_vec()),
    ];
    let offsets = send_raw(&kafka.brokers(), TOPIC, &first).await;
    let last = |o: &[i64]| BTreeMap::from([((TOPIC.to_string(), 0), *o.last().unwrap())]);
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&last(&offsets)).await;

    // While the writer runs: erase alice (GDPR) and one post of bob's.
    let bob_b2 = format!("platform=bluesky,post_id={}", uri(bob, "b2"));
    let args = ["--author", alice, "--key", &bob_b2, "--reason", "GDPR-7"];
    let out = sluice_forget(&file, &args);
    assert!(
        out.contains("enriched_posts: 2 erasure requests recorded; removed 4 rows (")
            && out.contains(" and 2 dead letters ("),
        "{out}"
    );
    assert!(out.contains("--purge-history deletes them now"), "{out}");
    assert_eq!(
        offsets_of(&root, "SELECT kafka_offset FROM enriched_posts").await,
        [offsets[3]]
    );
    let dead = "SELECT kafka_offset FROM enriched_posts_dead_letters ORDER BY kafka_offset";
    assert_eq!(offsets_of(&root, dead).await, [offsets[7], offsets[8]]);

    // Alice posts again after the request, and sends another broken message: the next pass
    // (the service's maintenance, here one pass) removes both.
    let late = send_raw(
        &kafka.brokers(),
        TOPIC,
        &[
            event(alice, "a5", "create", "alice is back", t + 9),
            headless(alice),
        ],
    )
    .await;
    writer.wait_committed(&last(&late)).await;
    writer.stop().await;
    let applied = apply_once(&cfg).await;
    assert_eq!(
        (
            applied.forget_requests,
            applied.forgotten,
            applied.forgotten_dead_letters
        ),
        (0, 1, 1),
        "{applied:?}"
    );
    assert_eq!(
        offsets_of(&root, "SELECT kafka_offset FROM enriched_posts").await,
        [offsets[3]]
    );
    assert_eq!(offsets_of(&root, dead).await, [offsets[7], offsets[8]]);

    // Every request and what it removed, once, with its reason.
    let records = query(
        &root,
        "SELECT operation, COALESCE(CAST(kafka_offset AS VARCHAR), '-'), \
         COALESCE(author, '-'), COALESCE(post_id, '-'), reason FROM enriched_posts_deletions \
         ORDER BY operation, kafka_offset NULLS FIRST, post_id NULLS FIRST",
    )
    .await;
    let records: Vec<String> = records
        .iter()
        .flat_map(|b| {
            let columns: Vec<Vec<String>> = (0..5).map(|c| strings(b.column(c))).collect();
            (0..b.num_rows())
                .map(|r| {
                    columns
                        .iter()
                        .map(|c| c[r].as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let o = |i: i64| i.to_string();
    let expected = vec![
        format!("forget - {alice} - GDPR-7"),
        format!("forget - - {} GDPR-7", uri(bob, "b2")),
        format!(
            "forgotten {} {alice} {} GDPR-7",
            o(offsets[0]),
            uri(alice, "a1")
        ),
        format!(
            "forgotten {} {alice} {} GDPR-7",
            o(offsets[1]),
            uri(alice, "a2")
        ),
        format!(
            "forgotten {} {alice} {} GDPR-7",
            o(offsets[2]),
            uri(alice, "a2")
        ),
        format!("forgotten {} - {} GDPR-7", o(offsets[4]), uri(bob, "b2")),
        format!(
            "forgotten {} {alice} {} GDPR-7",
            o(late[0]),
            uri(alice, "a5")
        ),
        format!("forgotten dead letter {} {alice} - GDPR-7", o(offsets[5])),
        format!("forgotten dead letter {} {alice} - GDPR-7", o(offsets[6])),
        format!("forgotten dead letter {} {alice} - GDPR-7", o(late[1])),
    ];
    assert_eq!(records, expected);
    let audit = audit_table(&cfg, &cfg.tables[0]).await.unwrap();
    let rendered = audit.render();
    assert!(audit.is_clean(), "{rendered}");
    let p = &audit.partitions[0];
    assert_eq!(
        (p.checked, p.rows, p.dead_letters, p.deletions, p.removed),
        (11, 1, 2, 0, 8),
        "{rendered}"
    );

    // The rows are gone from what readers see, but files of earlier versions still hold them
    // until vacuum; forgetting again records nothing and, with --purge-history, deletes them.
    let table_dir = root.join("enriched_posts");
    let dead_dir = root.join("enriched_posts_dead_letters");
    assert!(
        values_in_files(&table_dir, "author")
            .iter()
            .any(|a| a == alice)
    );
    let payloads = values_in_files(&dead_dir, "payload");
    assert!(payloads.iter().filter(|p| p.contains(alice)).count() > 1);
    let mut again = args.to_vec();
    again.push("--purge-history");
    let out = sluice_forget(&file, &again);
    assert!(
        out.contains("0 erasure requests recorded (2 recorded before); removed 0 rows"),
        "{out}"
    );
    assert!(out.contains("history purged:"), "{out}");
    assert!(
        !values_in_files(&table_dir, "author")
            .iter()
            .any(|a| a == alice),
        "no file of the table holds alice's rows any more"
    );
    let payloads = values_in_files(&dead_dir, "payload");
    assert_eq!(
        payloads.iter().filter(|p| p.contains(alice)).count(),
        1,
        "only the dead letter of did:plc:alice2 names alice's DID, as part of another: {payloads:?}"
    );
    assert_eq!(
        offsets_of(&root, "SELECT kafka_offset FROM enriched_posts").await,
        [offsets[3]],
        "the live table reads as before"
    );
    let audit = audit_table(&cfg, &cfg.tables[0]).await.unwrap();
    assert!(audit.is_clean(), "{}", audit.render());
}
