//! The broker's shared security state: credentials, the topic policy, the live sessions by
//! client id (to see take-overs and to drop revoked clients), and where events go.
//!
//! One [`Guard`] serves every connection; each connection's [`crate::PolicyProtocol`]
//! asks it to admit its CONNECT and reports its end.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use fleetbus_protocol::BrokerEvent;
use rumqttd::protocol::ConnectReturnCode;

use crate::acl::{Action, Grants, Policy, Role};
use crate::config::LimitsConfig;
use crate::credentials::{AuthFailure, Credential, Credentials};

/// Where broker events go (the server feeds them into the rules engine). Called on the
/// connection's task: it must not block; it returns false when it had to drop the event.
pub type EventSink = Arc<dyn Fn(BrokerEvent) -> bool + Send + Sync>;

/// Take-overs of one client id within this window...
const TAKEOVER_WINDOW: Duration = Duration::from_secs(600);
/// ...this many times mean two machines share the identity.
const TAKEOVERS_FOR_DUPLICATE: usize = 3;
/// At most one duplicate-identity event per client id this often.
const DUPLICATE_EVENT_EVERY: Duration = Duration::from_secs(60);
/// Take-overs remembered per client id (a flapping id costs bounded memory and work).
const TAKEOVERS_KEPT: usize = 32;
/// Client ids with take-over history kept before stale histories are swept.
const TAKEOVER_HISTORIES: usize = 1024;

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct SecurityCounters {
    /// Connections admitted.
    pub connects: AtomicU64,
    /// Admitted connections ended.
    pub disconnects: AtomicU64,
    /// CONNECTs refused.
    pub refused: AtomicU64,
    /// Clients disconnected for a forbidden PUBLISH or SUBSCRIBE.
    pub violations: AtomicU64,
    /// Duplicate-identity events emitted.
    pub duplicate_identities: AtomicU64,
    /// Live connections the server dropped (credential revoked or replaced).
    pub dropped: AtomicU64,
    /// Events not handed on because the event sink was full.
    pub events_dropped: AtomicU64,
    /// TLS or WebSocket handshakes that failed or timed out (wrong CA, plain TCP on a TLS
    /// port, scanners).
    pub handshake_failures: AtomicU64,
    /// CONNECTs refused by a connection limit of `[broker.limits]`.
    pub limited_connections: AtomicU64,
    /// Bootstrap connections dropped at the end of `limits.bootstrap_lifetime`.
    pub bootstrap_expired: AtomicU64,
    /// Enrollment requests refused by `limits.enrollments_per_minute`.
    pub limited_enrollments: AtomicU64,
    /// Retained publishes refused by `limits.retained_bytes`.
    pub limited_retained: AtomicU64,
    /// Accept loops that backed off because the process ran out of file descriptors.
    pub accept_backoffs: AtomicU64,
    /// Reloads (SIGHUP) of the topic policy file or the TLS certificate that failed (the
    /// ones in use stayed).
    pub reload_failures: AtomicU64,
    /// HTTP connections (metrics, admin) closed at once because the endpoint's connection
    /// cap was reached.
    pub http_refused_connections: AtomicU64,
    /// HTTP connections ended by the header timeout or the connection lifetime.
    pub http_timed_out: AtomicU64,
}

/// What a connection was admitted as.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Number of this connection (told apart from a later one with the same client id).
    pub serial: u64,
    /// What it may publish and subscribe to; `None` when the policy is not enforced.
    pub grants: Option<Arc<Grants>>,
    /// The role of its credential; `None` when nothing is enforced.
    pub role: Option<Role>,
}

/// The last will a CONNECT asks the broker to publish for it.
#[derive(Debug, Clone, Copy)]
pub struct Will<'a> {
    /// Its topic (as received).
    pub topic: &'a [u8],
    /// Whether it would be retained.
    pub retain: bool,
}

/// Topics under this prefix are the fleet's: nobody but the server's own clients may
/// leave retained messages there (operators would see stale state, and every agent could
/// make the broker remember a message per topic forever).
pub const FLEET_PREFIX: &[u8] = b"fleet/";

