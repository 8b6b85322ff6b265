//! The compaction lease: at most one compactor rewrites a table's files at a time.
//!
//! Two optimize runs over the same files can both commit in delta-rs 1.1 and duplicate rows,
//! so the service's background task and every scheduled `sluice compact` must hold the lease
//! to rewrite files. The lease lives in the table's own store, under `_sluice/` (a hidden
//! folder: Delta readers and vacuum leave it alone), as a numbered sequence of records written
//! with put-if-absent, the same primitive Delta commits rely on:
//! `_sluice/compaction-lease/00000000000000000007.json = {owner, expires_at_ms, released}`.
//!
//! The newest record is the lease. Taking over an expired or released lease, renewing, and
//! releasing all mean creating the next record; of two processes racing for the same number
//! exactly one succeeds, and the other learns it lost. A holder renews before it commits, so
//! a process that was paused past its expiry finds the next record taken and stops.
//! Expiry is wall-clock time: hosts that share a table need clocks within a small fraction of
//! the lease duration of each other.

use std::sync::Arc;
use std::time::Duration;

use crate::table::problem::StorageError;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

/// Folder of the lease records, relative to the table root.
pub const LEASE_DIR: &str = "_sluice/compaction-lease";

/// How often a racing acquire re-reads before giving up.
const MAX_RACES: usize = 8;

/// How often reading the newest record lists again when the record it saw was pruned meanwhile.
const MAX_LISTINGS: u32 = 10;

/// Errors reading or writing the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed.
    #[error("compaction lease at {path}: {source}")]
    Store {
        /// The record or folder involved.
        path: String,
        /// The store's error.
        source: StorageError<object_store::Error>,
    },
    /// A record is not what sluice writes.
    #[error("compaction lease record {path} is unreadable: {reason}")]
    Corrupt {
        /// The record.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Another process took the lease (this one's expired, or it raced and lost).
    #[error("compaction lease lost to {owner}")]
    Lost {
        /// Who holds it now.
        owner: String,
    },
}

/// One lease record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds (or held) the lease: host, process and a random part.
    pub owner: String,
    /// Until when, in milliseconds since the epoch.
    pub expires_at_ms: i64,
    /// Whether the owner gave it up before expiry.
    pub released: bool,
}

impl LeaseRecord {
    fn is_live(&self, now: DateTime<Utc>) -> bool {
        !self.released && self.expires_at_ms > now.timestamp_millis()
    }

    fn busy(self) -> Acquired {
        Acquired::Busy {
            expires_at: DateTime::from_timestamp_millis(self.expires_at_ms).unwrap_or_default(),
            owner: self.owner,
        }
    }
}

/// The outcome of trying to take the lease.
#[derive(Debug)]
pub enum Acquired {
    /// This process holds the lease.
    Held(Lease),
    /// Someone else does, until `expires_at` unless they renew.
    Busy {
        /// The holder.
        owner: String,
        /// When their lease runs out.
        expires_at: DateTime<Utc>,
    },
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    owner: String,
    generation: u64,
    ttl: Duration,
    expires_at_ms: i64,
}

/// A lease owner id for this process: host, pid and a random part, so a restarted process
/// never mistakes its predecessor's lease for its own.
pub fn owner_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown-host".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/pid-{}/{}", std::process::id(), &random[..8])
}

fn record_path(generation: u64) -> Path {
    Path::from(format!("{LEASE_DIR}/{generation:020}.json"))
}

fn store_error(path: &Path) -> impl FnOnce(object_store::Error) -> LeaseError + '_ {
    move |source| LeaseError::Store {
        path: path.to_string(),
        source: StorageError(source),
    }
}

/// The newest record and its number, if any.
async fn latest(store: &dyn ObjectStore) -> Result<Option<(u64, LeaseRecord)>, LeaseError> {
    let dir = Path::from(LEASE_DIR);
    let mut attempt = 1;
    loop {
        let listed: Vec<_> = store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(store_error(&dir))?;
        let newest = listed
            .iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                name.strip_suffix(".json")?.parse::<u64>().ok()
            })
            .max();
        let Some(generation) = newest else {
            return Ok(None);
        };
        let path = record_path(generation);
        let bytes = match store.get(&path).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            // Another compactor wrote a newer record and pruned this one after the listing:
            // list again.
            Err(object_store::Error::NotFound { .. }) if attempt < MAX_LISTINGS => {
                attempt += 1;
                continue;
            }
            Err(e) => return Err(store_error(&path)(e)),
        };
        let record = serde_json::from_slice(&bytes).map_err(|e| LeaseError::Corrupt {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        return Ok(Some((generation, record)));
    }
}

/// Writes record `generation` unless it exists. `Ok(false)` means someone else wrote it first.
async fn create(
    store: &dyn ObjectStore,
    generation: u64,
    record: &LeaseRecord,
) -> Result<bool, LeaseError> {
    let path = record_path(generation);
    let body = serde_json::to_vec(record).expect("lease records serialize");
    let options = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store.put_opts(&path, PutPayload::from(body), options).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(store_error(&path)(e)),
    }
}

/// Deletes records older than `keep_from`; best effort, since only the newest one matters.
async fn prune(store: &dyn ObjectStore, keep_from: u64) {
    let dir = Path::from(LEASE_DIR);
    let Ok(listed) = store.list(Some(&dir)).try_collect::<Vec<_>>().await else {
        return;
    };
    for meta in listed {
        let old = meta
            .location
            .filename()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|g| g < keep_from);
        if old {
            let _ = store.delete(&meta.location).await;
        }
    }
}

/// The current lease record, for `sluice inspect`.
pub async fn current(store: &dyn ObjectStore) -> Result<Option<LeaseRecord>, LeaseError> {
    Ok(latest(store).await?.map(|(_, record)| record))
}

