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
use fleetbus_broker::{ClientDropper, EventSink, Guard, LimitsConfig, SecurityConfig};
use fleetbus_pipeline::Engine;
use fleetbus_protocol::enroll::{reply_topic, EnrollReply, EnrollRequest};
use fleetbus_protocol::BrokerEvent;
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
    /// in `data_dir`; applies `[broker.limits]` for a broker of `max_connections`.
    pub fn open(
        config: &SecurityConfig,
        limits: &LimitsConfig,
        max_connections: usize,
        data_dir: &Path,
    ) -> Result<Security, ServerError> {
        let policy = match &config.policy {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        let (store, credentials) = match config.enforce {
            true => {
                let store = CredentialStore::open_in(data_dir)?;
                let credentials = store.snapshot()?;
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
            guard: Arc::new(
                Guard::new(config.enforce, policy, credentials, Some(sink))
                    .with_limits(limits.clone(), max_connections),
            ),
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
        let (drain, drained) = crate::shutdown::stop_signal();
        let forward = tokio::spawn(forward_events(self.events, engine, drained));
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
        Ok(SecurityTasks {
            forward,
            drain,
            watcher,
        })
    }
}

/// Enrolls agents that ask on `fleet/enroll/{agent}/request` over a connection the broker
/// admitted with a bootstrap credential: the agent gets a credential of its own (role
/// agent, the bootstrap credential's groups), its token comes back on
/// `fleet/enroll/{agent}/reply`.
///
/// Requests are handled one at a time on a thread of its own, fed by a bounded queue
/// ([`ENROLL_QUEUE`]): a flood of requests costs one thread and a bounded amount of memory,
/// and what does not fit is dropped (the agent asks again after its timeout). Each
/// bootstrap credential may enroll `limits.enrollments_per_minute` agents a minute.
pub struct Enroller {
    store: std::sync::Mutex<CredentialStore>,
    guard: Arc<Guard>,
    publish: fleetbus_support::Publisher,
    rate: std::sync::Mutex<RateLimits>,
}

/// Enrollment requests waiting for the enrollment thread; beyond, requests are dropped.
pub const ENROLL_QUEUE: usize = 256;

/// A token bucket per bootstrap credential: `per_minute` enrollments a minute, as many at
/// once after a quiet minute.
pub(crate) struct RateLimits {
    per_minute: u32,
    buckets: std::collections::HashMap<String, (f64, std::time::Instant)>,
}

impl RateLimits {
    /// Buckets of `per_minute` enrollments a minute, full at first.
    pub(crate) fn new(per_minute: u32) -> RateLimits {
        RateLimits {
            per_minute,
            buckets: std::collections::HashMap::new(),
        }
    }

    /// Takes one enrollment for `credential`, or says how long until one is free.
    pub(crate) fn take(
        &mut self,
        credential: &str,
        now: std::time::Instant,
    ) -> Result<(), Duration> {
        let capacity = f64::from(self.per_minute);
        if capacity == 0.0 {
            return Err(Duration::from_secs(60));
        }
        let per_sec = capacity / 60.0;
        let (tokens, last) = self
            .buckets
            .entry(credential.to_string())
            .or_insert((capacity, now));
        let refilled =
            (*tokens + now.saturating_duration_since(*last).as_secs_f64() * per_sec).min(capacity);
        *last = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / per_sec))
        }
    }
}

/// The sending end of the enrollment queue (see [`Enroller`]).
#[derive(Clone)]
pub struct EnrollQueue {
    tx: std_mpsc::SyncSender<(String, bytes::Bytes)>,
    guard: Arc<Guard>,
}

impl EnrollQueue {
    /// Queues a request from `agent`; dropped (and counted) when the queue is full.
    pub fn submit(&self, agent: &str, payload: bytes::Bytes) {
        if self.tx.try_send((agent.to_string(), payload)).is_err() {
            self.guard
                .counters()
                .limited_enrollments
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(
                agent,
                "enrollment queue full: request dropped (the agent asks again)"
            );
        }
    }
}

impl Enroller {
    /// An enroller on the credential store in `data_dir` (its own connection to it).
    pub fn open(
        data_dir: &Path,
        guard: Arc<Guard>,
        publish: fleetbus_support::Publisher,
    ) -> Result<Enroller, ServerError> {
        let store = CredentialStore::open_in(data_dir)?;
        let per_minute = guard.limits().enrollments_per_minute;
        Ok(Enroller {
            store: std::sync::Mutex::new(store),
            guard,
            publish,
            rate: std::sync::Mutex::new(RateLimits::new(per_minute)),
        })
    }

