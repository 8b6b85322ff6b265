//! Progress of long CLI jobs (produce, compact, audit): a bar redrawn in place on a terminal,
//! an `info` log line every 10 s otherwise, so cron jobs and containers still show that work
//! is moving without flooding their logs.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a terminal bar is redrawn at most.
const REDRAW: Duration = Duration::from_millis(100);
/// How often a progress line is logged when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Width of the bar in characters.
const WIDTH: usize = 30;

/// Reports `done` of `total` units of one job.
pub struct Meter {
    label: String,
    unit: &'static str,
    total: u64,
    terminal: bool,
    started: Instant,
    last: Instant,
    finished: bool,
}

impl Meter {
    /// A meter for `total` `unit`s; `bar` asks for a bar, drawn only when stderr is a terminal.
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str, bar: bool) -> Meter {
        let now = Instant::now();
        Meter {
            label: label.into(),
            unit,
            total,
            terminal: bar && std::io::stderr().is_terminal(),
            started: now,
            last: now,
            finished: false,
        }
    }

    /// Records progress; draws or logs only when it is time to.
    pub fn update(&mut self, done: u64, detail: &str) {
        let now = Instant::now();
        let every = if self.terminal { REDRAW } else { LOG_EVERY };
        if now.duration_since(self.last) < every {
            return;
        }
        self.last = now;
        self.show(done, detail);
    }

    /// Shows the final state (on a terminal, ends the bar's line).
    pub fn finish(&mut self, done: u64, detail: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.show(done, detail);
        if self.terminal {
            eprintln!();
        }
    }

    fn show(&self, done: u64, detail: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        if self.terminal {
            let line = render(&self.label, done, self.total, self.unit, rate, detail);
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{line}\x1b[K");
            let _ = err.flush();
        } else {
            tracing::info!(job = %self.label, done, total = self.total, unit = self.unit,
                per_second = rate.round() as u64, detail, "progress");
        }
    }
}

/// `label [#####.....] done/total unit (rate/s) detail`
fn render(label: &str, done: u64, total: u64, unit: &str, rate: f64, detail: &str) -> String {
    let filled = (WIDTH as u64 * done.min(total))
        .checked_div(total)
        .map_or(WIDTH, |f| f as usize);
    let mut line = format!(
        "{label} [{}{}] {done}/{total} {unit} ({rate:.0}/s)",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    if !detail.is_empty() {
        line.push(' ');
        line.push_str(detail);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_progress() {
        let half = render("produce", 50, 100, "messages", 12.4, "");
        assert_eq!(
            half,
            "produce [###############...............] 50/100 messages (12/s)"
        );
        let done = render("compact t", 3, 3, "partitions", 1.0, "last 2026-11-20");
        assert!(done.contains(&"#".repeat(WIDTH)), "{done}");
        assert!(done.ends_with("last 2026-11-20"), "{done}");
        assert!(render("x", 0, 0, "u", 0.0, "").contains(&"#".repeat(WIDTH)));
    }
}
