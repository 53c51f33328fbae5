//! The topic layout. Every topic fleetbus uses starts with [`ROOT`]:
//!
//! | topic | direction | content |
//! |---|---|---|
//! | `fleet/{agent}/telemetry/{stream}` | agent → server | [`crate::Record`] |
//! | `fleet/{agent}/presence` | agent → server (retained, + last will) | [`crate::Presence`] |
//! | `fleet/{agent}/acks` | server → agent | [`crate::Ack`] |
//! | `fleet/{agent}/files/{file_id}/...` | agent ⇄ server | file transfer, see [`crate::files`] |
//! | `fleet/{agent}/replies/...` | server → agent | answers (e.g. [`crate::FileReply`]) |
//! | `fleet/{agent}/jobs/...` | reserved for per-agent jobs | |
//! | `fleet/groups/{group}/jobs/...` | reserved for group jobs | |
//! | `fleet/enroll/{agent}/{request,reply}` | agent ⇄ server | enrollment, see [`crate::enroll`] |
//! | `fleet/server/...` | broker → rules engine only | [`crate::BrokerEvent`] |

/// First segment of every fleetbus topic.
pub const ROOT: &str = "fleet";

/// Second level of the server's own topics (`fleet/server/...`, broker events): a
/// reserved id, no agent can be called so.
pub const SERVER: &str = "server";
/// Second segment reserved for group topics (so no agent may be called `groups`).
pub const GROUPS: &str = "groups";

/// Topic filter matching every telemetry record of every agent.
pub const ALL_TELEMETRY: &str = "fleet/+/telemetry/#";
/// Topic filter matching every agent's presence message.
pub const ALL_PRESENCE: &str = "fleet/+/presence";

/// Topic on which `agent` publishes the records of `stream`.
pub fn telemetry(agent: &str, stream: &str) -> String {
    format!("{ROOT}/{agent}/telemetry/{stream}")
}

/// Topic on which the server acknowledges `agent`'s durably stored records.
pub fn acks(agent: &str) -> String {
    format!("{ROOT}/{agent}/acks")
}

/// Topic on which `agent` publishes its birth message and where its last will lands.
pub fn presence(agent: &str) -> String {
    format!("{ROOT}/{agent}/presence")
}

/// A topic name split into the parts fleetbus gives meaning to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// `fleet/{agent}/telemetry/{stream}`
    Telemetry {
        /// The publishing agent.
        agent: &'a str,
        /// The record stream (`metrics`, `events`, `checks`, ...).
        stream: &'a str,
    },
    /// `fleet/{agent}/acks`
    Acks {
        /// The agent the acknowledgements are for.
        agent: &'a str,
    },
    /// `fleet/{agent}/presence`
    Presence {
        /// The agent the presence message is about.
        agent: &'a str,
    },
    /// `fleet/{agent}/files/...` (see [`crate::files`])
    Files {
        /// The uploading agent.
        agent: &'a str,
        /// Everything after `files/`.
        rest: &'a str,
    },
    /// `fleet/{agent}/replies/...`: the server's answers to one agent.
    Replies {
        /// The agent the answers are for.
        agent: &'a str,
        /// Everything after `replies/`.
        rest: &'a str,
    },
    /// `fleet/{agent}/jobs/...` (reserved)
    AgentJobs {
        /// The target agent.
        agent: &'a str,
        /// Everything after `jobs/`.
        rest: &'a str,
    },
    /// `fleet/groups/{group}/jobs/...` (reserved)
    GroupJobs {
        /// The target group.
        group: &'a str,
        /// Everything after `jobs/`.
        rest: &'a str,
    },
    /// Any other topic (third-party clients may publish anywhere the policy allows).
    Other(&'a str),
}

