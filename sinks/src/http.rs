//! The HTTP sink: a webhook. Each batch is one request, its body a JSON array or NDJSON of
//! the batch's messages; with a templated URL (placeholders in its path or query), one
//! request per URL the batch's messages render.
//!
//! - 2xx: written.
//! - 408, 429 and 5xx, a timeout or a connection that fails: retried with the sink's
//!   backoff, and never sooner than a `Retry-After` the receiver sent (seconds or an HTTP
//!   date, at most [`MAX_RETRY_AFTER`]).
//! - Any other 4xx: the receiver refuses the batch for good. The worker then sends its
//!   messages one at a time and moves those still refused to the dead letter.
//!
//! Every request carries an `Idempotency-Key`: a hash of the batch's messages' identities
//! (a record's agent, stream, epoch and seq; a dead letter's or another message's log
//! index), the same when the batch is sent again, so a receiver can drop a batch it
//! already has (at-least-once from the sink, exactly-once with such a receiver).
//!
//! The body is each message's JSON rendered straight from the payload in the log
//! ([`fleetbus_protocol::write_json_body`]); without a URL template the sink never decodes
//! a message ([`Sink::needs_message`]).
//!
//! At start one `HEAD` request, beside the server's start, says in the log whether the
//! receiver can be reached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fleetbus_config::Problems;
use fleetbus_protocol::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{BatchConfig, SinkPlace, SinkType};
use crate::secret::Secret;
use crate::template::PathTemplate;
use crate::{Batch, BoxFuture, Item, Sink, SinkError};

/// The longest `Retry-After` honoured (a longer one is cut to it).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// `type = "http"`: each batch is one request to a URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where batches go (`http://` or `https://`). With `{...}` placeholders in its path or
    /// query it is a template (as for file paths), and a batch goes out as one request per
    /// URL its messages render.
    pub url: String,
    /// `POST` or `PUT`.
    #[serde(default = "default_method")]
    pub method: String,
    /// `json` (one JSON array per batch) or `ndjson` (one JSON line per message).
    #[serde(default)]
    pub format: BodyFormat,
    /// Headers of every request; a value may come from the environment (`{ env = "NAME"
    /// }`) or a file (`{ file = "/path" }`, its content trimmed), so secrets stay out of
    /// the rules file.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderSource>,
    /// How long one request may take, connecting included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// CA certificates (PEM) that sign the receiver's certificate, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How a batch is laid out in the request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// `[msg, msg, ...]`, `Content-Type: application/json`.
    #[default]
    Json,
    /// One message per line, `Content-Type: application/x-ndjson`.
    Ndjson,
}

/// Where a header's value comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderSource {
    /// Written in the rules file.
    Value(String),
    /// An environment variable or a file ([`Secret`]).
    Secret(Secret),
}

fn default_method() -> String {
    "POST".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl HeaderSource {
    /// The value, read now.
    fn resolve(&self) -> Result<String, String> {
        match self {
            HeaderSource::Value(v) => Ok(v.clone()),
            HeaderSource::Secret(secret) => secret.resolve(),
        }
    }
}

impl SinkType for HttpSinkConfig {
    fn default_batch(&self) -> BatchConfig {
        BatchConfig {
            max_events: 500,
            max_bytes: Some(1024 * 1024),
            max_age: Duration::from_secs(1),
            ..BatchConfig::default()
        }
    }

    fn check(&self, p: &mut Problems) {
        check_url(&self.url, p);
        if let Err(e) = url_template(&self.url) {
            p.add("url", e);
        }
        p.require(
            matches!(self.method.as_str(), "POST" | "PUT"),
            "method",
            format!("`{}` must be POST or PUT", self.method),
        );
        check_timeout(self.timeout, p);
        for (name, source) in &self.headers {
            let key = format!("headers.{name}");
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.add(&key, "is not a valid header name");
            }
            match source.resolve() {
                Ok(v) if reqwest::header::HeaderValue::from_str(&v).is_err() => {
                    p.add(&key, "the value is not a valid header value")
                }
                Ok(_) => {}
                Err(e) => p.add(&key, e),
            }
        }
        crate::tls::check_ca_file(self.ca_file.as_deref(), p);
    }

    fn file_destination(&self, msg: &Message) -> Option<String> {
        let url = match url_template(&self.url).ok()? {
            Some(t) => t.render(msg),
            None => self.url.clone(),
        };
        Some(format!("{} {url}", self.method))
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        let config_error = |e: String| SinkError::Config(format!("sink `{}`: {e}", place.name));
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, source) in &self.headers {
            let value = source.resolve().map_err(&config_error)?;
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| config_error(e.to_string()))?;
            let mut value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|e| config_error(e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client =
            client(self.ca_file.as_deref(), self.timeout, headers).map_err(&config_error)?;
        let method = match self.method.as_str() {
            "PUT" => reqwest::Method::PUT,
            _ => reqwest::Method::POST,
        };
        Ok(Box::new(HttpSink {
            name: place.name.to_string(),
            client,
            method,
            url: self.url.clone(),
            template: url_template(&self.url).map_err(&config_error)?,
            format: self.format,
        }))
    }
}

