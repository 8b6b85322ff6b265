//! Failpoints: named places where a test makes the process die exactly there, as a power cut
//! or a `kill -9` would (no destructors, no flushes), to prove recovery from each.
//!
//! `SLUICE_FAILPOINT=<name>` arms one: `after_upload` (a flush's Parquet files are uploaded,
//! nothing committed), `after_dead_letter_commit` (dead letters committed, rows not),
//! `after_row_commit` (rows committed, nothing after), `after_compaction_rewrite` (a
//! compaction's files are uploaded, not committed).

/// Environment variable naming the armed failpoint.
pub const FAILPOINT_ENV: &str = "SLUICE_FAILPOINT";

/// The failpoint armed for this process, read once by its caller.
pub fn armed() -> Option<String> {
    std::env::var(FAILPOINT_ENV).ok()
}

/// Aborts the process when `point` is the `armed` one.
pub fn reached(armed: Option<&str>, point: &str) {
    if armed == Some(point) {
        tracing::error!(failpoint = point, "failpoint reached: aborting");
        std::process::abort();
    }
}
