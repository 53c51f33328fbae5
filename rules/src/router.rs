//! The compiled router: which sinks a message goes to.

use std::sync::atomic::{AtomicU64, Ordering};

use fleetbus_protocol::Message;

use crate::condition::context_for;
use crate::ruleset::Rule;

/// Counters of one rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Messages the rule matched (filter and condition).
    pub matched: AtomicU64,
    /// Messages whose condition could not be evaluated.
    pub condition_errors: AtomicU64,
}

/// Rules compiled for routing.
#[derive(Debug)]
pub struct Router {
    rules: Vec<Rule>,
    stats: Vec<RuleStats>,
}

impl Router {
    /// A router over `rules`.
    pub fn new(rules: Vec<Rule>) -> Router {
        let stats = rules.iter().map(|_| RuleStats::default()).collect();
        Router { rules, stats }
    }

    /// Fills `sinks` with the index of every sink `msg` goes to. A message matched by
    /// several rules naming the same sink goes to that sink once.
    pub fn route(&self, msg: &Message, sinks: &mut Vec<usize>) {
        sinks.clear();
        // the CEL context is built lazily, once per message, only if a condition needs it
        let mut ctx = None;
        for (rule, stats) in self.rules.iter().zip(&self.stats) {
            if !rule.from.iter().any(|f| f.matches(&msg.topic)) {
                continue;
            }
            if let Some(cond) = &rule.condition {
                let ctx = ctx.get_or_insert_with(|| context_for(msg));
                match cond.evaluate_in(ctx) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        stats.condition_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(rule = %rule.name, topic = %msg.topic, error = %e, "condition could not be evaluated: no match");
                        continue;
                    }
                }
            }
            stats.matched.fetch_add(1, Ordering::Relaxed);
            for &s in &rule.to {
                if !sinks.contains(&s) {
                    sinks.push(s);
                }
            }
        }
    }

    /// (rule name, matched, condition errors) for every rule.
    pub fn stats(&self) -> Vec<(String, u64, u64)> {
        self.rules
            .iter()
            .zip(&self.stats)
            .map(|(r, s)| {
                (
                    r.name.clone(),
                    s.matched.load(Ordering::Relaxed),
                    s.condition_errors.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RuleSet;
    use std::path::Path;

    #[test]
    fn fan_out_conditions_and_dedup() {
        let text = r#"
[sinks.archive]
type = "stdout"
[sinks.alerts]
type = "stdout"
[[rules]]
name = "all"
from = ["fleet/+/telemetry/#"]
to = ["archive"]
[[rules]]
name = "hot"
from = ["fleet/+/telemetry/metrics"]
where = 'record.metrics.exists(m, m.name == "cpu.usage" && m.value > 90.0)'
to = ["alerts", "archive"]
"#;
        let set = RuleSet::parse(Path::new("r.toml"), text).unwrap();
        let names: Vec<String> = set.sinks.iter().map(|(n, _)| n.clone()).collect();
        let router = Router::new(set.rules);
        let mut out = Vec::new();
        let hot = Message::decode(
            "fleet/a/telemetry/metrics",
            br#"{"metrics":[{"name":"cpu.usage","value":95.0}]}"#,
        )
        .unwrap();
        router.route(&hot, &mut out);
        let mut got: Vec<&str> = out.iter().map(|&i| names[i].as_str()).collect();
        got.sort();
        assert_eq!(got, ["alerts", "archive"], "archive once, alerts once");
        let cool = Message::decode(
            "fleet/a/telemetry/metrics",
            br#"{"metrics":[{"name":"cpu.usage","value":5.0}]}"#,
        )
        .unwrap();
        router.route(&cool, &mut out);
        assert_eq!(
            out.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>(),
            ["archive"]
        );
        let other = Message::decode("other/topic", b"{}").unwrap();
        router.route(&other, &mut out);
        assert!(out.is_empty());
        let stats = router.stats();
        assert_eq!(stats[0], ("all".to_string(), 2, 0));
        assert_eq!(stats[1], ("hot".to_string(), 1, 0));
    }
}
