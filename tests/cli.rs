//! The `sluice` binary as a user runs it: `sluice run --config FILE`, stopped with SIGTERM.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sluice::tools::generator::Shape;

/// Sum of a counter across its label sets.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_the_buffered_tail_and_exits_zero() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 2);
    let dir = tempfile::tempdir().unwrap();
    let repo = env!("CARGO_MANIFEST_DIR");
    let config_file = dir.path().join("sluice.toml");
    std::fs::write(
        &config_file,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "cli-test"
[storage]
root = "lake"
[batch]
max_rows = 100
max_age_ms = 600000
[metrics]
lag_interval_s = 1
[[tables]]
schema = "{repo}/schemas/enriched_posts.toml"
sources = [{{ topic = "posts.mastodon", mapping = "{repo}/schemas/mappings/mastodon.toml" }}]
"#,
            brokers = kafka.brokers()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&config_file)
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // 550 messages with max_rows = 100: 5 commits by size, 50 left buffered once the writer
    // has read everything (nothing unread in either partition).
    let produced = publish(&kafka.brokers(), &[Shape::Mastodon], 550, 12, 0).await;
    let all_read_50_buffered = tokio::time::timeout(CATCH_UP, async {
        loop {
            if let Some(scrape) = Scrape::fetch(([127, 0, 0, 1], port).into()) {
                let unread: Vec<_> = scrape
                    .matching("sluice_consumer_unread_messages", &[])
                    .collect();
                if scrape.sum("sluice_rows_written_total", &[]) == 500.0
                    && unread.len() == 2
                    && unread.iter().all(|s| s.value == 0.0)
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        all_read_50_buffered.is_ok(),
        "the service read every message and committed 500"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), err)
    })
    .await
    .unwrap();
    assert!(
        output.0.success(),
        "exit status {:?}; log:\n{}",
        output.0,
        output.1
    );
    assert!(output.1.contains("reason=\"shutdown\""), "{}", output.1);

    assert_exactly_once(
        &table_offsets(&dir.path().join("lake")).await,
        &produced.last_offsets,
        &BTreeSet::new(),
    );
}

