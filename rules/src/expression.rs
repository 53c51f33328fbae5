//! A CEL expression of a rules file, compiled and checked once: a rule's `where`,
//! `foreach`, `set` values, the keys of `throttle`, `dedupe` and `aggregate`. Compiling
//! reports syntax errors, unknown variables and, where the rule's topic filters say which
//! kind of message `record` is, fields that kind does not have ([`crate::schema`]).

use cel::{Context, ExecutionError, Program, Value as CelValue};

use crate::filter::TopicFilter;

/// A compiled CEL expression and its source.
#[derive(Debug)]
pub struct Expression {
    source: String,
    program: Program,
}

impl Expression {
    /// Compiles `source` for a rule listening to `from`, with the variables `more` beyond
    /// those of a `where`: syntax errors, unknown variables and fields the message kind
    /// does not have are reported ([`crate::schema`]).
    pub fn compile(source: &str, from: &[TopicFilter], more: &[&str]) -> Result<Self, String> {
        let program = Program::compile(source).map_err(|e| {
            // cel's message embeds its own "<input>:line:col" and a caret diagram
            e.to_string()
                .replace("ERROR: <input>:", "expression position ")
        })?;
        let problems = crate::schema::check_with(program.expression(), from, more);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Expression {
            source: source.to_string(),
            program,
        })
    }

    /// What it reads of `record` ([`crate::record_use`]).
    pub fn record_use(&self) -> crate::record_use::RecordUse {
        crate::record_use::RecordUse::of(self.program.expression())
    }

    /// True when it names the variable `name`.
    pub fn names(&self, name: &str) -> bool {
        crate::record_use::names(self.program.expression(), name)
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Its value in `ctx`.
    pub fn evaluate(&self, ctx: &Context) -> Result<CelValue, String> {
        self.execute(ctx).map_err(|e| e.to_string())
    }

    /// Its value in `ctx`, or CEL's error.
    pub fn execute(&self, ctx: &Context) -> Result<CelValue, ExecutionError> {
        self.program.execute(ctx)
    }

    /// Its value in `ctx` as JSON.
    pub fn evaluate_json(&self, ctx: &Context) -> Result<serde_json::Value, String> {
        let value = self.evaluate(ctx)?;
        fleetbus_sinks::columns::to_json(&value)
    }

    /// Its value in `ctx` as a key: a string as it is, anything else as its JSON text.
    pub fn evaluate_key(&self, ctx: &Context) -> Result<String, String> {
        match self.evaluate(ctx)? {
            CelValue::String(s) => Ok(s.to_string()),
            other => Ok(fleetbus_sinks::columns::to_json(&other)?.to_string()),
        }
    }
}