/// Sends each batch as one request (see the module documentation).
pub struct HttpSink {
    name: String,
    client: reqwest::Client,
    method: reqwest::Method,
    url: String,
    /// The URL as a template, when it has placeholders.
    template: Option<PathTemplate>,
    format: BodyFormat,
}

/// `url` as a template when it has `{...}` placeholders (None: a plain URL, `%` and all).
/// Placeholders may stand only after the host, so a message can choose a path or a query
/// value but never where the request goes; in a template `%` starts a time field (`%Y`),
/// `%%` is a literal `%`.
fn url_template(url: &str) -> Result<Option<PathTemplate>, String> {
    if !url.contains('{') {
        return Ok(None);
    }
    let after_scheme = url.find("://").map_or(0, |n| n + 3);
    let authority_end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |n| after_scheme + n);
    if url[..authority_end].contains('{') {
        return Err(format!(
            "`{url}`: placeholders may stand only in the path and query, not in the scheme or host"
        ));
    }
    PathTemplate::parse(url)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The identity of a message within its sink: a record's key as the server accepted it,
/// else (a dead letter, a message that is not a sequenced record) its log index.
/// Written piece by piece (`agent\0stream\0epoch\0seq\n`, or `#index\n`): `writeln!`
/// took 45-60 µs per batch of 500 against 15 µs so (a scratch measurement), on the way
/// between one request and the next.
fn identity(item: &Item, out: &mut Vec<u8>) {
    let mut number = itoa::Buffer::new();
    match &item.entry.key {
        Some(k) if item.dead_letter().is_none() => {
            for part in [k.agent.as_str(), k.stream.as_str(), number.format(k.epoch)] {
                out.extend_from_slice(part.as_bytes());
                out.push(0);
            }
            out.extend_from_slice(number.format(k.seq).as_bytes());
        }
        _ => {
            out.push(b'#');
            out.extend_from_slice(number.format(item.index).as_bytes());
        }
    }
    out.push(b'\n');
    if let Some(dl) = item.dead_letter() {
        out.extend_from_slice(b"dead letter of ");
        out.extend_from_slice(dl.sink.as_bytes());
        out.push(b'\n');
    }
}

/// The `Idempotency-Key` of a batch: 32 hex characters of SHA-256 over its messages'
/// identities, in order.
pub fn idempotency_key(batch: &Batch) -> String {
    let mut ids = Vec::with_capacity(batch.items.len() * 48);
    for item in &batch.items {
        identity(item, &mut ids);
    }
    hex::encode(&Sha256::digest(&ids)[..16])
}

/// The body of a batch in `format`.
fn body(batch: &Batch, format: BodyFormat) -> Result<Vec<u8>, SinkError> {
    // the size of the JSON rendered ahead (a guess for the rest): one allocation
    let size: usize = (batch.items.iter())
        .map(|item| item.json.as_ref().map_or(256, |json| json.len()) + 1)
        .sum();
    let mut out = Vec::with_capacity(size + 2);
    if format == BodyFormat::Json {
        out.push(b'[');
    }
    for (n, item) in batch.items.iter().enumerate() {
        if format == BodyFormat::Json && n > 0 {
            out.push(b',');
        }
        crate::json_line(item, &mut out)?;
        if format == BodyFormat::Json {
            out.pop(); // the line's newline
        }
    }
    if format == BodyFormat::Json {
        out.push(b']');
    }
    Ok(out)
}

