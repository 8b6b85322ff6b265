//! Compaction: results never change, one compactor at a time, and appends keep landing
//! exactly once while it runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
use sluice::query::sql::format::logictest;
use sluice::query::sql::{Session, TimeTravel};
use sluice::table::compact::{CompactOptions, CompactOutcome, CompactedPartition, compact};
use sluice::table::delta::{open_table, table_location};
use sluice::table::lease::{self, Acquired};
use sluice::tools::generator::Shape;

use common::faulty::{Faults, faulty_root};
use common::*;

fn main_table(root: &Path) -> String {
    table_location(&root.to_string_lossy(), "enriched_posts")
}

async fn session(root: &Path) -> Session {
    let cfg = config("127.0.0.1:1", root, &Shape::ALL, limits(1000, 1000));
    Session::open(&cfg, &TimeTravel::default()).await.unwrap()
}

/// The count `sql` answers in `sluice sql` over the tables under `root`.
async fn count(root: &Path, sql: &str) -> Result<i64, sluice::query::sql::SqlError> {
    session(root)
        .await
        .run(sql)
        .await
        .map(|r| scalar_i64(&r[0].batches))
}

/// Counts the posts of `version`, reading the rows themselves (a bare count(*) is answered
/// from statistics).
fn rows_of_version(version: i64) -> String {
    format!(
        "SELECT count(*) FROM version_as_of('enriched_posts', {version}) WHERE length(text) > 0"
    )
}

/// Vacuums with the default retention (a week); returns how many files it deleted.
async fn vacuum_a_week(location: &str) -> usize {
    sluice::table::maintain::vacuum(
        location,
        Default::default(),
        sluice::table::maintain::DEFAULT_VACUUM_RETENTION,
        false,
        false,
    )
    .await
    .unwrap()
    .files
}

/// Every query of `sql/` with its result as text.
async fn library(root: &Path) -> BTreeMap<String, String> {
    let session = session(root).await;
    let mut results = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join("sql")).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let sql = std::fs::read_to_string(&file).unwrap();
        let out = session.run(&sql).await.unwrap();
        let last = out.last().unwrap();
        results.insert(
            file.file_name().unwrap().to_string_lossy().into_owned(),
            logictest(&last.schema, &last.batches).unwrap(),
        );
    }
    results
}

async fn files_and_bytes(location: &str) -> (usize, u64) {
    let table = open_table(location, Default::default()).await.unwrap();
    let parts = sluice::table::compact::partitions(&table, u64::MAX).unwrap();
    (
        parts.iter().map(|p| p.files).sum(),
        parts.iter().map(|p| p.bytes).sum(),
    )
}

/// How the live files store each column: its codecs, and whether any chunk is dictionary
/// encoded.
async fn storage_of_columns(location: &str) -> BTreeMap<String, (BTreeSet<String>, bool)> {
    let table = open_table(location, Default::default()).await.unwrap();
    let mut columns: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
    for uri in table.get_file_uris().unwrap() {
        let path = uri.strip_prefix("file://").unwrap_or(&uri).to_string();
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        for group in reader.metadata().row_groups() {
            for chunk in group.columns() {
                let entry = columns.entry(chunk.column_path().string()).or_default();
                // The level is not recorded in the file, only the codec.
                let codec = format!("{:?}", chunk.compression());
                entry.0.insert(codec.split('(').next().unwrap().to_string());
                entry.1 |= chunk.dictionary_page_offset().is_some();
            }
        }
    }
    columns
}

/// Vectors are stored plain (no codec, no dictionary); every other column zstd.
fn assert_vectors_plain_and_the_rest_zstd(columns: &BTreeMap<String, (BTreeSet<String>, bool)>) {
    let (codecs, dictionary) = &columns["embedding.list.element"];
    assert_eq!(codecs, &BTreeSet::from(["UNCOMPRESSED".to_string()]));
    assert!(!dictionary, "embedding values are not dictionary encoded");
    for (column, (codecs, _)) in columns {
        if column != "embedding.list.element" {
            assert_eq!(codecs, &BTreeSet::from(["ZSTD".to_string()]), "{column}");
        }
    }
    assert!(columns["text"].1, "text keeps its dictionary");
}

fn options(owner: &str) -> CompactOptions {
    CompactOptions {
        owner: owner.to_string(),
        ..CompactOptions::default()
    }
}

