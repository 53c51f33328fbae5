//! Topic authorization: which identity may publish or subscribe where.
//!
//! A policy is a list of rules, each granting one role an action on topic patterns that may
//! contain the placeholders `${client_id}` (the authenticated agent id) and `${group}` (each
//! of the agent's groups). Anything no rule grants is denied. A SUBSCRIBE filter is allowed
//! only when every topic it can match is allowed (`fleet/+/telemetry/#` is not allowed to an
//! agent, even though it matches the agent's own telemetry). `$`-topics are matched only by
//! patterns that name them literally (a leading wildcard never matches them, as in MQTT).
//!
//! Pure logic: the broker applies [`Policy::check`] to every PUBLISH and SUBSCRIBE, and
//! `fleetbus acl check` prints the same [`Decision`].

use serde::{Deserialize, Serialize};

pub mod export;

/// What a client wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// PUBLISH on a topic.
    Publish,
    /// SUBSCRIBE to a filter.
    Subscribe,
}

/// Who a client is, as far as rights go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An enrolled agent.
    Agent,
    /// The server's own clients (rules engine, job service).
    Server,
    /// An operator's tool.
    Operator,
    /// A bootstrap credential: may only ask for an agent credential (enrollment).
    Bootstrap,
}

impl Role {
    /// The role's name in policy files, the credential store and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Server => "server",
            Role::Operator => "operator",
            Role::Bootstrap => "bootstrap",
        }
    }

    /// A role by its name.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "agent" => Some(Role::Agent),
            "server" => Some(Role::Server),
            "operator" => Some(Role::Operator),
            "bootstrap" => Some(Role::Bootstrap),
            _ => None,
        }
    }
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The MQTT client id (= the agent id for agents).
    pub client_id: String,
    /// Its role.
    pub role: Role,
    /// Its groups (agents).
    pub groups: Vec<String>,
}

/// Ids that name topic tree branches of their own; an agent with such an id would own them.
pub const RESERVED_IDS: &[&str] = &["groups", "enroll", "server"];

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Named in decisions ("allowed by rule ...").
    pub name: String,
    /// Who it is for.
    pub role: Role,
    /// What it allows.
    pub actions: Vec<Action>,
    /// Topic patterns (MQTT filters with `${client_id}` / `${group}`).
    pub topics: Vec<String>,
}

/// The answer to "may this client do this?", with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed or not.
    pub allowed: bool,
    /// The rule that allowed it.
    pub rule: Option<String>,
    /// The pattern (placeholders filled in) that allowed it, or why nothing did.
    pub reason: String,
}

/// A policy file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("policy file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// Not TOML of the expected shape.
    #[error("policy: {0}")]
    Parse(String),
    /// A rule's pattern is not a valid filter or names an unknown placeholder.
    #[error("policy rule `{rule}`: pattern `{pattern}`: {problem}")]
    Pattern {
        /// The rule.
        rule: String,
        /// The pattern.
        pattern: String,
        /// What is wrong.
        problem: String,
    },
}

/// The rules, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Grants; anything none of them grants is denied.
    #[serde(rename = "rule")]
    pub rules: Vec<Rule>,
}