/// Whether a client logged in as `role` may publish a retained message on `topic`.
pub fn may_retain(role: Option<Role>, topic: &[u8]) -> bool {
    role == Some(Role::Server) || !topic.starts_with(FLEET_PREFIX)
}

#[derive(Debug)]
struct Live {
    serial: u64,
    peer: SocketAddr,
    since: Instant,
    credential: Option<Credential>,
}

/// Live connections counted against `[broker.limits]`.
#[derive(Debug, Default)]
struct Occupancy {
    /// Per credential id: live connections logged in with it.
    per_credential: HashMap<String, usize>,
    /// Live connections logged in with any bootstrap credential.
    bootstrap: usize,
    /// Live connections that are not enrolled agents (bootstrap, operator, server).
    not_agents: usize,
}

impl Occupancy {
    fn change(&mut self, credential: &Credential, up: bool) {
        let step = |n: &mut usize| {
            *n = match up {
                true => n.saturating_add(1),
                false => n.saturating_sub(1),
            }
        };
        let count = self
            .per_credential
            .entry(credential.id.clone())
            .or_default();
        step(count);
        if *count == 0 {
            self.per_credential.remove(&credential.id);
        }
        if credential.role == Role::Bootstrap {
            step(&mut self.bootstrap);
        }
        if credential.role != Role::Agent {
            step(&mut self.not_agents);
        }
    }
}

#[derive(Debug, Default)]
struct Sessions {
    live: HashMap<String, Live>,
    occupancy: Occupancy,
    takeovers: HashMap<String, VecDeque<(Instant, SocketAddr)>>,
    last_duplicate_event: HashMap<String, Instant>,
    /// Client ids being dropped on purpose, with the reason their end reports.
    dropping: HashMap<String, String>,
}

/// The broker's security state, shared by all connections.
pub struct Guard {
    enforce: bool,
    limits: LimitsConfig,
    max_connections: usize,
    /// Client ids of the server's in-process links: never admitted from the network.
    reserved: RwLock<HashSet<String>>,
    /// Retained messages accepted from network clients: bytes per topic, and their sum.
    retained: Mutex<(HashMap<String, usize>, usize)>,
    policy: RwLock<Arc<Policy>>,
    credentials: RwLock<Arc<Credentials>>,
    sessions: Mutex<Sessions>,
    events: Option<EventSink>,
    next_serial: AtomicU64,
    counters: SecurityCounters,
}

impl Default for Guard {
    /// Nothing enforced, no events: every client is admitted and may do anything.
    fn default() -> Self {
        Guard::new(false, Policy::default(), Credentials::default(), None)
    }
}

impl Guard {
    /// A guard that, when `enforce` is set, authenticates every CONNECT against
    /// `credentials` and checks every PUBLISH and SUBSCRIBE against `policy`. Events go to
    /// `events` either way.
    pub fn new(
        enforce: bool,
        policy: Policy,
        credentials: Credentials,
        events: Option<EventSink>,
    ) -> Guard {
        Guard {
            enforce,
            limits: LimitsConfig::default(),
            max_connections: usize::MAX,
            reserved: RwLock::new(HashSet::new()),
            retained: Mutex::new((HashMap::new(), 0)),
            policy: RwLock::new(Arc::new(policy)),
            credentials: RwLock::new(Arc::new(credentials)),
            sessions: Mutex::new(Sessions::default()),
            events,
            next_serial: AtomicU64::new(1),
            counters: SecurityCounters::default(),
        }
    }

    /// The same guard with `[broker.limits]` applied, for a broker of `max_connections`.
    pub fn with_limits(mut self, limits: LimitsConfig, max_connections: usize) -> Guard {
        self.limits = limits;
        self.max_connections = max_connections;
        self
    }