impl<'a> Topic<'a> {
    /// Splits `topic` into its fleetbus meaning.
    pub fn parse(topic: &'a str) -> Topic<'a> {
        let mut parts = topic.splitn(4, '/');
        let (Some(root), Some(second)) = (parts.next(), parts.next()) else {
            return Topic::Other(topic);
        };
        if root != ROOT || second.is_empty() {
            return Topic::Other(topic);
        }
        let third = parts.next();
        let rest = parts.next();
        match (second, third, rest) {
            (GROUPS, Some(group), Some(rest)) => match rest.split_once('/') {
                Some(("jobs", rest)) => Topic::GroupJobs { group, rest },
                None if rest == "jobs" => Topic::GroupJobs { group, rest: "" },
                _ => Topic::Other(topic),
            },
            (agent, Some("telemetry"), Some(stream))
                if !stream.is_empty() && !stream.contains('/') =>
            {
                Topic::Telemetry { agent, stream }
            }
            (agent, Some("presence"), None) => Topic::Presence { agent },
            (agent, Some("acks"), None) => Topic::Acks { agent },
            (agent, Some("files"), rest) => Topic::Files {
                agent,
                rest: rest.unwrap_or(""),
            },
            (agent, Some("replies"), Some(rest)) => Topic::Replies { agent, rest },
            (agent, Some("jobs"), rest) => Topic::AgentJobs {
                agent,
                rest: rest.unwrap_or(""),
            },
            _ => Topic::Other(topic),
        }
    }

    /// True for topics only the server produces, and only inside its rules engine: file
    /// completions (`fleet/{agent}/files/{id}/complete`), job state changes
    /// (`fleet/{agent}/jobs/event`) and broker events (`fleet/server/...`). Such a message
    /// arriving from the network is forged, whoever sent it, and is refused on every path.
    pub fn server_only(&self) -> bool {
        match *self {
            Topic::Files { rest, .. } => matches!(
                crate::files::parse_file_rest(rest),
                Some((_, crate::files::FileAction::Complete))
            ),
            Topic::AgentJobs { agent, rest } => rest == "event" || agent == SERVER,
            Topic::Other(topic) => topic
                .strip_prefix(ROOT)
                .and_then(|t| t.strip_prefix('/'))
                .and_then(|t| t.strip_prefix(SERVER))
                .is_some_and(|t| t.is_empty() || t.starts_with('/')),
            _ => self.agent() == Some(SERVER),
        }
    }

    /// True for enrollment topics (`fleet/enroll/...`): they carry requests and sealed
    /// tokens and are never routed to a sink, on any path.
    pub fn is_enrollment(&self) -> bool {
        match *self {
            Topic::Other(topic) => topic
                .strip_prefix(ROOT)
                .and_then(|t| t.strip_prefix('/'))
                .and_then(|t| t.strip_prefix(crate::enroll::ENROLL))
                .is_some_and(|t| t.is_empty() || t.starts_with('/')),
            _ => false,
        }
    }

    /// The agent a topic belongs to, if it is an agent topic.
    pub fn agent(&self) -> Option<&'a str> {
        match *self {
            Topic::Telemetry { agent, .. }
            | Topic::Presence { agent }
            | Topic::Acks { agent }
            | Topic::Files { agent, .. }
            | Topic::Replies { agent, .. }
            | Topic::AgentJobs { agent, .. } => Some(agent),
            Topic::GroupJobs { .. } | Topic::Other(_) => None,
        }
    }

    /// The telemetry stream, if this is a telemetry topic.
    pub fn stream(&self) -> Option<&'a str> {
        match *self {
            Topic::Telemetry { stream, .. } => Some(stream),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_agent_topics() {
        let t = telemetry("web-01", "metrics");
        assert_eq!(t, "fleet/web-01/telemetry/metrics");
        assert_eq!(
            Topic::parse(&t),
            Topic::Telemetry {
                agent: "web-01",
                stream: "metrics"
            }
        );
        assert_eq!(Topic::parse(&presence("a")), Topic::Presence { agent: "a" });
        assert_eq!(Topic::parse(&presence("a")).agent(), Some("a"));
        assert_eq!(Topic::parse(&acks("a")), Topic::Acks { agent: "a" });
    }

    #[test]
    fn only_the_server_produces_completions_job_events_and_broker_events() {
        for forged in [
            "fleet/a1/files/0123/complete",
            "fleet/a1/jobs/event",
            "fleet/server/security/refused",
            "fleet/server/connections/connected",
            "fleet/server",
            "fleet/server/telemetry/x",
        ] {
            assert!(Topic::parse(forged).server_only(), "{forged}");
        }
        for honest in [
            "fleet/a1/files/0123/chunk",
            "fleet/a1/jobs/status",
            "fleet/a1/telemetry/metrics",
            "fleet/a1/presence",
            "fleet/serverless/telemetry/x",
            "other/server/x",
        ] {
            assert!(!Topic::parse(honest).server_only(), "{honest}");
        }
    }

    #[test]
    fn enrollment_topics_are_told_apart() {
        assert!(Topic::parse("fleet/enroll/a1/request").is_enrollment());
        assert!(Topic::parse("fleet/enroll/a1/reply").is_enrollment());
        assert!(!Topic::parse("fleet/enrollment/x").is_enrollment());
        assert!(!Topic::parse("fleet/a1/telemetry/enroll").is_enrollment());
    }

    #[test]
    fn parses_reserved_and_foreign_topics() {
        assert_eq!(
            Topic::parse("fleet/groups/web/jobs/123"),
            Topic::GroupJobs {
                group: "web",
                rest: "123"
            }
        );
        assert_eq!(
            Topic::parse("fleet/a/files/f1/init"),
            Topic::Files {
                agent: "a",
                rest: "f1/init"
            }
        );
        assert_eq!(
            Topic::parse("fleet/a/jobs/x"),
            Topic::AgentJobs {
                agent: "a",
                rest: "x"
            }
        );
        assert_eq!(
            Topic::parse("fleet/a/replies/files"),
            Topic::Replies {
                agent: "a",
                rest: "files"
            }
        );
        assert_eq!(Topic::parse("other/x"), Topic::Other("other/x"));
        assert_eq!(
            Topic::parse("fleet/a/telemetry/x/y"),
            Topic::Other("fleet/a/telemetry/x/y")
        );
        assert_eq!(Topic::parse("fleet"), Topic::Other("fleet"));
    }
}
