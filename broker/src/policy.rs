//! Connection policy, applied inside the broker's MQTT codec.
//!
//! rumqttd's `Server<P>` is generic over its `Protocol` trait; [`PolicyProtocol`] wraps the
//! MQTT v4 codec and sees every decoded packet of every connection, CONNECT first. The
//! server clones it for every accepted connection, so each clone holds that connection's
//! state (peer address, what it was admitted as). Through hooks we added to the vendored
//! rumqttd (vendor/README.md) it is told the peer address, decides on the CONNECT (a
//! refusal is answered with a CONNACK code) and learns when the connection ended. Refusing
//! a packet here closes that connection without an extra network hop and before the packet
//! reaches the router, so nothing of it is delivered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, ConnectReturnCode, Error, Packet, Protocol};

use crate::acl::Action;
use crate::guard::{may_retain, Admitted, Guard, Will};

/// Open while the broker accepts traffic; closed when it is stopping.
#[derive(Debug)]
pub struct Gate {
    open: AtomicBool,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            open: AtomicBool::new(true),
        }
    }
}

impl Gate {
    /// True while traffic is accepted.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Refuses all further traffic.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }
}

/// What one connection is, once its CONNECT was admitted.
#[derive(Clone)]
struct Session {
    client_id: String,
    admitted: Admitted,
    /// The last topic a PUBLISH was allowed on (most clients publish on a few topics over
    /// and over: the policy is asked once per change of topic). None before the first.
    last_allowed: Option<Vec<u8>>,
}

/// rumqttd's MQTT v4 codec with fleetbus policy applied to every incoming packet.
#[derive(Clone)]
pub struct PolicyProtocol {
    inner: V4,
    gate: Arc<Gate>,
    guard: Arc<Guard>,
    peer: Option<SocketAddr>,
    session: Option<Session>,
    /// The plain listener's accept back-off (shared by the clones; only the accept loop's
    /// own value uses it).
    accept_backoff: Arc<std::sync::Mutex<crate::accept::AcceptBackoff>>,
    /// Under mutual TLS: the names of the client's certificate (its client id must be one).
    certificate: Option<Vec<String>>,
}

impl PolicyProtocol {
    /// A codec that refuses traffic once `gate` closes and applies `guard`'s policy.
    pub fn new(gate: Arc<Gate>, guard: Arc<Guard>) -> Self {
        PolicyProtocol {
            inner: V4,
            gate,
            guard,
            peer: None,
            session: None,
            accept_backoff: Arc::new(std::sync::Mutex::new(crate::accept::AcceptBackoff::new(
                "broker.listen",
            ))),
            certificate: None,
        }
    }

    /// This connection's value, told the names of the certificate its client presented
    /// (`None`: no certificate): its CONNECT must then name one of them as client id.
    pub fn with_certificate_names(mut self, names: Option<Vec<String>>) -> Self {
        self.certificate = names;
        self
    }

    /// A retained PUBLISH: nobody but the server's own clients retains under `fleet/`
    /// (stale state for operators, memory for ever), and retained messages elsewhere share
    /// `limits.retained_bytes`. A refusal is a violation (the connection ends).
    fn check_retain(&mut self, topic: &[u8], payload_len: usize) -> Result<(), Error> {
        let Some(session) = &self.session else {
            return Err(Error::InvalidProtocol);
        };
        let shown = String::from_utf8_lossy(topic).into_owned();
        let reason = if !may_retain(session.admitted.role, topic) {
            "retained publish under fleet/: only the server may retain messages there".to_string()
        } else if !self.guard.note_retained(&shown, payload_len) {
            format!(
                "retained messages would exceed limits.retained_bytes ({} bytes)",
                self.guard.limits().retained_bytes
            )
        } else {
            return Ok(());
        };
        self.guard.violation(
            &session.client_id,
            self.peer,
            Action::Publish,
            &shown,
            reason,
        );
        Err(Error::InvalidProtocol)
    }

