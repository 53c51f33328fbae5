//! Checks a condition against what a message can hold, before any message arrives: every
//! identifier, inside macros too, must be a condition variable or a macro's own variable,
//! and where the rule's `from` filters say which kind of message `record` is (a telemetry
//! record, a job event, a file completion, a presence message), every field read inside a
//! known object must exist (`record.event.severty`; a telemetry payload's top level stays
//! open, as other publishers may add fields of their own) and a comparison between a field
//! and a literal of another type (`record.event.severity >= "high"`: a number against a
//! string) is refused, because it would silently never match.
//!
//! The kinds are described here by hand from the wire types in `fleetbus_protocol`; a rule
//! whose filters can match any other topic (a third-party device's, `#`) gets `record` as
//! an open map: its identifiers are still checked, its fields are not.

use std::collections::BTreeMap;

use cel::common::ast::{Expr, IdedExpr, LiteralValue};

use crate::filter::TopicFilter;

/// The type of a value a condition reads, as far as the checker knows it.
#[derive(Debug, Clone, PartialEq)]
enum Type {
    /// Not known (an open map's fields, a macro's accumulator).
    Any,
    /// int, uint or double (CEL compares them with one another).
    Number,
    /// A string (timestamps arrive as RFC 3339 strings too).
    Text,
    /// A boolean.
    Bool,
    /// A list of one element type.
    List(Box<Type>),
    /// A map with free keys and one value type.
    Map(Box<Type>),
    /// An object with these fields; closed (`false`): no others, open (`true`): others
    /// may be there, of any type.
    Object(BTreeMap<&'static str, Type>, bool),
    /// One of several (a field two message kinds both have, with different types).
    OneOf(Vec<Type>),
}

impl Type {
    fn name(&self) -> &'static str {
        match self {
            Type::Any | Type::OneOf(_) => "value",
            Type::Number => "number",
            Type::Text => "string",
            Type::Bool => "bool",
            Type::List(_) => "list",
            Type::Map(_) | Type::Object(..) => "map",
        }
    }

    fn alternatives(&self) -> Vec<&Type> {
        match self {
            Type::OneOf(all) => all.iter().flat_map(Type::alternatives).collect(),
            other => vec![other],
        }
    }
}

