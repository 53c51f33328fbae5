//! Enrollment with a bootstrap token: an agent without a credential of its own asks the
//! server for one over a connection logged in with the bootstrap credential (which may do
//! nothing else), keeps it in `state_dir/credential.json` (owner-only) and logs in with it
//! from then on. See `fleetbus_protocol::enroll`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetbus_mqtt::{Backoff, ClientTransport};
use fleetbus_protocol::enroll::{reply_topic, request_topic, EnrollReply, EnrollRequest};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::ConnectionConfig;
use crate::AgentError;

/// File in `state_dir` holding the enrolled credential.
pub const CREDENTIAL_FILE: &str = "credential.json";

/// How long one enrollment attempt waits for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The credential an enrollment gave this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCredential {
    /// The agent id it is for.
    pub agent: String,
    /// The token.
    pub token: String,
    /// The groups the server gave it.
    pub groups: Vec<String>,
}

fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CREDENTIAL_FILE)
}

/// The token stored by an earlier enrollment of `agent`, if any.
pub fn stored_token(state_dir: &Path, agent: &str) -> Result<Option<String>, AgentError> {
    let path = credential_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AgentError::Io {
                path,
                op: "read",
                source,
            })
        }
    };
    let stored: StoredCredential = serde_json::from_str(&text).map_err(|e| AgentError::State {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    if stored.agent != agent {
        return Err(AgentError::State {
            path,
            problem: format!(
                "holds the credential of `{}`, not of this agent `{agent}`",
                stored.agent
            ),
        });
    }
    Ok(Some(stored.token))
}

/// The bootstrap login an agent is configured with.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The bootstrap credential's id (the MQTT user name).
    pub id: String,
    /// Its token.
    pub token: String,
}

impl Bootstrap {
    /// `connection.bootstrap_id` with `connection.bootstrap_token_file`, when set.
    pub fn from_config(c: &ConnectionConfig) -> Result<Option<Bootstrap>, String> {
        match (&c.bootstrap_id, &c.bootstrap_token_file) {
            (None, None) => Ok(None),
            (Some(id), Some(file)) => {
                let token = std::fs::read_to_string(file).map_err(|e| {
                    format!("connection.bootstrap_token_file {}: {e}", file.display())
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(format!(
                        "connection.bootstrap_token_file {}: empty",
                        file.display()
                    ));
                }
                Ok(Some(Bootstrap {
                    id: id.clone(),
                    token: token.to_string(),
                }))
            }
            _ => Err(
                "connection.bootstrap_id and connection.bootstrap_token_file go together".into(),
            ),
        }
    }
}

/// Asks for a credential until one comes (stored, then returned) or `shutdown` turns true
/// (None). A refusal (the id is taken, the bootstrap token revoked) is logged as an error
/// and asked again after the longest backoff: an operator can fix it meanwhile.
pub async fn obtain(
    transport: &ClientTransport,
    agent: &str,
    bootstrap: &Bootstrap,
    connection: &ConnectionConfig,
    state_dir: &Path,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut backoff = Backoff::new(connection.backoff_min, connection.backoff_max);
    loop {
        let delay = match ask(transport, agent, bootstrap, connection).await {
            Ok(Answer::Enrolled { token, groups }) => {
                let stored = StoredCredential {
                    agent: agent.to_string(),
                    token: token.clone(),
                    groups: groups.clone(),
                };
                match crate::state_file::write_secret_json(&credential_path(state_dir), &stored) {
                    Ok(()) => {
                        tracing::info!(?groups, "enrolled: credential kept in state_dir");
                        return Some(token);
                    }
                    Err(e) => {
                        // without the file the next start would need a new id: keep going
                        // with the token, and say so
                        tracing::error!(error = %e, "enrolled, but the credential could not be saved: this run uses it, a restart will be refused");
                        return Some(token);
                    }
                }
            }
            Ok(Answer::Refused { reason }) => {
                tracing::error!(%reason, "enrollment refused by the server");
                connection.backoff_max
            }
            Err(reason) => {
                let delay = backoff.next_delay();
                tracing::warn!(%reason, retry_in = ?delay, "enrollment failed");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::stopped(shutdown) => return None,
        }
    }
}

/// Opens the sealed token of an `enrolled` answer with the request's secret key.
fn open(reply: EnrollReply, key: &crypto_box::SecretKey) -> Result<Answer, String> {
    match reply {
        EnrollReply::Refused { reason } => Ok(Answer::Refused { reason }),
        EnrollReply::Enrolled {
            sealed_token,
            groups,
            ..
        } => {
            let sealed =
                hex::decode(&sealed_token).map_err(|e| format!("sealed token is not hex: {e}"))?;
            let token = key
                .unseal(&sealed)
                .map_err(|_| "the sealed token does not open with this request's key".to_string())
                .and_then(|t| String::from_utf8(t).map_err(|e| e.to_string()))?;
            Ok(Answer::Enrolled { token, groups })
        }
    }
}

/// The server's answer, the token opened.
enum Answer {
    Enrolled { token: String, groups: Vec<String> },
    Refused { reason: String },
}

/// One enrollment exchange. The request carries the public half of a key pair made for it
/// alone; the token comes back sealed to it.
async fn ask(
    transport: &ClientTransport,
    agent: &str,
    bootstrap: &Bootstrap,
    connection: &ConnectionConfig,
) -> Result<Answer, String> {
    let mut opts = fleetbus_mqtt::options(transport, agent, connection.keepalive, 10);
    opts.set_credentials(bootstrap.id.clone(), bootstrap.token.clone());
    let (client, mut events) = AsyncClient::new(opts, 10);
    let reply_key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let request = serde_json::to_vec(&EnrollRequest {
        agent: agent.to_string(),
        hostname: sysinfo::System::host_name().ok(),
        reply_key: hex::encode(reply_key.public_key().as_bytes()),
    })
    .map_err(|e| e.to_string())?;
    let exchange = async {
        let mut subscribed = false;
        loop {
            match events.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe(reply_topic(agent), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                    subscribed = true;
                    client
                        .publish(
                            request_topic(agent),
                            QoS::AtLeastOnce,
                            false,
                            request.clone(),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == reply_topic(agent) => {
                    let reply = serde_json::from_slice::<EnrollReply>(&p.payload)
                        .map_err(|e| format!("unreadable answer: {e}"))?;
                    return open(reply, &reply_key);
                }
                _ => {}
            }
        }
    };
    let outcome = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("no answer from the server".into()));
    let _ = client.disconnect().await;
    outcome
}
