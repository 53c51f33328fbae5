//! The birth message: who this agent is and where it runs (informational only: identity is
//! the agent id, never the hostname or an address).

use chrono::Utc;
use fleetbus_protocol::{CloudIdentity, Presence, PresenceStatus};
use sysinfo::{Networks, System};

use crate::AgentConfig;

/// The birth message of agent `id` right now, with its cloud identity if one was read.
pub fn birth(id: &str, config: &AgentConfig, cloud: Option<CloudIdentity>) -> Presence {
    let mut ips: Vec<String> = Networks::new_with_refreshed_list()
        .map(|nets| {
            nets.values()
                .flat_map(|n| n.ip_networks().iter().map(|ip| ip.addr))
                .filter(|addr| !addr.is_loopback())
                .map(|addr| addr.to_string())
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips.dedup();
    Presence {
        agent: id.to_string(),
        status: PresenceStatus::Online,
        ts: Utc::now(),
        hostname: System::host_name().ok(),
        ips,
        os: System::long_os_version().ok(),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        groups: config.groups.clone(),
        tags: config.tags.clone(),
        cloud,
    }
}