    /// Checks one PUBLISH topic or SUBSCRIBE filter of this connection.
    /// A SUBSCRIBE filter: a malformed one (4.7.1), a `$` one (other than a shared
    /// subscription, `$share/GROUP/...`) or one the policy refuses is marked
    /// refused, so the router answers 0x80 for it in the SUBACK and subscribes nothing
    /// (3.9.3); the others pass. An agent whose filter the policy refuses is disconnected
    /// instead (a fleetbus agent never asks for one: it is misbehaving); other roles get the
    /// protocol's answer. Every policy refusal is reported as a violation.
    fn check_filter(&mut self, filter: &mut rumqttd::protocol::Filter) -> Result<(), Error> {
        // a `$` filter (4.7.2: reserved for the server; fleetbus publishes nothing there)
        // is refused for everyone without counting as a violation
        let reserved = filter.path.starts_with('$') && !filter.path.starts_with("$share/");
        if !valid_filter(&filter.path) || reserved {
            refuse_filter(filter);
            return Ok(());
        }
        if !self.guard.enforcing() {
            return Ok(());
        }
        if self
            .authorize(Action::Subscribe, filter.path.as_bytes())
            .is_ok()
        {
            return Ok(());
        }
        let is_agent = self
            .session
            .as_ref()
            .is_some_and(|s| s.admitted.role == Some(crate::acl::Role::Agent));
        if is_agent {
            return Err(Error::InvalidProtocol);
        }
        refuse_filter(filter);
        Ok(())
    }

    fn authorize(&mut self, action: Action, topic: &[u8]) -> Result<(), Error> {
        let Some(session) = &mut self.session else {
            // nothing before CONNECT is admitted
            return Err(Error::InvalidProtocol);
        };
        let Some(grants) = &session.admitted.grants else {
            return Ok(()); // the policy is not enforced
        };
        if action == Action::Publish && session.last_allowed.as_deref() == Some(topic) {
            return Ok(());
        }
        let text = match std::str::from_utf8(topic) {
            Ok(text) => text,
            Err(_) => {
                let shown = String::from_utf8_lossy(topic).into_owned();
                let reason = "topic is not UTF-8".to_string();
                self.guard
                    .violation(&session.client_id, self.peer, action, &shown, reason);
                return Err(Error::InvalidProtocol);
            }
        };
        if grants.allows(action, text).is_some() {
            if action == Action::Publish {
                let last = session.last_allowed.get_or_insert_with(Vec::new);
                last.clear();
                last.extend_from_slice(topic);
            }
            return Ok(());
        }
        let reason = grants.decide(action, text).reason;
        self.guard
            .violation(&session.client_id, self.peer, action, text, reason);
        Err(Error::InvalidProtocol)
    }
}

/// Prefix a refused filter is given: the router refuses every `$` filter (other than
/// `$share/`) with 0x80 in the SUBACK, and nothing is ever published under it.
pub const REFUSED_FILTER_PREFIX: &str = "$refused/";

fn refuse_filter(filter: &mut rumqttd::protocol::Filter) {
    filter.path = format!("{REFUSED_FILTER_PREFIX}{}", filter.path);
}

/// A topic filter as MQTT 3.1.1 4.7.1 allows it: not empty, `#` only as the whole last
/// level, `+` only as a whole level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i + 1 == levels.len(),
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

impl Protocol for PolicyProtocol {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let mut packet = self.inner.read_mut(stream, max_size)?;
        if !self.gate.is_open() {
            // the broker is stopping: this connection ends here, unacknowledged
            return Err(Error::InvalidProtocol);
        }
        match &mut packet {
            // MQTT 3.1.1 3.1.0-2: a second CONNECT is a protocol violation
            Packet::Connect(..) if self.session.is_some() => return Err(Error::InvalidProtocol),
            Packet::Publish(publish, _) => {
                // 3.3.2-2: a topic name has no wildcards (and is not empty, 4.7.3-1)
                if publish.topic.is_empty()
                    || publish.topic.iter().any(|b| matches!(b, b'+' | b'#'))
                {
                    return Err(Error::InvalidProtocol);
                }
                if publish.retain {
                    self.check_retain(&publish.topic, publish.payload.len())?;
                }
                if self.guard.enforcing() {
                    self.authorize(Action::Publish, &publish.topic)?;
                }
            }
            Packet::Subscribe(subscribe, _) => {
                for filter in &mut subscribe.filters {
                    self.check_filter(filter)?;
                }
            }
            _ => {}
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        self.inner.write(packet, write)
    }