impl Default for Policy {
    /// Operators watch telemetry, presence and jobs (not acknowledgements, file replies or
    /// enrollment replies, which carry new tokens). Bootstrap credentials only enroll.
    /// Agents publish only what agents produce under their own `fleet/{id}/` (telemetry,
    /// presence, file transfer, job status: never acknowledgements, replies, job commands
    /// or the server's event topics of their own id), subscribe only to their own
    /// acknowledgements, replies and jobs and to their groups' jobs; the server's clients
    /// may do anything outside `$`-topics; operators may watch the fleet.
    fn default() -> Self {
        let rule = |name: &str, role, actions: &[Action], topics: &[&str]| Rule {
            name: name.into(),
            role,
            actions: actions.to_vec(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        };
        Policy {
            rules: vec![
                rule(
                    "agent-publishes-own-topics",
                    Role::Agent,
                    &[Action::Publish],
                    &[
                        "fleet/${client_id}/telemetry/+",
                        "fleet/${client_id}/presence",
                        // not `files/+/complete`: only the server announces a file
                        "fleet/${client_id}/files/+/init",
                        "fleet/${client_id}/files/+/chunk",
                        "fleet/${client_id}/files/+/status",
                        "fleet/${client_id}/files/+/finish",
                        "fleet/${client_id}/files/+/abort",
                        "fleet/${client_id}/jobs/status",
                    ],
                ),
                rule(
                    "agent-subscribes-own-replies-and-jobs",
                    Role::Agent,
                    &[Action::Subscribe],
                    &[
                        "fleet/${client_id}/acks",
                        "fleet/${client_id}/replies/#",
                        "fleet/${client_id}/jobs/notify",
                        "fleet/groups/${group}/jobs/notify",
                    ],
                ),
                rule(
                    "server-everything",
                    Role::Server,
                    &[Action::Publish, Action::Subscribe],
                    &["#"],
                ),
                rule(
                    "operator-watches-the-fleet",
                    Role::Operator,
                    &[Action::Subscribe],
                    &[
                        "fleet/+/telemetry/#",
                        "fleet/+/presence",
                        "fleet/+/jobs/#",
                        "fleet/groups/+/jobs/#",
                    ],
                ),
                rule(
                    "bootstrap-only-enrolls",
                    Role::Bootstrap,
                    &[Action::Publish],
                    &["fleet/enroll/${client_id}/request"],
                ),
                rule(
                    "bootstrap-reads-its-enrollment",
                    Role::Bootstrap,
                    &[Action::Subscribe],
                    &["fleet/enroll/${client_id}/reply"],
                ),
            ],
        }
    }
}

impl Policy {
    /// Reads and checks the policy file at `path`; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Policy::from_toml(&text).map_err(|e| match e {
            PolicyError::Parse(reason) => PolicyError::Read {
                path: shown,
                reason,
            },
            PolicyError::Pattern {
                rule,
                pattern,
                problem,
            } => PolicyError::Pattern {
                rule,
                pattern,
                problem: format!("{problem} (in {shown})"),
            },
            other => other,
        })
    }

    /// Reads a policy (`[[rule]]` tables) and checks every pattern.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every pattern: a valid MQTT filter whose placeholders are whole levels.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for rule in &self.rules {
            for pattern in &rule.topics {
                check_pattern(pattern).map_err(|problem| PolicyError::Pattern {
                    rule: rule.name.clone(),
                    pattern: pattern.clone(),
                    problem,
                })?;
            }
        }
        Ok(())
    }

    /// May `who` do `action` on `topic` (a topic name to publish, a filter to subscribe)?
    pub fn check(&self, who: &Identity, action: Action, topic: &str) -> Decision {
        self.grants_for(who).decide(action, topic)
    }

    /// The grants of `who` with placeholders filled in: what the broker keeps per
    /// connection, so that checking a packet allocates nothing.
    pub fn grants_for(&self, who: &Identity) -> Grants {
        let mut grants = Vec::new();
        for rule in self.rules.iter().filter(|r| r.role == who.role) {
            for pattern in &rule.topics {
                for filled in expand(pattern, who) {
                    grants.push(Grant {
                        rule: rule.name.clone(),
                        publish: rule.actions.contains(&Action::Publish),
                        subscribe: rule.actions.contains(&Action::Subscribe),
                        pattern: filled,
                    });
                }
            }
        }
        Grants {
            who: format!("{} ({})", who.client_id, who.role.as_str()),
            grants,
        }
    }
}

/// One filled-in pattern of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    rule: String,
    publish: bool,
    subscribe: bool,
    pattern: String,
}

/// What one identity may do: a policy's rules for its role, placeholders filled in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    /// `client_id (role)`, for reasons.
    who: String,
    grants: Vec<Grant>,
}

impl Grants {
    /// Every filled-in pattern with whether it grants publish and subscribe, in policy
    /// order.
    pub fn patterns(&self) -> impl Iterator<Item = (&str, bool, bool)> {
        self.grants
            .iter()
            .map(|g| (g.pattern.as_str(), g.publish, g.subscribe))
    }

