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
use crate::guard::{Admitted, Guard};

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
    /// and over: the policy is asked once per change of topic).
    last_allowed: Vec<u8>,
}

/// rumqttd's MQTT v4 codec with fleetbus policy applied to every incoming packet.
#[derive(Clone)]
pub struct PolicyProtocol {
    inner: V4,
    gate: Arc<Gate>,
    guard: Arc<Guard>,
    peer: Option<SocketAddr>,
    session: Option<Session>,
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
        }
    }

    /// Checks one PUBLISH topic or SUBSCRIBE filter of this connection.
    fn authorize(&mut self, action: Action, topic: &[u8]) -> Result<(), Error> {
        let Some(session) = &mut self.session else {
            // nothing before CONNECT is admitted
            return Err(Error::InvalidProtocol);
        };
        let Some(grants) = &session.admitted.grants else {
            return Ok(()); // the policy is not enforced
        };
        if action == Action::Publish && topic == session.last_allowed.as_slice() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(topic);
        if grants.allows(action, &text).is_some() {
            if action == Action::Publish {
                session.last_allowed.clear();
                session.last_allowed.extend_from_slice(topic);
            }
            return Ok(());
        }
        let reason = grants.decide(action, &text).reason;
        self.guard
            .violation(&session.client_id, self.peer, action, &text, reason);
        Err(Error::InvalidProtocol)
    }
}

impl Protocol for PolicyProtocol {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let packet = self.inner.read_mut(stream, max_size)?;
        if !self.gate.is_open() {
            // the broker is stopping: this connection ends here, unacknowledged
            return Err(Error::InvalidProtocol);
        }
        if self.guard.enforcing() {
            match &packet {
                Packet::Publish(publish, _) => self.authorize(Action::Publish, &publish.topic)?,
                Packet::Subscribe(subscribe, _) => {
                    for filter in &subscribe.filters {
                        self.authorize(Action::Subscribe, filter.path.as_bytes())?;
                    }
                }
                _ => {}
            }
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        self.inner.write(packet, write)
    }

    fn accepted(&mut self, peer: SocketAddr) {
        self.peer = Some(peer);
    }

    fn admit(&mut self, connect: &Packet) -> Result<(), ConnectReturnCode> {
        let Packet::Connect(connect, _, _, _, login) = connect else {
            return Err(ConnectReturnCode::ProtocolError);
        };
        let admitted = self.guard.admit(
            self.peer,
            &connect.client_id,
            login.as_ref().map(|l| l.username.as_str()),
            login.as_ref().map(|l| l.password.as_bytes()),
        )?;
        self.session = Some(Session {
            client_id: connect.client_id.clone(),
            admitted,
            last_allowed: Vec::new(),
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
