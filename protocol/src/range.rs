//! Threshold ranges in the monitoring-plugins syntax, used by a plugin's performance data
//! (`warn` and `crit`) and by the thresholds of the agent's built-in checks, so that an
//! operator writes one syntax for both. A metric's `warn` and `crit` carry one on the wire,
//! as its text.
//!
//! `[@][START:]END`: a value alerts when it is outside `START..=END` (with `@`, when it is
//! inside). `START` defaults to 0 and `~` is minus infinity; an empty `END` (after a `:`)
//! is plus infinity. So `10` alerts below 0 or above 10, `10:` below 10, `~:10` above 10,
//! `10:20` outside 10 to 20, and `@10:20` inside it (ends included).

use std::fmt;

/// A threshold range (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// The lowest value that does not alert; `None` for minus infinity (`~`).
    pub start: Option<f64>,
    /// The highest value that does not alert; `None` for plus infinity.
    pub end: Option<f64>,
    /// `@`: the range alerts when the value is inside it instead.
    pub inside: bool,
}

/// Why a text is not a range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a range ({why}); use [@][START:]END, e.g. 10, 10:, ~:10, 10:20, @10:20")]
pub struct RangeError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Range {
    /// Parses `text` (surrounding blanks are not allowed: a range is one token).
    pub fn parse(text: &str) -> Result<Range, RangeError> {
        let error = |why| RangeError {
            text: text.to_string(),
            why,
        };
        let (inside, rest) = match text.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if rest.is_empty() {
            return Err(error("empty"));
        }
        let (start, end) = match rest.split_once(':') {
            None => (
                Some(0.0),
                Some(number(rest).ok_or_else(|| error("END is not a number"))?),
            ),
            Some((start, end)) => {
                let start = match start {
                    "~" => None,
                    "" => Some(0.0),
                    s => Some(number(s).ok_or_else(|| error("START is not a number or ~"))?),
                };
                let end = match end {
                    "" => None,
                    e => Some(number(e).ok_or_else(|| error("END is not a number"))?),
                };
                (start, end)
            }
        };
        if let (Some(s), Some(e)) = (start, end) {
            if s > e {
                return Err(error("START is above END"));
            }
        }
        Ok(Range { start, end, inside })
    }

    /// Whether `value` alerts against this range.
    pub fn alerts(&self, value: f64) -> bool {
        let within = self.start.is_none_or(|s| value >= s) && self.end.is_none_or(|e| value <= e);
        within == self.inside
    }
}

/// The range in its shortest text form (what [`Range::parse`] reads back as the same).
impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inside {
            f.write_str("@")?;
        }
        match (self.start, self.end) {
            (Some(0.0), Some(e)) => write!(f, "{e}"),
            (Some(s), Some(e)) => write!(f, "{s}:{e}"),
            (Some(s), None) => write!(f, "{s}:"),
            (None, Some(e)) => write!(f, "~:{e}"),
            (None, None) => f.write_str("~:"),
        }
    }
}

/// On the wire a range is its text. A bare number is read too (records from before ranges
/// had a number threshold): `80` means "alerts above 80", the range `~:80`.
impl serde::Serialize for Range {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Range {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Range, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Range;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a threshold range such as `10`, `~:10` or `@10:20`, or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Range, E> {
                Range::parse(v).map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Range, E> {
                if !v.is_finite() {
                    return Err(E::custom(format!("threshold {v} is not a finite number")));
                }
                Ok(Range {
                    start: None,
                    end: Some(v),
                    inside: false,
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Range, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Range, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// A decimal number as plugins print it (`-1.5`, `.5`, `10`, `1e-3`); not `inf` or `NaN`.
pub fn number(text: &str) -> Option<f64> {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let plain = digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && digits
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'));
    if !plain {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guidelines' table, each case with values on both sides of each end.
    #[test]
    fn each_form_of_the_guidelines_alerts_where_they_say() {
        let cases: [(&str, &[f64], &[f64]); 7] = [
            ("10", &[0.0, 5.0, 10.0], &[-0.1, 10.1]),
            ("10:", &[10.0, 1e9], &[9.99, -5.0]),
            ("~:10", &[-1e9, 10.0], &[10.01]),
            ("10:20", &[10.0, 15.0, 20.0], &[9.9, 20.1]),
            ("@10:20", &[9.9, 20.1], &[10.0, 15.0, 20.0]),
            ("-5:-1", &[-5.0, -1.0], &[0.0, -5.5]),
            ("@~:0", &[0.5], &[0.0, -3.0]),
        ];
        for (text, ok, alert) in cases {
            let r = Range::parse(text).unwrap();
            for &v in ok {
                assert!(!r.alerts(v), "{text} alerted on {v}");
            }
            for &v in alert {
                assert!(r.alerts(v), "{text} did not alert on {v}");
            }
            assert_eq!(Range::parse(&r.to_string()).unwrap(), r, "{text}");
        }
    }

    #[test]
    fn a_bad_range_says_what_is_wrong() {
        for (text, why) in [
            ("", "empty"),
            ("@", "empty"),
            ("20:10", "START is above END"),
            ("ten", "END is not a number"),
            ("x:5", "START is not a number or ~"),
            ("5:y", "END is not a number"),
            ("inf", "END is not a number"),
            ("1,5", "END is not a number"),
        ] {
            let e = Range::parse(text).unwrap_err();
            assert_eq!(e.why, why, "{text}");
            assert!(e.to_string().contains(&format!("`{text}`")), "{e}");
        }
    }

    #[test]
    fn on_the_wire_a_range_is_its_text_and_an_old_number_threshold_still_reads() {
        let r = Range::parse("@10:20").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), r#""@10:20""#);
        assert_eq!(serde_json::from_str::<Range>(r#""@10:20""#).unwrap(), r);
        let old: Range = serde_json::from_str("80").unwrap();
        assert_eq!(old.to_string(), "~:80");
        assert!(old.alerts(80.5) && !old.alerts(-3.0));
        let packed = rmp_serde::to_vec(&-2.5f64).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<Range>(&packed).unwrap().to_string(),
            "~:-2.5"
        );
        let e = serde_json::from_str::<Range>(r#""20:10""#).unwrap_err();
        assert!(e.to_string().contains("START is above END"), "{e}");
    }
}
