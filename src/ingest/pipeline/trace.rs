//! The freshness trace: when each message was received and when each step of the flush that
//! committed it ended, for the breakdown `sluice bench --stage freshness` prints.
//!
//! Off unless a process installs a receiver ([`install`], which only the benchmark does); then
//! the writer records one timestamp per message and sends one [`FlushTrace`] per commit. Like
//! the metrics recorder it is process-wide, so the service needs no extra plumbing for it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use crate::table::delta::PartitionKey;

/// The steps of one committed flush, as wall-clock microseconds since the Unix epoch.
#[derive(Debug, Clone)]
pub struct FlushTrace {
    /// Table name.
    pub table: String,
    /// Table version of the commit.
    pub version: i64,
    /// Every committed message: partition, offset, when the writer took it from the consumer.
    pub received: Vec<(PartitionKey, i64, i64)>,
    /// The flush began (a limit or the batch age was reached).
    pub started_us: i64,
    /// Every buffered message was decoded.
    pub decoded_us: i64,
    /// Positions re-checked and dead letters stored: the files are awaited next.
    pub checked_us: i64,
    /// The Parquet writer got its last rows and began closing its files (encoding done); may
    /// precede `checked_us` (it closes while positions are checked), and is `checked_us` when
    /// an earlier attempt's files were reused.
    pub encoded_us: i64,
    /// The files were uploaded.
    pub uploaded_us: i64,
    /// The rows and positions were committed.
    pub committed_us: i64,
}

/// Read per message, so a flag rather than the lock.
static ON: AtomicBool = AtomicBool::new(false);
static SINK: Mutex<Option<mpsc::UnboundedSender<FlushTrace>>> = Mutex::new(None);

/// Turns tracing on for this process and returns the traces of every commit from now on (a
/// second call takes them over from the first).
pub fn install() -> mpsc::UnboundedReceiver<FlushTrace> {
    let (sender, receiver) = mpsc::unbounded_channel();
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    ON.store(true, Ordering::Release);
    receiver
}

/// Whether a receiver is installed.
pub(super) fn enabled() -> bool {
    ON.load(Ordering::Acquire)
}

pub(super) fn send(trace: FlushTrace) {
    if let Some(sink) = SINK.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = sink.send(trace);
    }
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
