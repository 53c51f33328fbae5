//! Which rules' topic filters can match a topic, without trying every rule: a tree of the
//! filters' levels (exact names, `+`, `#`). A lookup walks one branch per level of the
//! topic (its name, and `+`), so its cost grows with the topic's depth and the rules that
//! match, not with the number of rules. With 1,000 rules each naming its own agents,
//! routing a message finds the handful that match it. The result is exactly the rules
//! [`crate::TopicFilter::matches`] (the one definition of matching) accepts, as a test
//! checks over many filters and topics, so the router does not check them again.

use crate::filter::TopicFilter;

/// The filters of a rule set, by level.
#[derive(Debug, Default)]
pub struct FilterIndex {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// Child levels by name: foldhash, not SipHash (the keys are the operator's, so a
    /// topic cannot flood them; a lookup per level of every message is the hot path).
    exact: foldhash::HashMap<String, Node>,
    plus: Option<Box<Node>>,
    /// Rules with a filter ending in `#` here: they match this level and all below.
    rest: Vec<usize>,
    /// Rules with a filter ending here.
    end: Vec<usize>,
}

impl FilterIndex {
    /// The index of `filters`: (rule index, its filters).
    pub fn new<'a>(filters: impl IntoIterator<Item = (usize, &'a [TopicFilter])>) -> FilterIndex {
        let mut root = Node::default();
        for (rule, list) in filters {
            for filter in list {
                let mut node = &mut root;
                let levels: Vec<&str> = filter.as_str().split('/').collect();
                for (i, level) in levels.iter().enumerate() {
                    match *level {
                        "#" if i + 1 == levels.len() => {
                            node.rest.push(rule);
                            break;
                        }
                        "+" => node = node.plus.get_or_insert_with(Box::default),
                        name => node = node.exact.entry(name.to_string()).or_default(),
                    }
                    if i + 1 == levels.len() {
                        node.end.push(rule);
                    }
                }
            }
        }
        FilterIndex { root }
    }

    /// Fills `out` with the rules (in order, each once) that have a filter matching
    /// `topic`: exactly those for which [`TopicFilter::matches`] holds (tested), so a
    /// candidate needs no second check.
    pub fn candidates(&self, topic: &str, out: &mut Vec<usize>) {
        out.clear();
        if topic.starts_with('$') {
            // a filter starting with a wildcard does not match a `$` topic
            let (level, below) = split(topic);
            if let Some(child) = self.root.exact.get(level) {
                descend(child, below, out);
            }
        } else {
            walk(&self.root, topic, out);
        }
        out.sort_unstable();
        out.dedup();
    }
}

/// The topic's first level and the rest below it, if any.
fn split(topic: &str) -> (&str, Option<&str>) {
    match topic.split_once('/') {
        Some((level, below)) => (level, Some(below)),
        None => (topic, None),
    }
}

/// The rules of `node` matching `rest`, the levels below it.
fn walk(node: &Node, rest: &str, out: &mut Vec<usize>) {
    out.extend_from_slice(&node.rest);
    let (level, below) = split(rest);
    for child in [node.exact.get(level), node.plus.as_deref()]
        .into_iter()
        .flatten()
    {
        descend(child, below, out);
    }
}

/// The rules of `child`, reached by a level, matching what is `below` that level.
fn descend(child: &Node, below: Option<&str>, out: &mut Vec<usize>) {
    match below {
        Some(below) => walk(child, below, out),
        None => {
            out.extend_from_slice(&child.end);
            // `a/#` matches `a` itself
            out.extend_from_slice(&child.rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every candidate set equals the rules whose filters match, for many filters and
    /// topics (`$` ones too): the index is exact, `matches` the definition it meets.
    #[test]
    fn the_candidates_are_every_rule_that_matches() {
        let filters: Vec<Vec<TopicFilter>> = [
            vec!["#"],
            vec!["fleet/+/telemetry/#"],
            vec!["fleet/a/telemetry/metrics", "fleet/b/#"],
            vec!["fleet/+/+"],
            vec!["fleet/+/telemetry/+"],
            vec!["+"],
            vec!["fleet"],
            vec!["fleet/#"],
            vec!["a/+/c/#"],
            vec!["$SYS/#"],
            vec!["+/x"],
            vec!["$SYS/+/x", "$SYS/a/+"],
            vec!["+/+/#", "fleet/+/#"],
            vec!["/#", "a/+"],
            vec!["+/#"],
        ]
        .iter()
        .map(|l| l.iter().map(|f| TopicFilter::parse(f).unwrap()).collect())
        .collect();
        let index = FilterIndex::new(filters.iter().enumerate().map(|(i, f)| (i, f.as_slice())));
        let topics = [
            "fleet",
            "fleet/a",
            "fleet/a/telemetry",
            "fleet/a/telemetry/metrics",
            "fleet/b",
            "fleet/b/x/y/z",
            "fleet/c/telemetry/events",
            "a/b/c",
            "a/b/c/d",
            "a//c",
            "x",
            "y/x",
            "$SYS/broker",
            "$SYS",
            "$SYS/a/x",
            "$foo/x",
            "/x",
            "a/",
            "",
            "/",
            "fleet/",
            "fleet/a/presence",
        ];
        let mut got = Vec::new();
        for topic in topics {
            index.candidates(topic, &mut got);
            let matching: Vec<usize> = (0..filters.len())
                .filter(|&i| filters[i].iter().any(|f| f.matches(topic)))
                .collect();
            assert_eq!(got, matching, "{topic}");
        }
        // and narrows: a topic of one agent tries no other agent's rules
        let per_agent: Vec<Vec<TopicFilter>> = (0..1000)
            .map(|k| vec![TopicFilter::parse(&format!("fleet/agent-{k}/telemetry/#")).unwrap()])
            .collect();
        let index = FilterIndex::new(per_agent.iter().enumerate().map(|(i, f)| (i, f.as_slice())));
        index.candidates("fleet/agent-7/telemetry/metrics", &mut got);
        assert_eq!(got, [7]);
    }
}
