//! What sluice promises about its object store, checked against a store that misbehaves on
//! purpose (`common::faulty`): a commit that lands and then reports an error, a store ignoring
//! `If-None-Match: *`, a store that accepts requests and never answers, and the LIST requests
//! of steady commits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::faulty::{Faults, faulty_root};
use common::*;
use sluice::service::health::Health;
use sluice::table::delta::{DeltaError, DeltaSink};
use sluice::tools::generator::Shape;

/// (partition, offset) of every row of `table` under `root`.
async fn offsets_of(root: &std::path::Path, table: &str) -> Vec<(i32, i64)> {
    offsets_in_table(root, table)
        .await
        .into_iter()
        .map(|(_, partition, offset)| (partition, offset))
        .collect()
}

/// A topic of `shape` with `partitions` partitions and a writer config whose tables live
/// behind the faulty store's `host`.
struct Setup {
    kafka: Kafka,
    dir: tempfile::TempDir,
    faults: Arc<Faults>,
    config: sluice::config::Config,
}

fn setup(
    host: &str,
    shape: Shape,
    partitions: i32,
    limits: sluice::ingest::batch::BatchLimits,
) -> Setup {
    let kafka = Kafka::new(&[shape.default_topic()], partitions);
    let dir = tempfile::tempdir().unwrap();
    let (root, faults) = faulty_root(host, dir.path(), Faults::new(false));
    let mut config = config(&kafka.brokers(), dir.path(), &[shape], limits);
    config.storage.root = root;
    Setup {
        kafka,
        dir,
        faults,
        config,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_error_surfaced_after_it_landed_is_counted_once_and_never_rewritten() {
    let topic = Shape::Bluesky.default_topic();
    let Setup {
        kafka,
        dir,
        faults,
        config,
    } = setup("landed", Shape::Bluesky, 1, limits(250, 300));
    let mut writer = Writer::start(&config).await;
    // The first commit of each table after the start lands, and its caller hears a timeout.
    faults.land_then_fail.lock().unwrap().extend([
        "enriched_posts".to_string(),
        "enriched_posts_dead_letters".into(),
    ]);
    let junk: Vec<Option<Vec<u8>>> = (0..20)
        .map(|i| Some(format!("{{not json {i}").into_bytes()))
        .collect();
    let junk_offsets = send_raw(&kafka.brokers(), topic, &junk).await;
    let produced = publish(&kafka.brokers(), &[Shape::Bluesky], 1000, 3, 0).await;
    writer.wait_committed(&produced.last_offsets).await;
    let progress = writer.stop().await;

    let failed = faults.landed_then_failed.lock().unwrap().clone();
    assert_eq!(
        failed.len(),
        2,
        "both commits landed and reported an error: {failed:?}"
    );
    assert!(faults.land_then_fail.lock().unwrap().is_empty());

    let rows = offsets_of(dir.path(), "enriched_posts").await;
    let dead = offsets_of(dir.path(), "enriched_posts_dead_letters").await;
    let junk: BTreeSet<i64> = junk_offsets.into_iter().collect();
    let expected_rows: Vec<(i32, i64)> = (0..=produced.last_offsets[&(topic.to_string(), 0)])
        .filter(|o| !junk.contains(o))
        .map(|o| (0, o))
        .collect();
    assert_eq!(rows, expected_rows, "every post once, none twice");
    assert_eq!(
        dead,
        junk.iter().map(|o| (0, *o)).collect::<Vec<_>>(),
        "every junk message once in the dead letters"
    );
    // The writer recognised its own landed commits: it counted them as committed (not as a
    // position another writer moved, which would drop and re-read the buffer uncounted).
    assert_eq!(progress.rows, 1000);
    assert_eq!(progress.dead_letters, 20);
    assert_eq!(progress.rejected, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ignores_if_none_match_is_refused_before_any_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = faulty_root("overwrites", dir.path(), Faults::new(true));
    let schema =
        sluice::contract::schema::TableSchema::load(&repo().join("schemas/enriched_posts.toml"))
            .unwrap();
    let location = sluice::table::delta::table_location(&root, "enriched_posts");
    let err = match DeltaSink::open_or_create(
        &location,
        Default::default(),
        Arc::new(schema),
        "sluice-test",
        sink_settings(),
    )
    .await
    {
        Ok(_) => panic!("a store that overwrites on If-None-Match must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, DeltaError::UnsafeStore { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("does not honour conditional writes (If-None-Match: *); refusing to commit"),
        "{err}"
    );
    // Nothing of a table was written, and the probe cleaned up after itself.
    assert_eq!(
        log_files(&dir.path().join("enriched_posts")),
        BTreeSet::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_fails_readiness_and_the_writer_resumes_when_it_answers() {
    let Setup {
        kafka,
        dir,
        faults,
        mut config,
    } = setup("silent", Shape::Mastodon, 2, limits(10_000, 200));
    config.health.probe_interval_s = 1;
    let max_wait =
        config.batch.max_age() + std::time::Duration::from_secs(config.health.commit_stall_s);
    let health = Health::new(1, max_wait);
    let addr = sluice::service::telemetry::serve("127.0.0.1:0", health.clone())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(sluice::service::app::run(
        config.clone(),
        async move {
            let _ = stopped.await;
        },
        Some(health),
    ));
    let readyz = move || async move {
        tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
            .await
            .unwrap()
    };
    let wait_for = async |what: &str, ok: &dyn Fn(u16, &str) -> bool| -> String {
        let seen = tokio::time::timeout(CATCH_UP, async {
            loop {
                if let Some((status, body)) = readyz().await
                    && ok(status, &body)
                {
                    return body;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
        .await;
        match seen {
            Ok(body) => body,
            Err(_) => panic!("/readyz never showed {what}: {:?}", readyz().await),
        }
    };

    let first = publish(&kafka.brokers(), &[Shape::Mastodon], 300, 4, 0).await;
    wait_for("ready", &|status, _| status == 200).await;

    faults.answering.send_replace(false);
    let second = publish(&kafka.brokers(), &[Shape::Mastodon], 300, 5, 0).await;
    let body = wait_for("the silent store", &|status, body| {
        status == 503 && body.contains("no answer within 10s")
    })
    .await;
    assert!(body.contains("object store"), "{body}");

    faults.answering.send_replace(true);
    wait_for("ready again", &|status, _| status == 200).await;
    let targets = latest_offsets(&[&first, &second]);
    let rows_now = async || offsets_of(dir.path(), "enriched_posts").await.len() as u64;
    let all: u64 = targets.values().map(|last| (last + 1) as u64).sum();
    tokio::time::timeout(CATCH_UP, async {
        while rows_now().await < all {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the writer lands what arrived while the store was silent");
    let _ = stop.send(());
    let progress = service.await.unwrap().expect("the service stops cleanly");
    assert_eq!(progress[0].rows, 600);
    let rows = table_offsets(dir.path()).await;
    assert_exactly_once(&rows, &targets, &BTreeSet::new());
}

/// LIST requests per commit on the commit path: the writer's check for other writers' commits
/// and delta-rs' two snapshot updates around its commit (one of them the conflict check).
const LISTINGS_PER_COMMIT: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_commits_list_only_the_log_since_the_last_checkpoint() {
    // The folder lives as long as `_dir`.
    let Setup {
        kafka,
        dir: _dir,
        faults,
        mut config,
    } = setup("listings", Shape::Tweets, 2, limits(10_000, 100));
    // As in the service: checkpoints are written off the commit path (here by the test, every
    // fourth round, as the maintenance thread would).
    config.delta.checkpoint_interval = 1_000_000;
    let location = sluice::table::delta::table_location(&config.storage.root, "enriched_posts");
    let mut writer = Writer::start(&config).await;
    let warm = publish(&kafka.brokers(), &[Shape::Tweets], 100, 6, 0).await;
    writer.wait_committed(&warm.last_offsets).await;
    let at_start = writer.table.progress.borrow().commits;
    faults.log_listings.lock().unwrap().clear();
    for round in 0..12 {
        let report = publish(&kafka.brokers(), &[Shape::Tweets], 100, 10 + round, 0).await;
        writer.wait_committed(&report.last_offsets).await;
        if round % 4 == 3 {
            faults
                .recording
                .store(false, std::sync::atomic::Ordering::SeqCst);
            sluice::table::maintain::checkpoint(&location, Default::default())
                .await
                .unwrap();
            faults
                .recording
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let commits = (writer.table.progress.borrow().commits - at_start) as usize;
    let listings = faults.log_listings.lock().unwrap().clone();
    writer.stop().await;

    assert!(commits >= 12, "each round committed: {commits}");
    let checkpoints: BTreeSet<i64> = listings.iter().filter_map(|l| l.checkpoint).collect();
    assert!(checkpoints.len() >= 2, "{listings:?}");
    // Plus one when the writer's snapshot first meets a new checkpoint.
    assert!(
        listings.len() <= LISTINGS_PER_COMMIT * commits + checkpoints.len(),
        "{commits} commits listed the log {} times: {listings:?}",
        listings.len()
    );
    // Each listing starts at the checkpoint the writer's snapshot last read (kernel
    // snapshots pick up a newer checkpoint at their next update): never the table's history.
    let mut since_checkpoint = BTreeMap::new();
    for listing in &listings {
        let from = listing
            .from
            .unwrap_or_else(|| panic!("a commit listed the whole log: {listings:?}"));
        let previous = checkpoints
            .range(..listing.checkpoint.unwrap_or(0))
            .next_back()
            .copied()
            .unwrap_or(0);
        assert!(
            from >= previous,
            "a listing reached behind the checkpoint before the last: {listing:?} in {listings:?}"
        );
        *since_checkpoint.entry(listing.checkpoint).or_insert(0usize) += 1;
    }
    assert!(since_checkpoint.len() >= 2, "{since_checkpoint:?}");
}
