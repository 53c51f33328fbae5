//! Reloading the rules file of a running server: on SIGHUP ([`crate::Server::reload`]),
//! on `POST /rules/reload` (the admin endpoint), and with `[rules] watch = true` whenever
//! the file's contents change (polled every second).
//!
//! The new file is read, parsed, checked and its `[[tests]]` run first; on any error the
//! old rules stay, the error is logged, counted (`fleetbus_rules_reload_failures_total`)
//! and kept for `GET /rules`. Then the engine switches ([`fleetbus_pipeline::reload`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetbus_pipeline::{Engine, ReloadReport};
use fleetbus_rules::{rule_tests, RuleSet};
use serde::Serialize;

/// How often `[rules] watch` looks at the file.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads the rules of one engine from one file.
pub struct RulesReloader {
    file: Option<PathBuf>,
    engine: Arc<Engine>,
    /// The contents last tried: the watcher tries each version of the file once.
    last_text: Mutex<Option<String>>,
    /// One reload at a time (a signal and the watcher may meet).
    one: tokio::sync::Mutex<()>,
}

/// What `GET /rules` answers.
#[derive(Debug, Clone, Serialize)]
pub struct RulesStatus {
    /// The rules file (`null`: the built-in rules).
    pub file: Option<String>,
    /// The generation in effect: 1 at start, one more per reload that took effect.
    pub generation: u64,
    /// When the last reload took effect.
    pub last_reload: Option<DateTime<Utc>>,
    /// Reloads refused since the start.
    pub reload_failures: u64,
    /// The last refusal, unless a reload took effect since.
    pub last_error: Option<LastError>,
}

/// Why the last reload was refused.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// When.
    pub at: DateTime<Utc>,
    /// Every problem, one per line.
    pub error: String,
}

impl RulesReloader {
    /// A reloader of `engine`'s rules from `file` (`None`: the built-in rules, which cannot
    /// be reloaded).
    pub fn new(file: Option<PathBuf>, engine: Arc<Engine>) -> RulesReloader {
        let last_text = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok());
        RulesReloader {
            file,
            engine,
            last_text: Mutex::new(last_text),
            one: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads, checks and tests the file, then puts it in effect. On an error the old
    /// rules stay and the error is kept (and returned). Without a rules file (the built-in
    /// rules) there is nothing to reload: an error, not counted as a refused reload.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        if self.file.is_none() {
            // nothing to read again, and not a refused reload (a SIGHUP may be for the
            // policy or the certificate)
            return Err(
                "no rules file is configured ([rules] file): the built-in rules stay".into(),
            );
        }
        let _one = self.one.lock().await;
        let result = match self.prepare() {
            Ok(set) => self.engine.reload(set).await,
            Err(e) => {
                self.engine.reload_refused(&e);
                Err(e)
            }
        };
        match &result {
            Ok(report) => {
                tracing::info!(generation = report.generation, "rules file reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "rules file not reloaded: the rules in effect stay")
            }
        }
        result
    }

    /// The file read, parsed, checked and tested.
    fn prepare(&self) -> Result<RuleSet, String> {
        let Some(file) = &self.file else {
            return Err("no rules file is configured".into());
        };
        // the version tried: the watcher tries each version once
        if let Ok(text) = std::fs::read_to_string(file) {
            *self.last_text.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        }
        rule_tests::load_tested(file)
    }

    /// Reloads whenever the file's contents differ from the version last tried, until
    /// `stop`.
    pub(crate) async fn watch(self: Arc<Self>, mut stop: crate::shutdown::StopSignal) {
        let Some(file) = self.file.clone() else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = stop.stopped() => return,
            }
            let Ok(text) = tokio::fs::read_to_string(&file).await else {
                continue; // being replaced; looked at again in a second
            };
            let changed = self
                .last_text
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                != Some(text.as_str());
            if changed {
                let _ = self.reload().await;
            }
        }
    }

    /// The engine whose rules this reloads.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The generation in effect and the last refusal.
    pub fn status(&self) -> RulesStatus {
        let stats = self.engine.stats();
        RulesStatus {
            file: self.file.as_ref().map(|f| f.display().to_string()),
            generation: stats.generation,
            last_reload: stats.reloads.last_reload,
            reload_failures: stats.reloads.failures,
            last_error: stats
                .reloads
                .last_error
                .map(|(at, error)| LastError { at, error }),
        }
    }
}
