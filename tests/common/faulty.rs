//! A local folder behind the `faulty://` scheme, registered with delta-rs as S3 is, whose
//! faults each test arms: a commit that lands and then reports an error, a store ignoring
//! `If-None-Match: *`, a store that accepts requests and never answers, data files that cannot
//! be read until the test says so. Every listing of a table's log is counted. Each test names
//! its own host (`faulty://<host>/<folder>`) and so its own faults.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use deltalake::DeltaResult;
use deltalake::logstore::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    local::LocalFileSystem, path::Path,
};
use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig, default_logstore,
    logstore_factories, object_store_factories,
};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tokio::sync::watch;
use url::Url;

/// The faults armed on one host of the `faulty://` scheme.
pub struct Faults {
    /// Table folders (`<table>/_delta_log/`) whose next commit lands and then reports an
    /// error, once per entry.
    pub land_then_fail: Mutex<Vec<String>>,
    /// How many commits landed and then failed.
    pub landed_then_failed: Mutex<Vec<String>>,
    /// Writes with `If-None-Match: *` overwrite instead of failing on an existing object.
    pub ignore_if_none_match: bool,
    /// While false, every request waits (a store that accepts and never answers).
    pub answering: watch::Sender<bool>,
    /// Every listing of a `_delta_log` folder while recording.
    pub log_listings: Mutex<Vec<Listing>>,
    /// Whether listings are recorded (off while the test itself writes a checkpoint).
    pub recording: std::sync::atomic::AtomicBool,
    /// While false, reads of data files (Parquet outside `_delta_log`) wait.
    pub data_reads: watch::Sender<bool>,
    /// Data-file reads that waited on `data_reads`.
    pub data_reads_held: watch::Sender<usize>,
}

impl Faults {
    pub fn new(ignore_if_none_match: bool) -> Faults {
        Faults {
            land_then_fail: Mutex::default(),
            landed_then_failed: Mutex::default(),
            ignore_if_none_match,
            answering: watch::channel(true).0,
            log_listings: Mutex::default(),
            recording: true.into(),
            data_reads: watch::channel(true).0,
            data_reads_held: watch::channel(0).0,
        }
    }

    /// Holds a read of a data file while `data_reads` is off.
    async fn read_data(&self, location: &Path) {
        let path = location.as_ref();
        if !path.ends_with(".parquet") || path.contains("/_delta_log/") || *self.data_reads.borrow()
        {
            return;
        }
        self.data_reads_held.send_modify(|n| *n += 1);
        let mut reads = self.data_reads.subscribe();
        let _ = reads.wait_for(|open| *open).await;
    }

    async fn answer(&self) {
        let mut answering = self.answering.subscribe();
        let _ = answering.wait_for(|a| *a).await;
    }

    /// Records a listing of a table's log: from which version it starts (`None`: the whole
    /// folder) and the table's last checkpoint at that moment.
    fn listed(&self, prefix: Option<&Path>, offset: Option<&Path>) {
        if !self.recording.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(path) = offset.or(prefix).map(|p| p.to_string()) else {
            return;
        };
        let Some((table, rest)) = path.split_once("/_delta_log") else {
            return;
        };
        let from = offset.and_then(|_| rest.trim_start_matches('/').get(..20)?.parse().ok());
        let checkpoint = std::fs::read(format!("/{table}/_delta_log/_last_checkpoint"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["version"].as_i64());
        self.log_listings
            .lock()
            .unwrap()
            .push(Listing { from, checkpoint });
    }
}

/// One listing of a `_delta_log` folder.
#[derive(Debug, Clone, Copy)]
pub struct Listing {
    /// The version the listing starts from; `None` lists the whole folder.
    pub from: Option<i64>,
    /// The table's last checkpoint when it was listed.
    pub checkpoint: Option<i64>,
}

fn hosts() -> &'static Mutex<HashMap<String, Arc<Faults>>> {
    static HOSTS: OnceLock<Mutex<HashMap<String, Arc<Faults>>>> = OnceLock::new();
    HOSTS.get_or_init(Default::default)
}

/// Registers the `faulty://` scheme (once per process) and a host with its faults; returns
/// the storage root for a folder of `dir`.
pub fn faulty_root(host: &str, dir: &std::path::Path, faults: Faults) -> (String, Arc<Faults>) {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        let scheme = Url::parse("faulty://").unwrap();
        object_store_factories().insert(scheme.clone(), Arc::new(FaultyFactory));
        logstore_factories().insert(scheme, Arc::new(FaultyFactory));
    });
    let faults = Arc::new(faults);
    hosts()
        .lock()
        .unwrap()
        .insert(host.to_string(), faults.clone());
    (format!("faulty://{host}{}", dir.display()), faults)
}

struct FaultyFactory;

impl ObjectStoreFactory for FaultyFactory {
    fn parse_url_opts(
        &self,
        url: &Url,
        _config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, Path)> {
        let host = url.host_str().unwrap_or_default();
        let faults = hosts()
            .lock()
            .unwrap()
            .get(host)
            .cloned()
            .unwrap_or_else(|| panic!("no faults registered for host {host}"));
        let store = FaultyStore {
            inner: LocalFileSystem::new(),
            faults,
        };
        Ok((Arc::new(store), Path::from_url_path(url.path())?))
    }
}

impl LogStoreFactory for FaultyFactory {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

#[derive(Debug)]
struct FaultyStore {
    inner: LocalFileSystem,
    faults: Arc<Faults>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Faults")
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    /// Lists in key order, as S3 does (delta-rs relies on it for every scheme but `file://`).
    fn sorted(
        &self,
        listing: BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let faults = self.faults.clone();
        futures::stream::once(async move {
            faults.answer().await;
            let mut all: Vec<ObjectMeta> = listing.try_collect().await?;
            all.sort_by(|a, b| a.location.cmp(&b.location));
            Ok::<_, object_store::Error>(futures::stream::iter(all.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }
}

fn is_commit(location: &Path) -> bool {
    let s = location.as_ref();
    s.ends_with(".json")
        && s.rsplit('/')
            .next()
            .is_some_and(|name| name.len() == 25 && name[..20].bytes().all(|b| b.is_ascii_digit()))
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.faults.answer().await;
        if self.faults.ignore_if_none_match && opts.mode == PutMode::Create {
            opts.mode = PutMode::Overwrite;
        }
        let armed = is_commit(location) && {
            let mut armed = self.faults.land_then_fail.lock().unwrap();
            let path = location.as_ref();
            match armed
                .iter()
                .position(|table| path.contains(&format!("/{table}/_delta_log/")))
            {
                Some(i) => {
                    armed.remove(i);
                    true
                }
                None => false,
            }
        };
        let result = self.inner.put_opts(location, payload, opts).await?;
        if armed {
            self.faults
                .landed_then_failed
                .lock()
                .unwrap()
                .push(location.to_string());
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: "the response timed out after the object was stored".into(),
            });
        }
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.faults.answer().await;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.faults.answer().await;
        self.faults.read_data(location).await;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.faults.listed(prefix, None);
        self.sorted(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.faults.listed(prefix, Some(offset));
        self.sorted(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.faults.listed(prefix, None);
        self.faults.answer().await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.faults.answer().await;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.faults.answer().await;
        self.inner.rename_opts(from, to, options).await
    }
}
