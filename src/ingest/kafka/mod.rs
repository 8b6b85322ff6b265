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
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaConfRes;

pub use problem::{Problem, ProblemKind, classify};
use redact::{MIN_SCRUBBED_LEN, REDACTED};
pub use redact::{Redactor, is_secret_key};
pub use watch::{Watch, WatchContext, forward_log};

mod problem;
mod redact;
mod watch;

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

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::problem::{detail_of, listener_of};
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