fn compacted(outcome: CompactOutcome) -> Vec<CompactedPartition> {
    match outcome {
        CompactOutcome::Compacted(parts) => parts,
        other => panic!("expected a compaction, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_changes_no_query_result_and_leaves_one_file_per_day() {
    let root = tokio::task::spawn_blocking(|| build_fixture_blocking("compact-fixture"))
        .await
        .unwrap();
    let location = main_table(&root);
    let before = library(&root).await;
    let (files_before, bytes_before) = files_and_bytes(&location).await;
    let version_before = session(&root).await.tables()[0].version;
    assert_vectors_plain_and_the_rest_zstd(&storage_of_columns(&location).await);

    let parts = compacted(
        compact(&location, Default::default(), &options("test"))
            .await
            .unwrap(),
    );
    let (files_after, bytes_after) = files_and_bytes(&location).await;
    println!(
        "compaction: {files_before} files ({bytes_before} bytes) -> {files_after} files ({bytes_after} bytes)"
    );
    // The fixture spans three days; a day the apply pass already left in one file is not
    // rewritten again.
    assert_eq!(files_after, 3, "one file per day partition");
    assert!(!parts.is_empty() && parts.len() <= 3);
    assert_eq!(rewrites_change_no_data(&location), parts.len());
    assert!(files_after < files_before);
    assert_eq!(
        parts
            .iter()
            .map(|p| p.files_removed as usize)
            .sum::<usize>()
            + files_after,
        files_before + parts.len()
    );
    assert_eq!(
        library(&root).await,
        before,
        "every sql/ result is unchanged"
    );
    // The rewritten files are stored as the writer stores them.
    assert_vectors_plain_and_the_rest_zstd(&storage_of_columns(&location).await);
    // Readers start from a checkpoint at the compacted version, not from the rewrite's log.
    let table = open_table(&location, Default::default()).await.unwrap();
    assert_eq!(
        sluice::table::maintain::last_checkpoint(&table).await,
        table.version().map(|v| v as i64)
    );

    // The state before compaction is still readable (nothing vacuumed yet) and equal.
    let session = session(&root).await;
    let old = format!(
        "SELECT count(*), sum(like_count), count(DISTINCT post_id) FROM version_as_of('enriched_posts', {version_before})"
    );
    let new = "SELECT count(*), sum(like_count), count(DISTINCT post_id) FROM enriched_posts";
    let text = |r: Vec<sluice::query::sql::StatementResult>| {
        logictest(&r[0].schema, &r[0].batches).unwrap()
    };
    assert_eq!(
        text(session.run(&old).await.unwrap()),
        text(session.run(new).await.unwrap())
    );
    // A second run finds nothing to do.
    assert!(
        compacted(
            compact(&location, Default::default(), &options("test"))
                .await
                .unwrap()
        )
        .is_empty()
    );
}

/// A table of `count` Mastodon posts written in many small commits.
async fn fragmented_table(dir: &Path, count: u64) -> BTreeMap<(String, i32), i64> {
    let kafka = Kafka::new(&["posts.mastodon"], 2);
    let cfg = config(&kafka.brokers(), dir, &[Shape::Mastodon], limits(40, 1000));
    let report = publish(&kafka.brokers(), &[Shape::Mastodon], count, 3, 0).await;
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&report.last_offsets).await;
    writer.stop().await;
    report.last_offsets
}

/// A fragmented table of 400 posts in a folder of its own, with what it held before a test
/// compacts it.
struct Fragmented {
    dir: tempfile::TempDir,
    /// Last offset per partition the producer sent.
    last: BTreeMap<(String, i32), i64>,
    location: String,
    rows_before: Vec<(String, i32, i64)>,
}

impl Fragmented {
    async fn new() -> Fragmented {
        let dir = tempfile::tempdir().unwrap();
        let last = fragmented_table(dir.path(), 400).await;
        let location = main_table(dir.path());
        let rows_before = table_offsets(dir.path()).await;
        Fragmented {
            dir,
            last,
            location,
            rows_before,
        }
    }
}

/// `sluice compact --table enriched_posts --config <config>`.
fn sluice_compact(config: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["compact", "--table", "enriched_posts", "--config"])
        .arg(config);
    command
}

