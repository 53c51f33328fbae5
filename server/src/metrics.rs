//! The metrics endpoint: `GET /metrics` answers the engine's and every sink's counters in
//! the Prometheus text format (version 0.0.4), so lag, retries and dead letters can be
//! scraped and alerted on.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use fleetbus_broker::{Guard, SecurityCounters};
use fleetbus_pipeline::{Engine, EngineStats, SinkStatsSnapshot};
use fleetbus_rules::router::RuleStatsSnapshot;

use crate::file_service::FileCounters;
use tokio::task::JoinHandle;

use crate::ServerError;

/// Binds `addr` and serves `/metrics` from `engine` on the current runtime. Returns the
/// bound address and the serving task.
pub(crate) async fn start(
    addr: SocketAddr,
    limits: crate::HttpSection,
    engine: Arc<Engine>,
    files: Arc<FileCounters>,
    guard: Arc<Guard>,
    stop: crate::shutdown::StopSignal,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let guard_for_http = guard.clone();
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state((engine, files, guard));
    crate::http::serve("metrics.listen", addr, app, limits, guard_for_http, stop).await
}

async fn scrape(
    State((engine, files, guard)): State<(Arc<Engine>, Arc<FileCounters>, Arc<Guard>)>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&engine.stats(), &files, guard.counters()),
    )
}

