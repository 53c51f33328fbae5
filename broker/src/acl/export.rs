//! The policy in an external broker's format, for a fleet that runs on Mosquitto or EMQX
//! instead of the embedded broker.
//!
//! Neither has our roles or groups, so every enrolled (not revoked) client gets its own
//! rules with its grants filled in, exactly as the embedded broker fills them in at
//! CONNECT. Clients must log in with their client id as user name (fleetbus agents do).
//! Passwords are the external broker's own (e.g. `mosquitto_passwd`): the credential store
//! keeps only token hashes, so tokens are given to the broker when they are issued.
//! Bootstrap credentials are left out: enrollment needs the embedded broker's server.

use std::fmt::Write;

use super::{Identity, Policy, Role};

/// An external broker's ACL format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Mosquitto's `acl_file`: `user` blocks of `topic read|write|readwrite` lines.
    Mosquitto,
    /// EMQX 5's file authorizer (`acl.conf`): Erlang tuples, ending with `{deny, all}.`.
    Emqx,
}

/// What one client may do on one filled-in pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Publish,
    Subscribe,
    Both,
}

/// The ACL for `clients` under `policy` in `format`.
pub fn export(format: Format, policy: &Policy, clients: &[Identity]) -> String {
    let mut out = match format {
        Format::Mosquitto => String::from(
            "# fleetbus topic policy for Mosquitto (fleetbus acl export --format mosquitto)\n\
             # anything not listed is denied\n",
        ),
        Format::Emqx => String::from(
            "%% fleetbus topic policy for EMQX (fleetbus acl export --format emqx)\n\
             %% set authorization.no_match = deny; anything not listed is denied\n",
        ),
    };
    let comment = match format {
        Format::Mosquitto => "#",
        Format::Emqx => "%%",
    };
    for who in clients {
        if who.role == Role::Bootstrap {
            let _ = writeln!(
                out,
                "\n{comment} {}: bootstrap credential left out (enrollment needs the embedded broker)",
                who.client_id
            );
            continue;
        }
        let grants = client_grants(policy, who);
        match format {
            Format::Mosquitto => {
                let _ = writeln!(out, "\nuser {}", who.client_id);
                if grants.is_empty() {
                    let _ = writeln!(out, "# (no grants)");
                }
                for (pattern, access) in grants {
                    let word = match access {
                        Access::Publish => "write",
                        Access::Subscribe => "read",
                        Access::Both => "readwrite",
                    };
                    let _ = writeln!(out, "topic {word} {pattern}");
                }
            }
            Format::Emqx => {
                let _ = writeln!(out, "\n%% {}", who.client_id);
                for (pattern, access) in grants {
                    let word = match access {
                        Access::Publish => "publish",
                        Access::Subscribe => "subscribe",
                        Access::Both => "all",
                    };
                    let _ = writeln!(
                        out,
                        "{{allow, {{username, {}}}, {word}, [{}]}}.",
                        erlang_string(&who.client_id),
                        erlang_string(&pattern)
                    );
                }
            }
        }
    }
    if format == Format::Emqx {
        out.push_str("\n{deny, all}.\n");
    }
    out
}

/// `who`'s filled-in patterns, each once, in policy order.
fn client_grants(policy: &Policy, who: &Identity) -> Vec<(String, Access)> {
    let mut lines: Vec<(String, Access)> = Vec::new();
    for (pattern, publish, subscribe) in policy.grants_for(who).patterns() {
        let access = match (publish, subscribe) {
            (true, true) => Access::Both,
            (true, false) => Access::Publish,
            (false, true) => Access::Subscribe,
            (false, false) => continue,
        };
        let line = (pattern.to_string(), access);
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines
}

/// An Erlang string literal (ids and topics hold no quotes or backslashes after our
/// checks; escaped anyway).
fn erlang_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> [Identity; 3] {
        [
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
            Identity {
                client_id: "provision".into(),
                role: Role::Bootstrap,
                groups: vec![],
            },
        ]
    }

    #[test]
    fn mosquitto_gets_a_user_block_per_client() {
        let text = export(Format::Mosquitto, &Policy::default(), &clients());
        assert!(
            text.contains("\nuser web-01\ntopic write fleet/web-01/telemetry/+\n"),
            "{text}"
        );
        assert!(
            text.contains("topic read fleet/groups/web/jobs/notify\n"),
            "{text}"
        );
        assert!(text.contains("\nuser rules\ntopic readwrite #\n"), "{text}");
        assert!(!text.contains("user provision"), "{text}");
        assert!(!text.contains("${"), "{text}");
    }

    #[test]
    fn emqx_gets_tuples_and_a_final_deny() {
        let text = export(Format::Emqx, &Policy::default(), &clients());
        assert!(
            text.contains(
                "{allow, {username, \"web-01\"}, publish, [\"fleet/web-01/telemetry/+\"]}.\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "{allow, {username, \"web-01\"}, subscribe, [\"fleet/groups/web/jobs/notify\"]}.\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("{allow, {username, \"rules\"}, all, [\"#\"]}.\n"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("{deny, all}."), "{text}");
    }
}
