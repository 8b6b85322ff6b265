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
use sluice::contract::schema::TableSchema;
use sluice::query::audit::audit_table;
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
    let root = &cfg.storage.root;
    let schema = TableSchema::load(&cfg.tables[0].schema).unwrap();
    let options = ApplyOptions {
        owner: "test".into(),
        lease_ttl: std::time::Duration::from_secs(60),
        settings: common::sink_settings(),
    };
    match apply(
        &table_location(root, "enriched_posts"),
        &table_location(root, "enriched_posts_deletions"),
        &Default::default(),
        &schema,
        &options,
    )
    .await
    .unwrap()
    {
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
