//! The agent's one outbound connection: connects with backoff, announces presence, publishes
//! the outbox in order at QoS 1, and acknowledges outbox records on the broker's PUBACK.
//!
//! Every connection attempt builds a fresh rumqttc client and event loop: nothing is carried
//! over in rumqttc's memory (its queue silently drops publishes on a clean-session
//! reconnect). After a reconnect the outbox is published again from its oldest
//! unacknowledged record.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fleetbus_mqtt::{Backoff, BrokerUrl};
use fleetbus_protocol::{topics, Presence};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::config::ConnectionConfig;
use crate::outbox::Outbox;

/// Why a session ended.
enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The connection failed or dropped; `connected` tells whether it had been up.
    Failed { reason: String, connected: bool },
}

/// What the publisher needs to run.
pub struct Publisher {
    /// The agent's id (also its MQTT client id).
    pub agent: String,
    /// Where to connect.
    pub server: BrokerUrl,
    /// Connection tunables.
    pub connection: ConnectionConfig,
    /// The outbox to publish from.
    pub outbox: Arc<Outbox>,
    /// Builds the birth message for each new connection.
    pub birth: Arc<dyn Fn() -> Presence + Send + Sync>,
}

impl Publisher {
    /// Connects, publishes and reconnects until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.connection.backoff_min, self.connection.backoff_max);
        loop {
            match self.session(&mut shutdown).await {
                SessionEnd::Shutdown => return,
                SessionEnd::Failed { reason, connected } => {
                    if connected {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(server = %self.server, %reason, retry_in = ?delay, "connection to server failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = crate::stopped(&mut shutdown) => return,
                    }
                }
            }
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> SessionEnd {
        let stopping = *shutdown.borrow();
        if stopping {
            return SessionEnd::Shutdown;
        }
        let window = self.connection.inflight as usize;
        let birth = (self.birth)();
        let will = Presence::offline(&self.agent, birth.ts);
        let mut options = fleetbus_mqtt::options(
            &self.server,
            &self.agent,
            self.connection.keepalive,
            // rumqttc cycles packet ids modulo its inflight limit: twice our window keeps a
            // reused id from meeting one still unacknowledged
            (window * 2).min(u16::MAX as usize) as u16,
        );
        if let Some(payload) = encoded(&will) {
            options.set_last_will(LastWill::new(
                topics::presence(&self.agent),
                payload,
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, window + 16);
        let (events_tx, mut events) = mpsc::channel(1024);
        let poller = tokio::spawn(poll_events(eventloop, events_tx));
        let end = self
            .serve(&client, &mut events, shutdown, birth, window)
            .await;
        poller.abort();
        end
    }

    async fn serve(
        &self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
        shutdown: &mut watch::Receiver<bool>,
        birth: Presence,
        window: usize,
    ) -> SessionEnd {
        // 1. wait for the broker to accept us
        let connack = tokio::time::timeout(self.connection.connect_timeout, async {
            loop {
                match events.recv().await {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(describe(&e)),
                    None => return Err("connection task ended".to_string()),
                }
            }
        });
        let connected = tokio::select! {
            r = connack => r,
            _ = crate::stopped(shutdown) => return SessionEnd::Shutdown,
        };
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return SessionEnd::Failed {
                    reason,
                    connected: false,
                }
            }
            Err(_) => {
                return SessionEnd::Failed {
                    reason: format!("no CONNACK within {:?}", self.connection.connect_timeout),
                    connected: false,
                }
            }
        }
        tracing::info!(server = %self.server, agent = %self.agent, "connected");

        // 2. announce ourselves, and report losses the operator must know about
        // packet ids of our publishes arrive in the order we sent them; None = not an outbox record
        let mut unassigned: VecDeque<Option<u64>> = VecDeque::new();
        let mut inflight: HashMap<u16, Option<u64>> = HashMap::new();
        if let Some(payload) = encoded(&birth) {
            if client
                .try_publish(
                    topics::presence(&self.agent),
                    QoS::AtLeastOnce,
                    true,
                    payload,
                )
                .is_ok()
            {
                unassigned.push_back(None);
            }
        }
        if let Err(e) = self.outbox.report_drops() {
            tracing::error!(error = %e, "could not store the outbox overflow report");
        }

        // 3. publish the outbox from its oldest unacknowledged record on
        let mut cursor = self.outbox.head();
        let mut housekeeping = tokio::time::interval(Duration::from_millis(50));
        loop {
            let busy = unassigned.len() + inflight.len();
            if busy < window {
                match self.outbox.read_from(cursor, window - busy) {
                    Ok(items) => {
                        for item in items {
                            let index = item.index;
                            if client
                                .try_publish(item.topic, QoS::AtLeastOnce, false, item.payload)
                                .is_err()
                            {
                                break;
                            }
                            unassigned.push_back(Some(index));
                            cursor = index + 1;
                        }
                    }
                    Err(e) => {
                        return SessionEnd::Failed {
                            reason: format!("cannot read the outbox: {e}"),
                            connected: true,
                        }
                    }
                }
            }
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(slot) = unassigned.pop_front() {
                            inflight.insert(pkid, slot);
                        }
                    }
                    Some(Ok(Event::Outgoing(Outgoing::AwaitAck(pkid)))) => {
                        // the broker acknowledges out of order and a packet id collided:
                        // start over rather than risk acknowledging the wrong record
                        return SessionEnd::Failed { reason: format!("packet id {pkid} collision"), connected: true };
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(Some(index)) = inflight.remove(&ack.pkid) {
                            self.outbox.ack(index);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed { reason: describe(&e), connected: true },
                    None => return SessionEnd::Failed { reason: "connection task ended".into(), connected: true },
                },
                _ = self.outbox.notified(), if busy < window => {}
                _ = housekeeping.tick() => {
                    if let Err(e) = self.outbox.maintain() {
                        tracing::error!(error = %e, "outbox housekeeping failed");
                    }
                }
                _ = crate::stopped(shutdown) => {
                    self.goodbye(client, events, &mut inflight, &mut unassigned).await;
                    return SessionEnd::Shutdown;
                }
            }
        }
    }

    /// On shutdown: wait briefly for outstanding acknowledgements, say we are going offline,
    /// disconnect cleanly.
    async fn goodbye(
        &self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
        inflight: &mut HashMap<u16, Option<u64>>,
        unassigned: &mut VecDeque<Option<u64>>,
    ) {
        let offline = Presence::offline(&self.agent, chrono::Utc::now());
        if let Some(payload) = encoded(&offline) {
            if client
                .try_publish(
                    topics::presence(&self.agent),
                    QoS::AtLeastOnce,
                    true,
                    payload,
                )
                .is_ok()
            {
                unassigned.push_back(None);
            }
        }
        let drain = async {
            while !(inflight.is_empty() && unassigned.is_empty()) {
                match events.recv().await {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(slot) = unassigned.pop_front() {
                            inflight.insert(pkid, slot);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(Some(index)) = inflight.remove(&ack.pkid) {
                            self.outbox.ack(index);
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    }
}

/// Drives rumqttc's event loop (nothing happens unless `poll` keeps being called) and hands
/// events over; stops at the first connection error.
async fn poll_events(mut eventloop: EventLoop, tx: mpsc::Sender<Result<Event, ConnectionError>>) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if tx.send(event).await.is_err() || failed {
            return;
        }
    }
}

/// A log-friendly reason for a connection error.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?}")
        }
        ConnectionError::Io(io) => format!("network error: {io}"),
        other => other.to_string(),
    }
}

/// A presence message's encoding; presence is best effort, so a failure is logged and the
/// message skipped.
fn encoded(presence: &Presence) -> Option<Vec<u8>> {
    presence
        .encode()
        .map_err(|e| tracing::error!(error = %e, "presence message not sent"))
        .ok()
}
