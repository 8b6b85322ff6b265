//! Secrets kept out of errors and logs: which properties are secret, and a redactor that
//! scrubs their values from any text librdkafka produces.

/// Replaces a secret wherever it would be shown.
pub(super) const REDACTED: &str = "<redacted>";

/// Secrets shorter than this are not searched for inside free text (a one-letter "secret"
/// would blank every such letter of a message); they are still redacted where sluice knows
/// the property, as in configuration errors.
pub(super) const MIN_SCRUBBED_LEN: usize = 4;

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

/// Replaces secret values in text.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    pub(super) secrets: Vec<String>,
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
