//! Connection policy, applied inside the broker's MQTT codec.
//!
//! rumqttd's `Server<P>` is generic over its `Protocol` trait; [`PolicyProtocol`] wraps the
//! MQTT v4 codec and sees every decoded packet of every connection, CONNECT first. Refusing
//! a packet here closes that connection without an extra network hop. Today the policy is
//! the broker's [`Gate`] (refuse everything while stopping); authentication and topic ACLs
//! plug in at the same place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, Error, Packet, Protocol};

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

/// rumqttd's MQTT v4 codec with fleetbus policy applied to every incoming packet.
#[derive(Debug, Clone)]
pub struct PolicyProtocol {
    inner: V4,
    gate: Arc<Gate>,
}

impl PolicyProtocol {
    /// A codec that refuses traffic once `gate` closes.
    pub fn new(gate: Arc<Gate>) -> Self {
        PolicyProtocol { inner: V4, gate }
    }
}

impl Protocol for PolicyProtocol {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let packet = self.inner.read_mut(stream, max_size)?;
        if !self.gate.is_open() {
            // the broker is stopping: this connection ends here, unacknowledged
            return Err(Error::InvalidProtocol);
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        self.inner.write(packet, write)
    }
}
