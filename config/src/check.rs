//! Checking a parsed configuration once and completely: serde reads the shape, then
//! [`Check::check`] looks at the values and records every problem at its key path
//! (`wal.snapshot_interval`, `sinks.archive.batch.max_events`), so an operator sees all of
//! them in one go. [`Valid`] is the proof that a value passed: the runtime takes a
//! `Valid<T>` and never checks again, and nothing is clamped behind the operator's back.

use std::fmt;
use std::ops::Deref;

/// One thing wrong with a configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key path, dotted from the top of the file (`broker.max_connections`).
    pub key: String,
    /// What is wrong, as a sentence about the value (`must be at least 1`).
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// The problems a check found, in the order it found them.
#[derive(Debug, Default)]
pub struct Problems {
    prefix: String,
    found: Vec<Problem>,
}

impl Problems {
    /// No problems yet.
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Records that the value at `key` (relative to the current section) is wrong.
    pub fn add(&mut self, key: &str, message: impl Into<String>) {
        let key = match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{key}", self.prefix),
        };
        self.found.push(Problem {
            key,
            message: message.into(),
        });
    }

    /// Records `message` at `key` unless `ok`.
    pub fn require(&mut self, ok: bool, key: &str, message: impl Into<String>) {
        if !ok {
            self.add(key, message);
        }
    }

    /// Runs `check` with keys relative to the section `section` (e.g. `broker`, then
    /// `limits` inside it).
    pub fn section(&mut self, section: &str, check: impl FnOnce(&mut Problems)) {
        let outer = self.prefix.clone();
        if !section.is_empty() {
            self.prefix = if outer.is_empty() {
                section.to_string()
            } else {
                format!("{outer}.{section}")
            };
        }
        check(self);
        self.prefix = outer;
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// What was found.
    pub fn into_vec(self) -> Vec<Problem> {
        self.found
    }
}

/// A configuration value whose values can be checked beyond what serde reads.
pub trait Check {
    /// Records every problem with the value's contents, keys relative to it.
    fn check(&self, problems: &mut Problems);
}

/// Every problem `value` has (empty when it is valid).
pub fn problems_of<T: Check + ?Sized>(value: &T) -> Vec<Problem> {
    let mut problems = Problems::new();
    value.check(&mut problems);
    problems.into_vec()
}

/// A value that passed its [`Check`]: only [`Valid::new`] makes one, so code that takes a
/// `Valid<T>` never checks again.
#[derive(Debug, Clone)]
pub struct Valid<T>(T);

impl<T: Check> Valid<T> {
    /// Checks `value`: the value, or every problem it has.
    pub fn new(value: T) -> Result<Valid<T>, Invalid> {
        let problems = problems_of(&value);
        if problems.is_empty() {
            Ok(Valid(value))
        } else {
            Err(Invalid(problems))
        }
    }
}

/// The problems of a value that failed its [`Check`] (for a value made in code; a file's
/// problems are placed in it by [`crate::InvalidConfig::locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<Problem>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(|p| p.to_string()).collect();
        write!(f, "invalid configuration: {}", shown.join("; "))
    }
}

impl std::error::Error for Invalid {}

impl<T> Valid<T> {
    /// The checked value itself.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Valid<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Limits {
        low: u32,
        high: u32,
    }

    impl Check for Limits {
        fn check(&self, p: &mut Problems) {
            p.require(self.low > 0, "low", "must be at least 1");
            p.require(self.high >= self.low, "high", "must be at least low");
        }
    }

    #[derive(Debug)]
    struct File {
        limits: Limits,
        name: String,
    }

    impl Check for File {
        fn check(&self, p: &mut Problems) {
            p.section("limits", |p| self.limits.check(p));
            p.require(!self.name.is_empty(), "name", "is empty");
        }
    }

    #[test]
    fn every_problem_is_reported_at_its_key_path() {
        let bad = File {
            limits: Limits { low: 0, high: 0 },
            name: String::new(),
        };
        let shown: Vec<String> = Valid::new(bad)
            .unwrap_err()
            .0
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(shown, ["limits.low: must be at least 1", "name: is empty"]);

        let good = File {
            limits: Limits { low: 1, high: 2 },
            name: "x".into(),
        };
        assert_eq!(Valid::new(good).unwrap().limits.high, 2);
    }
}
