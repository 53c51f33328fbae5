//! Presence: the birth message an agent publishes (retained) on `fleet/{agent}/presence`
//! when it connects, and the last-will message the broker publishes when it vanishes.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Whether the agent is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    /// Birth message: the agent just connected.
    Online,
    /// Last will (or a clean goodbye): the agent is gone.
    Offline,
}

/// The presence message. The birth message carries everything; the last will carries only
/// the agent id, status and the time its connection was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// The agent's stable id.
    pub agent: String,
    /// Online (birth) or offline (will).
    pub status: PresenceStatus,
    /// When the message was made (for a will: when the connection it belongs to was opened).
    pub ts: DateTime<Utc>,
    /// Host name at the time of connecting (informational: never used as identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// IP addresses of the host (informational).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Operating system name and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// fleetbus agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Groups the agent belongs to (job targeting).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Operator-defined tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Where the agent runs, from its cloud's instance metadata (`[metadata]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudIdentity>,
}

/// An instance's identity from its cloud's metadata service: stable where hostnames and
/// addresses are not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudIdentity {
    /// `aws`, `gcp` or `azure`.
    pub provider: String,
    /// The instance (VM) id.
    pub instance_id: String,
    /// The image it was started from (AMI id, GCP image, Azure image reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The instance type (machine type, VM size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The availability zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The role, from an instance tag or the user data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl CloudIdentity {
    /// The identity as record tags: `cloud`, `instance_id`, and each other field set.
    pub fn tags(&self) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::from([
            ("cloud".to_string(), self.provider.clone()),
            ("instance_id".to_string(), self.instance_id.clone()),
        ]);
        for (key, value) in [
            ("image_id", &self.image_id),
            ("instance_type", &self.instance_type),
            ("region", &self.region),
            ("zone", &self.zone),
            ("role", &self.role),
        ] {
            if let Some(v) = value {
                tags.insert(key.to_string(), v.clone());
            }
        }
        tags
    }
}

impl Presence {
    /// The last-will message for `agent`, set when the connection opened at `ts`.
    pub fn offline(agent: &str, ts: DateTime<Utc>) -> Presence {
        Presence {
            agent: agent.to_string(),
            status: PresenceStatus::Offline,
            ts,
            hostname: None,
            ips: Vec::new(),
            os: None,
            agent_version: None,
            groups: Vec::new(),
            tags: BTreeMap::new(),
            cloud: None,
        }
    }

    /// Encodes as MessagePack with named fields.
    pub fn encode(&self) -> Result<Vec<u8>, crate::EncodeError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Decodes from MessagePack or JSON.
    pub fn decode(payload: &[u8]) -> Result<Presence, crate::DecodeError> {
        crate::message::decode_as(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn will_round_trips() {
        let p = Presence::offline("a1", Utc::now());
        assert_eq!(Presence::decode(&p.encode().unwrap()).unwrap(), p);
    }
}
