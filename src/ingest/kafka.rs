//! Kafka clients: one way to configure them, no secret in any error or log line, and connection
//! failures explained.
//!
//! Every client sluice creates (the writer's consumer, the dead-letter producer, `sluice
//! produce`, `sluice audit`, `sluice bench`) starts from a [`Connection`]: bootstrap servers plus
//! the user's librdkafka properties (TLS, SASL), which win over sluice's own settings.
//!
//! librdkafka reports a broken connection as a stream of repeated global errors. [`Watch`], the
//! clients' context, turns them into one [`Problem`] naming the listener, the cause and what to
//! check: wrong credentials, a certificate the client does not trust, a plaintext client on a
//! TLS listener, an unreachable broker. The service logs it once and `/readyz` shows it until the
//! connection works; one-shot commands stop with it ([`Connection::check`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaConfRes, RDKafkaErrorCode};

/// How long a one-shot command waits for the cluster to answer before it gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A partition's low and high watermarks: the first offset the broker still has and the one
/// its next message will get. librdkafka's call blocks, so it runs on a blocking thread.
pub async fn watermarks<X, C>(
    consumer: Arc<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError>
where
    X: ConsumerContext + 'static,
    C: Consumer<X> + Send + Sync + 'static,
{
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition, timeout))
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}
/// Replaces a secret wherever it would be shown.
const REDACTED: &str = "<redacted>";
/// Secrets shorter than this are not searched for inside free text (a one-letter "secret"
/// would blank every such letter of a message); they are still redacted where sluice knows
/// the property, as in configuration errors.
const MIN_SCRUBBED_LEN: usize = 4;

/// Property names whose values must never be printed: passwords, secrets, tokens and keys
/// (`sasl.password`, `ssl.key.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`),
/// and `sasl.oauthbearer.config`, which may carry credentials. File locations and URLs
/// (`ssl.key.location`, `sasl.oauthbearer.token.endpoint.url`) are not secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    (["password", "secret", "token", "key", "credential"]
        .iter()
        .any(|s| key.contains(s))
        && !key.ends_with(".location")
        && !key.ends_with(".url"))
        || key == "sasl.oauthbearer.config"
}

/// Errors creating or connecting a Kafka client. Their text never holds a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// librdkafka refused the configuration (an unknown property, an invalid value).
    #[error("kafka client for {brokers}: {message}")]
    Config {
        /// Bootstrap servers.
        brokers: String,
        /// librdkafka's complaint, secrets redacted.
        message: String,
    },
    /// The client could not talk to the cluster.
    #[error("kafka at {brokers}: {problem}")]
    Connect {
        /// Bootstrap servers.
        brokers: String,
        /// What went wrong and what to check.
        problem: Box<Problem>,
    },
}

/// Where a Kafka client connects and how: bootstrap servers and librdkafka properties.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// Bootstrap servers (`host:port,...`).
    pub brokers: String,
    /// librdkafka properties (`security.protocol`, `sasl.*`, `ssl.*`, timeouts). They override
    /// the settings sluice chooses for each client.
    pub properties: BTreeMap<String, String>,
}

impl Connection {
    /// A connection with no extra properties (PLAINTEXT).
    pub fn plain(brokers: &str) -> Connection {
        Connection {
            brokers: brokers.to_string(),
            properties: BTreeMap::new(),
        }
    }

