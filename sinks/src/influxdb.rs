//! The InfluxDB sink: metric records as points in InfluxDB line protocol, one request per
//! batch, to InfluxDB 1.x (`/write`) or 2.x (`/api/v2/write`); VictoriaMetrics, QuestDB
//! and GreptimeDB take the same.
//!
//! Each metric of a record (`record.metrics[]`) is one point:
//!
//! ```text
//! cpu.usage,agent=web-01,cpu=total,stream=metrics value=3.5,warn=80,crit=90 1796119200000000000
//! ```
//!
//! - the measurement from a template (`{metric}` the metric's name, and the path
//!   placeholders: `{agent}`, `{stream}`, `{topic.N}`, ...);
//! - tags: `agent`, `stream`, `groups` (the agent's groups when the server accepted the
//!   record, sorted and joined by commas: `groups=linux\,web`), the string values of the
//!   record's `tags` object, and the metric's `labels` (a later one of the same name wins:
//!   labels over agent, stream and groups over record tags);
//! - fields: `value`, and `warn`, `crit`, `min`, `max` when the metric has them;
//! - the record's `ts` in nanoseconds (else the time the server received it).
//!
//! A point written again replaces itself (same measurement, tags and time), so a batch
//! sent again after a failure or a crash duplicates nothing.
//!
//! A message without metrics (or with a metric without a numeric `value`) has no points:
//! it goes to the dead letter, before its batch is sent. Answers: 2xx written; 400 and 413
//! (a point the database refuses, e.g. a field type conflict) refused, and the batch's
//! messages are then sent one by one so that only the refused ones go to the dead letter;
//! anything else (401, 403, a database not found, 429, 5xx, no answer) retried, not before
//! a `Retry-After`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use fleetbus_config::Problems;
use fleetbus_protocol::Message;
use serde::{Deserialize, Serialize};

use crate::config::{BatchConfig, SinkPlace, SinkType};
use crate::secret::Secret;
use crate::template::PathTemplate;
use crate::{Batch, BoxFuture, Item, Sink, SinkError};

/// The placeholder for the metric's name in `measurement`.
const METRIC: &str = "{metric}";

/// `type = "influxdb"`: metric records as points.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxSinkConfig {
    /// The server (`http://host:8086`, `https://...`).
    pub url: String,
    /// InfluxDB 1.x: the database (`/write?db=`).
    #[serde(default)]
    pub database: Option<String>,
    /// InfluxDB 1.x: the retention policy (`rp=`); the database's default when unset.
    #[serde(default)]
    pub retention_policy: Option<String>,
    /// InfluxDB 1.x: create the database at the first write (`CREATE DATABASE`, which
    /// changes nothing when it exists).
    #[serde(default)]
    pub create_database: bool,
    /// InfluxDB 1.x: the user name (HTTP basic authentication).
    #[serde(default)]
    pub username: Option<String>,
    /// InfluxDB 1.x: the password, from the environment or a file.
    #[serde(default)]
    pub password: Option<Secret>,
    /// InfluxDB 2.x: the organisation (`/api/v2/write?org=`).
    #[serde(default)]
    pub org: Option<String>,
    /// InfluxDB 2.x: the bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// InfluxDB 2.x: the API token, from the environment or a file.
    #[serde(default)]
    pub token: Option<Secret>,
    /// The measurement of a metric's point: a template with `{metric}` (the metric's
    /// name) and the path placeholders (`{agent}`, `{stream}`, `{topic.N}`, ...).
    #[serde(default = "default_measurement")]
    pub measurement: String,
    /// How long one request may take, connecting included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// CA certificates (PEM) that sign the server's certificate, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_measurement() -> String {
    METRIC.into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A measurement template: fixed text and message placeholders around `{metric}`.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The parts between the `{metric}`s (None for an empty part).
    parts: Vec<Option<PathTemplate>>,
}

