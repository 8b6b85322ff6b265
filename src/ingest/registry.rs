//! The schema registry: schemas fetched by id over the Confluent REST API (Confluent Schema
//! Registry, Karapace, Redpanda, Apicurio's `ccompat` API) and kept for the life of the process,
//! and the outage readiness reports.
//!
//! A registry that does not answer is not bad input: lookups wait and retry until it answers
//! (or the service stops), and [`Registry::problem`] says why meanwhile. Only an answer that the
//! id does not exist makes a message a dead letter.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::Notify;

use crate::table::problem::chain;

/// How to reach the registry; credentials come from the environment through the config.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Base URL of the Confluent-compatible API, e.g. `http://registry:8081` or Apicurio's
    /// `http://apicurio:8080/apis/ccompat/v7`.
    pub url: String,
    /// HTTP basic authentication user.
    pub username: Option<String>,
    /// HTTP basic authentication password.
    pub password: Option<String>,
    /// PEM file of the certificate authority that signed the registry's certificate, when it
    /// is not in the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// How long one request may take.
    pub timeout: Duration,
}

/// What a schema is written in: the registry's `schemaType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaKind {
    /// Apache Avro (the registry's default type).
    Avro,
    /// Protocol Buffers (`.proto` text).
    Protobuf,
    /// JSON Schema.
    Json,
}

impl SchemaKind {
    /// The registry's name for the type.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaKind::Avro => "AVRO",
            SchemaKind::Protobuf => "PROTOBUF",
            SchemaKind::Json => "JSON",
        }
    }
}

/// A schema as registered: its text and the schemas it imports, by the name it imports them.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredSchema {
    /// The registry's global id.
    pub id: u32,
    /// What the schema is written in.
    pub kind: SchemaKind,
    /// The schema text.
    pub text: String,
    /// Referenced schemas (Protobuf imports), transitively: import name → text.
    pub references: Vec<(String, String)>,
}

/// The answer to a lookup by id.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The registry holds the schema.
    Found(Arc<RegisteredSchema>),
    /// The registry answered that there is no such schema (or it cannot be used); why.
    Unknown(String),
}

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The settings cannot make a client.
    #[error("schema registry {url}: {problem}")]
    Settings {
        /// Configured URL.
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// The registry refused or could not be reached (registration, when producing).
    #[error("schema registry {url}: {problem}")]
    Request {
        /// Configured URL.
        url: String,
        /// What went wrong.
        problem: String,
    },
    /// The service is stopping; the lookup was abandoned.
    #[error("schema registry {url}: lookup abandoned, the service is stopping")]
    Closed {
        /// Configured URL.
        url: String,
    },
}

/// A registry outage as readiness shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// The last failure.
    pub error: String,
    /// Since when lookups fail.
    pub since: SystemTime,
}

/// First wait after a failed lookup; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A schema registry client with a cache of every schema it fetched (ids never change their
/// schema, so entries never expire).
pub struct Registry {
    settings: RegistrySettings,
    base: String,
    http: reqwest::Client,
    cache: Mutex<HashMap<u32, Arc<RegisteredSchema>>>,
    outage: Mutex<Option<Outage>>,
    closed: AtomicBool,
    close: Notify,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("url", &self.base).finish()
    }
}

/// `GET /schemas/ids/{id}` and `GET /subjects/{s}/versions/{v}` bodies.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<ReferenceBody>,
}

#[derive(Debug, Deserialize)]
struct ReferenceBody {
    name: String,
    subject: String,
    version: i64,
}

/// The registry's error body: `{"error_code": 40403, "message": "Schema not found"}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_code: i64,
    #[serde(default)]
    message: String,
}

/// Error codes of the Confluent API that mean "no such schema", as opposed to a wrong URL.
const SCHEMA_NOT_FOUND: [i64; 3] = [40403, 40401, 40402];

/// How one request ended.
enum Answer<T> {
    Ok(T),
    /// The registry says the thing does not exist.
    NotFound(String),
    /// No usable answer: retry.
    Failed(String),
}