    fn accepted(&mut self, peer: SocketAddr) {
        self.peer = Some(peer);
        // an accept worked: the next failure pauses briefly again
        if let Ok(mut backoff) = self.accept_backoff.try_lock() {
            backoff.succeeded();
        }
    }

    fn accept_failed(&self, error: &std::io::Error) -> std::time::Duration {
        let mut backoff = self
            .accept_backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        backoff.failed(error, &self.guard.counters().accept_backoffs)
    }

    fn admit(&mut self, connect_packet: &Packet) -> Result<(), ConnectReturnCode> {
        let Packet::Connect(connect, _, _, _, login) = connect_packet else {
            return Err(ConnectReturnCode::ProtocolError);
        };
        let Packet::Connect(_, _, will, _, _) = connect_packet else {
            return Err(ConnectReturnCode::ProtocolError);
        };
        let will = will.as_ref().map(|w| Will {
            topic: &w.topic,
            retain: w.retain,
        });
        let admitted = self.guard.admit(
            self.peer,
            &connect.client_id,
            login.as_ref().map(|l| l.username.as_str()),
            login.as_ref().map(|l| l.password.as_bytes()),
            will,
            self.certificate.as_deref(),
        )?;
        self.session = Some(Session {
            client_id: connect.client_id.clone(),
            admitted,
            last_allowed: None,
        });
        Ok(())
    }

    fn ended(&mut self, reason: &str) {
        if let Some(session) = self.session.take() {
            self.guard.ended(
                &session.client_id,
                session.admitted.serial,
                self.peer,
                reason,
            );
        }
    }
}

impl Drop for PolicyProtocol {
    /// A connection whose task ended without `ended` (it panicked, or was aborted at a
    /// stop) still gives its session back, so its slot and its client id are free again.
    fn drop(&mut self) {
        self.ended("connection task ended abnormally");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use fleetbus_protocol::BrokerEvent;
    use rand::{Rng, SeedableRng};
    use rumqttd::protocol::{Connect, Login};

    use super::*;
    use crate::acl::{covers, Policy, Role};
    use crate::credentials::CredentialStore;

    /// An enforcing guard knowing agent `a1` (group `web`), its token, and its events.
    fn guard() -> (Arc<Guard>, String, Arc<Mutex<Vec<BrokerEvent>>>) {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        let token = store
            .enroll("a1", Role::Agent, &["web".into()], false)
            .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let sink: crate::EventSink = Arc::new(move |e| {
            seen.lock().unwrap().push(e);
            true
        });
        let guard = Guard::new(
            true,
            Policy::default(),
            store.snapshot().unwrap(),
            Some(sink),
        );
        (Arc::new(guard), token, events)
    }

    fn connect(id: &str, token: &str) -> Packet {
        let connect = Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_session: true,
        };
        let login = Login {
            username: id.into(),
            password: token.into(),
        };
        Packet::Connect(connect, None, None, None, Some(login))
    }

