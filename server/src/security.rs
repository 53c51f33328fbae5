//! The server's side of broker security: builds the broker's [`Guard`] from
//! `[broker.security]`, feeds broker events (connects, disconnects, refusals, violations,
//! duplicate identities) into the rules engine, reloads the credential store when
//! `fleetbus agents enroll/revoke` changed it, dropping live connections whose credential
//! is no longer valid, and enrolls agents that ask with a bootstrap token ([`Enroller`]).

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use fleetbus_broker::acl::Policy;
use fleetbus_broker::acl::Role;
use fleetbus_broker::credentials::{CredentialError, CredentialStore, Credentials};
use fleetbus_broker::{ClientDropper, EventSink, Guard, SecurityConfig};
use fleetbus_protocol::enroll::{reply_topic, EnrollReply, EnrollRequest};
use fleetbus_protocol::BrokerEvent;
use fleetbus_rules::Engine;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ServerError;

/// Broker events waiting for the rules engine; beyond this they are counted and dropped
/// (a connect storm must not stall connection tasks).
const EVENT_QUEUE: usize = 16_384;

/// How often the credential store is looked at for changes made by other processes.
pub const CREDENTIALS_POLL: Duration = Duration::from_millis(500);

/// The guard and the receiving end of its events.
pub struct Security {
    /// For the broker.
    pub guard: Arc<Guard>,
    events: mpsc::Receiver<BrokerEvent>,
    store: Option<CredentialStore>,
}

impl Security {
    /// Reads `[broker.security]`: the policy file and, when enforcing, the credential store
    /// in `data_dir`.
    pub fn open(config: &SecurityConfig, data_dir: &Path) -> Result<Security, ServerError> {
        let policy = match &config.policy {
            Some(path) => Policy::load(path)
                .map_err(|e| ServerError::Config(format!("broker.security.policy: {e}")))?,
            None => Policy::default(),
        };
        let (store, credentials) = match config.enforce {
            true => {
                let store = CredentialStore::open_in(data_dir)
                    .map_err(|e| ServerError::Config(e.to_string()))?;
                let credentials = store
                    .snapshot()
                    .map_err(|e| ServerError::Config(e.to_string()))?;
                tracing::info!(
                    enrolled = credentials.len(),
                    "broker security enforced: clients authenticate with their token, topic policy applied"
                );
                (Some(store), credentials)
            }
            false => {
                tracing::warn!("broker.security.enforce is off: any client that reaches the broker may publish and subscribe as anyone (docs/security.md)");
                (None, Credentials::default())
            }
        };
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let sink: EventSink = Arc::new(move |event| tx.try_send(event).is_ok());
        Ok(Security {
            guard: Arc::new(Guard::new(config.enforce, policy, credentials, Some(sink))),
            events,
            store,
        })
    }

    /// Starts forwarding events into `engine` and, when enforcing, watching the credential
    /// store (dropping clients through `dropper`).
    pub fn run(
        self,
        engine: Arc<Engine>,
        dropper: ClientDropper,
    ) -> Result<SecurityTasks, ServerError> {
        let forward = tokio::spawn(forward_events(self.events, engine));
        let watcher = match self.store {
            Some(store) => {
                let (stop, stopped) = std_mpsc::channel();
                let guard = self.guard.clone();
                let thread = std::thread::Builder::new()
                    .name("credentials".into())
                    .spawn(move || watch_credentials(store, guard, dropper, stopped))
                    .map_err(|source| ServerError::Thread {
                        what: "the credential watcher",
                        source,
                    })?;
                Some((stop, thread))
            }
            None => None,
        };
        Ok(SecurityTasks { forward, watcher })
    }
}

/// Publishes a message through the broker (topic, payload).
pub type Publish = Arc<dyn Fn(String, Vec<u8>) + Send + Sync>;

/// Enrolls agents that ask on `fleet/enroll/{agent}/request` over a connection the broker
/// admitted with a bootstrap credential: the agent gets a credential of its own (role
/// agent, the bootstrap credential's groups), its token comes back on
/// `fleet/enroll/{agent}/reply`.
pub struct Enroller {
    store: std::sync::Mutex<CredentialStore>,
    guard: Arc<Guard>,
    publish: Publish,
}

impl Enroller {
    /// An enroller on the credential store in `data_dir` (its own connection to it).
    pub fn open(
        data_dir: &Path,
        guard: Arc<Guard>,
        publish: Publish,
    ) -> Result<Enroller, ServerError> {
        let store =
            CredentialStore::open_in(data_dir).map_err(|e| ServerError::Config(e.to_string()))?;
        Ok(Enroller {
            store: std::sync::Mutex::new(store),
            guard,
            publish,
        })
    }

