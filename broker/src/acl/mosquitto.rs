//! The policy in Mosquitto's `acl_file` format, for a fleet that runs on an external
//! Mosquitto instead of the embedded broker.
//!
//! Mosquitto has no roles or groups, so every enrolled (not revoked) client gets its own
//! `user` block with its grants filled in, exactly as the embedded broker fills them in at
//! CONNECT: `topic write` for publish, `topic read` for subscribe, `topic readwrite` for
//! both. Clients must log in with their client id as user name (fleetbus agents do).
//! Mosquitto's passwords are its own (`mosquitto_passwd`): the credential store keeps only
//! token hashes, so the tokens are given to `mosquitto_passwd` when they are issued.

use std::fmt::Write;

use super::{Identity, Policy};

/// The ACL file for `clients` under `policy`.
pub fn export(policy: &Policy, clients: &[Identity]) -> String {
    let mut out = String::from(
        "# fleetbus topic policy for Mosquitto (fleetbus acl export --format mosquitto)\n\
         # anything not listed is denied\n",
    );
    for who in clients {
        let _ = writeln!(out, "\nuser {}", who.client_id);
        let grants = policy.grants_for(who);
        let mut lines: Vec<(String, &str)> = Vec::new();
        for (pattern, publish, subscribe) in grants.patterns() {
            let access = match (publish, subscribe) {
                (true, true) => "readwrite",
                (true, false) => "write",
                (false, true) => "read",
                (false, false) => continue,
            };
            let line = (pattern.to_string(), access);
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        if lines.is_empty() {
            let _ = writeln!(out, "# (no grants)");
        }
        for (pattern, access) in lines {
            let _ = writeln!(out, "topic {access} {pattern}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Role;

    #[test]
    fn every_client_gets_its_filled_in_grants() {
        let clients = [
            Identity {
                client_id: "web-01".into(),
                role: Role::Agent,
                groups: vec!["web".into()],
            },
            Identity {
                client_id: "rules".into(),
                role: Role::Server,
                groups: vec![],
            },
        ];
        let text = export(&Policy::default(), &clients);
        assert!(
            text.contains("\nuser web-01\ntopic write fleet/web-01/telemetry/#\n"),
            "{text}"
        );
        assert!(
            text.contains("topic read fleet/groups/web/jobs/notify\n"),
            "{text}"
        );
        assert!(text.contains("\nuser rules\ntopic readwrite #\n"), "{text}");
        assert!(!text.contains("${"), "{text}");
    }
}
