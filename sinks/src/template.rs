//! Templates, the one engine of every name a sink takes from a message (file paths, S3
//! keys, MQTT topics, HTTP URLs, InfluxDB measurements): `telemetry/{agent}/{stream}/%Y-%m-%d.jsonl`.
//!
//! - `{agent}`, `{stream}`: the message's agent and stream (`_` when it has none);
//! - `{record.PATH}`: any field of the message, by path (`{record.event.class}`,
//!   `{record.labels.mount}`; for a message a rule made, a field of that message): a
//!   string as it is, a number or a boolean as written, anything else (a map, a list,
//!   nothing there) `_`;
//! - `{topic.N}`: segment N (0-based) of the topic;
//! - `{seq}`, `{epoch}`: a record's sequence number (`t` + the time received in ms when it
//!   has none) and outbox incarnation;
//! - `{file.name}`, `{file.sha256}`, `{file.id}`, `{file.size}`, `{file.meta.KEY}`: the
//!   file of a file completion message (`_` for other messages);
//! - strftime fields (`%Y`, `%m`, `%d`, `%H`, ...) from the record's timestamp (its `ts`,
//!   else the time the server received it), in UTC;
//! - a fallback for any placeholder: `{record.tags.role | "unknown"}` (or `'unknown'`)
//!   stands for the text in quotes when the value is missing or empty.
//!
//! Substituted values are made safe as one path component: anything outside
//! `[A-Za-z0-9._-]` becomes `_`, and `.`/`..` become `_`, so a message can never steer a
//! write outside the sink's directory; a value longer than 128 bytes is cut to 100
//! characters plus `~` and a hash of the whole ([`MAX_VALUE_BYTES`]), so one long file name
//! cannot make a path the filesystem refuses.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::{Component, Path};

use chrono::format::{Item, StrftimeItems};
use fleetbus_protocol::Message;

/// A template compiled once at configuration time.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(Vec<Item<'static>>),
    /// A value from the message, and what stands for it when it is missing or empty.
    Value(Source, Option<String>),
}

#[derive(Debug, Clone)]
enum Source {
    Agent,
    Stream,
    Seq,
    Epoch,
    TopicSegment(usize),
    /// A field of the body, by path (`file.name` → `body.file.name`).
    BodyField(Vec<String>),
}

/// A template that cannot be used, with the character position of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path template `{template}`, at character {position}: {problem}")]
pub struct TemplateError {
    /// The whole template.
    pub template: String,
    /// 1-based character position of the problem.
    pub position: usize,
    /// What is wrong.
    pub problem: String,
}

impl PathTemplate {
    /// Compiles `source`, refusing unknown placeholders, bad strftime fields, absolute paths
    /// and `..` components.
    pub fn parse(source: &str) -> Result<PathTemplate, TemplateError> {
        let err = |byte: usize, problem: String| TemplateError {
            template: source.to_string(),
            position: source[..byte.min(source.len())].chars().count() + 1,
            problem,
        };
        if source.trim().is_empty() {
            return Err(err(0, "is empty".into()));
        }
        let path = Path::new(source);
        if path.is_absolute() {
            return Err(err(
                0,
                "must be relative (it is resolved under the server's data_dir)".into(),
            ));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            let at = source.find("..").unwrap_or(0);
            return Err(err(at, "`..` would leave the data directory".into()));
        }
        let mut parts = Vec::new();
        let mut rest = source;
        let mut offset = 0;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(open) => {
                    if open > 0 {
                        parts.push(text(&rest[..open]).map_err(|p| err(offset, p))?);
                    }
                    let close = rest[open..]
                        .find('}')
                        .ok_or_else(|| err(offset + open, "`{` is never closed".into()))?;
                    let name = &rest[open + 1..open + close];
                    parts.push(placeholder(name).map_err(|p| err(offset + open, p))?);
                    offset += open + close + 1;
                    rest = &rest[open + close + 1..];
                }
                None => {
                    parts.push(text(rest).map_err(|p| err(offset, p))?);
                    rest = "";
                }
            }
        }
        Ok(PathTemplate {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The relative path for `msg`.
    pub fn render(&self, msg: &Message) -> String {
        let ts = msg.timestamp();
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                // validated at parse time: formatting cannot fail
                Part::Text(items) => {
                    let _ = write!(out, "{}", ts.format_with_items(items.iter()));
                }
                Part::Value(source, fallback) => {
                    let value = source.value(msg).filter(|v| !v.is_empty());
                    push_safe(&mut out, value.as_deref().or(fallback.as_deref()))
                }
            }
        }
        out
    }
}

