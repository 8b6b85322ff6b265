//! The watch on a client: librdkafka's logs and errors forwarded through `tracing` once per
//! change rather than per retry, and the latest connection problem kept for readiness.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::Connection;
use super::problem::{Problem, ProblemKind, classify, detail_of, listener_of};
use super::redact::Redactor;

#[derive(Debug, Default)]
pub(super) struct WatchState {
    /// The current failure; `None` once the connection worked.
    problem: Option<Problem>,
    /// The kind last logged, so that a failure repeated by every reconnect logs once.
    logged: Option<ProblemKind>,
    /// When a failure that goes on is logged again.
    reminder: Reminder,
}

/// First interval after which a failure that goes on is logged again; each later one is twice
/// as long, up to [`LONGEST_REMINDER`].
const FIRST_REMINDER: Duration = Duration::from_secs(30);
/// Longest interval between two lines about the same failure.
const LONGEST_REMINDER: Duration = Duration::from_secs(10 * 60);

/// The log lines of one failure that goes on: librdkafka retries every few hundred
/// milliseconds, the log says it once, then once per backoff period (30 s, 1 min, 2 min, ...
/// 10 min) with how many attempts failed since, so an hour down is a dozen lines.
#[derive(Debug, Default)]
pub(super) struct Reminder {
    /// When the failure was last logged, and the wait until the next line.
    last: Option<(Instant, Duration)>,
    /// Failed attempts since the last line.
    failed: u64,
}

impl Reminder {
    /// The failure was logged now.
    fn logged(&mut self, now: Instant) {
        *self = Reminder {
            last: Some((now, FIRST_REMINDER)),
            failed: 0,
        };
    }

    /// One more failed attempt; the attempts since the last line when one is due now.
    pub(super) fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failed += 1;
        let (at, wait) = self.last?;
        if now.duration_since(at) < wait {
            return None;
        }
        let failed = std::mem::take(&mut self.failed);
        self.last = Some((now, (wait * 2).min(LONGEST_REMINDER)));
        Some(failed)
    }
}

/// Shared between a client's context (which reports into it) and whoever shows its state:
/// readiness, one-shot commands.
#[derive(Debug)]
pub struct Watch {
    /// Whether failures are logged here (a long-running client) or only handed to the caller,
    /// who reports them (a one-shot check).
    pub(super) logs: bool,
    pub(super) brokers: String,
    pub(super) security: String,
    pub(super) redactor: Redactor,
    pub(super) state: Mutex<WatchState>,
}

