//! Health: what `/healthz` and `/readyz` answer, and the gauges derived from the writers'
//! progress at scrape time (freshness, versions, assignment).
//!
//! Ready means, for every configured table: its writer is open, its consumer reports no
//! connection failure (credentials, TLS, protocol, unreachable brokers: shown with the
//! listener and the cause), the consumer group has given it an assignment (possibly empty:
//! more instances than partitions is healthy), no buffered message has waited longer than
//! `batch.max_age_ms + health.commit_stall_s` for a commit, the last commit did not fail, and
//! the table's object store answered the last probe; and the schema registry, when sources
//! use one, answered its last lookup. Readiness drops as soon as shutdown starts, so a load balancer stops routing before the process exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::watch;

use crate::ingest::kafka::Watch;
use crate::ingest::progress::Progress;
use crate::ingest::registry::Registry;

/// One readiness condition and how it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Table the check is about, or `service`.
    pub subject: String,
    /// What is checked: `writer`, `kafka`, `assignment`, `commits`, `object store`.
    pub name: &'static str,
    /// Whether it passes.
    pub ok: bool,
    /// Figures behind the verdict, for the operator reading the probe.
    pub detail: String,
}

/// The answer to `/readyz`.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Every check passes.
    pub ready: bool,
    /// Every check, failing ones included.
    pub checks: Vec<Check>,
}

impl Readiness {
    /// One line per check: `ok` or `FAIL`, subject, check, detail.
    pub fn render(&self) -> String {
        let mut out = String::from(if self.ready { "ready\n" } else { "not ready\n" });
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4} {} {}: {}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.subject,
                c.name,
                c.detail
            ));
        }
        out
    }
}

/// The last object-store probe of a table.
#[derive(Debug, Clone)]
enum Probe {
    /// Not probed yet.
    Pending,
    /// The store answered.
    Reachable,
    /// The store did not answer, since this time.
    Failed { error: String, since: SystemTime },
}

struct TableHealth {
    progress: watch::Receiver<Progress>,
    probe: Probe,
    /// The consumer's connection state, once known.
    kafka: Option<Arc<Watch>>,
}

struct Inner {
    tables: BTreeMap<String, TableHealth>,
    stopping: bool,
    /// The schema registry the sources read schemas from, if any.
    registry: Option<Arc<Registry>>,
}

/// Shared by the writers' helper tasks (which report into it) and the HTTP endpoint.
pub struct Health {
    /// Tables the config names; readiness waits for all of them to open.
    expected: usize,
    /// How long a buffered message may wait for its commit before readiness fails.
    max_wait: Duration,
    inner: Mutex<Inner>,
}