impl Source {
    /// The value in `msg`, if it has one.
    fn value<'m>(&self, msg: &'m Message) -> Option<Cow<'m, str>> {
        match self {
            Source::Agent => msg.agent().map(Cow::Borrowed),
            Source::Stream => msg.stream().map(Cow::Borrowed),
            Source::Seq => Some(Cow::Owned(match msg.seq() {
                Some(seq) => seq.to_string(),
                None => format!("t{}", msg.received.timestamp_millis()),
            })),
            Source::Epoch => Some(Cow::Owned(msg.epoch().to_string())),
            Source::TopicSegment(n) => msg.segments().nth(*n).map(Cow::Borrowed),
            Source::BodyField(path) => {
                let value = path
                    .iter()
                    .try_fold(&msg.body, |v, key| v.get(key.as_str()))?;
                match value {
                    serde_json::Value::String(s) => Some(Cow::Borrowed(s.as_str())),
                    v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                        Some(Cow::Owned(v.to_string()))
                    }
                    _ => None,
                }
            }
        }
    }
}

fn text(s: &str) -> Result<Part, String> {
    let items = StrftimeItems::new(s)
        .parse_to_owned()
        .map_err(|_| format!("bad strftime field in `{s}` (write %% for a literal %)"))?;
    Ok(Part::Text(items))
}

/// `NAME` or `NAME | "fallback"`.
fn placeholder(text: &str) -> Result<Part, String> {
    let (name, fallback) = match text.split_once('|') {
        None => (text.trim(), None),
        Some((name, fallback)) => {
            let f = fallback.trim();
            let quoted = f.len() >= 2
                && ((f.starts_with('"') && f.ends_with('"'))
                    || (f.starts_with('\'') && f.ends_with('\'')));
            if !quoted {
                return Err(format!(
                    "the fallback of `{{{text}}}` must be quoted text: `{{{} | \"unknown\"}}`",
                    name.trim()
                ));
            }
            let text = &f[1..f.len() - 1];
            if text.contains('/') {
                return Err(format!(
                    "the fallback of `{{{}}}` stands for one value: no `/` in it",
                    name.trim()
                ));
            }
            (name.trim(), Some(text.to_string()))
        }
    };
    Ok(Part::Value(source(name)?, fallback))
}

fn source(name: &str) -> Result<Source, String> {
    match name {
        "agent" => Ok(Source::Agent),
        "stream" => Ok(Source::Stream),
        "seq" => Ok(Source::Seq),
        "epoch" => Ok(Source::Epoch),
        "file.id" => Ok(Source::BodyField(vec!["file".into(), "file_id".into()])),
        "file.name" | "file.sha256" | "file.size" | "file.content_type" => Ok(Source::BodyField(
            name.split('.').map(str::to_string).collect(),
        )),
        _ if name.starts_with("file.meta.") && name.len() > "file.meta.".len() => {
            let key = &name["file.meta.".len()..];
            Ok(Source::BodyField(vec!["file".into(), "meta".into(), key.into()]))
        }
        _ if name.starts_with("record.") => {
            let path: Vec<String> = name["record.".len()..].split('.').map(str::to_string).collect();
            match path.iter().any(String::is_empty) {
                true => Err(format!("`{{{name}}}`: a field path is names separated by single dots")),
                false => Ok(Source::BodyField(path)),
            }
        }
        _ => match name.strip_prefix("topic.").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Source::TopicSegment(n)),
            _ => Err(format!(
                "unknown placeholder `{{{name}}}` (known: {{agent}}, {{stream}}, {{seq}}, {{epoch}}, {{topic.N}}, {{record.FIELD}}, {{file.name}}, {{file.sha256}}, {{file.id}}, {{file.size}}, {{file.meta.KEY}}; any with a fallback: {{record.FIELD | \"unknown\"}})"
            )),
        },
    }
}

fn push_safe(out: &mut String, value: Option<&str>) {
    match value {
        Some(v) if !v.is_empty() && v != "." && v != ".." => {
            let safe = v.chars().map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            });
            if v.len() <= MAX_VALUE_BYTES {
                out.extend(safe);
            } else {
                // the first characters, then a hash of the whole value: still one
                // component the filesystem takes, and still one per distinct value
                out.extend(safe.take(LONG_VALUE_KEPT));
                let _ = write!(out, "~{:016x}", fnv1a(v.as_bytes()));
            }
        }
        _ => out.push('_'),
    }
}

/// Longest value substituted as it is (ids are at most 128 characters, so they always
/// are); a longer one (a file name, a metadata value) is cut to [`LONG_VALUE_KEPT`]
/// characters followed by `~` and 16 hex digits of its hash, so that it cannot make a path
/// component longer than the filesystem allows (255 bytes) on its own.
pub const MAX_VALUE_BYTES: usize = 128;
/// Characters kept of a value longer than [`MAX_VALUE_BYTES`].
const LONG_VALUE_KEPT: usize = 100;