    /// The limits applied.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Keeps `client_id` for an in-process link: a network client asking for it is refused
    /// (CONNACK 2), whether or not security is enforced, so nobody can take over the
    /// server's own links (the rules engine's, for one).
    pub fn reserve(&self, client_id: &str) {
        self.reserved
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_string());
    }

    fn is_reserved(&self, client_id: &str) -> bool {
        self.reserved
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(client_id)
    }

    /// Accounts a retained PUBLISH of `bytes` on `topic` (an empty one clears the topic's);
    /// false (nothing noted) when it would take the retained messages past
    /// `limits.retained_bytes`.
    pub(crate) fn note_retained(&self, topic: &str, bytes: usize) -> bool {
        let mut retained = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        let (by_topic, total) = &mut *retained;
        let before = by_topic.get(topic).copied().unwrap_or(0);
        let after = total.saturating_sub(before).saturating_add(bytes);
        if bytes > before && after > self.limits.retained_bytes {
            self.counters
                .limited_retained
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *total = after;
        match bytes {
            0 => by_topic.remove(topic),
            n => by_topic.insert(topic.to_string(), n),
        };
        true
    }

    /// Whether authentication and the topic policy are enforced.
    pub fn enforcing(&self) -> bool {
        self.enforce
    }

    /// The counters.
    pub fn counters(&self) -> &SecurityCounters {
        &self.counters
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands an event about a connection (e.g. from the enrollment service) to the same
    /// place as the broker's own.
    pub fn report(&self, event: BrokerEvent) {
        self.emit(event);
    }

    fn emit(&self, event: BrokerEvent) {
        if let Some(sink) = &self.events {
            if !sink(event) {
                self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Replaces the credentials (after the store changed) and returns the client ids whose
    /// live connection is no longer valid (revoked, removed, new token): the caller drops
    /// them with [`crate::ClientDropper::drop_client`].
    pub fn set_credentials(&self, credentials: Credentials) -> Vec<String> {
        let stale: Vec<String> = {
            let sessions = self.sessions();
            sessions
                .live
                .iter()
                .filter(|(_, l)| {
                    l.credential
                        .as_ref()
                        .is_some_and(|c| credentials.invalidates(c))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        *self.credentials.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(credentials);
        stale
    }

    /// Puts `policy` in effect for the connections admitted from now on, and returns the
    /// client ids of the live connections whose grants it changes: the caller drops them,
    /// and they come back under the new policy (a connection keeps the grants it was
    /// admitted with).
    pub fn set_policy(&self, policy: Policy) -> Vec<String> {
        let old = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let changed: Vec<String> = self
            .sessions()
            .live
            .iter()
            .filter_map(|(id, l)| {
                // as at login: the credential's identity (a bootstrap login's under the
                // connection's client id)
                let credential = l.credential.as_ref()?;
                let mut identity = credential.identity();
                if credential.role == crate::acl::Role::Bootstrap {
                    identity.client_id = id.clone();
                }
                (old.grants_for(&identity) != policy.grants_for(&identity)).then(|| id.clone())
            })
            .collect();
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        changed
    }

    /// The groups of the agent credential `client_id`'s live connection logged in with
    /// (None when nothing is enforced or the client is not an agent).
    pub fn agent_groups(&self, client_id: &str) -> Option<Vec<String>> {
        self.sessions()
            .live
            .get(client_id)
            .and_then(|l| l.credential.as_ref())
            .filter(|c| c.role == crate::acl::Role::Agent && c.id == client_id)
            .map(|c| c.groups.clone())
    }

    /// The bootstrap credential `client_id`'s live connection logged in with, if it is an
    /// enrollment connection (the enrollment service trusts the broker's word, not the
    /// request's).
    pub fn bootstrap_login(&self, client_id: &str) -> Option<Credential> {
        self.sessions()
            .live
            .get(client_id)
            .and_then(|l| l.credential.clone())
            .filter(|c| c.role == Role::Bootstrap && c.id != client_id)
    }

    /// Notes that `client_id` is about to be dropped on purpose, so its end says why.
    /// False (nothing noted) when it is not connected.
    pub(crate) fn dropping(&self, client_id: &str, reason: &str) -> bool {
        let mut sessions = self.sessions();
        if !sessions.live.contains_key(client_id) {
            return false;
        }
        sessions
            .dropping
            .insert(client_id.to_string(), reason.to_string());
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Counts a refused CONNECT, logs it and emits a `refused` event; returns `code`.
    fn refuse(
        &self,
        peer: SocketAddr,
        client_id: &str,
        code: ConnectReturnCode,
        reason: &str,
    ) -> ConnectReturnCode {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client_id, %peer, reason, "connection refused");
        self.emit(BrokerEvent::Refused {
            client_id: client_id.to_string(),
            peer: peer.to_string(),
            code: connack_code(code),
            reason: reason.to_string(),
            ts: Utc::now(),
        });
        code
    }

    /// Why a client id can never be admitted from the network, if it cannot.
    fn unacceptable_id(&self, client_id: &str) -> Option<&'static str> {
        if self.is_reserved(client_id) {
            return Some("client id reserved for the server's own links");
        }
        if client_id.contains(['/', '+', '#', '$', '\0']) {
            return Some("client id contains '/', '+', '#', '$' or NUL");
        }
        None
    }

    /// Which connection limit a new connection with `credential` (replacing a live one of
    /// the same client id logged in with `replacing`) would exceed, if any.
    fn over_limit(
        &self,
        occupancy: &Occupancy,
        credential: &Credential,
        replacing: Option<&Credential>,
    ) -> Option<String> {
        let same = |c: &&Credential| c.id == credential.id;
        let freed = usize::from(replacing.filter(same).is_some());
        let mine = occupancy
            .per_credential
            .get(&credential.id)
            .copied()
            .unwrap_or(0)
            .saturating_sub(freed);
        let limits = &self.limits;
        match credential.role {
            Role::Agent => return None,
            Role::Bootstrap => {
                let bootstrap = occupancy.bootstrap.saturating_sub(freed);
                if bootstrap >= limits.bootstrap_connections {
                    return Some(format!(
                        "{bootstrap} bootstrap connections are open (limits.bootstrap_connections)"
                    ));
                }
            }
            Role::Server | Role::Operator => {
                if mine >= limits.connections_per_credential {
                    return Some(format!(
                        "credential `{}` already holds {mine} connections (limits.connections_per_credential)",
                        credential.id
                    ));
                }
            }
        }
        let others = occupancy.not_agents.saturating_sub(freed);
        let open_to_others = self
            .max_connections
            .saturating_sub(limits.agent_slots(self.max_connections));
        if others >= open_to_others {
            return Some(format!(
                "the connection slots not kept for agents are taken ({others}; limits.reserved_for_agents)"
            ));
        }
        None
    }

    /// Decides on a CONNECT from `peer` asking the broker to publish `will` for it;
    /// `certificate` holds the names of its client certificate under mutual TLS.
    pub(crate) fn admit(
        &self,
        peer: Option<SocketAddr>,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        will: Option<Will<'_>>,
        certificate: Option<&[String]>,
    ) -> Result<Admitted, ConnectReturnCode> {
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        if let Some(reason) = self.unacceptable_id(client_id) {
            return Err(self.refuse(
                peer,
                client_id,
                ConnectReturnCode::ClientIdentifierNotValid,
                reason,
            ));
        }
        if let Some(names) = certificate {
            // the certificate, not only the token, says who this is: a client may use only
            // an id its certificate names (a stolen token without the key is not enough)
            if !names.iter().any(|n| n == client_id) {
                let reason = format!(
                    "client certificate names {}, not the client id",
                    match names.is_empty() {
                        true => "nothing".to_string(),
                        false => names.join(", "),
                    }
                );
                return Err(self.refuse(
                    peer,
                    client_id,
                    ConnectReturnCode::NotAuthorized,
                    &reason,
                ));
            }
        }
        let mut credential = None;
        let mut grants = None;
        if self.enforce {
            let credentials = self
                .credentials
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match credentials.authenticate(client_id, username, password) {
                Ok(login) => {
                    let policy = self
                        .policy
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    grants = Some(Arc::new(policy.grants_for(&login.identity)));
                    credential = Some(login.credential.clone());
                }
                Err(failure) => {
                    let code = match failure {
                        AuthFailure::NoToken | AuthFailure::WrongToken => {
                            ConnectReturnCode::BadUserNamePassword
                        }
                        AuthFailure::UserMismatch | AuthFailure::IdTaken => {
                            ConnectReturnCode::ClientIdentifierNotValid
                        }
                        AuthFailure::Unknown | AuthFailure::Revoked => {
                            ConnectReturnCode::NotAuthorized
                        }
                    };
                    return Err(self.refuse(peer, client_id, code, failure.as_str()));
                }
            }
        }
        let role = credential.as_ref().map(|c| c.role);
        if let Some(reason) = will.and_then(|w| unacceptable_will(w, role, grants.as_deref())) {
            return Err(self.refuse(peer, client_id, ConnectReturnCode::NotAuthorized, &reason));
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let role_name = role.map(|r| r.as_str().to_string());
        let duplicate = {
            let mut sessions = self.sessions();
            if let Some(c) = &credential {
                let replacing = sessions
                    .live
                    .get(client_id)
                    .and_then(|l| l.credential.as_ref());
                if let Some(reason) = self.over_limit(&sessions.occupancy, c, replacing) {
                    drop(sessions);
                    self.counters
                        .limited_connections
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(self.refuse(
                        peer,
                        client_id,
                        ConnectReturnCode::ServiceUnavailable,
                        &reason,
                    ));
                }
                sessions.occupancy.change(c, true);
            }
            let previous = sessions.live.insert(
                client_id.to_string(),
                Live {
                    serial,
                    peer,
                    since: Instant::now(),
                    credential,
                },
            );
            match previous {
                Some(old) => {
                    if let Some(c) = &old.credential {
                        sessions.occupancy.change(c, false);
                    }
                    self.note_takeover(&mut sessions, client_id, old.peer, peer)
                }
                None => None,
            }
        };
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        self.emit(BrokerEvent::Connected {
            client_id: client_id.to_string(),
            peer: peer.to_string(),
            role: role_name,
            ts: Utc::now(),
        });
        if let Some(event) = duplicate {
            self.counters
                .duplicate_identities
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client_id, "duplicate agent identity: two machines keep taking over one client id (see docs/security.md, cloned identities)");
            self.emit(event);
        }
        Ok(Admitted {
            serial,
            grants,
            role,
        })
    }

    /// Client ids of bootstrap connections older than `limits.bootstrap_lifetime`: the
    /// caller drops them (see [`crate::ClientDropper::drop_client`]).
    pub fn expired_bootstraps(&self) -> Vec<String> {
        let lifetime = self.limits.bootstrap_lifetime;
        self.sessions()
            .live
            .iter()
            .filter(|(_, l)| {
                l.credential
                    .as_ref()
                    .is_some_and(|c| c.role == Role::Bootstrap)
                    && l.since.elapsed() >= lifetime
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A live connection of `client_id` was taken over by a new one from `new_peer`.
    fn note_takeover(
        &self,
        sessions: &mut Sessions,
        client_id: &str,
        old_peer: SocketAddr,
        new_peer: SocketAddr,
    ) -> Option<BrokerEvent> {
        let now = Instant::now();
        let stale = |history: &VecDeque<(Instant, SocketAddr)>| {
            history
                .back()
                .is_none_or(|(t, _)| now.duration_since(*t) > TAKEOVER_WINDOW)
        };
        if sessions.takeovers.len() >= TAKEOVER_HISTORIES {
            sessions.takeovers.retain(|_, h| !stale(h));
            sessions
                .last_duplicate_event
                .retain(|_, t| now.duration_since(*t) < DUPLICATE_EVENT_EVERY);
        }
        let history = sessions.takeovers.entry(client_id.to_string()).or_default();
        history.push_back((now, old_peer));
        history.push_back((now, new_peer));
        while history.len() > 2 * TAKEOVERS_KEPT
            || history
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > TAKEOVER_WINDOW)
        {
            history.pop_front();
        }
        let takeovers = history.len() / 2;
        if takeovers < TAKEOVERS_FOR_DUPLICATE {
            return None;
        }
        let mut peers: Vec<String> = history.iter().map(|(_, p)| p.to_string()).collect();
        peers.sort();
        peers.dedup();
        if sessions
            .last_duplicate_event
            .get(client_id)
            .is_some_and(|t| now.duration_since(*t) < DUPLICATE_EVENT_EVERY)
        {
            return None;
        }
        sessions
            .last_duplicate_event
            .insert(client_id.to_string(), now);
        Some(BrokerEvent::DuplicateIdentity {
            client_id: client_id.to_string(),
            peers,
            takeovers,
            window_secs: TAKEOVER_WINDOW.as_secs(),
            ts: Utc::now(),
        })
    }

    /// A PUBLISH or SUBSCRIBE was denied: count it and say so.
    pub(crate) fn violation(
        &self,
        client_id: &str,
        peer: Option<SocketAddr>,
        action: Action,
        topic: &str,
        reason: String,
    ) {
        self.counters.violations.fetch_add(1, Ordering::Relaxed);
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        tracing::warn!(client_id, %peer, ?action, topic, %reason, "policy violation: client disconnected");
        self.sessions()
            .dropping
            .insert(client_id.to_string(), format!("policy violation: {reason}"));
        self.emit(BrokerEvent::Violation {
            client_id: client_id.to_string(),
            peer,
            action: match action {
                Action::Publish => "publish",
                Action::Subscribe => "subscribe",
            }
            .to_string(),
            topic: topic.to_string(),
            reason,
            ts: Utc::now(),
        });
    }

    /// An admitted connection ended.
    pub(crate) fn ended(
        &self,
        client_id: &str,
        serial: u64,
        peer: Option<SocketAddr>,
        reason: &str,
    ) {
        let (since, reason) = {
            let mut sessions = self.sessions();
            let mine = sessions
                .live
                .get(client_id)
                .is_some_and(|l| l.serial == serial);
            if mine {
                let live = sessions.live.remove(client_id);
                if let Some(c) = live.as_ref().and_then(|l| l.credential.as_ref()) {
                    sessions.occupancy.change(c, false);
                }
                let reason = sessions
                    .dropping
                    .remove(client_id)
                    .unwrap_or_else(|| reason.to_string());
                (live.map(|l| l.since), reason)
            } else {
                (
                    None,
                    "replaced by a newer connection with the same client id".to_string(),
                )
            }
        };
        self.counters.disconnects.fetch_add(1, Ordering::Relaxed);
        self.emit(BrokerEvent::Disconnected {
            client_id: client_id.to_string(),
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            reason,
            connected_secs: since.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0),
            ts: Utc::now(),
        });
    }
}

/// Why the broker must not accept `will` from a client logged in as `role` with `grants`
/// (`None`: the policy is not enforced), if it must not: the broker publishes a will on the
/// client's behalf, so it gets the same checks as the client's own PUBLISH.
fn unacceptable_will(
    will: Will<'_>,
    role: Option<Role>,
    grants: Option<&Grants>,
) -> Option<String> {
    let Ok(topic) = std::str::from_utf8(will.topic) else {
        return Some("last will topic is not UTF-8".into());
    };
    if will.retain && !may_retain(role, will.topic) {
        return Some(format!(
            "retained last will on `{topic}`: only the server may retain messages under fleet/"
        ));
    }
    let grants = grants?;
    match grants.allows(Action::Publish, topic) {
        Some(_) => None,
        None => Some(format!(
            "last will on `{topic}`: {}",
            grants.decide(Action::Publish, topic).reason
        )),
    }
}

/// The MQTT 3.1.1 CONNACK return code of `code`.
fn connack_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::ClientIdentifierNotValid => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        _ => 5,
    }
}
