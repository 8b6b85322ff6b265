//! `sluice bench` as a user runs it: every stage, both profiles, small sizes. The figures
//! themselves are machine facts and not asserted; what is asserted is that each stage measured
//! what it says (rows written, files and commits made, latencies observed, files compacted).

mod common;

use std::process::Command;

/// The cells of the table rows under the heading that starts with `heading`.
fn rows(report: &str, heading: &str) -> Vec<Vec<String>> {
    let section = report
        .split("### ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("no `{heading}` table in\n{report}"));
    section
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| records") && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('*').to_string())
                .collect()
        })
        .collect()
}

/// The leading number of a cell such as `12k`, `3 ms`, `1.5×`.
fn number(cell: &str) -> f64 {
    let digits: String = cell
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("`{cell}` is not a figure"))
}

#[test]
fn every_stage_reports_what_it_measured_for_both_profiles() {
    // From a folder without the checkout's sql/: the compaction stage runs the built-in library.
    let elsewhere = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(elsewhere.path())
        .args([
            "bench",
            "--records",
            "3000",
            "--rate",
            "1000",
            "--seconds",
            "3",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(report.starts_with("## sluice bench on "), "{report}");

    for heading in [
        "Limit",
        "Pipeline",
        "With Kafka",
        "Memory",
        "Freshness",
        "Compaction",
    ] {
        let rows = rows(&report, heading);
        assert_eq!(rows.len(), 2, "{heading}: a row per profile");
        assert!(rows[0][0].ends_with("posts") && rows[1][0].ends_with("embeddings"));
    }
    for row in rows(&report, "Limit") {
        assert_eq!(number(&row[0]), 3000.0);
        assert!(number(&row[4]) > 0.0, "{row:?}");
    }
    for row in rows(&report, "Pipeline") {
        assert!(number(&row[1]) > 0.0, "{row:?}");
        assert!(
            number(&row[6]) >= 1.0 && number(&row[7]) >= 1.0,
            "files and commits: {row:?}"
        );
    }
    for row in rows(&report, "With Kafka") {
        assert_eq!(
            number(&row[0]),
            3000.0,
            "every pre-produced record drained: {row:?}"
        );
        assert!(number(&row[6]) >= 1.0, "commits: {row:?}");
    }
    for row in rows(&report, "Memory") {
        assert_eq!(number(&row[0]), 3000.0, "the whole set drained: {row:?}");
        assert!(number(&row[2]) > 0.0, "peak RSS: {row:?}");
        let largest = number(&row[4]);
        assert!(
            (1.0..=3000.0).contains(&largest),
            "largest commit within the set: {row:?}"
        );
    }
    for row in rows(&report, "Freshness") {
        assert_eq!(
            number(&row[0]),
            3000.0,
            "a latency per produced record: {row:?}"
        );
        assert_eq!(number(&row[1]), 1.0, "the run: {row:?}");
        let (p50, p99, max) = (number(&row[2]), number(&row[3]), number(&row[4]));
        assert!(p50 <= p99 && p99 <= max, "{row:?}");
        // Each of the seven steps is `p50 / p99`.
        let steps: Vec<(f64, f64)> = row[5..12]
            .iter()
            .map(|cell| {
                let (a, b) = cell.split_once(" / ").expect("p50 / p99");
                (number(a), number(b))
            })
            .collect();
        assert!(steps.iter().all(|(a, b)| a <= b && *b <= max), "{row:?}");
        assert!(number(&row[12]) >= 1.0, "commits: {row:?}");
    }
    for row in rows(&report, "Compaction") {
        let (before, after) = (number(&row[1]), number(&row[2]));
        assert!(before >= 6.0 && after < before, "files compacted: {row:?}");
    }
}
