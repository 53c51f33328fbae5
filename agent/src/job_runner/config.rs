//! `[jobs]` in the agent configuration: the key that signs jobs, and the allow-listed
//! operations with the patterns their arguments must match.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[jobs]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The server's job signing public key, hex (from `fleetbus keys generate`). Without
    /// one (here or in `public_key_file`) every job is rejected.
    pub public_key: Option<String>,
    /// A file holding the public key instead (relative to the configuration file).
    pub public_key_file: Option<PathBuf>,
    /// Jobs running at the same time, at most; more wait their turn (QUEUED).
    pub concurrency: usize,
    /// Bytes of stdout and of stderr kept for the status report; beyond, a marker says how
    /// much was cut.
    pub output_limit: usize,
    /// Enables the `shell` operation (`cmd` argument run by `sh -c`). Off unless the
    /// operator explicitly wants arbitrary commands.
    pub allow_shell: bool,
    /// Timeout for `shell` and built-ins when the job does not ask for less.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// The allow-listed operations, by name.
    pub handlers: BTreeMap<String, HandlerConfig>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            public_key: None,
            public_key_file: None,
            concurrency: 4,
            output_limit: 16 * 1024,
            allow_shell: false,
            default_timeout: Duration::from_secs(300),
            handlers: BTreeMap::new(),
        }
    }
}

/// `[jobs.handlers.NAME]`: one allow-listed operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// The program and its arguments; `{name}` is replaced by the job's argument `name`
    /// (each element is one argument: no shell, no word splitting).
    pub command: Vec<String>,
    /// Every argument the job may pass, with the regular expression its whole value must
    /// match. An argument not listed here rejects the job.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// Most time one run may take; its processes get SIGTERM after it, then SIGKILL.
    #[serde(with = "humantime_serde", default = "default_handler_timeout")]
    pub timeout: Duration,
}

fn default_handler_timeout() -> Duration {
    Duration::from_secs(60)
}

impl HandlerConfig {
    /// A handler running `command` (`{name}` placeholders), accepting `args` (name and the
    /// pattern its value must match), killed after `timeout`.
    pub fn new(command: &[&str], args: &[(&str, &str)], timeout: Duration) -> HandlerConfig {
        HandlerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args
                .iter()
                .map(|(a, p)| (a.to_string(), p.to_string()))
                .collect(),
            timeout,
        }
    }
}

/// What serde cannot check: patterns compile, commands are not empty, placeholders name
/// declared arguments (keys relative to `[jobs]`).
impl fleetbus_config::Check for JobsConfig {
    fn check(&self, p: &mut fleetbus_config::Problems) {
        p.require(self.concurrency > 0, "concurrency", "must be at least 1");
        p.require(
            self.public_key.is_none() || self.public_key_file.is_none(),
            "public_key",
            "set public_key or public_key_file, not both",
        );
        if let Some(k) = &self.public_key {
            if let Err(e) = fleetbus_protocol::jobs::verifying_key_from_hex(k) {
                p.add("public_key", e.to_string());
            }
        }
        for (name, h) in &self.handlers {
            p.section(&format!("handlers.{name}"), |p| {
                p.require(
                    !crate::job_runner::BUILTINS.contains(&name.as_str()),
                    "",
                    format!("`{name}` is a built-in operation"),
                );
                p.require(!h.command.is_empty(), "command", "is empty");
                for (arg, pattern) in &h.args {
                    if let Err(e) = regex::Regex::new(pattern) {
                        p.add(&format!("args.{arg}"), e.to_string());
                    }
                }
                for part in &h.command {
                    for placeholder in placeholders(part) {
                        p.require(
                            h.args.contains_key(placeholder),
                            "command",
                            format!(
                                "uses {{{placeholder}}}, which is not in jobs.handlers.{name}.args"
                            ),
                        );
                    }
                }
                p.require(!h.timeout.is_zero(), "timeout", "must be above 0");
            });
        }
    }
}

/// The `{name}` placeholders in one command element.
pub(crate) fn placeholders(part: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = part;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(command: &[&str], args: &[(&str, &str)]) -> HandlerConfig {
        HandlerConfig::new(command, args, Duration::from_secs(5))
    }

    /// Every problem `c` has, one per line.
    fn problems(c: &JobsConfig) -> String {
        let found = fleetbus_config::problems_of(c);
        found.iter().map(|p| format!("{p}\n")).collect()
    }

    #[test]
    fn handlers_are_checked() {
        let mut c = JobsConfig::default();
        c.handlers.insert(
            "restart".into(),
            handler(&["systemctl", "restart", "{name}"], &[("name", "^[a-z]+$")]),
        );
        assert_eq!(problems(&c), "");
        c.handlers
            .insert("bad".into(), handler(&["x", "{missing}"], &[]));
        assert!(problems(&c).contains("{missing}"));
        c.handlers.remove("bad");
        c.handlers
            .insert("re".into(), handler(&["x"], &[("a", "([")]));
        assert!(problems(&c).contains("args.a"));
        c.handlers.remove("re");
        c.handlers.insert("echo".into(), handler(&["x"], &[]));
        assert!(problems(&c).contains("built-in"));
    }

    #[test]
    fn placeholders_are_found() {
        assert_eq!(placeholders("--unit={name}.{kind}"), vec!["name", "kind"]);
        assert!(placeholders("plain").is_empty());
    }
}