    /// The client configuration: bootstrap servers, then sluice's `settings` for this client,
    /// then the user's properties (which win).
    pub fn client_config(&self, settings: &[(&str, &str)]) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (key, value) in settings {
            client.set(*key, *value);
        }
        for (key, value) in &self.properties {
            client.set(key, value);
        }
        client
    }

    /// Creates a client from `config` with a [`Watch`] context; a refused configuration is an
    /// error without secrets.
    pub fn create<T>(&self, config: &ClientConfig) -> Result<(T, Arc<Watch>), ClientError>
    where
        T: FromClientConfigAndContext<WatchContext>,
    {
        self.create_watched(config, Watch::new(self))
    }

    fn create_watched<T>(
        &self,
        config: &ClientConfig,
        watch: Watch,
    ) -> Result<(T, Arc<Watch>), ClientError>
    where
        T: FromClientConfigAndContext<WatchContext>,
    {
        let watch = Arc::new(watch);
        let client = config
            .create_with_context(WatchContext {
                watch: watch.clone(),
            })
            .map_err(|e| self.config_error(&e))?;
        Ok((client, watch))
    }

    /// The error for a configuration librdkafka refused, with the value of a secret property
    /// (and any secret inside the message) redacted.
    pub fn config_error(&self, error: &KafkaError) -> ClientError {
        let message = match error {
            // A property librdkafka does not know may be a misspelt secret (`sasl.pasword`):
            // its value is never shown.
            KafkaError::ClientConfig(
                RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
                description,
                key,
                _,
            ) => {
                format!("unknown property {key}: {description}")
            }
            KafkaError::ClientConfig(_, description, key, value) => {
                let value = if is_secret_key(key) { REDACTED } else { value };
                format!("invalid property {key} = {value}: {description}")
            }
            other => other.to_string(),
        };
        ClientError::Config {
            brokers: self.brokers.clone(),
            message: self.redactor().scrub(&message),
        }
    }

    /// The values of the secret properties, for scrubbing text.
    pub fn redactor(&self) -> Redactor {
        let mut secrets: Vec<String> = self
            .properties
            .iter()
            .filter(|(key, value)| is_secret_key(key) && value.len() >= MIN_SCRUBBED_LEN)
            .map(|(_, value)| value.clone())
            .collect();
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    /// How the client talks to the brokers: `SASL_SSL with SCRAM-SHA-512`, `SSL`, `PLAINTEXT`.
    pub fn security(&self) -> String {
        let get = |key: &str| {
            self.properties
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
        };
        let protocol = get("security.protocol")
            .unwrap_or("plaintext")
            .to_ascii_uppercase();
        if protocol.starts_with("SASL") {
            let mechanism = get("sasl.mechanism")
                .or_else(|| get("sasl.mechanisms"))
                .unwrap_or("GSSAPI");
            format!("{protocol} with {mechanism}")
        } else {
            protocol
        }
    }

    /// Connects to the cluster and reads its metadata, within `timeout`. Wrong credentials,
    /// untrusted certificates and protocol mismatches fail at once; an unreachable cluster
    /// fails when the time is up. For one-shot commands, before they publish or read.
    pub async fn check(&self, timeout: Duration) -> Result<(), ClientError> {
        // The caller reports the failure; the watch only finds it.
        let quiet = Watch {
            logs: false,
            ..Watch::new(self)
        };
        let (consumer, watch): (BaseConsumer<WatchContext>, _) = self.create_watched(
            &self.client_config(&[("group.id", "sluice-connection-check")]),
            quiet,
        )?;
        let connection = self.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            loop {
                let attempt = consumer.fetch_metadata(None, Duration::from_millis(500));
                // librdkafka queues its log lines (where it tells why a connection failed) for
                // the client's poll: serve them to the watch.
                let _ = consumer.poll(Duration::from_millis(50));
                if attempt.is_ok() {
                    watch.connected();
                    return Ok(());
                }
                let fail = |problem| ClientError::Connect {
                    brokers: connection.brokers.clone(),
                    problem: Box::new(problem),
                };
                match watch.problem() {
                    Some(p) if p.kind != ProblemKind::Unreachable => return Err(fail(p)),
                    problem if Instant::now() >= deadline => {
                        let problem = problem.unwrap_or_else(|| Problem {
                            kind: ProblemKind::Unreachable,
                            listener: connection.brokers.clone(),
                            security: connection.security(),
                            detail: attempt.err().map_or_else(String::new, |e| {
                                connection.redactor().scrub(&e.to_string())
                            }),
                            since: SystemTime::now(),
                        });
                        return Err(fail(problem));
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(ClientError::Config {
                brokers: self.brokers.clone(),
                message: format!("bug: the connection check panicked: {e}"),
            })
        })
    }
}

/// Replaces secret values in text.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// `text` with every secret value replaced by `<redacted>`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }
}

/// What kind of connection failure librdkafka reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The broker rejected the SASL credentials.
    Authentication,
    /// The TLS handshake failed: an untrusted or mismatched certificate, a missing client
    /// certificate, or a TLS client on a plaintext listener.
    Tls,
    /// The listener speaks another protocol (a plaintext client on a TLS or SASL listener).
    Protocol,
    /// No broker answered (refused, unresolvable, timed out).
    Unreachable,
}

/// A connection failure: where, what, and what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind of failure.
    pub kind: ProblemKind,
    /// The listener concerned as librdkafka names it (`sasl_ssl://127.0.0.1:9094`), or the
    /// bootstrap servers.
    pub listener: String,
    /// How this client connects (`SASL_SSL with SCRAM-SHA-512`).
    pub security: String,
    /// librdkafka's words, secrets redacted.
    pub detail: String,
    /// When it was first seen (since the connection last worked).
    pub since: SystemTime,
}