/// Takes the lease for `ttl` unless another owner holds a live one.
pub async fn acquire(
    store: Arc<dyn ObjectStore>,
    owner: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<Acquired, LeaseError> {
    for _ in 0..MAX_RACES {
        let next = match latest(store.as_ref()).await? {
            Some((_, record)) if record.is_live(now) && record.owner != owner => {
                return Ok(record.busy());
            }
            Some((generation, _)) => generation + 1,
            None => 0,
        };
        let record = LeaseRecord {
            owner: owner.to_string(),
            expires_at_ms: now.timestamp_millis() + ttl.as_millis() as i64,
            released: false,
        };
        if create(store.as_ref(), next, &record).await? {
            prune(store.as_ref(), next.saturating_sub(1)).await;
            return Ok(Acquired::Held(Lease {
                store,
                owner: owner.to_string(),
                generation: next,
                ttl,
                expires_at_ms: record.expires_at_ms,
            }));
        }
        // Another process wrote the same record first: read again to see who holds it.
    }
    match latest(store.as_ref()).await? {
        Some((_, record)) => Ok(record.busy()),
        None => Err(LeaseError::Lost {
            owner: "nobody (the lease folder was emptied during the race)".into(),
        }),
    }
}

impl Lease {
    /// Who holds it.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// When it runs out unless renewed.
    pub fn expires_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.expires_at_ms).unwrap_or_default()
    }

    /// Extends the lease by its duration from `now`. Fails with [`LeaseError::Lost`] if it
    /// expired and someone else took it (or it was otherwise taken), in which case the caller
    /// must not commit anything it prepared under the lease.
    pub async fn renew(&mut self, now: DateTime<Utc>) -> Result<(), LeaseError> {
        let record = LeaseRecord {
            owner: self.owner.clone(),
            expires_at_ms: now.timestamp_millis() + self.ttl.as_millis() as i64,
            released: false,
        };
        if now.timestamp_millis() >= self.expires_at_ms {
            // Expired: someone may have taken it; creating the next record settles it.
            tracing::warn!(owner = %self.owner, "compaction lease expired before renewal");
        }
        self.advance(&record).await?;
        self.expires_at_ms = record.expires_at_ms;
        Ok(())
    }

    /// Writes the next record, or reports who took the lease if that number is taken.
    async fn advance(&mut self, record: &LeaseRecord) -> Result<(), LeaseError> {
        if create(self.store.as_ref(), self.generation + 1, record).await? {
            self.generation += 1;
            prune(self.store.as_ref(), self.generation.saturating_sub(1)).await;
            return Ok(());
        }
        let owner = latest(self.store.as_ref())
            .await?
            .map(|(_, r)| r.owner)
            .unwrap_or_default();
        Err(LeaseError::Lost { owner })
    }

    /// Gives the lease up so the next compactor need not wait for expiry.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        let record = LeaseRecord {
            owner: self.owner.clone(),
            expires_at_ms: self.expires_at_ms,
            released: true,
        };
        self.advance(&record).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::local::LocalFileSystem;
    use object_store::memory::InMemory;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn held(a: Acquired) -> Lease {
        match a {
            Acquired::Held(lease) => lease,
            Acquired::Busy { owner, .. } => panic!("expected the lease, {owner} holds it"),
        }
    }

    async fn lifecycle(store: Arc<dyn ObjectStore>) {
        let mut a = held(acquire(store.clone(), "a", TTL, at(0)).await.unwrap());
        // A live lease keeps others out and says until when.
        match acquire(store.clone(), "b", TTL, at(30)).await.unwrap() {
            Acquired::Busy { owner, expires_at } => {
                assert_eq!((owner.as_str(), expires_at), ("a", at(60)))
            }
            Acquired::Held(_) => panic!("b took a live lease"),
        }
        // Renewal pushes expiry out.
        a.renew(at(50)).await.unwrap();
        assert_eq!(a.expires_at(), at(110));
        assert!(matches!(
            acquire(store.clone(), "b", TTL, at(100)).await.unwrap(),
            Acquired::Busy { .. }
        ));
        // After expiry, b takes over, and a (paused meanwhile) learns it lost.
        let b = held(acquire(store.clone(), "b", TTL, at(111)).await.unwrap());
        match a.renew(at(112)).await {
            Err(LeaseError::Lost { owner }) => assert_eq!(owner, "b"),
            other => panic!("a's stale renewal must fail: {other:?}"),
        }
        // Release hands over without waiting.
        b.release().await.unwrap();
        let c = held(acquire(store.clone(), "c", TTL, at(113)).await.unwrap());
        assert_eq!(current(store.as_ref()).await.unwrap().unwrap().owner, "c");
        c.release().await.unwrap();
        // Old records are pruned; the folder stays small.
        let records: Vec<_> = store
            .list(Some(&Path::from(LEASE_DIR)))
            .try_collect()
            .await
            .unwrap();
        assert!(records.len() <= 2, "{records:?}");
    }

    #[tokio::test]
    async fn lease_lifecycle_in_memory() {
        lifecycle(Arc::new(InMemory::new())).await;
    }

    #[tokio::test]
    async fn lease_lifecycle_on_local_disk() {
        let dir = tempfile::tempdir().unwrap();
        lifecycle(Arc::new(
            LocalFileSystem::new_with_prefix(dir.path()).unwrap(),
        ))
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_many_simultaneous_compactors_exactly_one_gets_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        for round in 0..5 {
            let now = at(round * 1000);
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        acquire(store, &format!("worker-{i}"), TTL, now)
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for t in tasks {
                if let Acquired::Held(lease) = t.await.unwrap() {
                    winners.push(lease);
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
            winners.pop().unwrap().release().await.unwrap();
        }
    }
}