/// The counters in the Prometheus text format.
pub fn render(s: &EngineStats, files: &FileCounters, security: &SecurityCounters) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let engine = [
        ("fleetbus_messages_received_total", "counter", "Messages handed to the rules engine.", s.received),
        ("fleetbus_decode_errors_total", "counter", "Messages skipped because their payload could not be decoded.", s.decode_errors),
        ("fleetbus_invalid_names_total", "counter", "Telemetry whose agent or stream name is not an id, kept in the built-in dead-letter sink.", s.invalid_names),
        ("fleetbus_dedup_streams", "gauge", "(agent, stream) pairs the de-duplication state remembers.", s.dedup_streams),
        ("fleetbus_dedup_forgotten_total", "counter", "Streams the de-duplication state forgot: more than wal.max_streams_per_agent for one agent, or idle for wal.dedup_idle.", s.dedup_forgotten),
        ("fleetbus_forged_total", "counter", "Messages from the network on topics only the server produces (file completions, job events, broker events), refused.", s.forged),
        ("fleetbus_unrouted_total", "counter", "Messages no rule matched.", s.unrouted),
        ("fleetbus_duplicates_total", "counter", "Records recognised as already accepted (acknowledged again, not stored again).", s.duplicates),
        ("fleetbus_refused_total", "counter", "Records refused because a target sink's backlog was full (agents keep and resend them).", s.refused),
        ("fleetbus_wal_durable_index", "gauge", "Write-ahead log index up to which entries are on disk.", s.durable),
        ("fleetbus_rules_generation", "gauge", "Generation of the rules in effect: 1 at start, one more per reload that took effect.", s.generation),
        ("fleetbus_rules_reload_failures_total", "counter", "Reloads of the rules refused (the rules in effect stayed): see GET /rules for the last error.", s.reloads.failures),
    ];
    for (name, kind, help, value) in engine {
        family(name, kind, help, &[(String::new(), value)]);
    }
    type RuleField = fn(&RuleStatsSnapshot) -> u64;
    let rules: [(&str, &str, RuleField); 10] = [
        (
            "fleetbus_rule_seen_total",
            "Messages each rule's topic filters matched.",
            |r| r.seen,
        ),
        (
            "fleetbus_rule_matched_total",
            "Messages (under foreach: elements) each rule's `where` let through.",
            |r| r.matched,
        ),
        (
            "fleetbus_rule_filtered_total",
            "Messages (elements) each rule's `where` turned away.",
            |r| r.filtered,
        ),
        (
            "fleetbus_rule_condition_errors_total",
            "Messages (elements) whose `where` could not be evaluated, per rule (turned away).",
            |r| r.condition_errors,
        ),
        (
            "fleetbus_rule_throttled_total",
            "Messages each rule's throttle held back.",
            |r| r.throttled,
        ),
        (
            "fleetbus_rule_deduplicated_total",
            "Messages each rule's dedupe held back.",
            |r| r.deduplicated,
        ),
        (
            "fleetbus_rule_untracked_total",
            "Messages a rule's throttle or dedupe let through because its table of keys was full.",
            |r| r.untracked,
        ),
        (
            "fleetbus_rule_aggregated_total",
            "Messages (elements) folded into a rule's aggregate windows.",
            |r| r.aggregated,
        ),
        (
            "fleetbus_rule_errors_total",
            "Messages a rule's transforms failed for (sent to its on_error sink with the error).",
            |r| r.errors,
        ),
        (
            "fleetbus_rule_produced_total",
            "Messages each rule sent to its sinks (as published, or made by its transforms).",
            |r| r.produced,
        ),
    ];
    for (name, help, field) in rules {
        let samples: Vec<(String, u64)> = s
            .rules
            .iter()
            .map(|r| (format!("{{rule=\"{}\"}}", escape(&r.rule)), field(r)))
            .collect();
        family(name, "counter", help, &samples);
    }
    let durable = s.durable;
    type SinkField = Box<dyn Fn(&SinkStatsSnapshot) -> u64>;
    let sinks: [(&str, &str, &str, SinkField); 10] = [
        ("fleetbus_sink_routed_total", "counter", "Messages routed to the sink since the start (the log's backlog for it at start included): written + dead-lettered + dropped + undecodable + pending.", Box::new(|st| st.routed)),
        ("fleetbus_sink_pending_messages", "gauge", "Messages routed to the sink and not yet written, dead-lettered or dropped.", Box::new(|st| st.pending)),
        ("fleetbus_sink_written_total", "counter", "Messages the sink wrote.", Box::new(|st| st.written)),
        ("fleetbus_sink_failed_attempts_total", "counter", "Failed write attempts (each is retried, or the batch goes to the dead-letter sink).", Box::new(|st| st.failed_attempts)),
        ("fleetbus_sink_dead_lettered_total", "counter", "Messages the sink gave up and handed to its dead-letter sink.", Box::new(|st| st.dead_lettered)),
        ("fleetbus_sink_rejected_total", "counter", "Of those, messages that could never be written (moved at once, not retried).", Box::new(|st| st.rejected)),
        ("fleetbus_sink_dropped_total", "counter", "Dead letters the built-in dead-letter sink could not write anywhere (dropped, logged).", Box::new(|st| st.dropped)),
        ("fleetbus_sink_undecodable_total", "counter", "Log entries the sink could not decode (skipped).", Box::new(|st| st.undecodable)),
        ("fleetbus_sink_lag_entries", "gauge", "Durable log entries after the sink's saved position.", Box::new(move |st| durable.saturating_sub(st.position))),
        ("fleetbus_sink_backlog_bytes", "gauge", "Bytes of log entries routed to the sink and not yet written (backpressure at buffer.max_bytes).", Box::new(|st| st.pending_bytes)),
    ];
    for (name, kind, help, field) in sinks {
        let samples: Vec<(String, u64)> = s
            .sinks
            .iter()
            .map(|(sink, st)| (format!("{{sink=\"{}\"}}", escape(sink)), field(st)))
            .collect();
        family(name, kind, help, &samples);
    }
    for (suffix, help, value) in files.samples() {
        let name = format!("fleetbus_files_{suffix}");
        family(&name, "counter", help, &[(String::new(), value)]);
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let broker = [
        ("fleetbus_broker_connects_total", "Connections the broker admitted.", load(&security.connects)),
        ("fleetbus_broker_disconnects_total", "Admitted connections that ended.", load(&security.disconnects)),
        ("fleetbus_broker_refused_total", "CONNECTs refused (bad or missing token, unknown or revoked client).", load(&security.refused)),
        ("fleetbus_broker_violations_total", "Clients disconnected for a PUBLISH or SUBSCRIBE the policy forbids.", load(&security.violations)),
        ("fleetbus_broker_duplicate_identities_total", "Duplicate-identity events (one client id taking over another live connection again and again).", load(&security.duplicate_identities)),
        ("fleetbus_broker_dropped_total", "Live connections the server dropped because their credential was revoked or replaced.", load(&security.dropped)),
        ("fleetbus_broker_handshake_failures_total", "TLS or WebSocket handshakes that failed or timed out on the [broker.tls] listeners.", load(&security.handshake_failures)),
        ("fleetbus_broker_events_dropped_total", "Broker events not handed to the rules engine because its queue was full.", load(&security.events_dropped)),
        ("fleetbus_broker_limited_connections_total", "CONNECTs refused by a [broker.limits] connection limit (per credential, bootstrap, slots kept for agents).", load(&security.limited_connections)),
        ("fleetbus_broker_bootstrap_expired_total", "Bootstrap connections dropped at the end of limits.bootstrap_lifetime.", load(&security.bootstrap_expired)),
        ("fleetbus_broker_limited_enrollments_total", "Enrollment requests refused by limits.enrollments_per_minute or dropped from a full enrollment queue.", load(&security.limited_enrollments)),
        ("fleetbus_broker_limited_retained_total", "Retained publishes refused because retained messages would exceed limits.retained_bytes.", load(&security.limited_retained)),
        ("fleetbus_broker_topic_cache_resets_total", "Times the broker's cache of topics was full (32,768) and started over: a client publishing very many distinct topics.", fleetbus_broker::topic_cache_resets()),
        ("fleetbus_accept_backoffs_total", "Times an accept loop (MQTT, TLS, HTTP) paused because the process had no file descriptor left.", load(&security.accept_backoffs)),
        ("fleetbus_broker_reload_failures_total", "Reloads (SIGHUP) of the topic policy file or the TLS certificate that failed; the ones in use stayed.", load(&security.reload_failures)),
        ("fleetbus_http_refused_connections_total", "HTTP connections (metrics, admin) closed at once because the endpoint's connection cap was reached.", load(&security.http_refused_connections)),
        ("fleetbus_http_timed_out_total", "HTTP connections ended by the header timeout or the connection lifetime.", load(&security.http_timed_out)),
    ];
    for (name, help, value) in broker {
        family(name, "counter", help, &[(String::new(), value)]);
    }
    out
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_in_use_is_an_error_naming_metrics_listen() {
        let dir = tempfile::tempdir().unwrap();
        let acks = fleetbus_support::Publisher::discard();
        let rules = fleetbus_rules::RuleSet::builtin().unwrap();
        let options = fleetbus_pipeline::EngineOptions::default();
        let engine = Arc::new(
            Engine::start(rules, dir.path(), options, acks)
                .await
                .unwrap(),
        );
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = start(
            addr,
            Default::default(),
            engine,
            Arc::default(),
            Arc::default(),
            crate::shutdown::stop_signal().1,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.starts_with(&format!("metrics.listen {addr}: ")), "{e}");
    }

    #[test]
    fn renders_engine_rule_and_sink_families() {
        let stats = EngineStats {
            received: 10,
            durable: 9,
            rules: vec![RuleStatsSnapshot {
                rule: "archive".into(),
                matched: 7,
                throttled: 2,
                errors: 1,
                ..Default::default()
            }],
            sinks: vec![(
                "files\"x".into(),
                SinkStatsSnapshot {
                    written: 5,
                    position: 4,
                    dead_lettered: 2,
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let files = FileCounters::default();
        files
            .aborted
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let security = SecurityCounters::default();
        security
            .refused
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let text = render(&stats, &files, &security);
        assert!(text.contains("fleetbus_broker_refused_total 2\n"));
        assert!(text.contains("fleetbus_files_aborted_total 3\n"));
        assert!(text.contains("fleetbus_messages_received_total 10\n"));
        assert!(text.contains("fleetbus_rule_matched_total{rule=\"archive\"} 7\n"));
        assert!(text.contains("fleetbus_rule_throttled_total{rule=\"archive\"} 2\n"));
        assert!(text.contains("fleetbus_rule_errors_total{rule=\"archive\"} 1\n"));
        assert!(text.contains("fleetbus_sink_written_total{sink=\"files\\\"x\"} 5\n"));
        assert!(text.contains("fleetbus_sink_lag_entries{sink=\"files\\\"x\"} 5\n"));
        assert!(text.contains("fleetbus_sink_dead_lettered_total{sink=\"files\\\"x\"} 2\n"));
        assert!(text.contains("# TYPE fleetbus_sink_lag_entries gauge\n"));
    }
}
