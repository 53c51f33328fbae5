//! A Nagios-style plugin's output, read as the monitoring-plugins guidelines define it:
//!
//! ```text
//! TEXT OUTPUT | OPTIONAL PERFDATA
//! LONG TEXT LINE 1
//! LONG TEXT LINE 2 | PERFDATA LINE 2
//! PERFDATA LINE 3
//! ```
//!
//! The first line is the status text, with performance data after a `|`. The lines after
//! it are long text, up to a line with a `|`: what follows that `|`, and every line after
//! it, is performance data too (Telegraf's parser dropped those lines,
//! influxdata/telegraf#5591).
//!
//! Performance data is a list of `'label'=value[UOM];[warn];[crit];[min];[max]` separated
//! by blanks. A label is quoted with `'` when it holds a blank, `=` or `'` (a `'` inside
//! is written `''`). The value is a number or `U` (undetermined); the unit one of `s ms us
//! % B KB MB GB TB c` or none (another, of letters, is kept as given); `warn` and `crit` are
//! [`Range`]s; trailing `;` may be left out. An item that breaks these rules is set
//! apart with the reason ([`PluginOutput::problems`]); the others are kept.

use fleetbus_protocol::range::{number, Range};

/// A plugin's output, split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PluginOutput {
    /// The first line's text (before its `|`), trimmed.
    pub text: String,
    /// The long text lines, joined by `\n` (none: empty).
    pub long_text: String,
    /// The performance data items, in order.
    pub perfdata: Vec<PerfDatum>,
    /// Items that could not be read, each with why.
    pub problems: Vec<String>,
}

/// One performance data item.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfDatum {
    /// The label, unquoted.
    pub label: String,
    /// The value; `None` for `U` (the plugin could not determine it).
    pub value: Option<f64>,
    /// The unit of measurement as given (`""` for a plain number).
    pub unit: String,
    /// The warning range.
    pub warn: Option<Range>,
    /// The critical range.
    pub crit: Option<Range>,
    /// The lowest possible value.
    pub min: Option<f64>,
    /// The highest possible value.
    pub max: Option<f64>,
}

/// The units the guidelines name.
pub const KNOWN_UNITS: [&str; 11] = ["", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"];

impl PerfDatum {
    /// Whether the unit is one the guidelines name.
    pub fn known_unit(&self) -> bool {
        KNOWN_UNITS.contains(&self.unit.as_str())
    }
}

/// Splits a plugin's output (see the module documentation).
pub fn parse(output: &str) -> PluginOutput {
    let mut lines = output.lines();
    let first = lines.next().unwrap_or("");
    let (text, mut perf_text) = match first.split_once('|') {
        Some((text, perf)) => (text, perf.to_string()),
        None => (first, String::new()),
    };
    let mut long = Vec::new();
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf_text.push(' ');
            perf_text.push_str(line);
            continue;
        }
        match line.split_once('|') {
            Some((text, perf)) => {
                long.push(text.trim_end());
                perf_text.push(' ');
                perf_text.push_str(perf);
                in_perf = true;
            }
            None => long.push(line),
        }
    }
    while long.last().is_some_and(|l| l.trim().is_empty()) {
        long.pop();
    }
    let mut out = PluginOutput {
        text: text.trim().to_string(),
        long_text: long.join("\n"),
        ..PluginOutput::default()
    };
    for item in items(&perf_text) {
        match item.and_then(|(label, rest)| datum(label, rest)) {
            Ok(d) => out.perfdata.push(d),
            Err(e) => out.problems.push(e),
        }
    }
    out
}

/// The performance data items of `text`: each a label (unquoted) and what follows its
/// `=`, or why the item is not one.
fn items(text: &str) -> Vec<Result<(String, &str), String>> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('\'') {
            // a quoted label: up to a `'` not doubled
            let mut label = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if quoted[i + 1..].starts_with('\'') {
                        label.push('\'');
                        chars.next();
                        continue;
                    }
                    end = Some(i + 1);
                    break;
                }
                label.push(c);
            }
            let Some(end) = end else {
                out.push(Err(format!("`{rest}`: the label's quote is not closed")));
                break;
            };
            let after = &quoted[end..];
            let token_end = after.find(char::is_whitespace).unwrap_or(after.len());
            let token = &after[..token_end];
            out.push(match token.strip_prefix('=') {
                Some(values) => Ok((label, values)),
                None => Err(format!("`'{label}'{token}`: no `=` after the quoted label")),
            });
            rest = after[token_end..].trim_start();
        } else {
            let token_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let token = &rest[..token_end];
            out.push(match token.split_once('=') {
                Some((label, values)) if !label.is_empty() && !label.contains('\'') => {
                    Ok((label.to_string(), values))
                }
                Some(_) => Err(format!(
                    "`{token}`: an empty label, or a `'` in one not quoted"
                )),
                None => Err(format!("`{token}`: not label=value")),
            });
            rest = rest[token_end..].trim_start();
        }
    }
    out
}

/// One item from its label and `value[UOM];[warn];[crit];[min];[max]`.
fn datum(label: String, values: &str) -> Result<PerfDatum, String> {
    let fail = |why: String| format!("`{label}={values}`: {why}");
    let fields: Vec<&str> = values.split(';').collect();
    if fields.len() > 5 {
        return Err(fail("more than value;warn;crit;min;max".into()));
    }
    let first = fields[0];
    let (value, unit) = if first == "U" {
        (None, "")
    } else {
        let split = first
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
            .unwrap_or(first.len());
        // `e` starts a unit when no digit follows it (`5e` is not a number)
        let (mut num, mut unit) = first.split_at(split);
        while number(num).is_none() && num.ends_with(['e', 'E', '+', '-']) {
            let cut = num.len() - 1;
            (num, unit) = first.split_at(cut);
        }
        let unit_ok = unit.chars().all(|c| c.is_ascii_alphabetic() || c == '%');
        match number(num) {
            Some(v) if unit_ok => (Some(v), unit),
            _ => {
                return Err(fail(format!(
                    "`{first}` is not a number with a unit, nor U"
                )))
            }
        }
    };
    let field = |n: usize| fields.get(n).copied().filter(|f| !f.is_empty());
    let range = |n: usize, what: &str| -> Result<Option<Range>, String> {
        field(n)
            .map(|f| Range::parse(f).map_err(|e| fail(format!("{what}: {e}"))))
            .transpose()
    };
    let bound = |n: usize, what: &str| -> Result<Option<f64>, String> {
        field(n)
            .map(|f| number(f).ok_or_else(|| fail(format!("{what} `{f}` is not a number"))))
            .transpose()
    };
    Ok(PerfDatum {
        unit: unit.to_string(),
        value,
        warn: range(1, "warn")?,
        crit: range(2, "crit")?,
        min: bound(3, "min")?,
        max: bound(4, "max")?,
        label,
    })
}

#[cfg(test)]
mod tests;
