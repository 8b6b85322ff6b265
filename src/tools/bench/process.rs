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
    std::fs::read_to_string("/proc/self/stat").map_or(Duration::ZERO, |stat| stat_cpu(&stat))
}

/// User + system CPU time of this process's threads named `name`, from `/proc/self/task`
/// (zero where that cannot be read, as [`cpu_time`] is).
pub(super) fn named_threads_cpu_time(name: &str) -> Duration {
    let mut total = Duration::ZERO;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return total;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        if stat_name(&stat) == Some(name) {
            total += stat_cpu(&stat);
        }
    }
    total
}

/// The command (thread) name of a `stat` line: between the first `(` and the last `)`.
fn stat_name(stat: &str) -> Option<&str> {
    let start = stat.find('(')? + 1;
    let end = stat.rfind(')')?;
    stat.get(start..end)
}

/// utime + stime of a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Duration {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time of the calling thread, told by the kernel directly (not through /proc).
    fn thread_cpu_time() -> Duration {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to fill.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) },
            0
        );
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    #[test]
    fn a_stat_line_gives_its_thread_name_and_cpu_even_with_spaces_and_parentheses_in_the_name() {
        // pid (comm) state ppid ... utime(14) stime(15): 150 + 25 ticks of 10 ms.
        let stat = "4242 (odd) name (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 25 0 0 20 0 9";
        assert_eq!(stat_name(stat), Some("odd) name (x)"));
        assert_eq!(stat_cpu(stat), Duration::from_millis(1750));
    }

    #[test]
    fn the_cpu_of_named_threads_is_theirs_and_not_the_callers() {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::Builder::new()
            .name("bench-test-busy".into())
            .spawn(move || {
                let mut x = 0u64;
                while thread_cpu_time() < Duration::from_millis(200) {
                    x = x.wrapping_mul(31).wrapping_add(7);
                    std::hint::black_box(x);
                }
                let burnt = thread_cpu_time();
                // Alive (and named) until the caller has read its time.
                let _ = wait.recv();
                burnt
            })
            .unwrap();
        while named_threads_cpu_time("bench-test-busy") < Duration::from_millis(150) {
            std::thread::yield_now();
        }
        let named = named_threads_cpu_time("bench-test-busy");
        done.send(()).unwrap();
        let burnt = busy.join().unwrap();
        // /proc counts whole ticks of 10 ms.
        assert!(
            named <= burnt + Duration::from_millis(10),
            "{named:?} vs {burnt:?}"
        );
        assert_eq!(named_threads_cpu_time("no-such-thread"), Duration::ZERO);
    }
}