/// Records a problem at `url` unless it is an `http://` or `https://` URL.
pub(crate) fn check_url(url: &str, p: &mut Problems) {
    match reqwest::Url::parse(url) {
        Ok(u) => p.require(
            matches!(u.scheme(), "http" | "https"),
            "url",
            format!("`{url}` must start with http:// or https://"),
        ),
        Err(e) => p.add("url", format!("`{url}`: {e}")),
    }
}

/// Records a problem at `timeout` unless it is between 100 ms and 300 s.
pub(crate) fn check_timeout(timeout: Duration, p: &mut Problems) {
    p.require(
        timeout >= Duration::from_millis(100) && timeout <= Duration::from_secs(300),
        "timeout",
        "must be between 100ms and 300s",
    );
}

/// An HTTP client for a sink: TLS trusting `ca_file` or else the system's CAs, `timeout`
/// for connecting and for each request, `headers` on every request.
pub(crate) fn client(
    ca_file: Option<&std::path::Path>,
    timeout: Duration,
    headers: reqwest::header::HeaderMap,
) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_preconfigured_tls(crate::tls::client_config(ca_file)?)
        .timeout(timeout)
        .connect_timeout(timeout)
        .default_headers(headers)
        .pool_max_idle_per_host(2)
        .build()
        .map_err(|e| e.to_string())
}

/// The error for an answer that is not a 2xx to `what` (`POST URL`): retried when
/// `retryable(status)`, not before a `Retry-After` the receiver sent; else refused for
/// good. Its text has the status and the start of the receiver's answer.
pub(crate) async fn answer_error(
    response: reqwest::Response,
    what: &str,
    retryable: impl Fn(reqwest::StatusCode) -> bool,
) -> SinkError {
    let status = response.status();
    let wait = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, chrono::Utc::now()));
    // the start of the receiver's answer says why (bounded: a receiver may send a lot)
    let text = response.text().await.unwrap_or_default();
    let said: String = text.chars().take(300).collect();
    let reason = format!("{what}: {status} {}", said.trim());
    match (retryable(status), wait) {
        (true, Some(wait)) => SinkError::RetryAfter {
            wait,
            reason: format!("{reason} (Retry-After {}s)", wait.as_secs()),
        },
        (true, None) => SinkError::Remote(reason),
        (false, _) => SinkError::Refused(reason),
    }
}

/// The start-up check of a sink that speaks HTTP: sends `request` once and logs whether
/// `what` (`http sink: receiver`) answered. Any answer (a 404 or 405 included) says it can
/// be reached; a refused connection, a TLS failure or a timeout is a warning. Never fails
/// the start: the writes retry.
pub(crate) async fn probe(request: reqwest::RequestBuilder, what: &str, sink: String) {
    let url = request
        .try_clone()
        .and_then(|r| r.build().ok())
        .map(|r| r.url().to_string())
        .unwrap_or_default();
    match request.send().await {
        Ok(response) => {
            tracing::info!(%sink, %url, status = %response.status(), "{what} reachable")
        }
        Err(e) => {
            tracing::warn!(%sink, %url, error = %crate::error_chain(&e), "{what} not reachable at start; its messages wait in the log and every write retries")
        }
    }
}

/// How long a `Retry-After` header asks to wait (seconds or an HTTP date), at most
/// [`MAX_RETRY_AFTER`].
pub fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

impl HttpSink {
    /// Sends `batch` as one request to `url`.
    async fn send(&self, url: &str, batch: &Batch) -> Result<(), SinkError> {
        let content_type = match self.format {
            BodyFormat::Json => "application/json",
            BodyFormat::Ndjson => "application/x-ndjson",
        };
        let response = self
            .client
            .request(self.method.clone(), url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("Idempotency-Key", idempotency_key(batch))
            .body(body(batch, self.format)?)
            .send()
            .await
            .map_err(|e| {
                SinkError::Remote(format!("{} {url}: {}", self.method, crate::error_chain(&e)))
            })?;
        if response.status().is_success() {
            return Ok(());
        }
        let what = format!("{} {url}", self.method);
        Err(answer_error(response, &what, |status| {
            status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
        })
        .await)
    }
}

impl Sink for HttpSink {
    fn writes_json(&self) -> bool {
        true
    }