    /// A QoS 0 PUBLISH of `topic` (any bytes) as it comes off the wire.
    fn publish_bytes(topic: &[u8]) -> BytesMut {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic);
        body.extend_from_slice(b"payload");
        let mut out = BytesMut::new();
        out.extend_from_slice(&[0x30, body.len() as u8]);
        out.extend_from_slice(&body);
        out
    }

    fn admitted(guard: &Arc<Guard>, token: &str) -> PolicyProtocol {
        let mut p = PolicyProtocol::new(Arc::new(Gate::default()), guard.clone());
        p.accepted(SocketAddr::from(([127, 0, 0, 1], 5000)));
        p.admit(&connect("a1", token)).unwrap();
        p
    }

    /// Bootstrap logins are capped, and past the slots kept for agents no other login gets
    /// in, while enrolled agents still do; a connection that ends gives its slot back.
    #[test]
    fn connection_limits_keep_slots_for_agents() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open_in(dir.path()).unwrap();
        let boot = store
            .enroll("provision", Role::Bootstrap, &[], false)
            .unwrap();
        let agents: Vec<(String, String)> = (0..8)
            .map(|i| {
                let id = format!("a{i}");
                let token = store.enroll(&id, Role::Agent, &[], false).unwrap();
                (id, token)
            })
            .collect();
        let limits = crate::LimitsConfig {
            bootstrap_connections: 5,
            reserved_for_agents: Some(7),
            ..Default::default()
        };
        let guard = Arc::new(
            Guard::new(true, Policy::default(), store.snapshot().unwrap(), None)
                .with_limits(limits, 10),
        );
        let bootstrap = |id: &str| {
            let mut p = PolicyProtocol::new(Arc::new(Gate::default()), guard.clone());
            let connect = Packet::Connect(
                Connect {
                    keep_alive: 30,
                    client_id: id.into(),
                    clean_session: true,
                },
                None,
                None,
                None,
                Some(Login {
                    username: "provision".into(),
                    password: boot.clone(),
                }),
            );
            p.admit(&connect).map(|()| p)
        };
        // 10 slots, 7 kept for agents: 3 for everyone else, below the bootstrap cap of 5
        let mut held: Vec<PolicyProtocol> = (0..3)
            .map(|i| bootstrap(&format!("n{i}")).unwrap())
            .collect();
        assert_eq!(
            bootstrap("n3").err(),
            Some(ConnectReturnCode::ServiceUnavailable)
        );
        for (id, token) in &agents {
            let mut p = PolicyProtocol::new(Arc::new(Gate::default()), guard.clone());
            p.admit(&connect(id, token)).unwrap();
        }
        assert_eq!(
            guard.counters().limited_connections.load(Ordering::Relaxed),
            1
        );
        // one ends: its slot is free again
        held.remove(0).ended("closed by the client");
        bootstrap("n4").unwrap();
        // dropping a connection without `ended` (a task that panicked) frees it too
        drop(held.remove(0));
        bootstrap("n5").unwrap();
    }

    #[test]
    fn refusals_carry_their_code_and_an_event() {
        let (guard, token, events) = guard();
        let mut p = PolicyProtocol::new(Arc::new(Gate::default()), guard.clone());
        assert_eq!(
            p.admit(&connect("a1", "wrong")),
            Err(ConnectReturnCode::BadUserNamePassword)
        );
        assert_eq!(
            p.admit(&connect("zz", &token)),
            Err(ConnectReturnCode::NotAuthorized)
        );
        assert_eq!(guard.counters().refused.load(Ordering::Relaxed), 2);
        let events = events.lock().unwrap();
        assert!(
            matches!(&events[1], BrokerEvent::Refused { code: 5, client_id, .. } if client_id == "zz")
        );
    }

    #[test]
    fn own_topics_pass_others_and_non_utf8_topics_end_the_connection() {
        let (guard, token, events) = guard();
        let mut p = admitted(&guard, &token);
        let mut ok = publish_bytes(b"fleet/a1/telemetry/metrics");
        assert!(matches!(
            p.read_mut(&mut ok, 1 << 20),
            Ok(Packet::Publish(..))
        ));
        // again: the cached topic
        let mut again = publish_bytes(b"fleet/a1/telemetry/metrics");
        assert!(p.read_mut(&mut again, 1 << 20).is_ok());
        let mut other = publish_bytes(b"fleet/a2/telemetry/metrics");
        assert!(p.read_mut(&mut other, 1 << 20).is_err());
        let mut p = admitted(&guard, &token);
        let mut bad = publish_bytes(b"fleet/a1/telemetry/\xff\xfe");
        assert!(p.read_mut(&mut bad, 1 << 20).is_err());
        assert_eq!(guard.counters().violations.load(Ordering::Relaxed), 2);
        let events = events.lock().unwrap();
        let reasons: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                BrokerEvent::Violation { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reasons.len(), 2, "{events:?}");
        assert!(reasons[1].contains("UTF-8"), "{reasons:?}");
    }

    #[test]
    fn a_third_takeover_reports_a_duplicate_identity_and_ends_are_told_apart() {
        let (guard, token, events) = guard();
        let mut connections: Vec<PolicyProtocol> =
            (0..4).map(|_| admitted(&guard, &token)).collect();
        assert_eq!(
            guard
                .counters()
                .duplicate_identities
                .load(Ordering::Relaxed),
            1
        );
        // the replaced connections end after their successor took over
        connections[0].ended("closed by the client");
        connections[3].ended("closed by the client");
        let events = events.lock().unwrap();
        let reasons: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                BrokerEvent::Disconnected { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            [
                "replaced by a newer connection with the same client id",
                "closed by the client"
            ]
        );
        // nobody is connected any more: nothing to drop
        assert!(!guard.dropping("a1", "credential revoked"));
    }

    /// Random PUBLISH bytes, damaged PUBLISHes and arbitrary bytes through the codec: no
    /// panic, and whatever passes is under the agent's own prefix.
    #[test]
    fn random_packets_never_pass_a_forbidden_topic() {
        let (guard, token, _events) = guard();
        let levels: [&[u8]; 12] = [
            b"fleet",
            b"a1",
            b"a2",
            b"groups",
            b"web",
            b"telemetry",
            b"jobs",
            b"+",
            b"#",
            b"$SYS",
            b"\xff",
            b"",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut passed = 0;
        for _ in 0..20_000 {
            let mut p = admitted(&guard, &token);
            let n = rng.random_range(1..=5);
            let mut topic: Vec<&[u8]> = (0..n)
                .map(|_| levels[rng.random_range(0..levels.len())])
                .collect();
            // half of them start near the agent's own topics, where allowed cases are
            if rng.random_bool(0.5) {
                topic.splice(0..0, [&b"fleet"[..], &b"a1"[..], &b"telemetry"[..]]);
            }
            let topic = topic.join(&b'/');
            let mut bytes = publish_bytes(&topic);
            match rng.random_range(0..10) {
                // damage a byte
                0 | 1 => {
                    let i = rng.random_range(0..bytes.len());
                    bytes[i] = rng.random();
                }
                // or anything at all
                2 => {
                    let n = rng.random_range(0..300);
                    bytes = (0..n).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()[..].into();
                }
                _ => {}
            }
            // every packet the codec hands on: a PUBLISH only on the agent's own topics,
            // a SUBSCRIBE only to filters it is granted
            while let Ok(packet) = p.read_mut(&mut bytes, 1 << 20) {
                match packet {
                    Packet::Publish(publish, _) => {
                        let topic = std::str::from_utf8(&publish.topic).unwrap();
                        assert!(covers("fleet/a1/#", topic), "{topic} passed");
                        passed += 1;
                    }
                    Packet::Subscribe(subscribe, _) => {
                        for f in &subscribe.filters {
                            let granted = covers("fleet/a1/#", &f.path)
                                || covers("fleet/groups/web/jobs/notify", &f.path);
                            assert!(granted, "{} passed", f.path);
                        }
                    }
                    _ => {}
                }
            }
        }
        assert!(passed > 10, "the generator reached too few allowed cases");
    }

    #[test]
    fn filters_are_checked_as_mqtt_3_1_1_writes_them() {
        for good in ["#", "+", "a/+/b", "a/#", "+/+", "$share/g/a/#", "a//b"] {
            assert!(super::valid_filter(good), "{good}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "a/+b"] {
            assert!(!super::valid_filter(bad), "{bad}");
        }
    }
}