impl Health {
    /// Health for `expected` tables; a message may wait `max_wait` for its commit.
    pub fn new(expected: usize, max_wait: Duration) -> Arc<Health> {
        Arc::new(Health {
            expected,
            max_wait,
            inner: Mutex::new(Inner {
                tables: BTreeMap::new(),
                stopping: false,
                registry: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A table's writer is running and publishes its progress here.
    pub fn register(&self, table: &str, progress: watch::Receiver<Progress>) {
        self.lock().tables.insert(
            table.to_string(),
            TableHealth {
                progress,
                probe: Probe::Pending,
                kafka: None,
            },
        );
    }

    /// The table's consumer reports connection failures to `kafka`; readiness shows them.
    pub fn watch_kafka(&self, table: &str, kafka: Arc<Watch>) {
        if let Some(t) = self.lock().tables.get_mut(table) {
            t.kafka = Some(kafka);
        }
    }

    /// The sources read schemas from `registry`; readiness fails while it cannot be reached.
    pub fn watch_registry(&self, registry: Arc<Registry>) {
        self.lock().registry = Some(registry);
    }

    /// Shutdown has begun: not ready from now on.
    pub fn stopping(&self) {
        self.lock().stopping = true;
    }

    /// Records the outcome of an object-store probe of `table`.
    pub fn probed(&self, table: &str, result: Result<(), String>) {
        let mut inner = self.lock();
        let Some(t) = inner.tables.get_mut(table) else {
            return;
        };
        t.probe = match (result, &t.probe) {
            (Ok(()), _) => Probe::Reachable,
            (Err(error), Probe::Failed { since, .. }) => Probe::Failed {
                error,
                since: *since,
            },
            (Err(error), _) => Probe::Failed {
                error,
                since: SystemTime::now(),
            },
        };
    }

    /// Evaluates every check at `now`.
    pub fn readiness(&self, now: SystemTime) -> Readiness {
        let inner = self.lock();
        let mut checks = Vec::new();
        let service = |ok, detail: String| Check {
            subject: "service".into(),
            name: "writer",
            ok,
            detail,
        };
        if inner.stopping {
            checks.push(service(false, "shutting down".into()));
        }
        if let Some(registry) = &inner.registry {
            checks.push(match registry.outage() {
                None => Check {
                    subject: "service".into(),
                    name: "schema registry",
                    ok: true,
                    detail: format!("{} answers", registry.url()),
                },
                Some(outage) => Check {
                    subject: "service".into(),
                    name: "schema registry",
                    ok: false,
                    detail: format!(
                        "{} has not answered for {:.0} s, decoding waits for it (nothing is \
                         skipped): {}",
                        registry.url(),
                        now.duration_since(outage.since)
                            .unwrap_or_default()
                            .as_secs_f64(),
                        outage.error
                    ),
                },
            });
        }
        let open = inner.tables.len();
        if open < self.expected {
            checks.push(service(
                false,
                format!("{open} of {} tables open", self.expected),
            ));
        }
        for (name, table) in &inner.tables {
            let p = table.progress.borrow();
            let check = |name_: &'static str, ok, detail: String| Check {
                subject: name.clone(),
                name: name_,
                ok,
                detail,
            };
            if let Some(problem) = table.kafka.as_ref().and_then(|k| k.problem()) {
                checks.push(check(
                    "kafka",
                    false,
                    format!(
                        "{problem} (for {:.0} s)",
                        now.duration_since(problem.since)
                            .unwrap_or_default()
                            .as_secs_f64()
                    ),
                ));
            }
            checks.push(if p.assigned_once {
                check(
                    "assignment",
                    true,
                    format!("{} partitions assigned", p.owned.len()),
                )
            } else {
                check(
                    "assignment",
                    false,
                    "waiting for the consumer group to assign partitions".into(),
                )
            });
            checks.push(if p.partition_problems.is_empty() {
                check(
                    "positions",
                    true,
                    "every partition is read from the table's position".into(),
                )
            } else {
                check(
                    "positions",
                    false,
                    p.partition_problems
                        .iter()
                        .map(|(k, problem)| format!("{k}: {problem}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            });
            let waited = p
                .buffered_since
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            let last_commit = match p.last_commit_at {
                Some(t) => format!(
                    "last commit {:.0} s ago",
                    now.duration_since(t).unwrap_or_default().as_secs_f64()
                ),
                None => "no commit yet".into(),
            };
            checks.push(match &p.store_error {
                Some(e) => check(
                    "commits",
                    false,
                    format!("the last commit attempt failed and is being retried: {e}"),
                ),
                None if waited > self.max_wait => check(
                    "commits",
                    false,
                    format!(
                        "buffered messages have waited {:.0} s for a commit (limit {} s); {last_commit}",
                        waited.as_secs_f64(),
                        self.max_wait.as_secs()
                    ),
                ),
                None => check("commits", true, last_commit),
            });
            checks.push(match &table.probe {
                Probe::Pending => check("object store", true, "not probed yet".into()),
                Probe::Reachable => check("object store", true, "reachable".into()),
                Probe::Failed { error, since } => check(
                    "object store",
                    false,
                    format!(
                        "unreachable for {:.0} s: {error}",
                        now.duration_since(*since).unwrap_or_default().as_secs_f64()
                    ),
                ),
            });
        }
        Readiness {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    /// Sets the gauges that are functions of time or of the writers' progress; called right
    /// before each scrape, so freshness is exact when Prometheus reads it.
    pub fn observe(&self, now: SystemTime) {
        let readiness = self.readiness(now);
        metrics::gauge!("sluice_ready").set(if readiness.ready { 1.0 } else { 0.0 });
        let now_s = seconds(now);
        let inner = self.lock();
        for (name, table) in &inner.tables {
            let p = table.progress.borrow();
            let t = name.clone();
            metrics::gauge!("sluice_table_version", "table" => t.clone())
                .set(p.table_version as f64);
            metrics::gauge!("sluice_assigned_partitions", "table" => t.clone())
                .set(p.owned.len() as f64);
            if let Some(at) = p.last_commit_at {
                metrics::gauge!("sluice_last_commit_timestamp_seconds", "table" => t.clone())
                    .set(seconds(at));
            }
            if let Some(ms) = p.newest_committed_ms {
                let newest = ms as f64 / 1000.0;
                metrics::gauge!("sluice_last_committed_message_timestamp_seconds", "table" => t.clone())
                    .set(newest);
                metrics::gauge!("sluice_freshness_seconds", "table" => t)
                    .set((now_s - newest).max(0.0));
            }
        }
    }
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Asks the store for the table's newest known commit file, or failing that for its
/// `_last_checkpoint` (log cleanup may have removed an old commit file); either answers that
/// the store is reachable and the table is where it should be.
pub async fn probe_store(store: &dyn ObjectStore, version: i64) -> Result<(), String> {
    let commit = Path::from(format!("_delta_log/{:020}.json", version.max(0)));
    match store.head(&commit).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => {
            match store.head(&Path::from("_delta_log/_last_checkpoint")).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Err(format!(
                    "the table's log is gone: neither {commit} nor _delta_log/_last_checkpoint exists"
                )),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// How long one probe may take before it counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes a table's store every `interval` and reports into `health` until the task is
/// aborted.
pub async fn probe_loop(
    health: Arc<Health>,
    table: String,
    store: Arc<dyn ObjectStore>,
    progress: watch::Receiver<Progress>,
    interval: Duration,
) {
    loop {
        let version = progress.borrow().table_version;
        // The store's client retries a refused connection for minutes; a probe that hangs
        // that long must not leave the last good answer standing.
        let result = tokio::time::timeout(PROBE_TIMEOUT, probe_store(store.as_ref(), version))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())));
        if let Err(e) = &result {
            tracing::warn!(table = %table, error = %e, "object store probe failed");
            metrics::counter!("sluice_object_store_errors_total", "table" => table.clone(), "operation" => "probe")
                .increment(1);
        }
        health.probed(&table, result);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health_with(progress: Progress) -> (Arc<Health>, watch::Sender<Progress>) {
        let health = Health::new(1, Duration::from_secs(70));
        let (tx, rx) = watch::channel(progress);
        health.register("t", rx);
        (health, tx)
    }

    fn failing(r: &Readiness) -> Vec<&'static str> {
        r.checks.iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }

    #[test]
    fn ready_needs_every_table_open_and_assigned() {
        let health = Health::new(2, Duration::from_secs(70));
        let now = SystemTime::now();
        let r = health.readiness(now);
        assert!(!r.ready);
        assert!(r.render().contains("0 of 2 tables open"), "{}", r.render());

        let (tx, rx) = watch::channel(Progress::default());
        health.register("t", rx);
        let (_tx2, rx2) = watch::channel(Progress {
            assigned_once: true,
            ..Progress::default()
        });
        health.register("u", rx2);
        assert_eq!(failing(&health.readiness(now)), vec!["assignment"]);
        tx.send_modify(|p| p.assigned_once = true);
        assert!(health.readiness(now).ready);
        health.stopping();
        assert!(!health.readiness(now).ready);
    }

    #[test]
    fn a_stalled_or_failing_commit_and_an_unreachable_store_are_not_ready() {
        let now = SystemTime::now();
        let (health, tx) = health_with(Progress {
            assigned_once: true,
            buffered_since: Some(now - Duration::from_secs(30)),
            ..Progress::default()
        });
        assert!(health.readiness(now).ready);
        tx.send_modify(|p| p.buffered_since = Some(now - Duration::from_secs(71)));
        let r = health.readiness(now);
        assert_eq!(failing(&r), vec!["commits"]);
        assert!(r.render().contains("waited 71 s"), "{}", r.render());

        tx.send_modify(|p| {
            p.buffered_since = None;
            p.store_error = Some("connection refused".into());
        });
        assert_eq!(failing(&health.readiness(now)), vec!["commits"]);
        tx.send_modify(|p| p.store_error = None);

        health.probed("t", Err("connection refused".into()));
        let r = health.readiness(now);
        assert_eq!(failing(&r), vec!["object store"]);
        assert!(r.render().contains("connection refused"));
        health.probed("t", Ok(()));
        assert!(health.readiness(now).ready);
    }

    #[test]
    fn a_kafka_connection_failure_is_named_until_the_connection_works() {
        let now = SystemTime::now();
        let (health, _tx) = health_with(Progress::default());
        let connection = crate::ingest::kafka::Connection {
            brokers: "127.0.0.1:9094".into(),
            properties: [("security.protocol".to_string(), "SASL_SSL".to_string())].into(),
        };
        let kafka = Arc::new(Watch::new(&connection));
        health.watch_kafka("t", kafka.clone());
        assert_eq!(failing(&health.readiness(now)), vec!["assignment"]);
        kafka.report(
            &rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::Authentication),
            "sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: invalid credentials",
        );
        let r = health.readiness(SystemTime::now());
        assert_eq!(failing(&r), vec!["kafka", "assignment"]);
        assert!(
            r.render()
                .contains("FAIL t kafka: authentication failed at sasl_ssl://127.0.0.1:9094"),
            "{}",
            r.render()
        );
        kafka.connected();
        assert_eq!(failing(&health.readiness(now)), vec!["assignment"]);
    }

    #[tokio::test]
    async fn the_probe_finds_the_commit_or_the_checkpoint_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        assert!(
            probe_store(&store, 3)
                .await
                .unwrap_err()
                .contains("log is gone")
        );
        std::fs::create_dir_all(dir.path().join("_delta_log")).unwrap();
        std::fs::write(
            dir.path().join("_delta_log/00000000000000000003.json"),
            "{}",
        )
        .unwrap();
        probe_store(&store, 3).await.unwrap();
        std::fs::write(dir.path().join("_delta_log/_last_checkpoint"), "{}").unwrap();
        probe_store(&store, 9).await.unwrap();
    }
}
