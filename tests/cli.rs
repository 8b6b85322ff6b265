//! The `sluice` binary as a user runs it: `sluice run --config FILE`, stopped with SIGTERM.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sluice::generator::Shape;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sum of a counter across its label sets, from the Prometheus text format.
fn scrape_counter(port: u16, name: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

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

    // 550 messages with max_rows = 100: 5 commits by size, 50 left buffered.
    let produced = publish(&kafka.brokers(), &[Shape::Mastodon], 550, 12, 0).await;
    let consumed = tokio::time::timeout(CATCH_UP, async {
        loop {
            if scrape_counter(port, "sluice_messages_consumed_total") == Some(550.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(consumed.is_ok(), "the service consumed every message");

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
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml: column `score`: unknown type `decimal`"),
        "{stderr}"
    );
}