    /// Starts the enrollment thread; it ends when every [`EnrollQueue`] is dropped.
    pub fn spawn(self) -> Result<(EnrollQueue, std::thread::JoinHandle<()>), ServerError> {
        let (tx, rx) = std_mpsc::sync_channel::<(String, bytes::Bytes)>(ENROLL_QUEUE);
        let guard = self.guard.clone();
        let thread = std::thread::Builder::new()
            .name("enrollment".into())
            .spawn(move || {
                while let Ok((agent, payload)) = rx.recv() {
                    self.handle(&agent, &payload);
                }
            })
            .map_err(|source| ServerError::Thread {
                what: "the enrollment service",
                source,
            })?;
        Ok((EnrollQueue { tx, guard }, thread))
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
        let limited = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&bootstrap.id, std::time::Instant::now());
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
            Ok(_) if limited.is_err() => {
                self.guard
                    .counters()
                    .limited_enrollments
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let wait = limited.err().unwrap_or_default();
                tracing::warn!(agent, via = %bootstrap.id, "enrollment refused: limits.enrollments_per_minute reached");
                EnrollReply::Refused {
                    reason: format!(
                        "enrollment rate limit of `{}` reached (limits.enrollments_per_minute): ask again in {}s",
                        bootstrap.id,
                        wait.as_secs().max(1)
                    ),
                }
            }
            Ok(request) => match reply_key(&request.reply_key) {
                Ok(key) => self.enroll(agent, &bootstrap, request.hostname.as_deref(), &key),
                Err(reason) => EnrollReply::Refused { reason },
            },
        };
        match serde_json::to_vec(&reply) {
            Ok(bytes) => {
                if let Err(e) = self.publish.publish(reply_topic(agent), bytes) {
                    tracing::warn!(error = %e, "enrollment reply not published (the agent asks again)");
                }
            }
            Err(e) => tracing::error!(agent, error = %e, "enrollment reply not encoded"),
        }
    }

    fn enroll(
        &self,
        agent: &str,
        bootstrap: &fleetbus_broker::credentials::Credential,
        hostname: Option<&str>,
        reply_key: &crypto_box::PublicKey,
    ) -> EnrollReply {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        match store.enroll(agent, Role::Agent, &bootstrap.groups, false) {
            Ok(token) => {
                // sealed to the requester's one-time key: the broker, and anyone
                // subscribed there, only ever sees ciphertext
                let sealed_token = match reply_key.seal(&mut crypto_box::aead::OsRng, token.as_bytes())
                {
                    Ok(sealed) => hex::encode(sealed),
                    Err(e) => {
                        tracing::error!(agent, error = %e, "cannot seal the new token; the agent asks again (an operator may need --replace)");
                        return EnrollReply::Refused {
                            reason: format!("the server could not seal the token: {e}"),
                        };
                    }
                };
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
                    sealed_token,
                    groups: bootstrap.groups.clone(),
                }
            }
            Err(CredentialError::Revoked(_)) => EnrollReply::Refused {
                reason: format!(
                    "`{agent}` was revoked: only an operator can enroll it again (fleetbus agents enroll --replace)"
                ),
            },
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

/// The one-time public key of an enrollment request (32 bytes as hex), or why not.
fn reply_key(hex_key: &str) -> Result<crypto_box::PublicKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("reply_key must be an X25519 public key: 64 hex characters")?;
    Ok(crypto_box::PublicKey::from(bytes))
}

/// The event forwarder and the credential watcher of a running server.
pub struct SecurityTasks {
    forward: JoinHandle<()>,
    drain: crate::shutdown::Stopper,
    watcher: Option<(std_mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl SecurityTasks {
    /// Stops both, the broker stopped: the forwarder hands the events still queued to the
    /// engine and ends; the watcher ends.
    pub(crate) async fn stop(self, drain: &mut crate::shutdown::Drain) {
        use crate::shutdown::Running;
        self.drain.stop();
        drain
            .wait("broker events into the engine", Running::Task(self.forward))
            .await;
        if let Some((stop, thread)) = self.watcher {
            drop(stop);
            drain
                .wait("credential watcher", Running::Thread(thread))
                .await;
        }
    }
}

/// Hands every broker event to the engine until `stop`, then those already queued.
async fn forward_events(
    mut events: mpsc::Receiver<BrokerEvent>,
    engine: Arc<Engine>,
    mut stop: crate::shutdown::StopSignal,
) {
    let forward = |event: BrokerEvent| match event.encode() {
        Ok(payload) => engine.dispatch(&event.topic(), &payload),
        Err(e) => tracing::error!(error = %e, "broker event not encoded"),
    };
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => forward(event),
                None => return,
            },
            _ = stop.stopped() => break,
        }
    }
    while let Ok(event) = events.try_recv() {
        forward(event);
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
        for client_id in guard.expired_bootstraps() {
            let reason = "bootstrap connection lifetime over (limits.bootstrap_lifetime)";
            match dropper.drop_client(&client_id, reason) {
                Ok(true) => {
                    guard
                        .counters()
                        .bootstrap_expired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(%client_id, "bootstrap connection dropped: lifetime over");
                }
                Ok(false) => {}
                Err(e) => tracing::error!(%client_id, error = %e, "cannot drop the connection"),
            }
        }
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

    #[test]
    fn enrollments_are_limited_per_bootstrap_credential_and_refill() {
        let mut rate = RateLimits::new(60);
        let t0 = std::time::Instant::now();
        for _ in 0..60 {
            rate.take("provision", t0).unwrap();
        }
        let wait = rate.take("provision", t0).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // another bootstrap credential has its own bucket
        rate.take("other", t0).unwrap();
        // one a second comes back
        rate.take("provision", t0 + Duration::from_millis(1100))
            .unwrap();
        assert!(rate
            .take("provision", t0 + Duration::from_millis(1100))
            .is_err());
        assert!(RateLimits::new(0).take("x", t0).is_err());
    }

    fn open_error(config: &SecurityConfig, data_dir: &Path) -> String {
        match Security::open(config, &LimitsConfig::default(), 100, data_dir) {
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
            allow_insecure: false,
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
            allow_insecure: false,
        };
        let e = open_error(&config, dir.path());
        assert!(e.contains("credentials.db"), "{e}");
    }
}
