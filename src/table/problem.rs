//! Object-store failures explained: the S3 errors a new setup meets first (no bucket, no or
//! wrong credentials, no permission, an endpoint that does not answer) turned into one line
//! that names the cause and the fix. Anything else keeps the store's own words, on one line.

use std::error::Error;
use std::fmt;

/// An error from delta-rs or the object store, shown as one line: explained when its cause is
/// a known setup mistake, otherwise the whole chain of messages.
///
/// It reports no `source()`: its text already stands for the whole chain, so a caller that
/// prints causes does not repeat the store's raw words after the explanation.
#[derive(Debug)]
pub struct StorageError<E>(pub E);

impl<E> From<E> for StorageError<Box<E>> {
    fn from(error: E) -> Self {
        StorageError(Box::new(error))
    }
}

impl<E: Error> fmt::Display for StorageError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = chain(&self.0);
        match explain(&raw) {
            Some(explained) => f.write_str(&explained),
            None => f.write_str(&one_line(&raw)),
        }
    }
}

impl<E: Error> Error for StorageError<E> {}

/// The error's message and each cause the text before does not already quote.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = inner.source();
    }
    text
}

/// Line breaks (S3 puts its XML error body in the message) folded into spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The cause and the fix, when the store's words name a known setup mistake.
pub fn explain(raw: &str) -> Option<String> {
    let endpoint = endpoint(raw);
    let at = endpoint
        .as_deref()
        .map(|e| format!(" at {e}"))
        .unwrap_or_default();
    if raw.contains("NoSuchBucket") {
        let bucket = between(raw, "<BucketName>", "</BucketName>")
            .map(|b| format!("`{b}` "))
            .unwrap_or_default();
        return Some(format!(
            "the S3 bucket {bucket}does not exist{at}; create it (`aws s3 mb`, `mc mb`) or \
             change storage.root"
        ));
    }
    if raw.contains("169.254.169.254") {
        // No key in the environment, so the client asked the instance metadata service.
        return Some(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) \
             in sluice's environment"
                .into(),
        );
    }
    if raw.contains("InvalidAccessKeyId") {
        return Some(format!(
            "the S3 store{at} does not know the access key; check AWS_ACCESS_KEY_ID"
        ));
    }
    if raw.contains("SignatureDoesNotMatch") {
        return Some(format!(
            "the S3 store{at} rejected the request signature; check AWS_SECRET_ACCESS_KEY and \
             storage.s3.region"
        ));
    }
    if raw.contains("AccessDenied") || raw.contains("403 Forbidden") {
        return Some(format!(
            "the S3 store{at} denied access; the credentials need to list, read, write and \
             delete objects under storage.root"
        ));
    }
    let unreachable = [
        "Connection refused",
        "tcp connect error",
        "dns error",
        "error sending request",
    ];
    if endpoint.is_some() && unreachable.iter().any(|u| raw.contains(u)) {
        return Some(format!(
            "cannot reach the S3 endpoint{at}; check storage.s3.endpoint and that the store is up"
        ));
    }
    None
}

/// `scheme://host:port` of the first request the store's message quotes.
fn endpoint(raw: &str) -> Option<String> {
    let start = raw.find("http://").or_else(|| raw.find("https://"))?;
    let url = &raw[start..];
    let scheme_end = url.find("://")? + 3;
    let host_end = url[scheme_end..]
        .find(|c: char| c == '/' || c == '?' || c.is_whitespace())
        .map_or(url.len(), |i| scheme_end + i);
    Some(url[..host_end].to_string())
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages delta-rs gave against moto on this machine, and what S3 and MinIO answer
    /// for a wrong key, a wrong secret and a missing permission.
    #[test]
    fn setup_mistakes_become_a_cause_and_a_fix() {
        let cases = [
            (
                "Failed to read delta log object: Object at location warehouse/t/_delta_log/x not \
                 found: Error performing PUT http://127.0.0.1:45555/nobucket/warehouse/t/_delta_log/x \
                 in 17ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\" \
                 encoding=\"utf-8\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket \
                 does not exist</Message><BucketName>nobucket</BucketName></Error>",
                "the S3 bucket `nobucket` does not exist at http://127.0.0.1:45555; create it \
                 (`aws s3 mb`, `mc mb`) or change storage.root",
            ),
            (
                "Failed to read delta log object: Generic S3 error: Error performing PUT \
                 http://169.254.169.254/latest/api/token in 1ms - Server returned non-2xx status \
                 code: 403 Forbidden: resolve_deny: denied destination",
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or \
                 AWS_PROFILE) in sluice's environment",
            ),
            (
                "Generic S3 error: Error performing GET https://s3.example.com/lake?list-type=2 \
                 - Server returned non-2xx status code: 403 Forbidden: <Error><Code>\
                 InvalidAccessKeyId</Code></Error>",
                "the S3 store at https://s3.example.com does not know the access key; check \
                 AWS_ACCESS_KEY_ID",
            ),
            (
                "Generic S3 error: Error performing PUT http://minio:9000/lake/x - Server \
                 returned non-2xx status code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch\
                 </Code></Error>",
                "the S3 store at http://minio:9000 rejected the request signature; check \
                 AWS_SECRET_ACCESS_KEY and storage.s3.region",
            ),
            (
                "Generic S3 error: Error performing GET http://minio:9000/lake?list-type=2 - \
                 Server returned non-2xx status code: 403 Forbidden: <Error><Code>AccessDenied\
                 </Code></Error>",
                "the S3 store at http://minio:9000 denied access; the credentials need to list, \
                 read, write and delete objects under storage.root",
            ),
            (
                "Generic S3 error: Error performing PUT http://127.0.0.1:45556/nobucket/x in \
                 1.9s, after 10 retries, max_retries: 10, retry_timeout: 180s - HTTP error: error \
                 sending request: client error (Connect): tcp connect error: Connection refused \
                 (os error 111)",
                "cannot reach the S3 endpoint at http://127.0.0.1:45556; check \
                 storage.s3.endpoint and that the store is up",
            ),
        ];
        for (raw, explained) in cases {
            assert_eq!(explain(raw).as_deref(), Some(explained), "{raw}");
        }
        assert_eq!(explain("Generic error: the log is corrupt"), None);
    }

    #[test]
    fn an_unexplained_error_is_its_whole_chain_on_one_line() {
        let io = std::io::Error::other("disk on fire\n  really");
        let shown = StorageError(Box::new(io)).to_string();
        assert_eq!(shown, "disk on fire really");
        assert!(
            StorageError(Box::new(std::io::Error::other("x")))
                .source()
                .is_none()
        );
    }
}
