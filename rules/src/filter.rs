//! MQTT topic filters (`fleet/+/telemetry/#`): validation and matching, as the MQTT 3.1.1
//! specification defines them.

/// A validated topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    source: String,
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+`: exactly one level
    One,
    /// `#`: this level and everything below (last only)
    Rest,
}

impl TopicFilter {
    /// Parses and validates `filter`.
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("empty topic filter".into());
        }
        if filter.contains('\0') {
            return Err("topic filter contains a NUL character".into());
        }
        if filter.starts_with("$share/") {
            return Err("shared subscriptions ($share/...) are chosen with `rules run --group`, not in `from`".into());
        }
        let parts: Vec<&str> = filter.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("`#` must be the last level of `{filter}`")),
                "+" => Level::One,
                p if p.contains('#') || p.contains('+') => {
                    return Err(format!(
                        "wildcards must fill a whole level: `{p}` in `{filter}`"
                    ))
                }
                p => Level::Exact(p.to_string()),
            };
            levels.push(level);
        }
        Ok(TopicFilter {
            source: filter.to_string(),
            levels,
        })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when some topic matches both this filter and `other` (a filter too, wildcards
    /// allowed): `alerts/+/disk` and `alerts/web-1/#` overlap, `alerts/+` and `jobs/#` do
    /// not.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        let mut mine = self.levels.iter();
        let mut theirs = other.levels.iter();
        loop {
            match (mine.next(), theirs.next()) {
                (Some(Level::Rest), _) | (_, Some(Level::Rest)) | (None, None) => return true,
                (Some(Level::One), Some(_)) | (Some(_), Some(Level::One)) => {}
                (Some(Level::Exact(a)), Some(Level::Exact(b))) if a == b => {}
                _ => return false,
            }
        }
    }

    /// True when `topic` matches. Topics starting with `$` are not matched by a filter
    /// that starts with a wildcard.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && matches!(self.levels.first(), Some(Level::One | Level::Rest)) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return true,
                Level::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Exact(want) => match parts.next() {
                    Some(p) if p == want => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::parse(filter).unwrap().matches(topic)
    }

    #[test]
    fn matches_like_mqtt() {
        assert!(m("fleet/+/telemetry/#", "fleet/a/telemetry/metrics"));
        assert!(m("fleet/+/telemetry/#", "fleet/a/telemetry"));
        assert!(!m("fleet/+/telemetry/#", "fleet/a/presence"));
        assert!(m("fleet/+/presence", "fleet/a/presence"));
        assert!(!m("fleet/+/presence", "fleet/a/b/presence"));
        assert!(!m("fleet/+", "fleet/a/b"));
        assert!(m("#", "anything/at/all"));
        assert!(!m("#", "$SYS/x"));
        assert!(m("$SYS/#", "$SYS/x"));
        assert!(m("a//b", "a//b"));
    }

    #[test]
    fn filters_overlap_when_one_topic_can_match_both() {
        let o = |a: &str, b: &str| {
            let (a, b) = (
                TopicFilter::parse(a).unwrap(),
                TopicFilter::parse(b).unwrap(),
            );
            assert_eq!(a.overlaps(&b), b.overlaps(&a), "not symmetric");
            a.overlaps(&b)
        };
        assert!(o("alerts/+/disk", "alerts/web-1/#"));
        assert!(o("alerts/#", "alerts"));
        assert!(o("#", "x/y"));
        assert!(o("a/+/c", "a/b/c"));
        assert!(!o("alerts/+", "jobs/#"));
        assert!(!o("a/+", "a/b/c"));
        assert!(!o("a/b", "a/c"));
        assert!(!o("a", "a/b"));
    }

    #[test]
    fn rejects_bad_filters() {
        for bad in ["", "a/#/b", "a/b#", "a+/b", "$share/g/a"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
