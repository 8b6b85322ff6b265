//! Progress of long CLI jobs (produce, compact, audit): an `indicatif` bar on a terminal, an
//! `info` log line every 10 s otherwise, so cron jobs and containers still show that work is
//! moving without flooding their logs.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a progress line is logged when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Reports `done` of `total` units of one job.
pub struct Meter {
    label: String,
    unit: &'static str,
    total: u64,
    /// The bar, when stderr is a terminal and the caller asked for one.
    bar: Option<ProgressBar>,
    started: Instant,
    last_logged: Instant,
    finished: bool,
}

/// `label [#####.....] done/total unit (rate/s, eta) detail`.
fn style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, {{eta}} left) {{msg}}"
    ))
    .expect("the template names only indicatif's keys")
    .progress_chars("#>.")
}

impl Meter {
    /// A meter for `total` `unit`s; `bar` asks for a bar, drawn only when stderr is a terminal.
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str, bar: bool) -> Meter {
        let label = label.into();
        let target = if bar && std::io::stderr().is_terminal() {
            Some(ProgressDrawTarget::stderr())
        } else {
            None
        };
        Meter::with_target(label, total, unit, target)
    }

    fn with_target(
        label: String,
        total: u64,
        unit: &'static str,
        target: Option<ProgressDrawTarget>,
    ) -> Meter {
        let bar = target.map(|target| {
            let bar = ProgressBar::with_draw_target(Some(total), target)
                .with_style(style(unit))
                .with_prefix(label.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Meter {
            label,
            unit,
            total,
            bar,
            started: now,
            last_logged: now,
            finished: false,
        }
    }

    /// Records progress; the bar redraws at its own pace, the log line every 10 s.
    pub fn update(&mut self, done: u64, detail: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(detail.to_string());
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last_logged) >= LOG_EVERY {
            self.last_logged = now;
            self.log(done, detail);
        }
    }

    /// Shows the final state; the bar stays on the terminal.
    pub fn finish(&mut self, done: u64, detail: &str) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.finish_with_message(detail.to_string());
            }
            None => self.log(done, detail),
        }
    }

    fn log(&self, done: u64, detail: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        tracing::info!(job = %self.label, done, total = self.total, unit = self.unit,
            per_second = rate.round() as u64, detail, "progress");
    }
}

impl Drop for Meter {
    /// A job that ended early (an error) leaves its bar where it stopped, on a line of its own.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar
            && !bar.is_finished()
        {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_counts_what_the_job_did_and_keeps_the_last_detail() {
        let mut meter = Meter::with_target(
            "compact t".into(),
            3,
            "partitions",
            Some(ProgressDrawTarget::hidden()),
        );
        meter.update(1, "last 2026-11-19");
        meter.finish(3, "last 2026-11-20");
        let bar = meter.bar.as_ref().unwrap();
        assert_eq!((bar.position(), bar.length()), (3, Some(3)));
        assert_eq!(bar.message(), "last 2026-11-20");
        assert!(bar.is_finished());
        assert_eq!(bar.prefix(), "compact t");
    }

    #[test]
    fn without_a_terminal_there_is_no_bar() {
        let meter = Meter::with_target("produce".into(), 10, "messages", None);
        assert!(meter.bar.is_none());
    }
}