impl Measurement {
    /// Compiles `source`.
    pub fn parse(source: &str) -> Result<Measurement, String> {
        if source.trim().is_empty() {
            return Err("is empty".into());
        }
        let parts = source
            .split(METRIC)
            .map(|part| match part.is_empty() {
                true => Ok(None),
                false => PathTemplate::parse(part).map(Some).map_err(|e| {
                    let problem = e.problem.replacen("(known: ", "(known: {metric}, ", 1);
                    format!("`{source}`: {problem}")
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Measurement { parts })
    }

    /// The measurement of metric `name` of `msg`.
    fn render(&self, msg: &Message, name: &str, out: &mut String) {
        for (n, part) in self.parts.iter().enumerate() {
            if n > 0 {
                out.push_str(name);
            }
            if let Some(template) = part {
                out.push_str(&template.render(msg));
            }
        }
    }
}

impl InfluxSinkConfig {
    /// The write endpoint with its query (database or org and bucket, precision).
    fn write_url(&self) -> Result<reqwest::Url, String> {
        let base = reqwest::Url::parse(&self.url).map_err(|e| format!("`{}`: {e}", self.url))?;
        let (path, query): (&str, Vec<(&str, &str)>) = match (&self.database, &self.bucket) {
            (Some(db), None) => {
                let mut q = vec![("db", db.as_str()), ("precision", "ns")];
                if let Some(rp) = &self.retention_policy {
                    q.push(("rp", rp));
                }
                ("write", q)
            }
            (None, Some(bucket)) => (
                "api/v2/write",
                vec![
                    ("org", self.org.as_deref().unwrap_or_default()),
                    ("bucket", bucket),
                    ("precision", "ns"),
                ],
            ),
            _ => return Err("set `database` (InfluxDB 1.x) or `org` and `bucket` (2.x)".into()),
        };
        let mut url = endpoint(&base, path);
        url.query_pairs_mut().extend_pairs(query);
        Ok(url)
    }
}

/// `base` with `path` appended to its own path (a server behind a prefix keeps it).
fn endpoint(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    let joined = format!("{}/{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url.set_query(None);
    url
}

impl SinkType for InfluxSinkConfig {
    fn default_batch(&self) -> BatchConfig {
        BatchConfig {
            max_events: 1_000,
            max_bytes: Some(1024 * 1024),
            max_age: Duration::from_secs(1),
            ..BatchConfig::default()
        }
    }

    fn check(&self, p: &mut Problems) {
        crate::http::check_url(&self.url, p);
        let v1 = self.database.is_some();
        let v2 = self.bucket.is_some();
        if v1 == v2 {
            p.add(
                "database",
                "set `database` (InfluxDB 1.x, `/write`) or `org` and `bucket` (2.x, `/api/v2/write`), not both",
            );
        }
        if v2 {
            p.require(self.org.is_some(), "org", "is needed with `bucket`");
        }
        let v1_keys = [
            ("retention_policy", self.retention_policy.is_some()),
            ("create_database", self.create_database),
            ("username", self.username.is_some()),
            ("password", self.password.is_some()),
        ];
        let v2_keys = [("org", self.org.is_some()), ("token", self.token.is_some())];
        match (v1, v2) {
            (true, false) => {
                for (key, _) in v2_keys.iter().filter(|(_, set)| *set) {
                    p.add(key, "is for InfluxDB 2.x (`bucket`), not `database`");
                }
            }
            (false, true) => {
                for (key, _) in v1_keys.iter().filter(|(_, set)| *set) {
                    p.add(key, "is for InfluxDB 1.x (`database`), not `bucket`");
                }
            }
            _ => {}
        }
        if self.password.is_some() {
            p.require(self.username.is_some(), "password", "needs a `username`");
        }
        for (key, secret) in [("password", &self.password), ("token", &self.token)] {
            if let Some(Err(e)) = secret.as_ref().map(Secret::resolve) {
                p.add(key, e);
            }
        }
        if let Err(e) = Measurement::parse(&self.measurement) {
            p.add("measurement", e);
        }
        crate::http::check_timeout(self.timeout, p);
        crate::tls::check_ca_file(self.ca_file.as_deref(), p);
    }

    fn file_destination(&self, _: &Message) -> Option<String> {
        self.write_url().ok().map(|u| format!("POST {u}"))
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        let config_error = |e: String| SinkError::Config(format!("sink `{}`: {e}", place.name));
        let auth = match (&self.token, &self.username) {
            (Some(token), _) => Auth::Token(token.resolve().map_err(&config_error)?),
            (None, Some(user)) => Auth::Basic {
                user: user.clone(),
                password: match &self.password {
                    Some(p) => Some(p.resolve().map_err(&config_error)?),
                    None => None,
                },
            },
            (None, None) => Auth::None,
        };
        let client = crate::http::client(
            self.ca_file.as_deref(),
            self.timeout,
            reqwest::header::HeaderMap::new(),
        )
        .map_err(&config_error)?;
        let base = reqwest::Url::parse(&self.url).map_err(|e| config_error(e.to_string()))?;
        let create = match (self.create_database, &self.database) {
            (true, Some(db)) => {
                let mut url = endpoint(&base, "query");
                url.query_pairs_mut().append_pair(
                    "q",
                    &format!("CREATE DATABASE \"{}\"", db.replace('"', "\\\"")),
                );
                Some(url)
            }
            _ => None,
        };
        Ok(Box::new(InfluxSink {
            name: place.name.to_string(),
            client,
            auth,
            write_url: self.write_url().map_err(&config_error)?,
            ping_url: endpoint(&base, "ping"),
            create,
            measurement: Measurement::parse(&self.measurement).map_err(&config_error)?,
        }))
    }
}

/// How requests authenticate.
enum Auth {
    None,
    /// InfluxDB 1.x: HTTP basic authentication.
    Basic {
        user: String,
        password: Option<String>,
    },
    /// InfluxDB 2.x: `Authorization: Token ...`.
    Token(String),
}

/// Writes each batch as one request (see the module documentation).
pub struct InfluxSink {
    name: String,
    client: reqwest::Client,
    auth: Auth,
    write_url: reqwest::Url,
    ping_url: reqwest::Url,
    /// `CREATE DATABASE`, until it has been done once.
    create: Option<reqwest::Url>,
    measurement: Measurement,
}

/// Appends `text` to `out` with line protocol's escapes: a backslash before each of
/// `special`; a line break (which would end the point) becomes a space.
fn escaped(out: &mut String, text: &str, special: &[char]) {
    for c in text.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            c if special.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

/// Escapes of a measurement.
const MEASUREMENT_SPECIAL: &[char] = &[',', ' '];
/// Escapes of a tag key, tag value or field key.
const KEY_SPECIAL: &[char] = &[',', '=', ' '];

/// Appends the points of `item` (one line each) to `out`, or says why it has none.
pub fn points(item: &Item, measurement: &Measurement, out: &mut String) -> Result<(), String> {
    if item.dead_letter().is_some() {
        return Err("a dead letter has no metrics to write as points".into());
    }
    let msg = item.message().map_err(|e| e.to_string())?;
    let metrics = match msg.body.get("metrics").and_then(|m| m.as_array()) {
        Some(m) if !m.is_empty() => m,
        _ => return Err("no `metrics`: only metric records become points".into()),
    };
    let time = msg
        .timestamp()
        .timestamp_nanos_opt()
        .ok_or("the record's time is out of InfluxDB's range")?;
    let mut base: BTreeMap<&str, &str> = BTreeMap::new();
    if let Some(tags) = msg.body.get("tags").and_then(|t| t.as_object()) {
        for (k, v) in tags {
            if let Some(v) = v.as_str() {
                base.insert(k, v);
            }
        }
    }
    if let Some(agent) = msg.agent() {
        base.insert("agent", agent);
    }
    if let Some(stream) = msg.stream() {
        base.insert("stream", stream);
    }
    // one tag for all of them: a group name is an id, so a comma only separates
    let groups = item.groups().join(",");
    base.insert("groups", &groups);
    let start = out.len();
    for (n, metric) in metrics.iter().enumerate() {
        let name = metric.get("name").and_then(|v| v.as_str()).unwrap_or("");
        if metric.get("value").is_some_and(|v| v.is_null()) {
            continue; // undetermined (a plugin's `U`): no point to plot
        }
        let Some(value) = metric.get("value").and_then(|v| v.as_f64()) else {
            out.truncate(start);
            return Err(format!("metric {n} (`{name}`) has no numeric `value`"));
        };
        if name.is_empty() {
            out.truncate(start);
            return Err(format!("metric {n} has no `name`"));
        }
        let mut tags = base.clone();
        if let Some(labels) = metric.get("labels").and_then(|l| l.as_object()) {
            for (k, v) in labels {
                if let Some(v) = v.as_str() {
                    tags.insert(k, v);
                }
            }
        }
        let mut m = String::new();
        measurement.render(msg, name, &mut m);
        escaped(out, &m, MEASUREMENT_SPECIAL);
        for (k, v) in tags {
            // InfluxDB refuses an empty tag key or value: such a tag is no tag
            if k.is_empty() || v.is_empty() {
                continue;
            }
            out.push(',');
            escaped(out, k, KEY_SPECIAL);
            out.push('=');
            escaped(out, v, KEY_SPECIAL);
        }
        let _ = write!(out, " value={value}");
        for field in ["warn", "crit", "min", "max"] {
            match metric.get(field) {
                Some(serde_json::Value::Number(v)) => {
                    let _ = write!(out, ",{field}={v}");
                }
                // a threshold range (`~:80`, `@10:20`): its text, under a key of its own so
                // that a field keeps one type
                Some(serde_json::Value::String(range)) => {
                    let _ = write!(out, ",{field}_range=\"");
                    escaped(out, range, &['"', '\\']);
                    out.push('"');
                }
                _ => {}
            }
        }
        let _ = writeln!(out, " {time}");
    }
    Ok(())
}

impl InfluxSink {
    /// `POST url` with `body`; the error classes of the module documentation.
    async fn post(&self, url: &reqwest::Url, body: String) -> Result<(), SinkError> {
        let what = format!(
            "POST {}",
            url.as_str().split('?').next().unwrap_or_default()
        );
        let mut request = self
            .client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body);
        request = match &self.auth {
            Auth::None => request,
            Auth::Basic { user, password } => request.basic_auth(user, password.as_ref()),
            Auth::Token(token) => {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Token {token}"))
                    .map_err(|e| {
                    SinkError::Config(format!("sink `{}`: token: {e}", self.name))
                })?;
                value.set_sensitive(true);
                request.header(reqwest::header::AUTHORIZATION, value)
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| SinkError::Remote(format!("{what}: {}", crate::error_chain(&e))))?;
        if response.status().is_success() {
            return Ok(());
        }
        Err(crate::http::answer_error(response, &what, |status| {
            !matches!(status.as_u16(), 400 | 413)
        })
        .await)
    }
}

impl Sink for InfluxSink {
    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        // beside the start, not before it: `GET /ping`
        tokio::spawn(crate::http::probe(
            self.client.get(self.ping_url.clone()),
            "influxdb sink: server",
            self.name.clone(),
        ));
        Box::pin(async move { Ok(saved) })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut body = String::new();
            // the messages without points that share the first one's reason: each dead
            // letter carries its own reason (others come back with theirs on the retry)
            let mut none = Vec::new();
            let mut why: Option<String> = None;
            for (n, item) in batch.items.iter().enumerate() {
                if let Err(e) = points(item, &self.measurement, &mut body) {
                    if why.get_or_insert_with(|| e.clone()) == &e {
                        none.push(n);
                    }
                }
            }
            if let Some(why) = why {
                return Err(SinkError::Refused(why).for_items(none));
            }
            if body.is_empty() {
                return Ok(()); // only undetermined values: nothing to plot
            }
            if let Some(create) = self.create.clone() {
                self.post(&create, String::new()).await?;
                self.create = None;
            }
            self.post(&self.write_url, body).await
        })
    }

    /// A point written again replaces itself: a batch written again after a crash (from
    /// a position saved now and then) changes nothing.
    fn exactly_once(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