impl Problem {
    fn cause(&self) -> &'static str {
        match self.kind {
            ProblemKind::Authentication => "authentication failed",
            ProblemKind::Tls => "TLS handshake failed",
            ProblemKind::Protocol => "the listener does not speak the client's protocol",
            ProblemKind::Unreachable => "cannot reach the broker",
        }
    }

    fn hint(&self) -> &'static str {
        let detail = self.detail.to_ascii_lowercase();
        match self.kind {
            ProblemKind::Authentication if self.security.contains("OAUTHBEARER") => {
                "check sasl.oauthbearer.client.id, sasl.oauthbearer.client.secret \
                 (SLUICE_KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET) and \
                 sasl.oauthbearer.token.endpoint.url"
            }
            ProblemKind::Authentication => {
                "check sasl.mechanism, sasl.username and sasl.password \
                 (SLUICE_KAFKA__PROPERTIES__SASL_PASSWORD)"
            }
            ProblemKind::Tls if detail.contains("certificate verify failed") => {
                "the broker's certificate is not signed by a CA the client trusts: set \
                 ssl.ca.location to the CA that signed it"
            }
            ProblemKind::Tls if detail.contains("bad certificate") => {
                "the listener requires a client certificate it trusts: set \
                 ssl.certificate.location, ssl.key.location and ssl.key.password \
                 (SLUICE_KAFKA__PROPERTIES__SSL_KEY_PASSWORD)"
            }
            ProblemKind::Tls => {
                "check ssl.ca.location, and ssl.certificate.location / ssl.key.location / \
                 ssl.key.password when the listener requires client certificates"
            }
            ProblemKind::Protocol if self.security == "PLAINTEXT" => {
                "the listener expects TLS or SASL: set security.protocol (SSL, SASL_SSL) to \
                 what the listener speaks"
            }
            ProblemKind::Protocol => {
                "the listener does not speak TLS: check the port and security.protocol"
            }
            ProblemKind::Unreachable => "check kafka.brokers and that the brokers are up",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {} (client security {}): {}; {}",
            self.cause(),
            self.listener,
            self.security,
            self.detail,
            self.hint()
        )
    }
}

/// Reads a connection failure out of librdkafka's words (a global error's reason, a log line),
/// helped by the error code when there is one and by how the client connects (`security`, as
/// [`Connection::security`] says it).
pub fn classify(code: Option<RDKafkaErrorCode>, text: &str, security: &str) -> Option<ProblemKind> {
    let text = text.to_ascii_lowercase();
    match code {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            return Some(ProblemKind::Authentication);
        }
        Some(RDKafkaErrorCode::SSL) if !text.contains("listener") => {
            return Some(ProblemKind::Tls);
        }
        _ => {}
    }
    let plaintext_cut_off = security == "PLAINTEXT"
        && text.contains("disconnected")
        && text.contains("apiversion_query");
    if text.contains("sasl authentication error")
        || text.contains("authentication failed")
        || text.contains("failed to retrieve oidc token")
    {
        Some(ProblemKind::Authentication)
    } else if text.contains("security.protocol")
        || text.contains("ssl listener")
        || text.contains("plaintext broker listener")
        || plaintext_cut_off
    {
        // A TLS listener hangs up on a plaintext client's first request; a plaintext listener
        // on a TLS client's handshake.
        Some(ProblemKind::Protocol)
    } else if text.contains("ssl handshake failed")
        || text.contains("ssl routines")
        || text.contains("certificate verify failed")
    {
        Some(ProblemKind::Tls)
    } else if text.contains("connection refused")
        || text.contains("failed to resolve")
        || text.contains("brokers are down")
        || matches!(
            code,
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::Resolve
                    | RDKafkaErrorCode::AllBrokersDown
            )
        )
    {
        Some(ProblemKind::Unreachable)
    } else {
        None
    }
}

/// `reason` without the `[thrd:...]: ` prefix of librdkafka's log lines.
fn without_thread(reason: &str) -> &str {
    match reason.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map_or(reason, |(_, text)| text),
        None => reason,
    }
}

/// The broker a librdkafka message is about: `sasl_ssl://127.0.0.1:9094` out of
/// `sasl_ssl://127.0.0.1:9094/bootstrap: SASL ...`, `127.0.0.1:9092` out of
/// `127.0.0.1:9092/1: Disconnected ...`.
fn listener_of(reason: &str) -> Option<&str> {
    let reason = without_thread(reason);
    let (head, _) = reason.split_once(": ")?;
    let (address, name) = head.rsplit_once('/')?;
    let host_port = address
        .rsplit_once("://")
        .map_or(address, |(scheme, rest)| {
            if scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                rest
            } else {
                ""
            }
        });
    let well_formed = !name.is_empty()
        && !name.contains(' ')
        && host_port.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(' ') && port.parse::<u16>().is_ok()
        });
    well_formed.then_some(address)
}