    /// Only a templated URL reads the message: the body is JSON rendered from the payload,
    /// and the idempotency key comes from the log entry.
    fn needs_message(&self) -> bool {
        self.template.is_some()
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        // beside the start, not before it; a templated URL's server is asked at its root
        let url = match &self.template {
            Some(_) => reqwest::Url::parse(&self.url)
                .map(|u| u.origin().ascii_serialization() + "/")
                .unwrap_or_else(|_| self.url.clone()),
            None => self.url.clone(),
        };
        tokio::spawn(probe(
            self.client.head(url),
            "http sink: receiver",
            self.name.clone(),
        ));
        Box::pin(async move { Ok(saved) })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let Some(template) = &self.template else {
                return self.send(&self.url, batch).await;
            };
            // one request per URL, in the order each URL first appears
            let mut groups: Vec<(String, Batch)> = Vec::new();
            for item in &batch.items {
                let url = template.render(item.message()?);
                match groups.iter_mut().find(|(u, _)| *u == url) {
                    Some((_, group)) => group.items.push(item.clone()),
                    None => groups.push((
                        url,
                        Batch {
                            first: batch.first,
                            next: batch.next,
                            items: vec![item.clone()],
                        },
                    )),
                }
            }
            for (url, group) in &groups {
                self.send(url, group).await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_its_key_and_no_secret_is_needed_in_the_file() {
        let config: HttpSinkConfig = toml::from_str(
            r#"
url = "ftp://example.com/x"
method = "GET"
timeout = "1ms"
headers = { Authorization = { env = "FLEETBUS_TEST_NEVER_SET_4711" }, "bad header" = "x", X-Key = { file = "/nonexistent/key" } }
"#,
        )
        .unwrap();
        let mut problems = Problems::new();
        config.check(&mut problems);
        let shown: Vec<String> = problems.into_vec().iter().map(|p| p.to_string()).collect();
        let expected = [
            "url: `ftp://example.com/x` must start with http:// or https://",
            "method: `GET` must be POST or PUT",
            "timeout: must be between 100ms and 300s",
            "headers.Authorization: environment variable FLEETBUS_TEST_NEVER_SET_4711 is not set",
            "headers.X-Key: /nonexistent/key:",
            "headers.bad header: is not a valid header name",
        ];
        assert_eq!(shown.len(), expected.len(), "{shown:#?}");
        for (got, want) in shown.iter().zip(expected) {
            assert!(got.starts_with(want), "{got}\n  expected {want}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_bounded() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after("Tue, 01 Dec 2026 10:00:07 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after("Tue, 01 Dec 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn the_idempotency_key_hashes_each_messages_identity_in_order() {
        let message = |topic: &str, body: &str| Message::decode(topic, body.as_bytes()).unwrap();
        let record = Item::new(
            3,
            message("fleet/a1/telemetry/app", r#"{"seq":12,"epoch":7}"#),
        );
        let other = Item::new(4, message("ingest/x", r#"{"seq":1}"#));
        let dead = Item::new(9, message("fleet/a1/telemetry/app", r#"{"seq":13}"#))
            .with_dead_letter(fleetbus_wal::DeadLetter {
                sink: "pg".into(),
                error: "refused".into(),
                attempts: 1,
                failed_at_ms: 0,
            });
        let batch = |items: Vec<Item>| Batch {
            first: 0,
            next: 10,
            items,
        };
        let key = idempotency_key(&batch(vec![record.clone(), other.clone(), dead.clone()]));
        let ids = "a1\x00app\x007\x0012\n#4\n#9\ndead letter of pg\n";
        assert_eq!(key, hex::encode(&Sha256::digest(ids.as_bytes())[..16]));
        // the same messages give the same key; another order or another message does not
        assert_eq!(
            key,
            idempotency_key(&batch(vec![record.clone(), other.clone(), dead]))
        );
        assert_ne!(
            key,
            idempotency_key(&batch(vec![other.clone(), record.clone()]))
        );
        assert_ne!(
            idempotency_key(&batch(vec![record])),
            idempotency_key(&batch(vec![other]))
        );
    }
}