/// The table under `root` holds the same rows as before, every offset up to `last` once, in
/// fewer files than `files_before`.
async fn assert_compacted_unchanged(
    root: &Path,
    rows_before: &[(String, i32, i64)],
    last: &BTreeMap<(String, i32), i64>,
    files_before: usize,
) {
    let rows_after = table_offsets(root).await;
    assert_eq!(rows_after, rows_before, "rows unchanged");
    assert_exactly_once(&rows_after, last, &BTreeSet::new());
    assert!(files_and_bytes(&main_table(root)).await.0 < files_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_lease_turns_the_compact_command_away_with_its_own_exit_code() {
    let Fragmented {
        dir,
        last,
        location,
        rows_before,
    } = Fragmented::new().await;
    let (files_before, _) = files_and_bytes(&location).await;

    // A scheduled job holds the lease: the CLI says so with its own exit code, and changes
    // nothing.
    let store = open_table(&location, Default::default())
        .await
        .unwrap()
        .object_store();
    let Acquired::Held(job) = lease::acquire(
        store,
        "cron-job-on-host-b",
        Duration::from_secs(300),
        chrono::Utc::now(),
    )
    .await
    .unwrap() else {
        panic!("the lease is free")
    };
    let config = write_lake_config(dir.path());
    let out = sluice_compact(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("lease held by cron-job-on-host-b"),
        "{stdout}"
    );
    assert_eq!(files_and_bytes(&location).await.0, files_before);
    job.release().await.unwrap();

    // Released: the same command compacts.
    let out = sluice_compact(&config).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_compacted_unchanged(dir.path(), &rows_before, &last, files_before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compact_command_z_orders_a_table_bin_packs_its_dead_letters_and_never_leaves_a_lease()
{
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::new(&["posts.mastodon"], 2);
    let cfg = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(40, 1000),
    );
    // Every 10th message hostile: the dead-letter table gets small files too.
    let report = publish(&kafka.brokers(), &[Shape::Mastodon], 400, 3, 10).await;
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&report.last_offsets).await;
    writer.stop().await;
    let dead_letters = table_location(&dir.path().to_string_lossy(), "enriched_posts_dead_letters");
    let (letters_before, _) = files_and_bytes(&dead_letters).await;
    assert!(letters_before >= 2, "{letters_before}");
    let config = write_lake_config(dir.path());

    // A Z-order column the table lacks fails the run, and leaves no lease held behind it.
    let failed = sluice_compact(&config)
        .args(["--zorder", "no_such_column"])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1));

    let out = sluice_compact(&config)
        .args(["--zorder", "category,language"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("lease held"), "{stdout}");
    assert!(files_and_bytes(&dead_letters).await.0 < letters_before);
    assert!(rewrites_change_no_data(&dead_letters) >= 1);
    assert_eq!(
        table_offsets(dir.path()).await.len()
            + offsets_in_table(dir.path(), "enriched_posts_dead_letters")
                .await
                .len(),
        400
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compactor_started_while_another_rewrites_is_turned_away() {
    let Fragmented {
        dir,
        last,
        location,
        rows_before,
    } = Fragmented::new().await;
    let (files_before, _) = files_and_bytes(&location).await;

    // Compactor A reads the table through a store that holds its reads of data files until
    // compactor B has run: the two runs overlap for certain, A in the middle of a rewrite.
    let (root, faults) = faulty_root("overlap", dir.path(), Faults::new(false));
    faults.data_reads.send_replace(false);
    let slow = main_table(Path::new(&root));
    let a = tokio::spawn(async move { compact(&slow, Default::default(), &options("a")).await });
    tokio::time::timeout(
        CATCH_UP,
        faults.data_reads_held.subscribe().wait_for(|n| *n > 0),
    )
    .await
    .expect("compactor A starts rewriting")
    .unwrap();

    match compact(&location, Default::default(), &options("b")).await {
        Ok(CompactOutcome::Busy { owner, .. }) => assert_eq!(owner, "a"),
        other => panic!("compactor B must find the lease held by A: {other:?}"),
    }
    assert_eq!(
        files_and_bytes(&location).await.0,
        files_before,
        "B changed nothing"
    );

    faults.data_reads.send_replace(true);
    let rewritten = compacted(a.await.unwrap().unwrap());
    assert!(!rewritten.is_empty());
    assert_compacted_unchanged(dir.path(), &rows_before, &last, files_before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn appends_and_compaction_interleave_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().to_path_buf();
    let kafka = Kafka::new(&["posts.mastodon", "posts.tweets"], 3);
    let shapes = [Shape::Mastodon, Shape::Tweets];
    let cfg = config(&kafka.brokers(), &root, &shapes, limits(60, 1000));
    let mut writer = Writer::start(&cfg).await;
    let location = main_table(&root);

    // The compactor runs after every commit of the writer, while the writer goes on.
    let compactor = {
        let (mut commits, location) = (writer.table.progress.clone(), location.clone());
        tokio::spawn(async move {
            let mut runs = Vec::new();
            // Ends when the writer stops.
            while commits.changed().await.is_ok() {
                let outcome = compact(&location, Default::default(), &options("background"))
                    .await
                    .expect("compaction beside the writer succeeds");
                runs.push(compacted(outcome).len());
            }
            runs
        })
    };
    let mut reports = Vec::new();
    for round in 0..8 {
        let report = publish(&kafka.brokers(), &shapes, 300, 100 + round, 0).await;
        writer.wait_committed(&report.last_offsets).await;
        reports.push(report);
    }
    let last = latest_offsets(&reports.iter().collect::<Vec<_>>());
    writer.stop().await;
    let runs = compactor.await.unwrap();
    let rewrites: usize = runs.iter().sum();
    assert!(
        rewrites > 0,
        "the compactor rewrote partitions while the writer ran: {runs:?}"
    );

    let rows = table_offsets(&root).await;
    assert_exactly_once(&rows, &last, &BTreeSet::new());
    let (files_before, _) = files_and_bytes(&location).await;
    compacted(
        compact(&location, Default::default(), &options("final"))
            .await
            .unwrap(),
    );
    let (files_after, _) = files_and_bytes(&location).await;
    assert!(files_after <= files_before);
    assert_eq!(table_offsets(&root).await, rows);
    let table = open_table(&location, Default::default()).await.unwrap();
    let days = sluice::table::compact::partitions(&table, u64::MAX)
        .unwrap()
        .len();
    assert_eq!(files_after, days, "one file per day after the final run");
}

#[tokio::test(flavor = "multi_thread")]
async fn vacuum_keeps_time_travel_within_retention_and_inspect_reports_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let last = fragmented_table(dir.path(), 300).await;
    let location = main_table(dir.path());
    let before_compaction = session(dir.path()).await.tables()[0].version;
    compacted(
        compact(&location, Default::default(), &options("test"))
            .await
            .unwrap(),
    );
    let old = rows_of_version(before_compaction);
    let count = async |sql: &str| count(dir.path(), sql).await;

    // The default retention keeps every file a week-old reader could need.
    assert_eq!(vacuum_a_week(&location).await, 0);
    assert_eq!(count(&old).await.unwrap(), 300);
    // Shorter only when asked for explicitly; then the old state is gone.
    let refused = sluice::table::maintain::vacuum(
        &location,
        Default::default(),
        Duration::ZERO,
        false,
        false,
    )
    .await;
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("--allow-short-retention")
    );
    let removed =
        sluice::table::maintain::vacuum(&location, Default::default(), Duration::ZERO, true, false)
            .await
            .unwrap();
    assert!(removed.files > 0);
    assert_eq!(
        count("SELECT count(*) FROM enriched_posts").await.unwrap(),
        300
    );
    let Err(gone) = count(&old).await else {
        panic!("files of the old version were vacuumed")
    };
    let gone = gone.to_string();
    assert!(gone.contains("not found"), "{gone}");

    let checkpoint = sluice::table::maintain::checkpoint(&location, Default::default())
        .await
        .unwrap();
    let inspection = sluice::table::maintain::inspect(
        "enriched_posts",
        &location,
        Default::default(),
        "sluice-test",
    )
    .await
    .unwrap();
    assert_eq!(inspection.last_checkpoint, Some(checkpoint.version));
    assert_eq!(
        inspection.partitions.iter().map(|p| p.rows).sum::<u64>(),
        300
    );
    assert!(inspection.lease.as_ref().is_some_and(|l| l.released));
    let positions: BTreeMap<(String, i32), i64> = inspection
        .positions
        .iter()
        .map(|(t, p, v)| ((t.clone(), *p), v.expect("a position per partition")))
        .collect();
    assert_eq!(positions, last);
    let text = inspection.render();
    assert!(text.contains("posts.mastodon[0]"), "{text}");
}

/// Data files under the table folder `dir`, referenced or not (not the log's checkpoints).
fn parquet_paths(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with('_') {
            continue;
        }
        if path.is_dir() {
            found.extend(parquet_paths(&path));
        } else if path.extension().is_some_and(|e| e == "parquet") {
            found.insert(path);
        }
    }
    found
}

fn written_days_ago(file: &Path, days: u64) {
    let then = std::time::SystemTime::now() - Duration::from_secs(days * 24 * 3600);
    File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(then)
        .unwrap();
}

/// Sub-second tables keep tombstones for minutes so they open fast; vacuum must still keep a
/// replaced file for its whole retention (time travel, long readers) after its tombstone left
/// the checkpoint, then delete it, and it deletes what a crashed writer uploaded but never
/// committed once that is as old.
#[tokio::test(flavor = "multi_thread")]
async fn vacuum_keeps_replaced_files_for_the_retention_after_their_tombstones_expire() {
    let dir = tempfile::tempdir().unwrap();
    fragmented_table(dir.path(), 300).await;
    let location = main_table(dir.path());
    let table_dir = dir.path().join("enriched_posts");
    // The configuration now keeps tombstones for no time at all: opening the table for writing
    // brings its property in line.
    let schema =
        sluice::contract::schema::TableSchema::load(&repo().join("schemas/enriched_posts.toml"))
            .unwrap();
    open_sink(dir.path(), schema, Duration::ZERO).await.unwrap();
    let table = open_table(&location, Default::default()).await.unwrap();
    {
        use deltalake::table::config::TablePropertiesExt;
        let properties = table.snapshot().unwrap().table_config();
        assert_eq!(properties.deleted_file_retention_duration(), Duration::ZERO);
        assert_eq!(properties.checkpoint_interval().get(), 5);
    }
    let before_compaction = table.version().unwrap();
    let written = parquet_paths(&table_dir);

    compacted(
        compact(&location, Default::default(), &options("test"))
            .await
            .unwrap(),
    );
    sluice::table::maintain::checkpoint(&location, Default::default())
        .await
        .unwrap();
    let table = open_table(&location, Default::default()).await.unwrap();
    let live: BTreeSet<PathBuf> = parquet_paths(&table_dir)
        .into_iter()
        .filter(|p| {
            table
                .get_file_uris()
                .unwrap()
                .any(|uri| uri.ends_with(p.file_name().unwrap().to_str().unwrap()))
        })
        .collect();
    let replaced: BTreeSet<PathBuf> = written.difference(&live).cloned().collect();
    assert!(replaced.len() > 10, "compaction replaced the small files");
    // A crashed writer's uploads, one from last week and one from a moment ago.
    let day = live.iter().next().unwrap().parent().unwrap();
    let (stale, fresh) = (
        day.join("part-stale-orphan.parquet"),
        day.join("part-fresh-orphan.parquet"),
    );
    std::fs::copy(live.iter().next().unwrap(), &stale).unwrap();
    std::fs::copy(live.iter().next().unwrap(), &fresh).unwrap();
    written_days_ago(&stale, 8);

    let old_rows = rows_of_version(before_compaction as i64);
    let rows = async |sql: &str| count(dir.path(), sql).await;
    let vacuum = async || vacuum_a_week(&location).await;

    // The replaced files were written moments ago: kept, and the old version reads in full.
    assert_eq!(vacuum().await, 1, "only last week's orphan goes");
    assert!(!stale.exists() && fresh.exists());
    assert!(replaced.iter().all(|p| p.exists()));
    assert_eq!(rows(&old_rows).await.unwrap(), 300);

    // A week on, they go too; the table itself is whole.
    for file in &replaced {
        written_days_ago(file, 8);
    }
    assert_eq!(vacuum().await, replaced.len());
    assert!(replaced.iter().all(|p| !p.exists()));
    assert!(live.iter().all(|p| p.exists()) && fresh.exists());
    assert_eq!(
        rows("SELECT count(*) FROM enriched_posts WHERE length(text) > 0")
            .await
            .unwrap(),
        300
    );
}

/// Old checkpoints are thinned (a sub-second table writes one every ~10 s, kept with the log
/// for 30 days): every version the log holds must stay readable, from the checkpoint below it.
#[tokio::test(flavor = "multi_thread")]
async fn thinned_checkpoints_leave_every_version_readable() {
    let dir = tempfile::tempdir().unwrap();
    fragmented_table(dir.path(), 300).await;
    let location = main_table(dir.path());
    let log = dir.path().join("enriched_posts/_delta_log");
    let latest = open_table(&location, Default::default())
        .await
        .unwrap()
        .version()
        .unwrap() as i64;
    assert!(latest >= 8, "300 posts in commits of 40: {latest}");
    // A checkpoint at every version, all written two hours ago.
    for version in 1..=latest {
        let table = deltalake::DeltaTableBuilder::from_url(
            sluice::table::delta::table_url(&location).unwrap(),
        )
        .unwrap()
        .with_version(version as u64)
        .load()
        .await
        .unwrap();
        sluice::table::maintain::write_checkpoint(&table, &location)
            .await
            .unwrap();
    }
    let checkpoints = || {
        let mut versions: Vec<i64> = std::fs::read_dir(&log)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".checkpoint.parquet")?.parse().ok()
            })
            .collect();
        versions.sort();
        versions
    };
    for version in checkpoints() {
        let file = log.join(format!("{version:020}.checkpoint.parquet"));
        File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
    }
    let rows = async |version: i64| count(dir.path(), &rows_of_version(version)).await;
    let mut before = Vec::new();
    for version in 1..=latest {
        before.push(rows(version).await.unwrap());
    }

    let table = open_table(&location, Default::default()).await.unwrap();
    let thinned = sluice::table::maintain::thin_checkpoints(
        &table,
        &location,
        chrono::Utc::now() - chrono::Duration::hours(1),
        3,
    )
    .await
    .unwrap();
    // The oldest, one per three versions after it, and the newest.
    let mut kept: Vec<i64> = (1..=latest).step_by(3).collect();
    if kept.last() != Some(&latest) {
        kept.push(latest);
    }
    assert_eq!(checkpoints(), kept);
    assert_eq!(thinned, latest as usize - kept.len());

    // Log cleanup then drops the commit before the oldest checkpoint: each later version reads
    // from the checkpoint at or below it plus the commits after that.
    std::fs::remove_file(log.join(format!("{:020}.json", 0))).unwrap();
    let mut after = Vec::new();
    for version in 1..=latest {
        after.push(rows(version).await.unwrap());
    }
    assert_eq!(after, before);
    assert_eq!(*after.last().unwrap(), 300);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_compacts_in_the_background_while_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::new(&["posts.mastodon"], 2);
    let config = service_config(
        dir.path(),
        &kafka,
        "[delta]\ncheckpoint_interval = 5\n[maintenance]\ninterval_s = 1\nhot_small_files = 2\n",
    );
    let report = publish(&kafka.brokers(), &[Shape::Mastodon], 600, 9, 0).await;
    let root = dir.path().join("lake");
    let location = main_table(&root);
    let compacted_and_complete = async || {
        let Ok(table) = open_table(&location, Default::default()).await else {
            return false;
        };
        let parts = sluice::table::compact::partitions(&table, u64::MAX).unwrap();
        let rows: u64 = parts.iter().map(|p| p.rows).sum();
        let rewritten = table.version().unwrap_or(0) > 0 && parts.iter().all(|p| p.files == 1);
        // The writer leaves checkpoints to the maintenance thread.
        let checkpointed = sluice::table::maintain::last_checkpoint(&table)
            .await
            .is_some();
        rows == 600 && rewritten && checkpointed
    };
    assert!(
        run_until(&config, compacted_and_complete).await,
        "the service wrote every message, compacted each day to one file and checkpointed"
    );
    assert!(rewrites_change_no_data(&main_table(&root)) >= 1);
    assert_exactly_once(
        &table_offsets(&root).await,
        &report.last_offsets,
        &BTreeSet::new(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_checkpoints_as_commits_reach_the_interval_not_at_its_next_pass() {
    // Compaction passes an hour apart: the checkpoints cannot wait for one. Every reader that
    // opens the table replays the commits after the last checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::new(&["posts.mastodon"], 2);
    let config = service_config(
        dir.path(),
        &kafka,
        "[delta]\ncheckpoint_interval = 5\nlog_retention_h = 48\n[maintenance]\ninterval_s = 3600\n",
    );
    let report = publish(&kafka.brokers(), &[Shape::Mastodon], 600, 9, 0).await;
    let root = dir.path().join("lake");
    let location = main_table(&root);
    let rows = async || {
        let Ok(table) = open_table(&location, Default::default()).await else {
            return 0;
        };
        let parts = sluice::table::compact::partitions(&table, u64::MAX).unwrap();
        parts.iter().map(|p| p.rows).sum::<u64>()
    };
    assert!(
        run_until(&config, async || rows().await == 600).await,
        "the service wrote every message"
    );

    // The service has stopped: its last commits are within one interval of a checkpoint.
    let table = open_table(&location, Default::default()).await.unwrap();
    let version = table.version().unwrap() as i64;
    let checkpoint = sluice::table::maintain::last_checkpoint(&table).await;
    assert!(version >= 15, "600 posts in batches of 40: {version}");
    assert!(
        checkpoint.is_some_and(|c| c >= 5 && version - c < 5),
        "version {version}, last checkpoint {checkpoint:?}"
    );
    assert_eq!(rewrites_change_no_data(&location), 0, "no compaction ran");
    {
        use deltalake::table::config::TablePropertiesExt;
        let properties = table.snapshot().unwrap().table_config();
        assert_eq!(
            properties.log_retention_duration(),
            Duration::from_secs(48 * 3600)
        );
    }
    assert_exactly_once(
        &table_offsets(&root).await,
        &report.last_offsets,
        &BTreeSet::new(),
    );
}

/// A service config for `sluice run` in `dir`: Mastodon posts from `kafka` in batches of 40
/// rows, into a lake under `dir`, with `sections` (the `[delta]` and `[maintenance]` a test
/// is about) added.
fn service_config(dir: &Path, kafka: &Kafka, sections: &str) -> PathBuf {
    let repo = repo();
    let repo = repo.display();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{}"
group_id = "maintained"
[kafka.properties]
"session.timeout.ms" = "6000"
[storage]
root = "lake"
[batch]
max_rows = 40
max_age_ms = 1000
{sections}
[[tables]]
schema = "{repo}/schemas/enriched_posts.toml"
sources = [{{ topic = "posts.mastodon", mapping = "{repo}/schemas/mappings/mastodon.toml" }}]
"#,
            kafka.brokers()
        ),
    )
    .unwrap();
    config
}