/// What `reason` says after its `listener/name: ` prefix.
fn detail_of(reason: &str) -> &str {
    let reason = without_thread(reason);
    match reason.split_once(": ") {
        Some((_, rest)) if listener_of(reason).is_some() => rest,
        _ => reason,
    }
}

#[derive(Debug, Default)]
struct WatchState {
    /// The current failure; `None` once the connection worked.
    problem: Option<Problem>,
    /// The kind last logged, so that a failure repeated by every reconnect logs once.
    logged: Option<ProblemKind>,
}

/// Shared between a client's context (which reports into it) and whoever shows its state:
/// readiness, one-shot commands.
#[derive(Debug)]
pub struct Watch {
    /// Whether failures are logged here (a long-running client) or only handed to the caller,
    /// who reports them (a one-shot check).
    logs: bool,
    brokers: String,
    security: String,
    redactor: Redactor,
    state: Mutex<WatchState>,
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
        if state.problem.take().is_some() && state.logged.take().is_some() {
            tracing::info!(brokers = %self.brokers, "kafka connection works again");
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
        if matches!(error, KafkaError::PartitionEOF(_)) {
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
        if state.logged != Some(kind) && self.logs {
            state.logged = Some(kind);
            if kind == ProblemKind::Unreachable {
                tracing::warn!(brokers = %self.brokers, "kafka: {problem}");
            } else {
                tracing::error!(brokers = %self.brokers, "kafka: {problem}");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(properties: &[(&str, &str)]) -> Connection {
        Connection {
            brokers: "127.0.0.1:9094".into(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn secret_properties_are_recognised_and_locations_are_not() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "ssl.key.location",
            "ssl.ca.location",
            "sasl.username",
            "security.protocol",
            "sasl.oauthbearer.client.id",
            "sasl.oauthbearer.token.endpoint.url",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn a_refused_secret_property_is_reported_without_its_value() {
        let c = connection(&[("sasl.password", "hunter2-secret")]);
        let error = KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"hunter2-secret\" for configuration property".into(),
            "sasl.password".into(),
            "hunter2-secret".into(),
        );
        let text = c.config_error(&error).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("sasl.password = <redacted>"), "{text}");
    }

    #[test]
    fn a_real_config_refusal_names_the_property_but_not_the_secret() {
        // A mistyped property name: librdkafka refuses it, and its value is a secret.
        let c = connection(&[("sasl.pasword", "hunter2-secret")]);
        let Err(error) = c.create::<BaseConsumer<WatchContext>>(&c.client_config(&[])) else {
            panic!("librdkafka accepted an unknown property");
        };
        let text = error.to_string();
        assert!(text.contains("sasl.pasword"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn secrets_are_scrubbed_from_free_text_longest_first() {
        let c = connection(&[
            ("sasl.password", "abcd"),
            ("ssl.key.password", "abcdefgh"),
            ("sasl.username", "alice"),
        ]);
        assert_eq!(
            c.redactor().scrub("user alice, abcdefgh then abcd"),
            "user alice, <redacted> then <redacted>"
        );
    }

    #[test]
    fn security_names_protocol_and_mechanism() {
        assert_eq!(connection(&[]).security(), "PLAINTEXT");
        assert_eq!(
            connection(&[("security.protocol", "ssl")]).security(),
            "SSL"
        );
        assert_eq!(
            connection(&[
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", "SCRAM-SHA-512")
            ])
            .security(),
            "SASL_SSL with SCRAM-SHA-512"
        );
    }

    #[test]
    fn librdkafka_reasons_become_problems_with_listener_cause_and_hint() {
        let c = connection(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.password", "not-the-password"),
        ]);
        let watch = Watch::new(&c);
        watch.report(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: Authentication \
             failed during authentication due to invalid credentials with SASL mechanism \
             SCRAM-SHA-512 (after 312ms in state AUTH_REQ, 1 identical error(s) suppressed)",
        );
        let problem = watch.problem().expect("a problem");
        assert_eq!(problem.kind, ProblemKind::Authentication);
        assert_eq!(problem.listener, "sasl_ssl://127.0.0.1:9094");
        let text = problem.to_string();
        assert!(
            text.starts_with(
                "authentication failed at sasl_ssl://127.0.0.1:9094 (client security SASL_SSL \
                 with SCRAM-SHA-512): SASL authentication error"
            ),
            "{text}"
        );
        assert!(text.contains("sasl.password"), "{text}");
        // The summary that follows does not replace the cause.
        watch.report(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(watch.problem().unwrap().kind, ProblemKind::Authentication);
        watch.connected();
        assert_eq!(watch.problem(), None);
    }

    #[test]
    fn tls_and_protocol_failures_are_told_apart() {
        let untrusted = "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: \
            error:0A000086:SSL routines::certificate verify failed: broker certificate could \
            not be verified, verify that ssl.ca.location is correctly configured";
        assert_eq!(
            classify(Some(RDKafkaErrorCode::SSL), untrusted, "SSL"),
            Some(ProblemKind::Tls)
        );
        let plaintext_on_tls = "127.0.0.1:9093/bootstrap: Disconnected while requesting \
            ApiVersion: might be caused by incorrect security.protocol configuration \
            (connecting to a SSL listener?) or broker version is < 0.10";
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                plaintext_on_tls,
                "PLAINTEXT"
            ),
            Some(ProblemKind::Protocol)
        );
        let refused = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection \
            refused (after 0ms in state CONNECT)";
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                refused,
                "PLAINTEXT"
            ),
            Some(ProblemKind::Unreachable)
        );
        assert_eq!(classify(None, untrusted, "SSL"), Some(ProblemKind::Tls));
        assert_eq!(classify(None, "Broker: Not coordinator", "SSL"), None);
        assert_eq!(listener_of(refused), Some("127.0.0.1:1"));
        // Words of librdkafka 2.12's log lines, as seen against Apache Kafka 4.1.
        let cut_off = "[thrd:127.0.0.1:40337/bootstrap]: 127.0.0.1:40337/bootstrap: \
            Disconnected: connection closed by peer: receive 0 after POLLIN (after 0ms in state \
            APIVERSION_QUERY)";
        assert_eq!(
            classify(None, cut_off, "PLAINTEXT"),
            Some(ProblemKind::Protocol)
        );
        assert_eq!(classify(None, cut_off, "SSL"), None);
        let no_client_certificate = "ssl://127.0.0.1:40337/bootstrap: Receive failed: \
            error:0A000412:SSL routines::ssl/tls alert bad certificate: SSL alert number 42";
        assert_eq!(
            classify(None, no_client_certificate, "SSL"),
            Some(ProblemKind::Tls)
        );
        let tls_on_plaintext = "ssl://127.0.0.1:45339/bootstrap: SSL handshake failed: \
            Disconnected: SSL connection closed by peer: connecting to a PLAINTEXT broker \
            listener? (after 6ms in state SSL_HANDSHAKE)";
        assert_eq!(
            classify(None, tls_on_plaintext, "SSL"),
            Some(ProblemKind::Protocol)
        );
        let oidc = "[thrd:background]: Failed to retrieve OIDC token from \
            \"http://127.0.0.1:41501/token\": {\"error\": \"invalid_client\"} (401)";
        assert_eq!(
            classify(None, oidc, "SASL_SSL with OAUTHBEARER"),
            Some(ProblemKind::Authentication)
        );
        assert_eq!(listener_of(oidc), None);
        assert!(detail_of(oidc).starts_with("Failed to retrieve OIDC token"));
        assert_eq!(
            listener_of("ssl://127.0.0.1:9093/bootstrap: SSL handshake failed"),
            Some("ssl://127.0.0.1:9093")
        );
        // As librdkafka's log lines have them.
        let logged = "[thrd:sasl_ssl://127.0.0.1:41537/bootstrap]: \
            sasl_ssl://127.0.0.1:41537/bootstrap: SASL authentication error: \
            {\"status\":\"invalid_token\"} (after 313ms in state AUTH_REQ)";
        assert_eq!(listener_of(logged), Some("sasl_ssl://127.0.0.1:41537"));
        assert!(detail_of(logged).starts_with("SASL authentication error"));
        assert_eq!(
            classify(None, logged, "SASL_SSL with OAUTHBEARER"),
            Some(ProblemKind::Authentication)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checking_an_unreachable_cluster_fails_naming_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let c = Connection::plain(&format!("127.0.0.1:{port}"));
        let error = c.check(Duration::from_secs(2)).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains("cannot reach the broker"), "{text}");
        assert!(text.contains(&port.to_string()), "{text}");
    }
}
