//! What a bench row measures about the process: CPU time, peak resident memory, and the
//! meter that takes both around a stage.

use std::time::{Duration, Instant};

/// CPU seconds of this process (user + system) and the wall clock, to take differences of.
pub(super) struct Meter {
    wall: Instant,
    cpu: Duration,
}

impl Meter {
    pub(super) fn start() -> Meter {
        reset_peak_rss();
        Meter {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    pub(super) fn stop(&self) -> Measured {
        Measured {
            wall: self.wall.elapsed(),
            cpu: cpu_time().saturating_sub(self.cpu),
            peak_rss: peak_rss(),
        }
    }
}

pub(super) struct Measured {
    pub(super) wall: Duration,
    pub(super) cpu: Duration,
    pub(super) peak_rss: u64,
}

/// User + system CPU time of the process, from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of the calling thread.
pub(super) fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0;
    if ok {
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    } else {
        Duration::ZERO
    }
}

/// Peak resident set size in bytes since the last reset (`VmHWM`).
pub(super) fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Starts a new peak RSS measurement (Linux: `echo 5 > /proc/self/clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(super) fn per_second(count: f64, wall: Duration) -> f64 {
    count / wall.as_secs_f64().max(1e-9)
}

pub(super) fn cpu_per_million(cpu: Duration, records: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / records.max(1) as f64
}

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub(super) fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