/// `count` Mastodon posts of one calendar day (2026-11-29, whatever the hour the test runs: a
/// split over two days made each partition's size depend on the clock), in commits of 1,000;
/// 48 Kafka partitions keep each under the mock cluster's retention.
async fn one_day_of_posts(dir: &Path, count: u64) -> BTreeMap<(String, i32), i64> {
    let kafka = Kafka::new(&["posts.mastodon"], 48);
    let cfg = config(
        &kafka.brokers(),
        dir,
        &[Shape::Mastodon],
        limits(1000, 1000),
    );
    let mut writer = Writer::start(&cfg).await;
    let report = sluice::tools::produce::produce(&sluice::tools::produce::ProduceOptions {
        connection: sluice::ingest::kafka::Connection::plain(&kafka.brokers()),
        shapes: vec![(Shape::Mastodon, "posts.mastodon".to_string())],
        count,
        rate: 0,
        seed: 5,
        embedding_dim: 16,
        bad_every: 0,
        operations_every: 0,
        spread_days: 1,
        // The last millisecond of 2026-11-29 UTC: posts are created within the day before it.
        clock_ms: Some(1_795_996_799_999),
        progress: false,
        wire: None,
    })
    .await
    .unwrap();
    writer.wait_committed(&report.last_offsets).await;
    writer.stop().await;
    report.last_offsets
}

