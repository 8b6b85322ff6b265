//! Micro-batching rules: when a table's buffered messages must be flushed to Delta.
//!
//! Pure bookkeeping with no I/O and no clock of its own (callers pass `now`), so the rules are
//! tested exhaustively without Kafka or timers.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Default maximum messages per flush.
pub const DEFAULT_MAX_ROWS: usize = 200_000;
/// Default maximum payload bytes per flush (the raw Kafka payloads, before compression): with
/// the consumer's prefetch queue this keeps the service under 300 MiB resident (`sluice bench
/// --stage memory`: 128 MiB peaked at ~330 MiB, 64 MiB at ~300 MiB).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Default maximum age of the oldest buffered message before a flush, in milliseconds.
pub const DEFAULT_MAX_AGE_MS: u64 = 10_000;
/// The shortest allowed flush age: below this, commit overhead dominates and the table fills
/// with tiny files (sub-second freshness runs at 500: see the README's "Freshness").
pub const MIN_MAX_AGE_MS: u64 = 100;

/// Limits of one flush; whichever is reached first triggers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLimits {
    /// Flush when this many messages (rows plus rejections) are buffered.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Flush when this many payload bytes are buffered; bounds the writer's memory.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Flush when the oldest buffered message has waited this long: the freshness bound.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
}

fn default_max_rows() -> usize {
    DEFAULT_MAX_ROWS
}
fn default_max_bytes() -> usize {
    DEFAULT_MAX_BYTES
}
fn default_max_age_ms() -> u64 {
    DEFAULT_MAX_AGE_MS
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_rows: DEFAULT_MAX_ROWS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_age_ms: DEFAULT_MAX_AGE_MS,
        }
    }
}

impl BatchLimits {
    /// Checks the limits make sense, naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_rows == 0 {
            return Err("batch.max_rows must be at least 1".into());
        }
        if self.max_bytes == 0 {
            return Err("batch.max_bytes must be at least 1".into());
        }
        if self.max_age_ms < MIN_MAX_AGE_MS {
            return Err(format!(
                "batch.max_age_ms must be at least {MIN_MAX_AGE_MS} (got {})",
                self.max_age_ms
            ));
        }
        Ok(())
    }

    /// The flush age as a duration.
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms)
    }
}

/// Why a flush happened; counted in metrics and logged with every commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// `max_rows` reached.
    Rows,
    /// `max_bytes` reached.
    Bytes,
    /// `max_age_ms` reached.
    Age,
    /// The service is stopping or a partition set changed.
    Shutdown,
}

impl FlushReason {
    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Rows => "rows",
            FlushReason::Bytes => "bytes",
            FlushReason::Age => "age",
            FlushReason::Shutdown => "shutdown",
        }
    }
}

/// Running totals of what one table has buffered since its last flush.
#[derive(Debug, Clone)]
pub struct Batcher {
    limits: BatchLimits,
    rows: usize,
    bytes: usize,
    oldest: Option<Instant>,
}

impl Batcher {
    /// An empty batcher with the given limits.
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            rows: 0,
            bytes: 0,
            oldest: None,
        }
    }

    /// Records buffered messages and says whether a size limit now requires a flush.
    pub fn add(&mut self, rows: usize, bytes: usize, now: Instant) -> Option<FlushReason> {
        if rows == 0 {
            return None;
        }
        self.rows += rows;
        self.bytes += bytes;
        self.oldest.get_or_insert(now);
        if self.rows >= self.limits.max_rows {
            Some(FlushReason::Rows)
        } else if self.bytes >= self.limits.max_bytes {
            Some(FlushReason::Bytes)
        } else {
            None
        }
    }

    /// Whether the oldest buffered message has waited long enough to force a flush.
    pub fn due(&self, now: Instant) -> Option<FlushReason> {
        let oldest = self.oldest?;
        (now.saturating_duration_since(oldest) >= self.limits.max_age()).then_some(FlushReason::Age)
    }

    /// When the oldest buffered message arrived, if anything is buffered.
    pub fn oldest(&self) -> Option<Instant> {
        self.oldest
    }

    /// When the age limit will fire, if anything is buffered.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.limits.max_age())
    }

    /// Forgets messages that left the buffer without a flush (e.g. a revoked partition).
    pub fn remove(&mut self, rows: usize, bytes: usize) {
        self.rows = self.rows.saturating_sub(rows);
        self.bytes = self.bytes.saturating_sub(bytes);
        if self.rows == 0 {
            self.oldest = None;
        }
    }

    /// Starts a new batch after a flush.
    pub fn reset(&mut self) {
        self.rows = 0;
        self.bytes = 0;
        self.oldest = None;
    }

    /// Messages buffered.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(rows: usize, bytes: usize, age_ms: u64) -> BatchLimits {
        BatchLimits {
            max_rows: rows,
            max_bytes: bytes,
            max_age_ms: age_ms,
        }
    }

    #[test]
    fn age_counts_from_the_oldest_message() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 1 << 20, 1000));
        assert_eq!(b.due(t0 + Duration::from_secs(60)), None, "empty never due");
        b.add(1, 10, t0);
        b.add(1, 10, t0 + Duration::from_millis(900));
        assert_eq!(b.due(t0 + Duration::from_millis(999)), None);
        assert_eq!(
            b.due(t0 + Duration::from_millis(1000)),
            Some(FlushReason::Age)
        );
        b.reset();
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn too_short_an_age_is_refused_with_the_key() {
        let err = limits(1, 1, 99).validate().unwrap_err();
        assert!(err.contains("batch.max_age_ms"), "{err}");
        assert!(limits(1, 1, 100).validate().is_ok());
    }

    proptest! {
        /// Feeding messages one at a time and flushing whenever told to, no batch ever exceeds
        /// max_rows, and a batch exceeds max_bytes only by its last message.
        #[test]
        fn batches_respect_limits(
            max_rows in 1usize..50,
            max_bytes in 1usize..5000,
            sizes in proptest::collection::vec(1usize..800, 0..300),
        ) {
            let t0 = Instant::now();
            let mut b = Batcher::new(limits(max_rows, max_bytes, 1000));
            let mut rows = 0;
            let mut bytes = 0;
            let mut last = 0;
            let mut total_rows = 0;
            for s in &sizes {
                rows += 1;
                bytes += s;
                last = *s;
                if let Some(reason) = b.add(1, *s, t0) {
                    prop_assert!(rows <= max_rows);
                    prop_assert!(bytes - last < max_bytes);
                    prop_assert!(reason == FlushReason::Rows || reason == FlushReason::Bytes);
                    total_rows += rows;
                    rows = 0;
                    bytes = 0;
                    b.reset();
                }
                prop_assert!(rows < max_rows && bytes < max_bytes);
            }
            prop_assert_eq!(total_rows + b.rows(), sizes.len());
            let _ = last;
        }
    }
}