impl Registry {
    /// A client for the registry of `settings`; nothing is requested yet.
    pub fn new(settings: RegistrySettings) -> Result<Arc<Registry>, RegistryError> {
        let invalid = |problem: String| RegistryError::Settings {
            url: settings.url.clone(),
            problem,
        };
        let parsed = url::Url::parse(&settings.url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid("use http:// or https://".into()));
        }
        if settings.password.is_some() && settings.username.is_none() {
            return Err(invalid(
                "a password is set but no username (registry.username)".into(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .timeout(settings.timeout);
        if let Some(file) = &settings.ca_file {
            let pem = std::fs::read(file)
                .map_err(|e| invalid(format!("registry.ca_file {}: {e}", file.display())))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| invalid(format!("registry.ca_file {}: {e}", file.display())))?;
            if certificates.is_empty() {
                return Err(invalid(format!(
                    "registry.ca_file {} holds no PEM certificate",
                    file.display()
                )));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().map_err(|e| invalid(e.to_string()))?;
        Ok(Arc::new(Registry {
            base: settings.url.trim_end_matches('/').to_string(),
            settings,
            http,
            cache: Mutex::new(HashMap::new()),
            outage: Mutex::new(None),
            closed: AtomicBool::new(false),
            close: Notify::new(),
        }))
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The current outage, if lookups are failing.
    pub fn outage(&self) -> Option<Outage> {
        self.outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Abandons lookups that wait for the registry (the service is stopping).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.close.notify_waiters();
    }

    /// The schema with `id`, from the cache or the registry. Waits and retries while the
    /// registry cannot be reached or answers with an error other than "not found".
    pub async fn schema(&self, id: u32) -> Result<Lookup, RegistryError> {
        if let Some(found) = self.cached(id) {
            return Ok(Lookup::Found(found));
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(RegistryError::Closed {
                    url: self.base.clone(),
                });
            }
            match self.fetch(id).await {
                Answer::Ok(schema) => {
                    self.recovered();
                    let schema = Arc::new(schema);
                    self.lock_cache().insert(id, schema.clone());
                    return Ok(Lookup::Found(schema));
                }
                Answer::NotFound(why) => {
                    self.recovered();
                    return Ok(Lookup::Unknown(why));
                }
                Answer::Failed(error) => {
                    self.failed(error, backoff);
                    let closed = self.close.notified();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = closed => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<RegisteredSchema>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, id: u32) -> Option<Arc<RegisteredSchema>> {
        self.lock_cache().get(&id).cloned()
    }

    fn failed(&self, error: String, backoff: Duration) {
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        match outage.as_mut() {
            Some(o) if o.error == error => {}
            Some(o) => {
                tracing::warn!(registry = %self.base, %error, "schema registry lookups fail; retrying");
                o.error = error;
            }
            None => {
                tracing::warn!(registry = %self.base, %error, backoff_ms = backoff.as_millis() as u64,
                    "schema registry lookups fail; waiting for it (nothing is skipped)");
                *outage = Some(Outage {
                    error,
                    since: SystemTime::now(),
                });
            }
        }
    }

    fn recovered(&self) {
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = outage.take() {
            let secs = SystemTime::now()
                .duration_since(o.since)
                .unwrap_or_default()
                .as_secs_f64();
            tracing::info!(registry = %self.base, down_s = secs, "schema registry answers again");
        }
    }

    /// `request` with the configured credentials.
    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.settings.username {
            Some(user) => request.basic_auth(user, self.settings.password.as_deref()),
            None => request,
        }
    }

    /// One request for `path`, its body parsed as `T`.
    async fn request<T: serde::de::DeserializeOwned>(&self, path: &str) -> Answer<T> {
        let request = self.authorized(self.http.get(format!("{}{path}", self.base)));
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Answer::Failed(format!("GET {path}: {}", chain(&e))),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return Answer::Failed(format!("GET {path}: {}", chain(&e))),
        };
        if status.is_success() {
            return match serde_json::from_slice(&body) {
                Ok(parsed) => Answer::Ok(parsed),
                Err(e) => Answer::Failed(format!(
                    "GET {path}: {status} with a body that is not a schema ({e}): is registry.url \
                     the Confluent-compatible API?"
                )),
            };
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(error) if SCHEMA_NOT_FOUND.contains(&error.error_code) => {
                Answer::NotFound(format!("{} (error {})", error.message, error.error_code))
            }
            Ok(error) => Answer::Failed(format!(
                "GET {path}: {status}: {} (error {})",
                error.message, error.error_code
            )),
            // A 404 without the registry's error body is a wrong URL, not a missing schema.
            Err(_) => Answer::Failed(format!(
                "GET {path}: {status}{}",
                if status == reqwest::StatusCode::NOT_FOUND {
                    " without a registry error body: is registry.url the Confluent-compatible API?"
                } else {
                    ""
                }
            )),
        }
    }

    async fn fetch(&self, id: u32) -> Answer<RegisteredSchema> {
        let body: SchemaBody = match self.request(&format!("/schemas/ids/{id}")).await {
            Answer::Ok(b) => b,
            Answer::NotFound(why) => {
                return Answer::NotFound(format!("the registry has no schema {id}: {why}"));
            }
            Answer::Failed(e) => return Answer::Failed(e),
        };
        let kind = match body.schema_type.as_deref().unwrap_or("AVRO") {
            "AVRO" => SchemaKind::Avro,
            "PROTOBUF" => SchemaKind::Protobuf,
            "JSON" => SchemaKind::Json,
            other => {
                return Answer::NotFound(format!("schema {id} is of unknown type `{other}`"));
            }
        };
        // References, transitively (a referenced schema may import others).
        let mut references = Vec::new();
        let mut pending: Vec<ReferenceBody> = body.references;
        while let Some(reference) = pending.pop() {
            if references.iter().any(|(name, _)| *name == reference.name) {
                continue;
            }
            let path = format!(
                "/subjects/{}/versions/{}",
                url::form_urlencoded::byte_serialize(reference.subject.as_bytes())
                    .collect::<String>(),
                reference.version
            );
            match self.request::<SchemaBody>(&path).await {
                Answer::Ok(referenced) => {
                    pending.extend(referenced.references);
                    references.push((reference.name, referenced.schema));
                }
                Answer::NotFound(why) => {
                    return Answer::NotFound(format!(
                        "schema {id} references `{}` (subject {} version {}), which the \
                         registry does not have: {why}",
                        reference.name, reference.subject, reference.version
                    ));
                }
                Answer::Failed(e) => return Answer::Failed(e),
            }
        }
        Answer::Ok(RegisteredSchema {
            id,
            kind,
            text: body.schema,
            references,
        })
    }

    /// Registers `text` under `subject` (or finds it already there); returns its id. For
    /// producers (`sluice produce`); no retries.
    pub async fn register(
        &self,
        subject: &str,
        kind: SchemaKind,
        text: &str,
    ) -> Result<u32, RegistryError> {
        let failed = |problem: String| RegistryError::Request {
            url: self.base.clone(),
            problem,
        };
        let subject_path: String =
            url::form_urlencoded::byte_serialize(subject.as_bytes()).collect();
        let mut body = serde_json::json!({ "schema": text });
        if kind != SchemaKind::Avro {
            body["schemaType"] = kind.as_str().into();
        }
        let request = self.authorized(
            self.http
                .post(format!("{}/subjects/{subject_path}/versions", self.base))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string()),
        );
        let response = request.send().await.map_err(|e| failed(chain(&e)))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| failed(chain(&e)))?;
        if !status.is_success() {
            return Err(failed(format!(
                "registering subject {subject}: {status}: {text}"
            )));
        }
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        serde_json::from_str::<Registered>(&text)
            .map(|r| r.id)
            .map_err(|e| failed(format!("registering subject {subject}: {e}: {text}")))
    }
}

/// The Confluent wire format: magic byte 0, then the schema id as a big-endian u32.
pub const MAGIC: u8 = 0;

/// The schema id and the bytes after the 5-byte header, or why the payload is not framed.
pub fn split_frame(payload: &[u8]) -> Result<(u32, &[u8]), String> {
    match payload {
        [] => Err("empty message: no magic byte and schema id".into()),
        [MAGIC, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [MAGIC, ..] => Err(format!(
            "{} bytes: too short for the magic byte and a 4-byte schema id",
            payload.len()
        )),
        [first, ..] => Err(format!(
            "starts with byte 0x{first:02x}, not the registry's magic byte 0x00 (is the topic \
             plain JSON? set its source's format)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_and_unframed_payloads_explained() {
        assert_eq!(
            split_frame(&[0, 0, 0, 1, 2, 9, 9]),
            Ok((258, &[9u8, 9][..]))
        );
        assert_eq!(split_frame(&[0, 0, 0, 0, 7]), Ok((7, &[][..])));
        assert!(split_frame(&[0, 1]).unwrap_err().contains("too short"));
        assert!(split_frame(b"{\"id\":1}").unwrap_err().contains("0x7b"));
        assert!(split_frame(b"").unwrap_err().contains("empty"));
    }
}