    /// Handles one request from `agent` (blocking: SQLite).
    pub fn handle(&self, agent: &str, payload: &[u8]) {
        let Some(bootstrap) = self.guard.bootstrap_login(agent) else {
            tracing::debug!(
                agent,
                "enrollment request not from a bootstrap login: ignored"
            );
            return;
        };
        let reply = match serde_json::from_slice::<EnrollRequest>(payload) {
            Err(e) => EnrollReply::Refused {
                reason: format!("unreadable request: {e}"),
            },
            Ok(request) if request.agent != agent => EnrollReply::Refused {
                reason: format!(
                    "the request names `{}` but the connection is `{agent}`",
                    request.agent
                ),
            },
            Ok(request) => self.enroll(agent, &bootstrap, request.hostname.as_deref()),
        };
        match serde_json::to_vec(&reply) {
            Ok(bytes) => (self.publish)(reply_topic(agent), bytes),
            Err(e) => tracing::error!(agent, error = %e, "enrollment reply not encoded"),
        }
    }

    fn enroll(
        &self,
        agent: &str,
        bootstrap: &fleetbus_broker::credentials::Credential,
        hostname: Option<&str>,
    ) -> EnrollReply {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        match store.enroll(agent, Role::Agent, &bootstrap.groups, false) {
            Ok(token) => {
                tracing::info!(agent, via = %bootstrap.id, hostname, groups = ?bootstrap.groups, "agent enrolled with a bootstrap token");
                // known to the broker at once, not at the next poll of the store
                match store.snapshot() {
                    Ok(credentials) => {
                        self.guard.set_credentials(credentials);
                    }
                    Err(e) => tracing::error!(error = %e, "credential store unreadable after an enrollment"),
                }
                self.guard.report(BrokerEvent::Enrolled {
                    client_id: agent.to_string(),
                    via: bootstrap.id.clone(),
                    groups: bootstrap.groups.clone(),
                    ts: chrono::Utc::now(),
                });
                EnrollReply::Enrolled {
                    agent: agent.to_string(),
                    token,
                    groups: bootstrap.groups.clone(),
                }
            }
            Err(CredentialError::Exists(_)) => EnrollReply::Refused {
                reason: format!(
                    "`{agent}` is already enrolled: a cloned machine? `fleetbus agent reset-identity` gives it a new id"
                ),
            },
            Err(e) => {
                tracing::error!(agent, error = %e, "enrollment failed");
                EnrollReply::Refused {
                    reason: e.to_string(),
                }
            }
        }
    }
}

/// The event forwarder and the credential watcher of a running server.
pub struct SecurityTasks {
    forward: JoinHandle<()>,
    watcher: Option<(std_mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl SecurityTasks {
    /// Stops both (the forwarder holds the engine).
    pub async fn stop(self) {
        self.forward.abort();
        let _ = self.forward.await;
        if let Some((stop, thread)) = self.watcher {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

async fn forward_events(mut events: mpsc::Receiver<BrokerEvent>, engine: Arc<Engine>) {
    while let Some(event) = events.recv().await {
        match event.encode() {
            Ok(payload) => {
                engine.dispatch(&event.topic(), &payload);
            }
            Err(e) => tracing::error!(error = %e, "broker event not encoded"),
        }
    }
}

/// Polls the store; on a change reloads it and drops connections that lost their right.
/// Ends when `stop` is dropped.
fn watch_credentials(
    store: CredentialStore,
    guard: Arc<Guard>,
    dropper: ClientDropper,
    stop: std_mpsc::Receiver<()>,
) {
    let mut seen = store.changed().ok();
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CREDENTIALS_POLL) {
        let now = match store.changed() {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, "credential store unreadable; keeping the credentials loaded before");
                continue;
            }
        };
        if now == seen {
            continue;
        }
        seen = now;
        let credentials = match store.snapshot() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "credential store unreadable; keeping the credentials loaded before");
                continue;
            }
        };
        tracing::info!(
            enrolled = credentials.len(),
            "credential store changed: reloaded"
        );
        for client_id in guard.set_credentials(credentials) {
            tracing::warn!(%client_id, "credential revoked or replaced: dropping the live connection");
            match dropper.drop_client(&client_id, "credential revoked or replaced") {
                Ok(_) => {}
                Err(e) => tracing::error!(%client_id, error = %e, "cannot drop the connection"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_error(config: &SecurityConfig, data_dir: &Path) -> String {
        match Security::open(config, data_dir) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_missing_or_broken_policy_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("acl.toml");
        let config = SecurityConfig {
            enforce: true,
            policy: Some(policy.clone()),
        };
        let e = open_error(&config, dir.path());
        assert!(
            e.starts_with("broker.security.policy: policy file") && e.contains("acl.toml"),
            "{e}"
        );
        std::fs::write(
            &policy,
            "[[rule]]\nname = \"bad\"\nrole = \"agent\"\nactions = [\"publish\"]\ntopics = [\"a/#/b\"]\n",
        )
        .unwrap();
        let e = open_error(&config, dir.path());
        assert!(e.contains("acl.toml") && e.contains("`bad`"), "{e}");
    }

    #[test]
    fn an_unusable_credential_store_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // a directory where the database file should be
        std::fs::create_dir(dir.path().join("credentials.db")).unwrap();
        let config = SecurityConfig {
            enforce: true,
            policy: None,
        };
        let e = open_error(&config, dir.path());
        assert!(e.contains("credentials.db"), "{e}");
    }
}
