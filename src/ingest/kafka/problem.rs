//! Connection failures explained: librdkafka's error codes and texts classified into what an
//! operator can act on (broker unreachable, TLS, SASL, wrong listener), with the fix named.

use std::fmt;
use std::time::SystemTime;

use rdkafka::types::RDKafkaErrorCode;

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

impl ProblemKind {
    /// The `kind` label of `sluice_kafka_connection_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::Authentication => "authentication",
            ProblemKind::Tls => "tls",
            ProblemKind::Protocol => "protocol",
            ProblemKind::Unreachable => "unreachable",
        }
    }
}

impl Problem {
    pub(super) fn cause(&self) -> &'static str {
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
pub(super) fn listener_of(reason: &str) -> Option<&str> {
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
pub(super) fn detail_of(reason: &str) -> &str {
    let reason = without_thread(reason);
    match reason.split_once(": ") {
        Some((_, rest)) if listener_of(reason).is_some() => rest,
        _ => reason,
    }
}
