//! The groups each agent belongs to, as the server last learned them: from the agent's
//! birth message, or from its credential when security is enforced (the server says which
//! through [`crate::Engine::set_agent_groups`]).
//!
//! The engine stamps them onto each message at ingest ([`fleetbus_wal::WalEntry::groups`]),
//! not when a sink writes it: a message keeps the groups its agent had when it was sent, so
//! a point written again after a crash or a retry lands in the same series.
//!
//! Bounded: at most [`MAX_AGENTS`] agents and [`MAX_GROUPS`] groups each; a name that is
//! not an id is left out. One rogue client announcing many agent ids fills the table, and
//! agents beyond it get no groups (logged), never memory without end.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use fleetbus_protocol::validate_id;

/// Most agents whose groups are kept.
pub const MAX_AGENTS: usize = 100_000;

/// Most groups kept for one agent.
pub const MAX_GROUPS: usize = 64;

/// Agent id → its groups (sorted, no duplicates).
#[derive(Debug, Default)]
pub struct AgentGroups {
    map: RwLock<HashMap<String, Arc<[String]>>>,
}

impl AgentGroups {
    /// Records `groups` as `agent`'s. False when the table is full and `agent` is not in
    /// it: its messages then carry no groups.
    pub fn set(&self, agent: &str, groups: &[String]) -> bool {
        let mut kept: Vec<String> = groups
            .iter()
            .filter(|g| validate_id("group", g).is_ok())
            .cloned()
            .collect();
        kept.sort();
        kept.dedup();
        kept.truncate(MAX_GROUPS);
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = map.get_mut(agent) {
            if **known != *kept {
                *known = kept.into();
            }
            return true;
        }
        if map.len() >= MAX_AGENTS {
            return false;
        }
        map.insert(agent.to_string(), kept.into());
        true
    }

    /// The groups of `agent`; empty when none are known.
    pub fn of(&self, agent: &str) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(agent).map(|g| g.to_vec()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn groups_are_sorted_without_duplicates_or_bad_names_and_a_new_birth_replaces_them() {
        let g = AgentGroups::default();
        assert!(g.of("web-01").is_empty());
        assert!(g.set("web-01", &names(&["web", "linux", "web", "bad,name", ""])));
        assert_eq!(g.of("web-01"), names(&["linux", "web"]));
        assert!(g.set("web-01", &names(&["db"])));
        assert_eq!(g.of("web-01"), names(&["db"]));
        assert!(g.of("web-02").is_empty());
    }

    #[test]
    fn a_full_table_takes_no_new_agent_but_still_updates_a_known_one() {
        let g = AgentGroups::default();
        for n in 0..MAX_AGENTS {
            assert!(g.set(&format!("a{n}"), &names(&["x"])));
        }
        assert!(!g.set("newcomer", &names(&["web"])));
        assert!(g.of("newcomer").is_empty());
        assert!(g.set("a7", &names(&["y"])));
        assert_eq!(g.of("a7"), names(&["y"]));
        let many: Vec<String> = (0..MAX_GROUPS + 10).map(|n| format!("g{n:03}")).collect();
        assert!(g.set("a8", &many));
        assert_eq!(g.of("a8").len(), MAX_GROUPS);
    }
}
