//! Enrollment with a bootstrap token: an agent that has no credential yet connects with a
//! bootstrap credential's id as user name and its token as password (the token may do
//! nothing but this), asks on `fleet/enroll/{agent}/request`, and receives its own token
//! on `fleet/enroll/{agent}/reply`, sealed to a one-time key the request carried (only the
//! requester can read it). Like claim-based provisioning: one bootstrap token can
//! be baked into an image; every machine started from it gets a credential of its own.

use serde::{Deserialize, Serialize};

use crate::topics::ROOT;

/// Second topic level of enrollment topics (a reserved id: no agent can be called so).
pub const ENROLL: &str = "enroll";

/// Topic on which `agent` asks for its credential.
pub fn request_topic(agent: &str) -> String {
    format!("{ROOT}/{ENROLL}/{agent}/request")
}

/// Topic on which the server answers `agent`.
pub fn reply_topic(agent: &str) -> String {
    format!("{ROOT}/{ENROLL}/{agent}/reply")
}

/// The agent named in an enrollment request topic, if `topic` is one.
pub fn requesting_agent(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let rest = rest.strip_prefix(ENROLL)?.strip_prefix('/')?;
    let agent = rest.strip_suffix("/request")?;
    (!agent.is_empty() && !agent.contains('/')).then_some(agent)
}

/// What an agent sends (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The agent id it wants (its MQTT client id, which must be the same).
    pub agent: String,
    /// Host name, for the operator's records (never used as identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The X25519 public key (32 bytes, hex) of a key pair the agent made for this request
    /// alone: the server seals the new token to it, so the token never crosses the broker
    /// (or reaches anyone subscribed there) in clear.
    pub reply_key: String,
}

/// What the server answers (JSON), tagged by `outcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EnrollReply {
    /// Enrolled: the agent's own token (shown this once) and its groups.
    Enrolled {
        /// The agent id.
        agent: String,
        /// Its token, sealed to the request's `reply_key` (a NaCl sealed box:
        /// X25519 + XSalsa20-Poly1305, hex): only the requester can open it.
        sealed_token: String,
        /// Its groups (those of the bootstrap credential).
        groups: Vec<String>,
    },
    /// Not enrolled, and why (e.g. the id is taken: reset the identity).
    Refused {
        /// Why.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        assert_eq!(request_topic("a1"), "fleet/enroll/a1/request");
        assert_eq!(requesting_agent("fleet/enroll/a1/request"), Some("a1"));
        assert_eq!(requesting_agent("fleet/enroll/a1/reply"), None);
        assert_eq!(requesting_agent("fleet/a1/telemetry/x"), None);
        assert_eq!(requesting_agent("fleet/enroll//request"), None);
        let reply = EnrollReply::Refused {
            reason: "taken".into(),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert!(json.contains("\"outcome\":\"refused\""), "{json}");
    }
}