/// 64-bit FNV-1a: a stable hash (the same value gives the same path on every retry and
/// every version).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, body: &str) -> Message {
        Message::decode(topic, body.as_bytes()).unwrap()
    }

    #[test]
    fn a_long_value_is_cut_with_a_hash_and_stays_distinct() {
        let t = PathTemplate::parse("uploads/{file.id}-{file.name}").unwrap();
        let body = |name: &str| format!(r#"{{"file":{{"id":"0123","name":"{name}"}}}}"#);
        let long_a = format!("{}.tar.gz", "a".repeat(240));
        let long_b = format!("{}.tar.gz", "a".repeat(241));
        let a = t.render(&msg("fleet/a1/files/0123/complete", &body(&long_a)));
        let b = t.render(&msg("fleet/a1/files/0123/complete", &body(&long_b)));
        let name = a.rsplit('/').next().unwrap();
        assert!(name.len() < 255 && name.contains("-aaaa"), "{a}");
        assert_ne!(a, b, "two long names must not share a path");
        assert_eq!(
            a,
            t.render(&msg("fleet/a1/files/0123/complete", &body(&long_a)))
        );
        let short = t.render(&msg("fleet/a1/files/0123/complete", &body("core.dump")));
        assert!(short.ends_with("-core.dump"), "{short}");
    }

    #[test]
    fn renders_placeholders_and_dates() {
        let t = PathTemplate::parse("telemetry/{agent}/{stream}/%Y-%m-%d.jsonl").unwrap();
        let m = msg(
            "fleet/a1/telemetry/metrics",
            r#"{"ts":"2026-03-04T05:06:07Z"}"#,
        );
        assert_eq!(t.render(&m), "telemetry/a1/metrics/2026-03-04.jsonl");
        let t = PathTemplate::parse("by-topic/{topic.0}-{topic.3}/%H.log").unwrap();
        assert_eq!(t.render(&m), "by-topic/fleet-metrics/05.log");
    }

    #[test]
    fn renders_file_fields() {
        let t = PathTemplate::parse("files/{agent}/{file.meta.case}/{file.name}-{file.sha256}")
            .unwrap();
        let m = msg(
            "fleet/a1/files/f1/complete",
            r#"{"file":{"name":"core.dump","sha256":"ab12","meta":{"case":"INC-42"}}}"#,
        );
        assert_eq!(t.render(&m), "files/a1/INC-42/core.dump-ab12");
        let other = msg("fleet/a1/telemetry/x", "{}");
        assert_eq!(t.render(&other), "files/a1/_/_-_");
    }

    #[test]
    fn hostile_values_stay_inside_the_directory() {
        let t = PathTemplate::parse("{agent}/{topic.1}/{topic.9}.jsonl").unwrap();
        let m = msg("x/../y", r#"{"agent":"../../etc"}"#);
        let p = t.render(&m);
        assert_eq!(p, ".._.._etc/_/_.jsonl");
        assert!(Path::new(&p)
            .components()
            .all(|c| matches!(c, Component::Normal(_))));
    }

    #[test]
    fn any_field_of_the_message_with_a_fallback() {
        let t = PathTemplate::parse(
            "events/{record.event.class}/{record.tags.role | \"unknown\"}/{record.n}-{record.ok}-{record.list}-{topic.7 | 'none'}.jsonl",
        )
        .unwrap();
        let m = msg(
            "fleet/a1/telemetry/events",
            r#"{"event":{"class":"disk/full"},"n":3,"ok":true,"list":[1],"tags":{"role":""}}"#,
        );
        // a `/` in a value is made safe, an empty value takes the fallback
        assert_eq!(t.render(&m), "events/disk_full/unknown/3-true-_-none.jsonl");
        let m = msg(
            "fleet/a1/telemetry/events",
            r#"{"event":{"class":"cpu"},"tags":{"role":"web"}}"#,
        );
        assert_eq!(t.render(&m), "events/cpu/web/_-_-_-none.jsonl");
        // a fallback is made safe as any value, and is one value
        let t = PathTemplate::parse("{agent | '..'}").unwrap();
        assert_eq!(t.render(&msg("other/topic", "{}")), "_");
        assert!(PathTemplate::parse("{agent | 'a/b'}").is_err());
    }

    #[test]
    fn bad_templates_say_where() {
        let e = PathTemplate::parse("x/{agnt}.log").unwrap_err();
        assert_eq!(e.position, 3);
        assert!(e.problem.contains("unknown placeholder `{agnt}`"));
        assert!(PathTemplate::parse("/etc/x").is_err());
        assert!(PathTemplate::parse("a/../../x").is_err());
        assert!(PathTemplate::parse("a/{agent").is_err());
        assert!(PathTemplate::parse("a/%Q").is_err());
        let e = PathTemplate::parse("x/{record.a | unknown}").unwrap_err();
        assert!(e.problem.contains("must be quoted"), "{e}");
        assert!(PathTemplate::parse("x/{record..a}").is_err());
        assert!(PathTemplate::parse("x/{record.}").is_err());
    }
}
