//! Loads fleetbus configuration files: TOML with environment overrides scoped to the
//! program (`FLEETBUS_SERVER__…` for `serve`, `FLEETBUS_AGENT__…` for `agent`, via
//! figment), unknown keys rejected, values checked once ([`check`]), and every error naming
//! `file:line:col` and the problem, all problems at once.

pub mod check;

use std::ops::Range;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;

pub use check::{problems_of, Check, Invalid, Problem, Problems, Valid};

/// Prefix of environment variables that override keys of the server's configuration
/// (`fleetbus serve`). Nested keys are separated by a double underscore:
/// `FLEETBUS_SERVER__BROKER__LISTEN=0.0.0.0:1883`.
pub const SERVER_ENV_PREFIX: &str = "FLEETBUS_SERVER__";

/// Prefix of environment variables that override keys of an agent's configuration
/// (`fleetbus agent`): `FLEETBUS_AGENT__METRICS__INTERVAL=30s`.
pub const AGENT_ENV_PREFIX: &str = "FLEETBUS_AGENT__";

/// A configuration problem, always naming the file and, when known, the line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A problem at a known place in the file.
    #[error("{}:{line}:{col}: {message}", path.display())]
    At {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// A problem that has no single place (e.g. from an environment override).
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An error at byte offset `span.start` of `text` (the contents of `path`).
    pub fn at(path: &Path, text: &str, span: Range<usize>, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, span.start);
        ConfigError::At {
            path: path.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    /// An error about the file as a whole.
    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Every problem found in one configuration or rules file, each naming the file and, when
/// known, the line and column.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct InvalidConfig {
    /// The problems, in the order they were found.
    pub problems: Vec<ConfigError>,
}

impl From<ConfigError> for InvalidConfig {
    fn from(e: ConfigError) -> Self {
        InvalidConfig { problems: vec![e] }
    }
}

impl InvalidConfig {
    /// Places each of `problems` in `text` (the contents of `path`, when the value came
    /// from a file): at its key when the file sets it, else naming just the file (the
    /// value came from a default or an environment override).
    pub fn locate(path: &Path, text: Option<&str>, problems: Vec<Problem>) -> InvalidConfig {
        let document = text.and_then(|t| toml::de::DeTable::parse(t).ok());
        let problems = problems
            .into_iter()
            .map(|p| {
                let span = document
                    .as_ref()
                    .and_then(|d| key_span_in(d.get_ref(), &p.key));
                match (text, span) {
                    (Some(text), Some(span)) => ConfigError::at(path, text, span, p.to_string()),
                    _ => ConfigError::invalid(path, p.to_string()),
                }
            })
            .collect();
        InvalidConfig { problems }
    }
}

/// Where the dotted `key` (`sinks.archive.batch.max_events`) is set in the TOML `text`:
/// the span of its last key, if the text sets it.
pub fn key_span(text: &str, key: &str) -> Option<Range<usize>> {
    let document = toml::de::DeTable::parse(text).ok()?;
    key_span_in(document.get_ref(), key)
}

/// Where the dotted `key` is set in `table`: the span of its last key. A name may itself
/// contain dots (`[sinks."fleetbus.dead-letters"]`), so the longest name that matches wins.
fn key_span_in(table: &toml::de::DeTable<'_>, key: &str) -> Option<Range<usize>> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = table;
    let mut rest = &parts[..];
    loop {
        let (name, value, used) = (1..=rest.len()).rev().find_map(|n| {
            let name = rest[..n].join(".");
            table
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == name.as_str())
                .map(|(k, v)| (k, v, n))
        })?;
        rest = &rest[used..];
        if rest.is_empty() {
            return Some(name.span());
        }
        table = value.get_ref().as_table()?;
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Turns a `toml` parse/deserialize error into a located [`ConfigError`].
pub fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim().to_string();
    match err.span() {
        Some(span) => ConfigError::at(path, text, span, message),
        None => ConfigError::invalid(path, message),
    }
}

/// Resolves `path` against the directory of the configuration file `config_file`
/// (unchanged when `path` is absolute or there is no file), so that a configuration works
/// wherever the program is started from.
pub fn relative_to(config_file: Option<&Path>, path: &Path) -> PathBuf {
    match config_file.and_then(Path::parent) {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// Reads `path` into a string, with an error naming the file.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses `text` (the contents of `path`) as `T`, reporting errors with line and column.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| toml_error(path, text, &e))
}

/// Loads a configuration of type `T` from the TOML file at `path` (if given) with
/// environment overrides on top: every variable starting with `env_prefix`
/// ([`SERVER_ENV_PREFIX`] or [`AGENT_ENV_PREFIX`]), nested keys separated by `__`. `T`
/// must give every field a default and should use `#[serde(deny_unknown_fields)]`.
/// `prepare` adjusts the value before it is checked (e.g. resolves relative paths against
/// the file's directory); then [`Check::check`] runs and every problem is reported, each at
/// its key's `line:col` when the file sets it.
///
/// The file alone is read first so that errors in it carry `line:col`; the environment
/// is merged afterwards. Each program has its own prefix, so an agent and a server can
/// share one environment, and so can unrelated variables such as
/// `FLEETBUS_TEST_REQUIRE`. A misspelled name under the prefix is an error, as in a file.
pub fn load<T: DeserializeOwned + Default + Check>(
    path: Option<&Path>,
    env_prefix: &str,
    prepare: impl FnOnce(&mut T),
) -> Result<Valid<T>, InvalidConfig> {
    let (mut value, text) = load_unchecked::<T>(path, env_prefix)?;
    prepare(&mut value);
    Valid::new(value).map_err(|invalid| {
        InvalidConfig::locate(
            path.unwrap_or(Path::new("<defaults>")),
            text.as_deref(),
            invalid.0,
        )
    })
}

/// [`load`] without the check: the value and the file's text.
fn load_unchecked<T: DeserializeOwned + Default>(
    path: Option<&Path>,
    env_prefix: &str,
) -> Result<(T, Option<String>), ConfigError> {
    let env = Env::prefixed(env_prefix).split("__");
    if let Some(stray) = unscoped_override(std::env::vars().map(|(k, _)| k)) {
        return Err(ConfigError::invalid(
            path.unwrap_or(Path::new("<defaults>")),
            format!(
                "environment variable {stray} is not read: configuration overrides name their program, {SERVER_ENV_PREFIX}KEY__SUBKEY for `serve` and {AGENT_ENV_PREFIX}KEY__SUBKEY for `agent`"
            ),
        ));
    }
    let (figment, shown, text) = match path {
        Some(path) => {
            let text = read(path)?;
            parse_toml::<T>(path, &text)?;
            (
                Figment::from(Toml::string(&text)).merge(env),
                path.to_path_buf(),
                Some(text),
            )
        }
        None => (Figment::new().merge(env), PathBuf::from("<defaults>"), None),
    };
    let value = figment.extract::<T>().map_err(|e| {
        ConfigError::invalid(
            &shown,
            format!("{e} (from environment overrides {env_prefix}*)"),
        )
    })?;
    Ok((value, text))
}

/// The first variable that looks like a configuration override (`FLEETBUS_…__…`) but names
/// neither program: an override in the older, unscoped form would otherwise be ignored
/// without a word.
fn unscoped_override(names: impl Iterator<Item = String>) -> Option<String> {
    names
        .filter(|n| n.starts_with("FLEETBUS_") && n.contains("__"))
        .find(|n| !n.starts_with(SERVER_ENV_PREFIX) && !n.starts_with(AGENT_ENV_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Deserialize, Serialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        name: String,
        inner: Inner,
        id: Option<String>,
    }

    #[derive(Debug, Deserialize, Serialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        port: u16,
    }

    impl Check for Sample {
        fn check(&self, p: &mut Problems) {
            p.section("inner", |p| {
                p.require(self.inner.port != 9, "port", "must not be 9")
            });
            p.require(self.name != "bad", "name", "must not be `bad`");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn every_failed_check_is_placed_at_its_key_or_named_by_file() {
        // in a jail: another test sets FLEETBUS_SERVER__INNER__PORT for a while
        figment::Jail::expect_with(|_| {
            every_failed_check_is_placed();
            Ok(())
        });
    }

    fn every_failed_check_is_placed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"x\"\n\n[inner]\n  port = 9\n").unwrap();
        let err =
            load::<Sample>(Some(&path), SERVER_ENV_PREFIX, |s| s.name = "bad".into()).unwrap_err();
        let shown: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        let file = path.display().to_string();
        assert_eq!(
            shown,
            [
                format!("{file}:4:3: inner.port: must not be 9"),
                // set by the file, so placed where the file sets it
                format!("{file}:1:1: name: must not be `bad`"),
            ]
        );
        std::fs::write(&path, "[inner]\nport = 9\n").unwrap();
        let err = load::<Sample>(Some(&path), SERVER_ENV_PREFIX, |s| s.name = "bad".into())
            .unwrap_err()
            .to_string();
        // a value the file does not set has no line to point at
        assert!(
            err.ends_with(&format!("{file}: name: must not be `bad`")),
            "{err}"
        );
    }

    #[test]
    fn a_key_path_finds_names_with_dots() {
        let text = "[sinks.\"a.b\".batch]\nmax_events = 0\n";
        let span = key_span(text, "sinks.a.b.batch.max_events").unwrap();
        assert_eq!(span.start, "[sinks.\"a.b\".batch]\n".len());
        assert!(key_span(text, "sinks.c").is_none());
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"x\"\n[inner]\nprot = 1\n").unwrap();
        let err = load::<Sample>(Some(&path), SERVER_ENV_PREFIX, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml:3:1"), "{err}");
        assert!(err.contains("unknown field `prot`"), "{err}");
    }

    #[test]
    fn missing_file_names_the_file() {
        let err = load::<Sample>(
            Some(Path::new("/nonexistent/x.toml")),
            SERVER_ENV_PREFIX,
            |_| {},
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/x.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"x\"\n[inner]\nport = 1\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("FLEETBUS_SERVER__INNER__PORT", "7");
            jail.set_env("FLEETBUS_SERVER__ID", "from-env");
            // another program's variables, and the test harness's, are not this one's
            jail.set_env("FLEETBUS_AGENT__INNER__PROT", "1");
            jail.set_env("FLEETBUS_TEST_REQUIRE", "1");
            let s = load::<Sample>(Some(&path), SERVER_ENV_PREFIX, |_| {});
            let s = s.unwrap_or_else(|e| panic!("{e}")).into_inner();
            assert_eq!(s.inner.port, 7);
            assert_eq!(s.id.as_deref(), Some("from-env"));
            assert_eq!(s.name, "x");
            // below a known key, a misspelled name is still an error
            jail.set_env("FLEETBUS_SERVER__INNER__PROT", "7");
            let err = load::<Sample>(Some(&path), SERVER_ENV_PREFIX, |_| {})
                .unwrap_err()
                .to_string();
            assert!(err.contains("prot"), "{err}");
            Ok(())
        });
    }
}

#[cfg(test)]
mod unscoped_tests {
    #[test]
    fn an_override_naming_no_program_is_found() {
        let names = |v: &[&str]| {
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(
            super::unscoped_override(names(&["FLEETBUS_BROKER__LISTEN", "PATH"])).as_deref(),
            Some("FLEETBUS_BROKER__LISTEN")
        );
        assert_eq!(
            super::unscoped_override(names(&[
                "FLEETBUS_SERVER__BROKER__LISTEN",
                "FLEETBUS_AGENT__SERVER",
                "FLEETBUS_ADMIN_TOKEN_FILE",
                "FLEETBUS_TEST_REQUIRE",
            ])),
            None
        );
    }
}