/// A broker that is not there is retried every few hundred milliseconds; the log says so once
/// (then after 30 s, 1, 2, 4 and 8 minutes), the metric counts every attempt and readiness
/// carries the detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_is_logged_once_not_once_per_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = format!("127.0.0.1:{}", free_port());
    let config_file = write_config(dir.path(), &brokers, 100);
    let port = free_port();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let log = dir.path().join("sluice.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&config_file)
        .args(["--metrics-listen", &metrics.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    const ATTEMPTS: f64 = 40.0;
    let failing = tokio::time::timeout(CATCH_UP, async {
        loop {
            let failures = tokio::task::spawn_blocking(move || {
                Scrape::fetch(metrics).map(|s| {
                    s.sum(
                        "sluice_kafka_connection_failures_total",
                        &[("kind", "unreachable")],
                    )
                })
            })
            .await
            .unwrap();
            if failures.is_some_and(|f| f >= ATTEMPTS) {
                return tokio::task::spawn_blocking(move || http_get(metrics, "/readyz"))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let log = std::fs::read_to_string(&log).unwrap();
    let readyz = failing.unwrap_or_else(|_| panic!("{ATTEMPTS} failed attempts counted:\n{log}"));

    let (status, body) = readyz.expect("/readyz answers");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("cannot reach the broker at {brokers}")),
        "{body}"
    );
    let kafka_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("kafka") && !l.contains("sluice::service"))
        .collect();
    assert_eq!(
        kafka_lines.len(),
        1,
        "{ATTEMPTS} failed attempts, one line:\n{log}"
    );
    assert!(
        kafka_lines[0].contains(&format!("cannot reach the broker at {brokers}"))
            && kafka_lines[0].contains("check kafka.brokers"),
        "{log}"
    );
}

/// An S3 endpoint that accepts connections and never answers keeps the writer opening its
/// table (the store client waits and retries for minutes). SIGTERM then stops it at once and
/// cleanly, as `systemctl stop` or a Kubernetes rollout expects, instead of killing it.
#[test]
fn sigterm_while_the_tables_are_still_opening_exits_zero() {
    let silent_store = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent_store.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = env!("CARGO_MANIFEST_DIR");
    let config_file = dir.path().join("sluice.toml");
    std::fs::write(
        &config_file,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:9"
group_id = "cli-test"
[storage]
root = "s3://lakehouse/silent"
[storage.s3]
endpoint = "http://{store}"
region = "us-east-1"
allow_http = true
[[tables]]
schema = "{repo}/schemas/enriched_posts.toml"
sources = [{{ topic = "posts.mastodon", mapping = "{repo}/schemas/mappings/mastodon.toml" }}]
"#,
            store = silent_store.local_addr().unwrap()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&config_file)
        .env("AWS_ACCESS_KEY_ID", "sluice-test")
        .env("AWS_SECRET_ACCESS_KEY", "sluice-test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The writer is opening its table once it has connected to the store.
    let deadline = std::time::Instant::now() + CATCH_UP;
    let _held_open = loop {
        match silent_store.accept() {
            Ok((connection, _)) => break connection,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "sluice exited before reaching the store"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "sluice never connected to the store"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + CATCH_UP;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break Some(exit);
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        exit.is_some_and(|e| e.success()),
        "exit status {exit:?} (None: still running {CATCH_UP:?} after SIGTERM); log:\n{log}"
    );
    assert!(
        log.contains("shutdown requested while opening the table"),
        "{log}"
    );
}

#[test]
fn a_wrong_schema_file_is_reported_with_file_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[table]\nname = \"t\"\n[[columns]]\nname = \"score\"\ntype = \"decimal\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("m.toml"), "table = \"t\"\n[columns]\n").unwrap();
    let config_file = dir.path().join("sluice.toml");
    std::fs::write(
        &config_file,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[storage]\nroot = \"lake\"\n[[tables]]\nschema = \"bad.toml\"\nsources = [{ topic = \"t\", mapping = \"m.toml\" }]\n",
    )
    .unwrap();
    let output = sluice("run", &config_file, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml: column `score`: unknown type `decimal`"),
        "{stderr}"
    );
}

#[test]
fn an_error_is_one_line_naming_the_cause_with_a_backtrace_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("sluice.toml");
    let run = |backtrace: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.args(["audit", "--config"]).arg(&missing);
        command
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(value) = backtrace {
            command.env("RUST_BACKTRACE", value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let plain = run(None);
    assert_eq!(
        plain,
        format!(
            "error: config file {}: No such file or directory (os error 2); pass the path of an \
             existing config (`sluice demo` writes one to lakehouse/sluice.toml)\n",
            missing.display()
        )
    );
    let traced = run(Some("1"));
    assert!(traced.starts_with(plain.trim_end()), "{traced}");
    assert!(traced.lines().count() > 3, "a backtrace follows: {traced}");
}

/// Rows in the table, or 0 before the writer has created it.
async fn rows_if_created(lake: &std::path::Path) -> usize {
    let location = sluice::table::delta::table_location(&lake.to_string_lossy(), "enriched_posts");
    match sluice::table::delta::open_table(&location, Default::default()).await {
        Ok(_) => table_offsets(lake).await.len(),
        Err(_) => 0,
    }
}

/// `sluice <command> --config FILE`, run to completion with extra environment.
fn sluice(command: &str, config: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([command, "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs the writer until it aborts at the failpoint after its first dead-letter commit;
/// returns its log.
fn crash_after_dead_letter_commit(config: &std::path::Path) -> String {
    let crashed = sluice(
        "run",
        config,
        &[("SLUICE_FAILPOINT", "after_dead_letter_commit")],
    );
    assert!(!crashed.status.success(), "the failpoint aborts the writer");
    String::from_utf8_lossy(&crashed.stderr).into_owned()
}

fn write_config(dir: &std::path::Path, brokers: &str, max_rows: usize) -> std::path::PathBuf {
    let schema = format!("{}/schemas/enriched_posts.toml", env!("CARGO_MANIFEST_DIR"));
    write_config_with(dir, brokers, max_rows, &schema)
}

fn write_config_with(
    dir: &std::path::Path,
    brokers: &str,
    max_rows: usize,
    schema: &str,
) -> std::path::PathBuf {
    let repo = env!("CARGO_MANIFEST_DIR");
    let config_file = dir.join("sluice.toml");
    std::fs::write(
        &config_file,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "cli-test"
[storage]
root = "lake"
[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[batch]
max_rows = {max_rows}
max_age_ms = 1000
[[tables]]
schema = "{schema}"
sources = [{{ topic = "posts.mastodon", mapping = "{repo}/schemas/mappings/mastodon.toml" }}]
"#
        ),
    )
    .unwrap();
    config_file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_dead_letter_commit_and_the_row_commit_loses_and_duplicates_nothing() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let config_file = write_config(dir.path(), &kafka.brokers(), 100);
    // 300 posts, every 10th hostile: 30 dead letters, 270 rows.
    let produced = publish(&kafka.brokers(), &[Shape::Mastodon], 300, 21, 10).await;

    let log = crash_after_dead_letter_commit(&config_file);
    assert!(log.contains("committed dead letters"), "{log}");
    // The crash left dead letters whose rows never landed.
    let lake = dir.path().join("lake");
    let dead = query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await;
    assert_eq!(scalar_i64(&dead), 10);
    assert!(table_offsets(&lake).await.is_empty());

    let caught_up = run_until(&config_file, async || rows_if_created(&lake).await >= 270).await;
    assert!(caught_up, "the restarted writer wrote every good post");

    let audit = sluice("audit", &config_file, &[]);
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(
        report.contains(
            "CLEAN: 300 messages checked, 270 rows, 30 dead letters, 0 missing, 0 duplicated"
        ),
        "{report}"
    );
    let dead = query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await;
    assert_eq!(scalar_i64(&dead), 30, "no dead letter stored twice");
    assert_eq!(produced.last_offsets.values().next(), Some(&299));
}

/// Every `commitInfo.sluice.ledger` entry of a table's log: (partition, first, last, rows,
/// rejected), in commit order.
fn ledgers(table_dir: &std::path::Path) -> Vec<(String, i64, i64, u64, u64)> {
    let mut commits: Vec<_> = std::fs::read_dir(table_dir.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let mut out = Vec::new();
    for commit in commits {
        for line in std::fs::read_to_string(&commit).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(ledger) = action["commitInfo"]["sluice"]["ledger"].as_object() else {
                continue;
            };
            for (partition, l) in ledger {
                let n = |k: &str| l[k].as_i64().unwrap();
                out.push((
                    partition.clone(),
                    n("first_offset"),
                    n("last_offset"),
                    n("rows") as u64,
                    n("rejected") as u64,
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_at_any_step_of_a_flush_restarts_losing_and_duplicating_nothing() {
    for point in [
        "after_upload",
        "after_dead_letter_commit",
        "after_row_commit",
    ] {
        let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
        let dir = tempfile::tempdir().unwrap();
        let config_file = write_config(dir.path(), &kafka.brokers(), 100);
        // 300 posts, every 10th hostile: 30 dead letters, 270 rows.
        publish(&kafka.brokers(), &[Shape::Mastodon], 300, 25, 10).await;
        let crashed = sluice("run", &config_file, &[("SLUICE_FAILPOINT", point)]);
        let log = String::from_utf8_lossy(&crashed.stderr);
        assert!(!crashed.status.success(), "{point}: the process dies there");
        assert!(log.contains(point), "{point}: {log}");

        let lake = dir.path().join("lake");
        let caught_up = run_until(&config_file, async || rows_if_created(&lake).await >= 270).await;
        assert!(
            caught_up,
            "{point}: the restarted writer wrote every good post"
        );
        let audit = sluice("audit", &config_file, &[]);
        let report = String::from_utf8_lossy(&audit.stdout);
        assert!(
            report.contains(
                "CLEAN: 300 messages checked, 270 rows, 30 dead letters, 0 missing, 0 duplicated"
            ),
            "{point}: {report}"
        );
        assert!(audit.status.success(), "{point}: {report}");
        let dead =
            scalar_i64(&query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await);
        assert_eq!(dead, 30, "{point}: no dead letter stored twice");

        // The ledger read back from the log: ranges contiguous from 0 to 299, each accounting
        // for every offset it covers as a row or a dead letter.
        let entries = ledgers(&lake.join("enriched_posts"));
        let mut next = 0;
        for (partition, first, last, rows, rejected) in &entries {
            assert_eq!(partition, "posts.mastodon/0");
            assert_eq!(
                *first, next,
                "{point}: ledger ranges contiguous: {entries:?}"
            );
            assert_eq!(
                rows + rejected,
                (last - first + 1) as u64,
                "{point}: {entries:?}"
            );
            next = last + 1;
        }
        assert_eq!(next, 300, "{point}: {entries:?}");
        let (rows, rejected) = entries.iter().fold((0, 0), |t, e| (t.0 + e.3, t.1 + e.4));
        assert_eq!((rows, rejected), (270, 30), "{point}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_exits_non_zero_when_an_offset_is_missing() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let config_file = write_config(dir.path(), &kafka.brokers(), 50);
    publish(&kafka.brokers(), &[Shape::Mastodon], 100, 22, 0).await;
    let lake = dir.path().join("lake");
    let caught_up = run_until(&config_file, async || rows_if_created(&lake).await >= 100).await;
    assert!(caught_up);

    // Lose rows behind the writer's back: delete offset 42 from the table.
    let location = sluice::table::delta::table_location(&lake.to_string_lossy(), "enriched_posts");
    let table = sluice::table::delta::open_table(&location, Default::default())
        .await
        .unwrap();
    table
        .delete()
        .with_predicate("kafka_offset = 42")
        .await
        .unwrap();

    let audit = sluice("audit", &config_file, &[]);
    let report = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(audit.status.code(), Some(2), "{report}");
    assert!(report.contains("first missing offsets: [42]"), "{report}");
    assert!(report.contains("NOT CLEAN"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_tightened_across_such_a_crash_stores_the_new_dead_letters_too() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    let config_file = write_config(dir.path(), &kafka.brokers(), 100);
    publish(&kafka.brokers(), &[Shape::Mastodon], 300, 23, 10).await;
    crash_after_dead_letter_commit(&config_file);

    // Restart with a stricter contract: posts with more than 250 likes are now out of range,
    // including posts of the interrupted flush that were rows the first time.
    let config_file = write_config_with(
        dir.path(),
        &kafka.brokers(),
        100,
        &strict_schema(dir.path()),
    );
    let lake = dir.path().join("lake");
    let caught_up = run_until(&config_file, async || {
        let rows = rows_if_created(&lake).await as i64;
        let dead =
            scalar_i64(&query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await);
        rows + dead >= 300
    })
    .await;
    assert!(caught_up, "every message landed somewhere");

    let audit = sluice("audit", &config_file, &[]);
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
    let early_out_of_range = query(
        &lake,
        "SELECT count(*) FROM enriched_posts_dead_letters WHERE reason = 'out_of_range' AND kafka_offset < 100",
    )
    .await;
    assert!(scalar_i64(&early_out_of_range) > 0, "{report}");
}

/// `schemas/enriched_posts.toml` with `like_count` limited to `[0, 250]`, written into `dir`.
fn strict_schema(dir: &std::path::Path) -> String {
    let repo = env!("CARGO_MANIFEST_DIR");
    let schema = std::fs::read_to_string(format!("{repo}/schemas/enriched_posts.toml"))
        .unwrap()
        .replacen(
            "name = \"like_count\"\ntype = \"long\"\nrange = [0, inf]",
            "name = \"like_count\"\ntype = \"long\"\nrange = [0, 250]",
            1,
        );
    assert!(schema.contains("range = [0, 250]"));
    let strict = dir.join("strict.toml");
    std::fs::write(&strict, schema).unwrap();
    strict.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_loosened_across_such_a_crash_keeps_the_stored_dead_letters_as_the_outcome() {
    let kafka = Kafka::new(&[Shape::Mastodon.default_topic()], 1);
    let dir = tempfile::tempdir().unwrap();
    // First with a strict contract: posts with more than 250 likes are dead letters.
    let strict = write_config_with(
        dir.path(),
        &kafka.brokers(),
        100,
        &strict_schema(dir.path()),
    );
    publish(&kafka.brokers(), &[Shape::Mastodon], 300, 24, 0).await;
    crash_after_dead_letter_commit(&strict);
    let lake = dir.path().join("lake");
    let stored =
        scalar_i64(&query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await);
    assert!(stored > 0, "the interrupted flush stored dead letters");

    // Restart with the contract as shipped: those posts would be rows now, but the interrupted
    // flush already decided them, and each offset has one outcome.
    let loose = write_config(dir.path(), &kafka.brokers(), 100);
    let caught_up = run_until(&loose, async || {
        let rows = rows_if_created(&lake).await as i64;
        let dead =
            scalar_i64(&query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await);
        rows + dead >= 300
    })
    .await;
    assert!(caught_up, "every message landed somewhere");
    let audit = sluice("audit", &loose, &[]);
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
    assert!(report.contains(", 0 missing, 0 duplicated"), "{report}");
    let dead = scalar_i64(&query(&lake, "SELECT count(*) FROM enriched_posts_dead_letters").await);
    assert_eq!(dead, stored, "no new dead letters under the loose contract");
}

/// `sluice config check FILE ARGS` with extra environment.
fn config_check(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["config", "check", "--config"])
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), "127.0.0.1:1", 100);
    let output = config_check(
        &file,
        &["--brokers", "kafka-a:9092,kafka-b:9092"],
        &[
            ("SLUICE_BATCH__MAX_AGE_MS", "2500"),
            ("SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("valid; tables enriched_posts"), "{stderr}");
    // File, environment and flags merged; defaults filled in.
    let effective: sluice::config::Config =
        toml::from_str(&stdout).expect("the output is a config");
    assert_eq!(effective.kafka.brokers, "kafka-a:9092,kafka-b:9092");
    assert_eq!(effective.batch.max_age_ms, 2500);
    assert_eq!(effective.batch.max_rows, 100);
    assert_eq!(effective.maintenance.interval_s, 300);
    assert_eq!(effective.kafka.properties["sasl.password"], "<redacted>");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
}

#[test]
fn config_check_names_the_file_and_the_key_that_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), "127.0.0.1:1", 100);
    let text = std::fs::read_to_string(&file).unwrap();
    let failing = |contents: String, env: &[(&str, &str)]| {
        std::fs::write(&file, contents).unwrap();
        let output = config_check(&file, &[], env);
        assert_eq!(output.status.code(), Some(1));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let err = failing(text.replace("max_rows =", "max_rowz ="), &[]);
    assert!(
        err.contains("sluice.toml") && err.contains("unknown field `max_rowz`"),
        "{err}"
    );
    assert!(err.contains("line 11"), "{err}");

    let err = failing(text.clone(), &[("SLUICE_BATCH__MAX_AGE", "5")]);
    assert!(
        err.contains("unknown field `max_age`") && err.contains("SLUICE_BATCH__MAX_AGE"),
        "{err}"
    );

    let err = failing(
        format!("{text}[maintenance]\nzorder = [\"categroy\"]\n"),
        &[],
    );
    assert!(
        err.contains("enriched_posts") && err.contains("`categroy`, which is not a column"),
        "{err}"
    );

    let err = failing(
        text.replace("mappings/mastodon.toml", "mappings/mastodn.toml"),
        &[],
    );
    assert!(
        err.contains(
            "mastodn.toml: No such file or directory (os error 2); check `mapping` of a \
             table's `sources` in the config (a relative path starts from the config file's folder)"
        ),
        "{err}"
    );

    let err = failing(
        text.replace("enriched_posts.toml", "enriched_post.toml"),
        &[],
    );
    assert!(
        err.contains(
            "enriched_post.toml: No such file or directory (os error 2); check `schema` \
             of a `[[tables]]` entry in the config"
        ),
        "{err}"
    );

    let err = failing(format!("{text}[metrics]\nlisten = \"9464\"\n"), &[]);
    assert!(
        err.contains("metrics.listen `9464` is not an address"),
        "{err}"
    );
}

/// `sql/trino/register.sql`, which the compose stack and scripts/trino-smoke.sh run, is what
/// `sluice trino-sql` prints for the compose config: the shipped file cannot drift from the
/// table locations the writer uses.
#[test]
fn the_shipped_trino_registration_is_what_trino_sql_prints_for_the_compose_config() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "trino-sql",
            "--config",
            &format!("{repo}/config/minio.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("table_location => 's3://lakehouse/warehouse/enriched_posts'"));
    let shipped = std::fs::read_to_string(format!("{repo}/sql/trino/register.sql")).unwrap();
    assert_eq!(
        shipped, printed,
        "regenerate: sluice trino-sql --config config/minio.toml > sql/trino/register.sql"
    );
}