    /// The rule and filled-in pattern allowing `action` on `topic`, or `None` (denied).
    pub fn allows(&self, action: Action, topic: &str) -> Option<(&str, &str)> {
        check_topic(action, topic).ok()?;
        self.grants
            .iter()
            .filter(|g| match action {
                Action::Publish => g.publish,
                Action::Subscribe => g.subscribe,
            })
            .find(|g| covers(&g.pattern, topic))
            .map(|g| (g.rule.as_str(), g.pattern.as_str()))
    }

    /// [`Grants::allows`] with the reason in words.
    pub fn decide(&self, action: Action, topic: &str) -> Decision {
        if let Err(problem) = check_topic(action, topic) {
            return Decision {
                allowed: false,
                rule: None,
                reason: problem,
            };
        }
        match self.allows(action, topic) {
            Some((rule, pattern)) => Decision {
                allowed: true,
                rule: Some(rule.to_string()),
                reason: format!("matches `{pattern}`"),
            },
            None => Decision {
                allowed: false,
                rule: None,
                reason: format!(
                    "no rule allows {} to {} `{topic}`",
                    self.who,
                    match action {
                        Action::Publish => "publish on",
                        Action::Subscribe => "subscribe to",
                    }
                ),
            },
        }
    }
}

/// Whether `id` may stand in for a placeholder: a plain topic level, not reserved.
fn usable_id(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#', '$', '\0']) && !RESERVED_IDS.contains(&id)
}

/// The pattern with its placeholders filled in for `who`: one per group for `${group}`,
/// none when a value is unusable (a pattern never widens because an id is odd).
fn expand(pattern: &str, who: &Identity) -> Vec<String> {
    let mut out = vec![pattern.to_string()];
    if pattern.contains("${client_id}") {
        if !usable_id(&who.client_id) {
            return Vec::new();
        }
        out = out
            .into_iter()
            .map(|p| p.replace("${client_id}", &who.client_id))
            .collect();
    }
    if pattern.contains("${group}") {
        out = out
            .iter()
            .flat_map(|p| {
                who.groups
                    .iter()
                    .filter(|g| usable_id(g))
                    .map(move |g| p.replace("${group}", g))
            })
            .collect();
    }
    out
}

fn check_pattern(pattern: &str) -> Result<(), String> {
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 != levels.len() => return Err("`#` must be the last level".into()),
            "#" | "+" | "${client_id}" | "${group}" => {}
            l if l.contains("${") => {
                return Err(format!(
                    "`{l}`: placeholders are `${{client_id}}` and `${{group}}`, each a whole level"
                ))
            }
            l if l.contains(['+', '#']) => {
                return Err(format!("`{l}`: a wildcard must be a whole level"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A topic to publish has no wildcards; a filter's wildcards are whole levels.
fn check_topic(action: Action, topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("empty topic".into());
    }
    if topic.contains('\0') {
        return Err("topic contains NUL".into());
    }
    match action {
        Action::Publish if topic.contains(['+', '#']) => Err(format!(
            "`{topic}`: a published topic cannot contain wildcards"
        )),
        Action::Subscribe => {
            let levels: Vec<&str> = topic.split('/').collect();
            for (i, level) in levels.iter().enumerate() {
                let bad = match *level {
                    "#" => i + 1 != levels.len(),
                    "+" => false,
                    l => l.contains(['+', '#']),
                };
                if bad {
                    return Err(format!("`{topic}`: invalid filter"));
                }
            }
            Ok(())
        }
        Action::Publish => Ok(()),
    }
}

/// Whether every topic `filter` can match is also matched by `pattern` (both MQTT filters;
/// a topic name is a filter without wildcards). A `$`-topic is covered only by a pattern
/// whose first level is that literal.
pub fn covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    let mut first = true;
    loop {
        match (p.next(), f.next()) {
            (Some("#"), Some(fl)) => return !(first && fl.starts_with('$')),
            (Some("#"), None) => return true, // `a/#` also matches `a`
            (Some("+"), Some(fl)) => {
                if fl == "#" || (first && fl.starts_with('$')) {
                    return false;
                }
            }
            (Some(pl), Some(fl)) => {
                if pl != fl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests;
