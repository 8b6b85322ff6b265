//! `sluice sql` and the query library in `sql/`: golden results on a fixture table written by
//! sluice's own writer, read-only enforcement, time travel, pruning, and the command line.
//!
//! Regenerate the golden files after an intended change:
//! `SLUICE_BLESS=1 cargo test --release --test sql`, then review the diff.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sluice::config::Config;
use sluice::query::sql::format::logictest;
use sluice::query::sql::{Session, SqlError, TimeTravel};
use sluice::tools::generator::Shape;

use common::*;

/// A table written by sluice from a fixed seed and clock (see [`common::build_fixture`]), in
/// the folder returned (with a `sluice.toml`). Built once per test run.
fn fixture() -> &'static Path {
    static FIXTURE: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE.get_or_init(|| build_fixture_blocking("sql-fixture"))
}

fn lake_config(root: &Path) -> Config {
    config("127.0.0.1:1", root, &Shape::ALL, limits(1000, 1000))
}

async fn session(root: &Path, travel: &TimeTravel) -> Session {
    Session::open(&lake_config(root), travel)
        .await
        .expect("session opens")
}

/// Runs one statement and returns its rows as sqllogictest text.
async fn rows(session: &Session, sql: &str) -> String {
    let results = session
        .run(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let last = results.last().expect("a statement");
    logictest(&last.schema, &last.batches).unwrap()
}

async fn count(session: &Session, sql: &str) -> i64 {
    let results = session.run(sql).await.unwrap();
    scalar_i64(&results[0].batches)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_library_query_matches_its_golden_result() {
    let session = session(fixture(), &TimeTravel::default()).await;
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("sql"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 11, "the library has its queries: {files:?}");
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let sql = std::fs::read_to_string(file).unwrap();
        for header in ["-- Question:", "-- Columns:", "-- Engines:"] {
            assert!(sql.contains(header), "{name}.sql has a `{header}` header");
        }
        let results = session
            .run(&sql)
            .await
            .unwrap_or_else(|e| panic!("{name}.sql fails: {e}"));
        let result = results.last().unwrap();
        assert!(result.rows() > 0, "{name}.sql returns rows on the fixture");
        let got = format!(
            "# sql/{name}.sql on the fixture table ({FIXTURE_MESSAGES} messages, seed 7).\n\
             # Regenerate: SLUICE_BLESS=1 cargo test --release --test sql\n{}",
            logictest(&result.schema, &result.batches).unwrap()
        );
        let golden = repo().join("tests/golden").join(format!("{name}.slt"));
        if bless {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} is missing; bless it", golden.display()));
        if got != want {
            failures.push(format!("{name}:\n--- want\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fixture_tells_the_stories_the_queries_look_for() {
    let session = session(fixture(), &TimeTravel::default()).await;
    // Every message is a row, a dead letter, or a delete or removed row the deletions table
    // records; the fixture's edits and deletes took some out.
    let accounted = count(
        &session,
        "SELECT (SELECT count(*) FROM enriched_posts) + (SELECT count(*) FROM enriched_posts_dead_letters) \
         + (SELECT count(*) FROM enriched_posts_deletions WHERE kafka_offset IS NOT NULL)",
    )
    .await;
    assert_eq!(accounted, FIXTURE_MESSAGES as i64);
    let one_row_per_post = count(
        &session,
        "SELECT count(*) - count(DISTINCT platform || '/' || post_id) FROM enriched_posts",
    )
    .await;
    assert_eq!(one_row_per_post, 0, "no post is there twice");
    let deletions = count(
        &session,
        "SELECT count(DISTINCT operation) FROM enriched_posts_deletions",
    )
    .await;
    assert_eq!(
        deletions, 3,
        "deletes, deleted and replaced rows are recorded"
    );
    // Every upstream's deletes, edits and redeliveries were applied, and no deleted post (even
    // one replayed after its delete) is readable.
    let platforms_with_every_operation = count(
        &session,
        "SELECT count(*) FROM (SELECT platform FROM enriched_posts_deletions \
         GROUP BY platform HAVING count(DISTINCT operation) = 3)",
    )
    .await;
    assert_eq!(platforms_with_every_operation, 3);
    let deleted_yet_readable = count(
        &session,
        "SELECT count(*) FROM enriched_posts p JOIN enriched_posts_deletions d \
         ON p.platform = d.platform AND p.post_id = d.post_id WHERE d.operation = 'delete'",
    )
    .await;
    assert_eq!(deleted_yet_readable, 0);
    // Nearest neighbours by embedding mostly share the anchor's topic.
    let nearest = std::fs::read_to_string(repo().join("sql/nearest_posts.sql")).unwrap();
    let same_topic = count(
        &session,
        &format!(
            "WITH n AS ({}) SELECT count(*) FROM n WHERE category = \
             (SELECT category FROM enriched_posts WHERE embedding IS NOT NULL ORDER BY post_id LIMIT 1)",
            nearest.trim().trim_end_matches(';')
        ),
    )
    .await;
    assert!(
        same_topic >= 8,
        "{same_topic} of 10 nearest posts share the topic"
    );
    // Surges and bots exist to be found.
    let surges = std::fs::read_to_string(repo().join("sql/toxicity_surges.sql")).unwrap();
    let surges = session.run(&surges).await.unwrap();
    assert!(
        surges[0].rows() >= 1,
        "the fixture's toxic hours are detected"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_and_filesystem_access_are_refused_and_change_nothing() {
    let session = session(fixture(), &TimeTravel::default()).await;
    let before = count(&session, "SELECT count(*) FROM enriched_posts").await;
    let refused = [
        (
            "INSERT INTO enriched_posts (post_id) VALUES ('x')",
            "Insert Into",
        ),
        ("DELETE FROM enriched_posts", "Delete"),
        ("UPDATE enriched_posts SET text = 'x'", "Update"),
        (
            "COPY enriched_posts TO '/tmp/sluice-copy.parquet'",
            "COPY TO /tmp/sluice-copy.parquet",
        ),
        (
            "CREATE EXTERNAL TABLE etc STORED AS CSV LOCATION '/etc/passwd'",
            "CreateExternalTable",
        ),
        ("DROP TABLE enriched_posts", "DropTable"),
        ("CREATE TABLE t AS SELECT 1", "CreateMemoryTable"),
        (
            "SET datafusion.runtime.temp_directory = '/tmp'",
            "SET datafusion.runtime.temp_directory",
        ),
        (
            "EXPLAIN ANALYZE INSERT INTO enriched_posts (post_id) VALUES ('x')",
            "Insert Into",
        ),
    ];
    for (sql, what) in refused {
        match session.run(sql).await {
            Err(SqlError::ReadOnly { what: got }) => {
                assert!(
                    got.contains(what),
                    "{sql}: refused as `{got}`, expected `{what}`"
                )
            }
            Err(e) => panic!("{sql}: refused, but not as read-only: {e}"),
            Ok(_) => panic!("{sql}: ran"),
        }
    }
    // A path is no table: refused, and the error lists the tables there are.
    match session.run("SELECT * FROM '/etc/passwd'").await {
        Err(refused @ SqlError::UnknownTable { .. }) => {
            let refused = refused.to_string();
            assert!(
                refused.starts_with(
                    "unknown table /etc/passwd; tables: enriched_posts, enriched_posts_dead_letters"
                ),
                "{refused}"
            );
        }
        Err(e) => panic!("files cannot be read by path, but the error was {e}"),
        Ok(_) => panic!("files cannot be read by path"),
    }
    assert!(!Path::new("/tmp/sluice-copy.parquet").exists());
    assert_eq!(
        count(&session, "SELECT count(*) FROM enriched_posts").await,
        before
    );
    // Session-only views and planner settings stay available.
    session
        .run("CREATE VIEW neg AS SELECT * FROM enriched_posts WHERE sentiment = 'negative'")
        .await
        .unwrap();
    session
        .run("SET datafusion.execution.batch_size = 1024")
        .await
        .unwrap();
    assert!(count(&session, "SELECT count(*) FROM neg").await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_misspelt_table_is_named_with_the_tables_there_are() {
    let session = session(fixture(), &TimeTravel::default()).await;
    let unknown = |sql: &'static str| {
        let session = &session;
        async move {
            match session.run(sql).await {
                Err(SqlError::UnknownTable { name, known }) => (name, known),
                Err(e) => panic!("{sql}: {e}"),
                Ok(_) => panic!("{sql}: ran"),
            }
        }
    };
    let (name, known) = unknown("SELECT count(*) FROM enriched_post").await;
    assert_eq!(name, "enriched_post");
    assert_eq!(
        known,
        "enriched_posts, enriched_posts_dead_letters, enriched_posts_deletions"
    );
    let (name, _) =
        unknown("SELECT * FROM enriched_posts p JOIN authors a ON a.author = p.author").await;
    assert_eq!(name, "authors");
    // Other mistakes keep DataFusion's own message; a CTE is not taken for a missing table.
    let other = session
        .run("WITH recent AS (SELECT post_id FROM enriched_posts) SELECT nope FROM recent")
        .await;
    match other {
        Err(SqlError::Query(e)) => assert!(e.to_string().contains("nope"), "{e}"),
        Err(e) => panic!("a missing column is reported as {e}"),
        Ok(_) => panic!("a missing column ran"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn time_travel_reads_the_table_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = Kafka::new(&["posts.mastodon"], 2);
    let cfg = config(
        &kafka.brokers(),
        dir.path(),
        &[Shape::Mastodon],
        limits(50, 1000),
    );
    let first = publish(&kafka.brokers(), &[Shape::Mastodon], 120, 1, 0).await;
    let mut writer = Writer::start(&cfg).await;
    writer.wait_committed(&first.last_offsets).await;
    let old = session(dir.path(), &TimeTravel::default()).await;
    let old_version = old.tables()[0].version;
    let old_count = count(&old, "SELECT count(*) FROM enriched_posts").await;
    assert_eq!(old_count, 120);
    let moment = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let second = publish(&kafka.brokers(), &[Shape::Mastodon], 80, 2, 0).await;
    writer
        .wait_committed(&latest_offsets(&[&first, &second]))
        .await;
    writer.stop().await;

    let now = session(dir.path(), &TimeTravel::default()).await;
    assert_eq!(
        count(&now, "SELECT count(*) FROM enriched_posts").await,
        200
    );
    let in_sql = format!("SELECT count(*) FROM version_as_of('enriched_posts', {old_version})");
    assert_eq!(count(&now, &in_sql).await, old_count);
    let at_time = format!(
        "SELECT count(*) FROM timestamp_as_of('enriched_posts', '{}')",
        moment.to_rfc3339()
    );
    assert_eq!(count(&now, &at_time).await, old_count);
    // Old and new side by side: what arrived since.
    let arrived = count(
        &now,
        &format!(
            "SELECT count(*) FROM enriched_posts AS n WHERE NOT EXISTS \
             (SELECT 1 FROM version_as_of('enriched_posts', {old_version}) AS o \
              WHERE o.kafka_partition = n.kafka_partition AND o.kafka_offset = n.kafka_offset)"
        ),
    )
    .await;
    assert_eq!(arrived, 80);

    let pinned = session(
        dir.path(),
        &TimeTravel {
            version: Some(old_version),
            ..TimeTravel::default()
        },
    )
    .await;
    assert_eq!(
        count(&pinned, "SELECT count(*) FROM enriched_posts").await,
        old_count
    );
    let as_of = session(
        dir.path(),
        &TimeTravel {
            as_of: Some(moment),
            ..TimeTravel::default()
        },
    )
    .await;
    assert_eq!(
        count(&as_of, "SELECT count(*) FROM enriched_posts").await,
        old_count
    );

    // A timestamp resolves by the commit's own timestamp (what `$history` shows and Trino
    // resolves by), not by when the storage says the commit file was written: S3 reports that to
    // the second, after the commit.
    let latest = now.tables()[0].version;
    let commit = dir
        .path()
        .join(format!("enriched_posts/_delta_log/{latest:020}.json"));
    let committed_at = std::fs::read_to_string(&commit)
        .unwrap()
        .lines()
        .find_map(|line| {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            action["commitInfo"]["timestamp"].as_i64()
        })
        .expect("the commit records its timestamp");
    std::fs::File::options()
        .write(true)
        .open(&commit)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    let committed_at = chrono::DateTime::from_timestamp_millis(committed_at).unwrap();
    let at_commit = session(
        dir.path(),
        &TimeTravel {
            as_of: Some(committed_at),
            ..TimeTravel::default()
        },
    )
    .await;
    assert_eq!(at_commit.tables()[0].version, latest);
    let before_commit = session(
        dir.path(),
        &TimeTravel {
            as_of: Some(committed_at - chrono::Duration::milliseconds(1)),
            ..TimeTravel::default()
        },
    )
    .await;
    assert!(before_commit.tables()[0].version < latest);

    let too_early = now
        .run("SELECT count(*) FROM timestamp_as_of('enriched_posts', '2001-01-01T00:00:00Z')")
        .await;
    assert!(
        matches!(too_early, Err(SqlError::TimeTravel(_))),
        "{too_early:?}"
    );
    let no_such = now
        .run("SELECT count(*) FROM version_as_of('enriched_posts', 99999)")
        .await;
    assert!(
        matches!(no_such, Err(SqlError::TimeTravel(_))),
        "{no_such:?}"
    );
    let unknown = now
        .run("SELECT count(*) FROM version_as_of('nope', 1)")
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("no table nope"), "{unknown}");
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_and_statistics_filters_skip_files_visibly_in_explain() {
    let session = session(fixture(), &TimeTravel::default()).await;
    let table = &session.tables()[0];
    let explain = async |filter: &str| {
        rows(
            &session,
            &format!("EXPLAIN SELECT count(*), avg(toxicity) FROM enriched_posts {filter}"),
        )
        .await
    };
    // Partition days named in a plan's file list (DataFusion lists up to 5 files per group).
    let days = |plan: &str| -> std::collections::BTreeSet<String> {
        plan.split("event_date=")
            .skip(1)
            .map(|rest| rest[..10].to_string())
            .collect()
    };
    let all = explain("").await;
    assert!(
        days(&all).len() > 1,
        "the full scan reads every day:\n{all}"
    );
    let day = days(&all).into_iter().next().unwrap();
    let one_day = explain(&format!("WHERE event_date = DATE '{day}'")).await;
    assert_eq!(
        days(&one_day),
        [day.clone()].into(),
        "a partition filter reads only that day's files:\n{one_day}"
    );
    // Min/max statistics in the Delta log: files whose like_count range cannot match are not
    // opened, and a filter no file can match reads nothing at all.
    let analyzed = rows(
        &session,
        "EXPLAIN ANALYZE SELECT count(*) FROM enriched_posts WHERE like_count > 4000",
    )
    .await;
    let opened: usize = analyzed
        .split("files_opened=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("files_opened is reported:\n{analyzed}"));
    assert!(
        opened > 0 && opened < table.files,
        "statistics skip files: {opened} of {} opened",
        table.files
    );
    let impossible = explain("WHERE like_count > 1000000").await;
    assert!(
        !impossible.contains("DataSourceExec"),
        "no file can match, none is read:\n{impossible}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_on_embeddings_run_once_above_the_parquet_scan() {
    let session = session(fixture(), &TimeTravel::default()).await;
    // Pushed into the Parquet reader, a filter on a list column decodes the column once for
    // the filter and again for the output; it belongs above the scan, in a FilterExec.
    let total = count(&session, "SELECT count(*) FROM enriched_posts").await;
    let with = count(
        &session,
        "SELECT count(*) FROM enriched_posts WHERE embedding IS NOT NULL",
    )
    .await;
    let counted = count(
        &session,
        "SELECT sum(CASE WHEN embedding IS NULL THEN 0 ELSE 1 END) FROM enriched_posts",
    )
    .await;
    assert!(
        0 < with && with < total,
        "{with} of {total} have embeddings"
    );
    assert_eq!(
        with, counted,
        "the filter keeps exactly the rows with an embedding"
    );

    // The reader's own row filter reports how many rows it kept (`pushdown_rows_matched`);
    // zero means no filter ran inside the Parquet reader.
    let analyzed = rows(
        &session,
        "EXPLAIN ANALYZE SELECT post_id FROM enriched_posts WHERE embedding IS NOT NULL",
    )
    .await;
    assert!(
        analyzed
            .lines()
            .any(|line| line.starts_with("Plan with Metrics FilterExec: embedding@")),
        "the embedding filter runs above the scan:\n{analyzed}"
    );
    assert!(
        analyzed.contains("pushdown_rows_matched=0,"),
        "the Parquet reader does not filter on the embedding:\n{analyzed}"
    );
    let plan = rows(
        &session,
        "EXPLAIN SELECT post_id FROM enriched_posts \
         WHERE embedding IS NOT NULL AND like_count > 4000",
    )
    .await;
    let scan = plan
        .lines()
        .find(|line| line.contains("DataSourceExec"))
        .unwrap_or_else(|| panic!("a Parquet scan:\n{plan}"));
    assert!(
        scan.contains("like_count@"),
        "plain filters still reach the scan and its statistics:\n{plan}"
    );
    // A struct field has one value per row: its filters stay in the reader.
    let plan = rows(
        &session,
        "EXPLAIN SELECT post_id FROM enriched_posts WHERE toxicity_labels['insult'] > 0.5",
    )
    .await;
    assert!(
        !plan.contains("FilterExec"),
        "struct field filters run inside the Parquet reader:\n{plan}"
    );
}

fn sluice_sql(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    // From outside the checkout, as a user runs it: nothing may depend on ./sql.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(std::env::temp_dir())
        .arg("sql")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_command_line_runs_statements_files_and_a_shell() {
    let config = fixture().join("sluice.toml");
    let config = config.to_str().unwrap();

    let one = "SELECT platform, count(*) AS posts FROM enriched_posts GROUP BY platform ORDER BY platform";
    let (ok, table, err) = sluice_sql(&["--config", config, "-c", one], None);
    assert!(ok, "{err}");
    assert!(table.contains("| platform | posts |"), "{table}");
    assert!(table.contains("| bluesky  |"), "{table}");
    let (_, csv, _) = sluice_sql(&["--config", config, "--format", "csv", "-c", one], None);
    let csv_lines: Vec<&str> = csv.lines().collect();
    assert_eq!(csv_lines[0], "platform,posts");
    assert!(csv_lines[1].starts_with("bluesky,"), "{csv}");
    let (_, ndjson, _) = sluice_sql(&["--config", config, "--format", "ndjson", "-c", one], None);
    let first: serde_json::Value = serde_json::from_str(ndjson.lines().next().unwrap()).unwrap();
    assert_eq!(first["platform"], "bluesky");
    let (_, json, _) = sluice_sql(&["--config", config, "--format", "json", "-c", one], None);
    let all: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 3);

    // Every library file runs from the command line.
    for entry in std::fs::read_dir(repo().join("sql")).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_some_and(|e| e == "sql") {
            let (ok, out, err) =
                sluice_sql(&["--config", config, "-f", file.to_str().unwrap()], None);
            assert!(ok, "{}: {err}", file.display());
            assert!(out.starts_with("+-"), "{}: {out}", file.display());
        }
    }

    // The library is built in: listed with its questions, run by name, from any folder.
    let (ok, listed, err) = sluice_sql(&["--config", config, "-c", "\\library"], None);
    assert!(ok, "{err}");
    assert!(
        listed.contains("toxicity_surges  ")
            && listed.contains("in which hours did toxicity surge above its recent level?"),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 13, "{listed}");
    let by_file = sluice_sql(
        &[
            "--config",
            config,
            "-f",
            repo().join("sql/toxicity_surges.sql").to_str().unwrap(),
        ],
        None,
    );
    let by_name = sluice_sql(&["--config", config, "--query", "toxicity_surges"], None);
    assert!(by_name.0, "{}", by_name.2);
    assert_eq!(by_name.1, by_file.1);
    let (ok, _, err) = sluice_sql(&["--config", config, "-q", "toxicity"], None);
    assert!(!ok);
    assert!(
        err.contains("no query named toxicity in the built-in library"),
        "{err}"
    );

    // The shell reads piped statements: meta commands, multi-line statements, errors that do
    // not end the session.
    let script = "\\d\n\\d enriched_posts_dead_letters\n\\run sentiment_distribution\n\\run nope\nSELECT count(*) AS n\n  FROM enriched_posts\n  WHERE platform = 'tweets';\nSELEC oops;\nSELECT 40 + 2 AS answer;\n\\q\nSELECT 'after quit';\n";
    let (ok, out, err) = sluice_sql(&["--config", config], Some(script));
    assert!(ok, "{err}");
    assert!(
        out.contains("| enriched_posts_dead_letters | dead letters of enriched_posts |"),
        "{out}"
    );
    assert!(
        out.contains("| reason "),
        "\\d describes the dead-letter columns: {out}"
    );
    assert!(out.contains("| n "), "{out}");
    assert!(out.contains("| 42     |"), "{out}");
    assert!(
        out.contains("| sentiment "),
        "\\run runs a library query: {out}"
    );
    assert!(err.contains("no query named nope"), "{err}");
    assert!(err.contains("error: "), "the typo is reported: {err}");
    assert!(!out.contains("after quit"), "{out}");

    // Refusals and bad SQL fail the command with a clear message.
    let (ok, _, err) = sluice_sql(
        &["--config", config, "-c", "DELETE FROM enriched_posts"],
        None,
    );
    assert!(!ok);
    assert!(err.contains("sluice sql is read-only: Delete"), "{err}");
    let (ok, _, err) = sluice_sql(
        &[
            "--config",
            config,
            "-c",
            "SELECT 1; SELECT nope FROM enriched_posts",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("-c, statement 2 of 2"), "{err}");
}

#[test]
fn the_command_line_pins_versions() {
    let config = fixture().join("sluice.toml");
    let config = config.to_str().unwrap();
    let count_sql = "SELECT count(*) AS n FROM enriched_posts";
    let (ok, v1, err) = sluice_sql(
        &[
            "--config",
            config,
            "--format",
            "csv",
            "--as-of-version",
            "1",
            "-c",
            count_sql,
        ],
        None,
    );
    assert!(ok, "{err}");
    let (_, named, _) = sluice_sql(
        &[
            "--config",
            config,
            "--format",
            "csv",
            "--as-of-version",
            "enriched_posts=1",
            "-c",
            count_sql,
        ],
        None,
    );
    let (_, latest, _) = sluice_sql(
        &["--config", config, "--format", "csv", "-c", count_sql],
        None,
    );
    assert_eq!(v1, named);
    let n = |csv: &str| csv.lines().nth(1).unwrap().parse::<i64>().unwrap();
    assert!(
        n(&v1) > 0 && n(&v1) < n(&latest),
        "version 1 is older: {v1} vs {latest}"
    );
    let (ok, _, err) = sluice_sql(
        &[
            "--config",
            config,
            "--as-of-version",
            "nope=1",
            "-c",
            count_sql,
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("no table nope"), "{err}");
}