impl Watch {
    /// A watch for clients of `connection`.
    pub fn new(connection: &Connection) -> Watch {
        Watch {
            logs: true,
            brokers: connection.brokers.clone(),
            security: connection.security(),
            redactor: connection.redactor(),
            state: Mutex::new(WatchState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current connection failure, if any.
    pub fn problem(&self) -> Option<Problem> {
        self.lock().problem.clone()
    }

    /// The client talked to the cluster (an assignment, metadata, watermarks): whatever failed
    /// before is over.
    pub fn connected(&self) {
        let mut state = self.lock();
        let problem = state.problem.take();
        state.reminder = Reminder::default();
        if let Some(problem) = problem
            && state.logged.take().is_some()
        {
            let down = problem.since.elapsed().unwrap_or_default().as_secs();
            tracing::info!(brokers = %self.brokers, down_s = down, "kafka connection works again after {down} s");
        }
    }

    /// Text with this client's secrets redacted.
    pub fn scrub(&self, text: &str) -> String {
        self.redactor.scrub(text)
    }

    /// Takes one of librdkafka's global errors (`reason` may be empty: consumers receive only
    /// the code).
    pub fn report(&self, error: &KafkaError, reason: &str) {
        // The end of a partition is news for readers that ask for it, not a failure.
        if is_end_of_partition(error) {
            return;
        }
        let reason = self.redactor.scrub(reason);
        if !self.observe(error.rdkafka_error_code(), &reason) {
            tracing::warn!(brokers = %self.brokers, error = %error, reason = %reason, "kafka client error");
        }
    }

    /// Takes an error a consumer received instead of a message; true if it tells of a
    /// connection failure. librdkafka gives consumers the code alone: the failure is recorded
    /// for readiness but logged only from librdkafka's own words (its log line about it), which
    /// name the listener and the cause.
    pub fn report_code(&self, error: &KafkaError) -> bool {
        let Some(kind) = classify(error.rdkafka_error_code(), "", &self.security) else {
            return false;
        };
        let mut state = self.lock();
        if state.problem.is_none() {
            state.problem = Some(Problem {
                kind,
                listener: self.brokers.clone(),
                security: self.security.clone(),
                detail: error.to_string(),
                since: SystemTime::now(),
            });
        }
        true
    }

    /// Takes a warning or error line of librdkafka's log; true if it told of a connection
    /// failure (which the watch has then reported).
    pub fn report_log(&self, message: &str) -> bool {
        self.observe(None, message)
    }

    /// Records a connection failure, logging it when its kind is new; false if `text` (and
    /// `code`) tell of none.
    fn observe(&self, code: Option<RDKafkaErrorCode>, text: &str) -> bool {
        let Some(kind) = classify(code, text, &self.security) else {
            return false;
        };
        metrics::counter!("sluice_kafka_connection_failures_total", "kind" => kind.label())
            .increment(1);
        let mut state = self.lock();
        // "All brokers down" only sums up what was reported before it.
        if kind == ProblemKind::Unreachable
            && state
                .problem
                .as_ref()
                .is_some_and(|p| p.kind != ProblemKind::Unreachable)
        {
            return true;
        }
        let since = match &state.problem {
            Some(p) if p.kind == kind => p.since,
            _ => SystemTime::now(),
        };
        let detail = match (detail_of(text), code) {
            ("", Some(code)) => code.to_string(),
            (detail, _) => detail.to_string(),
        };
        let problem = Problem {
            kind,
            listener: listener_of(text).unwrap_or(&self.brokers).to_string(),
            security: self.security.clone(),
            detail,
            since,
        };
        let now = Instant::now();
        if state.logged != Some(kind) && self.logs {
            state.logged = Some(kind);
            state.reminder.logged(now);
            if kind == ProblemKind::Unreachable {
                tracing::warn!(brokers = %self.brokers, "kafka: {problem}");
            } else {
                tracing::error!(brokers = %self.brokers, "kafka: {problem}");
            }
        } else if let Some(failed) = state.reminder.failed(now) {
            let down = since.elapsed().unwrap_or_default().as_secs();
            tracing::warn!(
                brokers = %self.brokers,
                down_s = down,
                failed,
                "kafka: still failing after {down} s ({failed} more failed attempts): {problem}"
            );
        }
        state.problem = Some(problem);
        true
    }
}

/// The context of every sluice Kafka client: librdkafka's errors go to its [`Watch`], its log
/// lines to `tracing` with secrets redacted.
pub struct WatchContext {
    /// Where connection failures are reported.
    pub watch: Arc<Watch>,
}

impl ClientContext for WatchContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(&self.watch, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.watch.report(&error, reason);
    }
}

impl ConsumerContext for WatchContext {}

/// librdkafka's log lines, through `tracing`, secrets redacted. Lines telling of a connection
/// failure (facility `FAIL` or `OIDC`, or any warning) go to the [`Watch`], which logs each
/// failure once (librdkafka repeats them on every reconnect); the lines themselves are kept at
/// debug level.
pub fn forward_log(watch: &Watch, level: RDKafkaLogLevel, fac: &str, message: &str) {
    let message = watch.scrub(message);
    let serious = matches!(
        level,
        RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning
    );
    if (serious || fac == "FAIL" || fac == "OIDC") && watch.report_log(&message) {
        tracing::debug!(target: "librdkafka", fac, "{message}");
    } else if serious {
        tracing::warn!(target: "librdkafka", fac, "{message}");
    } else if matches!(level, RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info) {
        tracing::info!(target: "librdkafka", fac, "{message}");
    } else {
        tracing::debug!(target: "librdkafka", fac, "{message}");
    }
}

/// The end of a partition, which consumers that ask for it receive as an error (as
/// `PartitionEOF` on a partition, or as a global error when it comes through the client's
/// error callback).
fn is_end_of_partition(error: &KafkaError) -> bool {
    matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_partition_is_no_client_error() {
        assert!(is_end_of_partition(&KafkaError::PartitionEOF(3)));
        assert!(is_end_of_partition(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_end_of_partition(&KafkaError::Global(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }

    #[test]
    fn an_hour_of_failures_every_200_ms_is_a_dozen_lines_saying_how_many() {
        let start = Instant::now();
        let mut reminder = Reminder::default();
        reminder.logged(start);
        let mut lines = vec![(Duration::ZERO, 0)];
        for step in 1..=18_000u32 {
            let at = Duration::from_millis(200) * step;
            if let Some(failed) = reminder.failed(start + at) {
                lines.push((at, failed));
            }
        }
        let at: Vec<u64> = lines.iter().map(|(at, _)| at.as_secs()).collect();
        assert_eq!(at, [0, 30, 90, 210, 450, 930, 1530, 2130, 2730, 3330]);
        // Every attempt is counted once, in the line after it.
        let counted: u64 = lines.iter().map(|(_, failed)| failed).sum();
        assert_eq!(counted, 3330 * 5);
        // A first minute of at most three lines, then one every ten minutes.
        assert!(lines.iter().filter(|(at, _)| at.as_secs() < 60).count() <= 3);
    }

    #[test]
    fn nothing_is_repeated_before_the_failure_was_logged() {
        let mut reminder = Reminder::default();
        let now = Instant::now();
        assert_eq!(reminder.failed(now + Duration::from_secs(3600)), None);
    }
}