#[tokio::test(flavor = "multi_thread")]
async fn z_order_spills_beyond_its_memory_budget_and_keeps_every_row() {
    // The same 120,000 posts (~61 MB of Arrow) twice: with the default budget the Z-order sort
    // stays in memory; with the smallest it spills to disk and merges its spills within the
    // budget, and the table still holds every row once.
    for (memory_limit, spills) in [
        (sluice::table::compact::DEFAULT_MEMORY_LIMIT, false),
        (sluice::table::compact::MIN_MEMORY_LIMIT, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let last = one_day_of_posts(dir.path(), 120_000).await;
        let location = main_table(dir.path());
        let before = table_offsets(dir.path()).await;
        let options = CompactOptions {
            zorder: vec!["category".into(), "language".into()],
            memory_limit,
            ..options("zorder")
        };
        let parts = compacted(
            compact(&location, Default::default(), &options)
                .await
                .unwrap(),
        );
        assert!(!parts.is_empty());
        // With the smallest budget the day's sort spills.
        assert_eq!(
            parts.iter().any(|p| p.spilled),
            spills,
            "budget {memory_limit}: {parts:?}"
        );
        assert_eq!(table_offsets(dir.path()).await, before);
        assert_exactly_once(&before, &last, &BTreeSet::new());
        let table = open_table(&location, Default::default()).await.unwrap();
        let per_day = sluice::table::compact::partitions(&table, u64::MAX).unwrap();
        assert!(per_day.iter().all(|p| p.files == 1), "{per_day:?}");
        assert!(rewrites_change_no_data(&location) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_rewrites_from_one_snapshot_land_once_whatever_the_lease_said() {
    let Fragmented {
        dir,
        last,
        location,
        rows_before,
    } = Fragmented::new().await;
    let table = open_table(&location, Default::default()).await.unwrap();
    let partition = sluice::table::compact::partitions(&table, u64::MAX)
        .unwrap()
        .into_iter()
        .max_by_key(|p| p.files)
        .unwrap()
        .partition;
    let properties = deltalake::parquet::file::properties::WriterProperties::default();

    // Two compactors read the same version: one whose lease ran out while it rewrote (a long
    // rewrite, a slow store, a paused process) and the one that took the lease over.
    let rewrite = |table| {
        let (location, partition, properties) =
            (location.clone(), partition.clone(), properties.clone());
        async move {
            sluice::table::compact::rewrite_partition(
                &table,
                &location,
                &partition,
                1 << 30,
                false,
                properties,
            )
            .await
            .unwrap()
            .expect("the partition has small files")
        }
    };
    let stale = rewrite(table.clone()).await;
    let current = rewrite(table.clone()).await;
    assert!(stale.files_in() >= 2);
    let (_, landed) = sluice::table::compact::commit_rewrite(current)
        .await
        .unwrap();
    assert_eq!(landed.files_added, 1);
    let refused = sluice::table::compact::commit_rewrite(stale).await;
    assert!(
        matches!(
            refused,
            Err(sluice::table::compact::CompactError::Concurrent { .. })
        ),
        "{:?}",
        refused.map(|(_, p)| p)
    );

    let rows_after = table_offsets(dir.path()).await;
    assert_eq!(rows_after, rows_before, "every row once");
    assert_exactly_once(&rows_after, &last, &BTreeSet::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compactor_killed_between_its_rewrite_and_its_commit_changes_nothing() {
    let Fragmented {
        dir,
        last,
        location,
        rows_before,
    } = Fragmented::new().await;
    let (files_before, bytes_before) = files_and_bytes(&location).await;
    let version_before = open_table(&location, Default::default())
        .await
        .unwrap()
        .version();

    let config = write_lake_config(dir.path());
    let killed = sluice_compact(&config)
        .env("SLUICE_FAILPOINT", "after_compaction_rewrite")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&killed.stderr);
    assert!(!killed.status.success(), "{log}");
    assert!(log.contains("after_compaction_rewrite"), "{log}");

    // Its files were uploaded but no version references them: readers see the table as it was.
    let table = open_table(&location, Default::default()).await.unwrap();
    assert_eq!(table.version(), version_before);
    assert_eq!(
        files_and_bytes(&location).await,
        (files_before, bytes_before)
    );
    let on_disk = walk_parquet(&dir.path().join("enriched_posts"));
    assert!(
        on_disk > files_before,
        "the rewrite uploaded its files ({on_disk} on disk)"
    );
    let rows_after = table_offsets(dir.path()).await;
    assert_eq!(rows_after, rows_before);
    assert_exactly_once(&rows_after, &last, &BTreeSet::new());
}

/// Parquet files under `dir`, referenced or not.
/// Checks every commit of the table at `location` that removed files, other than applied
/// upstream deletes (`DELETE`): each is a rewrite (`OPTIMIZE`) whose adds and removes all say `dataChange: false`, so streaming readers and
/// change feeds skip it. Returns how many there are.
fn rewrites_change_no_data(location: &str) -> usize {
    let mut commits: Vec<PathBuf> = std::fs::read_dir(Path::new(location).join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let mut rewrites = 0;
    for commit in commits {
        let actions: Vec<serde_json::Value> = std::fs::read_to_string(&commit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if !actions.iter().any(|a| a.get("remove").is_some()) {
            continue;
        }
        let operation = actions
            .iter()
            .find_map(|a| a.get("commitInfo"))
            .and_then(|c| c["operation"].as_str());
        if operation == Some("DELETE") {
            // The fixture's pass applying upstream deletes: it changes data, by design.
            continue;
        }
        rewrites += 1;
        assert_eq!(operation, Some("OPTIMIZE"), "{}", commit.display());
        for action in &actions {
            for kind in ["add", "remove"] {
                if let Some(file) = action.get(kind) {
                    assert_eq!(
                        file["dataChange"],
                        serde_json::Value::Bool(false),
                        "{kind} in {}",
                        commit.display()
                    );
                }
            }
        }
    }
    rewrites
}

fn walk_parquet(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                walk_parquet(&p)
            } else {
                usize::from(p.extension().is_some_and(|e| e == "parquet"))
            }
        })
        .sum()
}
