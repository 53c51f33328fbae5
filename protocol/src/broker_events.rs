//! Messages the embedded broker emits about connections: connects, disconnects with their
//! reason, refused logins, policy violations and duplicated identities (rumqttd has no
//! lifecycle events of its own). They go into the rules engine only, never through the
//! broker, on topics under `fleet/server/`, a branch no client can publish on (`server` is
//! a reserved id), so rules route them like any other message and no client can forge one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Topic of connection events: `fleet/server/connections/{connected|disconnected}`.
pub const CONNECTIONS: &str = "fleet/server/connections";
/// Topic of security events:
/// `fleet/server/security/{refused|violation|duplicate-identity|enrolled}`.
pub const SECURITY: &str = "fleet/server/security";
/// Filter matching every broker event.
pub const ALL_BROKER_EVENTS: &str = "fleet/server/#";

/// One broker event; `event` names the kind in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum BrokerEvent {
    /// A client was admitted.
    Connected {
        /// Its client id.
        client_id: String,
        /// Its address.
        peer: String,
        /// Its role when authenticated (`agent`, `server`, `operator`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        /// When.
        ts: DateTime<Utc>,
    },
    /// An admitted client's connection ended.
    Disconnected {
        /// Its client id.
        client_id: String,
        /// Its address.
        peer: String,
        /// Why, in words (closed by the client, keepalive timeout, replaced by a newer
        /// connection, policy violation, credential revoked...).
        reason: String,
        /// How long it was connected, in seconds.
        connected_secs: f64,
        /// When.
        ts: DateTime<Utc>,
    },
    /// A CONNECT was refused.
    Refused {
        /// The client id it claimed.
        client_id: String,
        /// Its address.
        peer: String,
        /// The CONNACK return code sent (4 bad user name or password, 5 not authorized,
        /// 2 identifier rejected).
        code: u8,
        /// Why, in words.
        reason: String,
        /// When.
        ts: DateTime<Utc>,
    },
    /// An admitted client tried something its policy forbids and was disconnected.
    Violation {
        /// Its client id.
        client_id: String,
        /// Its address.
        peer: String,
        /// `publish` or `subscribe`.
        action: String,
        /// The topic or filter.
        topic: String,
        /// Why it was denied.
        reason: String,
        /// When.
        ts: DateTime<Utc>,
    },
    /// An agent enrolled itself with a bootstrap token.
    Enrolled {
        /// The new agent's id.
        client_id: String,
        /// The bootstrap credential it used.
        via: String,
        /// The groups it got.
        groups: Vec<String>,
        /// When.
        ts: DateTime<Utc>,
    },
    /// A request to the admin endpoint was refused (no or wrong operator token, a foreign
    /// `Host` header, a POST that is not JSON).
    AdminRefused {
        /// Its address.
        peer: String,
        /// The request's method and path.
        request: String,
        /// The HTTP status answered.
        status: u16,
        /// Why, in words.
        reason: String,
        /// When.
        ts: DateTime<Utc>,
    },
    /// One client id keeps taking over another live connection: two machines (a cloned
    /// VM image) share one identity.
    DuplicateIdentity {
        /// The shared client id.
        client_id: String,
        /// Addresses the competing connections came from.
        peers: Vec<String>,
        /// Take-overs counted within `window_secs`.
        takeovers: usize,
        /// The window, in seconds.
        window_secs: u64,
        /// When.
        ts: DateTime<Utc>,
    },
}

impl BrokerEvent {
    /// The topic the event is dispatched on.
    pub fn topic(&self) -> String {
        match self {
            BrokerEvent::Connected { .. } => format!("{CONNECTIONS}/connected"),
            BrokerEvent::Disconnected { .. } => format!("{CONNECTIONS}/disconnected"),
            BrokerEvent::Refused { .. } => format!("{SECURITY}/refused"),
            BrokerEvent::Violation { .. } => format!("{SECURITY}/violation"),
            BrokerEvent::DuplicateIdentity { .. } => format!("{SECURITY}/duplicate-identity"),
            BrokerEvent::Enrolled { .. } => format!("{SECURITY}/enrolled"),
            BrokerEvent::AdminRefused { .. } => format!("{SECURITY}/admin-refused"),
        }
    }

    /// The JSON payload.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_their_kind_and_topic() {
        let e = BrokerEvent::Violation {
            client_id: "web-01".into(),
            peer: "127.0.0.1:5000".into(),
            action: "subscribe".into(),
            topic: "fleet/#".into(),
            reason: "no rule".into(),
            ts: Utc::now(),
        };
        assert_eq!(e.topic(), "fleet/server/security/violation");
        let json: serde_json::Value = serde_json::from_slice(&e.encode().unwrap()).unwrap();
        assert_eq!(json["event"], "violation");
        assert_eq!(json["client_id"], "web-01");
        let back: BrokerEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }
}