fn object(fields: &[(&'static str, Type)]) -> Type {
    Type::Object(fields.iter().cloned().collect(), false)
}

/// An object whose known fields have these types and which may carry more: a telemetry
/// payload from a publisher other than a fleetbus agent may hold fields of its own.
fn open_object(fields: &[(&'static str, Type)]) -> Type {
    Type::Object(fields.iter().cloned().collect(), true)
}

fn list(t: Type) -> Type {
    Type::List(Box::new(t))
}

fn map(t: Type) -> Type {
    Type::Map(Box::new(t))
}

/// A telemetry record (`fleetbus_protocol::Record`).
fn record() -> Type {
    use Type::{Number, Text};
    let event = object(&[
        ("class", Text),
        ("severity", Number),
        ("rule", Text),
        ("group", Text),
        ("resources", list(object(&[("type", Text), ("name", Text)]))),
        ("text", Text),
    ]);
    let metric = object(&[
        ("name", Text),
        ("value", Number),
        ("unit", Text),
        ("warn", Number),
        ("crit", Number),
        ("min", Number),
        ("max", Number),
        ("labels", map(Text)),
    ]);
    open_object(&[
        ("agent", Text),
        ("stream", Text),
        ("seq", Number),
        ("ts", Text),
        ("epoch", Number),
        ("event", event),
        ("metrics", list(metric)),
        ("fields", map(Type::Any)),
    ])
}

/// A job state change (`fleetbus_protocol::JobEvent`).
fn job_event() -> Type {
    use Type::{Number, Text};
    object(&[
        ("agent", Text),
        ("kind", Text),
        ("job_id", Text),
        ("operation", Text),
        ("state", Text),
        ("exit_code", Number),
        ("reason", Text),
        ("ts", Text),
    ])
}

/// A file completion (`fleetbus_protocol::FileCompleted`).
fn file_completed() -> Type {
    use Type::{Number, Text};
    let manifest = object(&[
        ("file_id", Text),
        ("name", Text),
        ("size", Number),
        ("sha256", Text),
        ("chunk_size", Number),
        ("chunk_count", Number),
        ("content_type", Text),
        ("meta", map(Text)),
    ]);
    object(&[
        ("agent", Text),
        ("kind", Text),
        ("file", manifest),
        ("spool", Text),
        ("ts", Text),
    ])
}

/// A presence message (`fleetbus_protocol::Presence`).
fn presence() -> Type {
    use Type::Text;
    open_object(&[
        ("agent", Text),
        ("status", Text),
        ("ts", Text),
        ("hostname", Text),
        ("ips", list(Text)),
        ("os", Text),
        ("agent_version", Text),
        ("groups", list(Text)),
        ("tags", map(Text)),
    ])
}

/// The message kinds with a known layout and the topics they travel on.
fn kinds() -> [(&'static str, Type); 4] {
    [
        ("fleet/+/telemetry/#", record()),
        ("fleet/+/jobs/event", job_event()),
        ("fleet/+/files/+/complete", file_completed()),
        ("fleet/+/presence", presence()),
    ]
}

/// Whether every topic `filter` matches also matches `pattern` (both MQTT filters).
fn confined(filter: &str, pattern: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let p: Vec<&str> = pattern.split('/').collect();
    for (i, level) in p.iter().enumerate() {
        if *level == "#" {
            return true;
        }
        let Some(own) = f.get(i) else {
            return false;
        };
        if *own == "#" || (*level != "+" && own != level) {
            return false;
        }
    }
    f.len() == p.len()
}

/// The type of `record` for a rule listening to `from`: the kinds its filters are confined
/// to, or an open map when one filter can match a topic of no known kind.
fn record_type(from: &[TopicFilter]) -> Type {
    if from.is_empty() {
        return map(Type::Any);
    }
    let mut found: Vec<Type> = Vec::new();
    for filter in from {
        let Some((_, t)) = kinds()
            .into_iter()
            .find(|(pattern, _)| confined(filter.as_str(), pattern))
        else {
            return map(Type::Any);
        };
        if !found.contains(&t) {
            found.push(t);
        }
    }
    match found.len() {
        1 => found.remove(0),
        _ => Type::OneOf(found),
    }
}

/// Type names a condition may write as identifiers (`type(x) == string`).
const TYPE_NAMES: [&str; 12] = [
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "timestamp",
    "duration",
];

/// Checks `expr` (a compiled condition) for a rule listening to `from`: every problem, or
/// none.
pub fn check(expr: &IdedExpr, from: &[TopicFilter]) -> Vec<String> {
    check_with(expr, from, &[])
}

/// [`check`], where the variables `more` (of any type) exist too: a computed column's
/// `dead_letter`.
pub fn check_with(expr: &IdedExpr, from: &[TopicFilter], more: &[&str]) -> Vec<String> {
    let mut checker = Checker {
        record: record_type(from),
        scope: more.iter().map(|v| (v.to_string(), Type::Any)).collect(),
        problems: Vec::new(),
    };
    checker.walk(expr);
    checker.problems
}

struct Checker {
    record: Type,
    /// Macro variables in scope, innermost last.
    scope: Vec<(String, Type)>,
    problems: Vec<String>,
}

impl Checker {
    fn walk(&mut self, e: &IdedExpr) -> Type {
        match &e.expr {
            Expr::Literal(l) => match l {
                LiteralValue::Int(_) | LiteralValue::UInt(_) | LiteralValue::Double(_) => {
                    Type::Number
                }
                LiteralValue::String(_) => Type::Text,
                LiteralValue::Boolean(_) => Type::Bool,
                _ => Type::Any,
            },
            Expr::Ident(name) => self.ident(name),
            Expr::Select(s) => {
                let operand = self.walk(&s.operand);
                let t = self.field(&operand, &s.operand, &s.field);
                if s.test {
                    Type::Bool
                } else {
                    t
                }
            }
            Expr::Call(call) => {
                let target = call.target.as_ref().map(|t| self.walk(t));
                let args: Vec<Type> = call.args.iter().map(|a| self.walk(a)).collect();
                self.call(&call.func_name, target, &args, &call.args)
            }
            Expr::Comprehension(c) => {
                let range = self.walk(&c.iter_range);
                let (first, second) = match (&range, &c.iter_var2) {
                    (Type::List(t), None) => ((**t).clone(), None),
                    (Type::List(t), Some(_)) => (Type::Number, Some((**t).clone())),
                    (Type::Map(t), second) => (Type::Text, second.as_ref().map(|_| (**t).clone())),
                    (Type::Object(..), second) => (Type::Text, second.as_ref().map(|_| Type::Any)),
                    (_, second) => (Type::Any, second.as_ref().map(|_| Type::Any)),
                };
                self.walk(&c.accu_init);
                let depth = self.scope.len();
                self.scope.push((c.iter_var.clone(), first));
                if let (Some(name), Some(t)) = (&c.iter_var2, second) {
                    self.scope.push((name.clone(), t));
                }
                self.scope.push((c.accu_var.clone(), Type::Any));
                self.walk(&c.loop_cond);
                self.walk(&c.loop_step);
                let result = self.walk(&c.result);
                self.scope.truncate(depth);
                result
            }
            Expr::List(l) => {
                let items: Vec<Type> = l.elements.iter().map(|x| self.walk(x)).collect();
                match items.first() {
                    Some(t) if items.iter().all(|x| x == t) => list(t.clone()),
                    _ => list(Type::Any),
                }
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                        self.walk(&me.key);
                        self.walk(&me.value);
                    }
                }
                map(Type::Any)
            }
            Expr::Struct(_) | Expr::Unspecified => Type::Any,
        }
    }

    fn ident(&mut self, name: &str) -> Type {
        if let Some((_, t)) = self.scope.iter().rev().find(|(n, _)| n == name) {
            return t.clone();
        }
        match name {
            "topic" | "agent" | "stream" => Type::Text,
            "segments" => list(Type::Text),
            "record" => self.record.clone(),
            _ if name.starts_with('@') || TYPE_NAMES.contains(&name) => Type::Any,
            _ => {
                let mut available: Vec<String> = crate::condition::VARIABLES
                    .iter()
                    .map(|v| v.to_string())
                    .collect();
                available.extend(
                    self.scope
                        .iter()
                        .filter(|(n, _)| !n.starts_with('@'))
                        .map(|(n, _)| n.clone()),
                );
                self.problems.push(format!(
                    "unknown variable `{name}` (available here: {})",
                    available.join(", ")
                ));
                Type::Any
            }
        }
    }

    /// The type of `field` of a value of type `t` (the expression `operand`).
    fn field(&mut self, t: &Type, operand: &IdedExpr, field: &str) -> Type {
        let mut found = Vec::new();
        let mut fields: Vec<&str> = Vec::new();
        let mut open = false;
        let mut lists = false;
        for alt in t.alternatives() {
            match alt {
                Type::Object(f, is_open) => match f.get(field) {
                    Some(t) => found.push(t.clone()),
                    None if *is_open => open = true,
                    None => fields.extend(f.keys().copied()),
                },
                Type::Map(v) => found.push((**v).clone()),
                Type::List(_) => lists = true,
                _ => open = true,
            }
        }
        if open {
            return Type::Any;
        }
        match found.len() {
            1 => return found.remove(0),
            n if n > 1 => return Type::OneOf(found),
            _ => {}
        }
        let path = path_text(operand).unwrap_or_else(|| "the value".into());
        if lists && fields.is_empty() {
            self.problems.push(format!(
                "`{path}` is a list, it has no field `{field}`: look inside with a macro, e.g. `{path}.exists(x, x.{field} ...)`"
            ));
        } else {
            fields.sort_unstable();
            fields.dedup();
            self.problems.push(format!(
                "`{path}` has no field `{field}` in the messages this rule's `from` matches (fields: {})",
                fields.join(", ")
            ));
        }
        Type::Any
    }

    fn call(
        &mut self,
        function: &str,
        target: Option<Type>,
        args: &[Type],
        exprs: &[IdedExpr],
    ) -> Type {
        match function {
            "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => {
                if let ([a, b], [ea, eb]) = (args, exprs) {
                    if never_equal(a, b) {
                        let side = |e: &IdedExpr| {
                            path_text(e)
                                .or_else(|| literal_text(e))
                                .unwrap_or_else(|| "an expression".into())
                        };
                        self.problems.push(format!(
                            "`{}` is a {} and `{}` a {}: this comparison never matches",
                            side(ea),
                            a.name(),
                            side(eb),
                            b.name()
                        ));
                    }
                }
                Type::Bool
            }
            "_&&_"
            | "_||_"
            | "!_"
            | "@in"
            | "startsWith"
            | "endsWith"
            | "contains"
            | "matches"
            | "@not_strictly_false" => Type::Bool,
            "size" => Type::Number,
            "_[_]" => match args.first() {
                Some(Type::List(t)) | Some(Type::Map(t)) => (**t).clone(),
                _ => Type::Any,
            },
            "_+_" | "_-_" | "_*_" | "_/_" | "_%_" | "-_" => {
                let _ = target;
                match args {
                    [Type::Number, Type::Number] | [Type::Number] => Type::Number,
                    [Type::Text, Type::Text] => Type::Text,
                    _ => Type::Any,
                }
            }
            _ => Type::Any,
        }
    }
}

/// Whether values of types `a` and `b` can never compare equal or ordered: scalars of
/// different kinds (a number and a string, a string and a bool...).
fn never_equal(a: &Type, b: &Type) -> bool {
    let scalar = |t: &Type| matches!(t, Type::Number | Type::Text | Type::Bool);
    a.alternatives().iter().all(|x| {
        b.alternatives()
            .iter()
            .all(|y| scalar(x) && scalar(y) && x != y)
    })
}

/// `record.event.severity` for a chain of field selections on an identifier.
fn path_text(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(s) if !s.test => Some(format!("{}.{}", path_text(&s.operand)?, s.field)),
        _ => None,
    }
}

fn literal_text(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(format!("\"{}\"", s.as_ref() as &str)),
        Expr::Literal(LiteralValue::Int(i)) => Some(i.to_string()),
        Expr::Literal(LiteralValue::UInt(u)) => Some(u.to_string()),
        Expr::Literal(LiteralValue::Double(d)) => Some(d.to_string()),
        Expr::Literal(LiteralValue::Boolean(b)) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(expr: &str, from: &[&str]) -> Vec<String> {
        let program = cel::Program::compile(expr).unwrap();
        let from: Vec<TopicFilter> = from
            .iter()
            .map(|f| TopicFilter::parse(f).unwrap())
            .collect();
        check(program.expression(), &from)
    }

    const TELEMETRY: &[&str] = &["fleet/+/telemetry/#"];

    #[test]
    fn unknown_identifiers_inside_macros_are_found() {
        let p = problems(
            "record.metrics.exists(m, m.value > 90.0 && cpu > 1)",
            TELEMETRY,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("unknown variable `cpu`"), "{p:?}");
        assert!(
            p[0].contains(", m"),
            "the macro's own variable is listed: {p:?}"
        );
        // the same with a rule open to any topic
        assert_eq!(problems("record.x.exists(m, cpu > 1)", &["#"]).len(), 1);
        // and the macro's variable is not known outside it
        let p = problems(
            "record.metrics.exists(m, m.value > 1.0) && m.value > 2.0",
            TELEMETRY,
        );
        assert!(p[0].contains("unknown variable `m`"), "{p:?}");
    }

    #[test]
    fn dead_letter_is_a_computed_columns_variable_not_a_conditions() {
        let program = cel::Program::compile("dead_letter == null").unwrap();
        let p = check(program.expression(), &[]);
        assert!(p[0].contains("unknown variable `dead_letter`"), "{p:?}");
        assert!(check_with(program.expression(), &[], &["dead_letter"]).is_empty());
    }

    #[test]
    fn type_mismatches_against_known_fields_are_found() {
        let p = problems(r#"record.event.severity >= "high""#, TELEMETRY);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("`record.event.severity` is a number and `\"high\"` a string"),
            "{p:?}"
        );
        let p = problems(r#"record.metrics.exists(m, m.name == 3)"#, TELEMETRY);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(problems(r#"agent == 7"#, &["#"]).len() == 1);
    }

    #[test]
    fn unknown_fields_of_known_kinds_are_found() {
        let p = problems("record.event.severty >= 4", TELEMETRY);
        assert!(p[0].contains("has no field `severty`"), "{p:?}");
        assert!(p[0].contains("severity"), "{p:?}");
        let p = problems("record.metrics.value > 1.0", TELEMETRY);
        assert!(p[0].contains("is a list"), "{p:?}");
        // a job event has `state`, a record does not; a rule over both accepts it
        assert_eq!(
            problems(r#"record.state == "FAILED""#, &["fleet/+/jobs/event"]).len(),
            0
        );
        assert_eq!(
            problems(r#"record.stat == "FAILED""#, &["fleet/+/jobs/event"]).len(),
            1
        );
        // a telemetry payload may carry fields of its own (a third-party publisher's)
        assert!(problems("has(record.temp) && record.temp > 50.0", TELEMETRY).is_empty());
        assert!(problems(
            r#"record.state == "FAILED""#,
            &["fleet/+/jobs/event", "fleet/+/telemetry/events"]
        )
        .is_empty());
    }

    #[test]
    fn good_conditions_pass() {
        for (expr, from) in [
            (
                r#"record.metrics.exists(m, m.name == "cpu.usage" && m.value > 90.0)"#,
                TELEMETRY,
            ),
            (
                r#"has(record.event) && record.event.severity >= 4 && record.event.class.startsWith("disk")"#,
                TELEMETRY,
            ),
            (
                r#"record.fields.anything == "x" && record.seq == 3"#,
                TELEMETRY,
            ),
            (r#"record.metrics.all(m, m.labels.mount == "/")"#, TELEMETRY),
            (
                r#"agent.startsWith("web-") && segments[2] == "telemetry""#,
                &["#"],
            ),
            (
                r#"record.temperature > 30.0 && record.unit == "C""#,
                &["sensors/#"],
            ),
            (
                r#"record.file.size > 1000 && record.file.meta.case == "x""#,
                &["fleet/+/files/+/complete"],
            ),
            (
                r#"type(record.seq) == uint || record.metrics.map(m, m.value).exists(v, v > 1.0)"#,
                TELEMETRY,
            ),
            (
                r#"record.event.resources.exists(r, r.type == "disk")"#,
                TELEMETRY,
            ),
        ] {
            let p = problems(expr, from);
            assert!(p.is_empty(), "{expr}: {p:?}");
        }
    }

    #[test]
    fn filters_are_confined_only_to_what_they_can_match() {
        assert!(confined("fleet/+/telemetry/#", "fleet/+/telemetry/#"));
        assert!(confined(
            "fleet/web-1/telemetry/metrics",
            "fleet/+/telemetry/#"
        ));
        assert!(!confined("fleet/#", "fleet/+/telemetry/#"));
        assert!(!confined("fleet/+/+/#", "fleet/+/telemetry/#"));
        assert!(confined("fleet/+/jobs/event", "fleet/+/jobs/event"));
        assert!(!confined("fleet/+/jobs/#", "fleet/+/jobs/event"));
        assert!(!confined("fleet/+", "fleet/+/presence"));
    }
}
