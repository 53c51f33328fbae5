//! Path templates: `telemetry/{agent}/{stream}/%Y-%m-%d.jsonl`.
//!
//! - `{agent}`, `{stream}`: the message's agent and stream (`_` when it has none);
//! - `{topic.N}`: segment N (0-based) of the topic;
//! - `{seq}`, `{epoch}`: a record's sequence number (`t` + the time received in ms when it
//!   has none) and outbox incarnation;
//! - `{file.name}`, `{file.sha256}`, `{file.id}`, `{file.size}`, `{file.meta.KEY}`: the
//!   file of a file completion message (`_` for other messages);
//! - strftime fields (`%Y`, `%m`, `%d`, `%H`, ...) from the record's timestamp (its `ts`,
//!   else the time the server received it), in UTC.
//!
//! Substituted values are made safe as one path component: anything outside
//! `[A-Za-z0-9._-]` becomes `_`, and `.`/`..` become `_`, so a message can never steer a
//! write outside the sink's directory; a value longer than 128 bytes is cut to 100
//! characters plus `~` and a hash of the whole ([`MAX_VALUE_BYTES`]), so one long file name
//! cannot make a path the filesystem refuses.

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
                Part::Agent => push_safe(&mut out, msg.agent()),
                Part::Stream => push_safe(&mut out, msg.stream()),
                Part::Seq => match msg.seq() {
                    Some(seq) => {
                        let _ = write!(out, "{seq}");
                    }
                    None => {
                        let _ = write!(out, "t{}", msg.received.timestamp_millis());
                    }
                },
                Part::Epoch => {
                    let _ = write!(out, "{}", msg.epoch());
                }
                Part::TopicSegment(n) => push_safe(&mut out, msg.segments().nth(*n)),
                Part::BodyField(path) => {
                    let value = path
                        .iter()
                        .try_fold(&msg.body, |v, key| v.get(key.as_str()));
                    match value {
                        Some(serde_json::Value::String(s)) => push_safe(&mut out, Some(s)),
                        Some(v @ serde_json::Value::Number(_)) => {
                            push_safe(&mut out, Some(&v.to_string()))
                        }
                        _ => push_safe(&mut out, None),
                    }
                }
            }
        }
        out
    }
}

fn text(s: &str) -> Result<Part, String> {
    let items = StrftimeItems::new(s)
        .parse_to_owned()
        .map_err(|_| format!("bad strftime field in `{s}` (write %% for a literal %)"))?;
    Ok(Part::Text(items))
}

fn placeholder(name: &str) -> Result<Part, String> {
    match name {
        "agent" => Ok(Part::Agent),
        "stream" => Ok(Part::Stream),
        "seq" => Ok(Part::Seq),
        "epoch" => Ok(Part::Epoch),
        "file.id" => Ok(Part::BodyField(vec!["file".into(), "file_id".into()])),
        "file.name" | "file.sha256" | "file.size" | "file.content_type" => Ok(Part::BodyField(
            name.split('.').map(str::to_string).collect(),
        )),
        _ if name.starts_with("file.meta.") && name.len() > "file.meta.".len() => {
            let key = &name["file.meta.".len()..];
            Ok(Part::BodyField(vec!["file".into(), "meta".into(), key.into()]))
        }
        _ => match name.strip_prefix("topic.").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Part::TopicSegment(n)),
            _ => Err(format!(
                "unknown placeholder `{{{name}}}` (known: {{agent}}, {{stream}}, {{seq}}, {{epoch}}, {{topic.N}}, {{file.name}}, {{file.sha256}}, {{file.id}}, {{file.size}}, {{file.meta.KEY}})"
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
fn fnv1a(bytes: &[u8]) -> u64 {
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
    fn bad_templates_say_where() {
        let e = PathTemplate::parse("x/{agnt}.log").unwrap_err();
        assert_eq!(e.position, 3);
        assert!(e.problem.contains("unknown placeholder `{agnt}`"));
        assert!(PathTemplate::parse("/etc/x").is_err());
        assert!(PathTemplate::parse("a/../../x").is_err());
        assert!(PathTemplate::parse("a/{agent").is_err());
        assert!(PathTemplate::parse("a/%Q").is_err());
    }
}
