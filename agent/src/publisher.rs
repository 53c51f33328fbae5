//! The agent's one outbound connection: connects with backoff, announces presence,
//! publishes the outbox in order at QoS 1, and removes records from the outbox only when
//! the server acknowledges them end to end (on `fleet/{agent}/acks`, once they are in the
//! server's write-ahead log). A record whose acknowledgement does not come within
//! `ack_timeout` is sent again (the server recognises duplicates).
//!
//! Every connection attempt builds a fresh rumqttc client and event loop: nothing is carried
//! over in rumqttc's memory (its queue silently drops publishes on a clean-session
//! reconnect). After a reconnect the outbox is published again from its oldest
//! unacknowledged record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbus_mqtt::{Backoff, ClientTransport};
use fleetbus_protocol::{topics, Ack, Presence};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, Packet, QoS,
};
use tokio::sync::{mpsc, watch};

use crate::config::{ConnectionConfig, UploadsConfig};
use crate::outbox::Outbox;
use crate::uploads::transfer::FileSender;
use crate::uploads::UploadQueue;

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
    pub server: ClientTransport,
    /// Connection tunables.
    pub connection: ConnectionConfig,
    /// The token to log in with (MQTT password; the agent id is the user name).
    pub token: Option<String>,
    /// The outbox to publish from.
    pub outbox: Arc<Outbox>,
    /// Builds the birth message for each new connection.
    pub birth: Arc<dyn Fn() -> Presence + Send + Sync>,
    /// Changes when what the birth message says changed (the cloud identity): it is
    /// published again on the open connection.
    pub birth_changed: watch::Receiver<u64>,
    /// Files to upload over the same connection.
    pub uploads: Arc<UploadQueue>,
    /// Upload tunables.
    pub uploads_config: UploadsConfig,
    /// Runs the jobs that arrive over the connection.
    pub jobs: crate::job_runner::JobRunner,
    /// The runner's status reports, published while connected.
    pub job_reports: tokio::sync::Mutex<mpsc::Receiver<fleetbus_protocol::JobStatus>>,
}

type Events = mpsc::Receiver<Result<Event, ConnectionError>>;

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
                    tracing::warn!(server = %self.server.url(), %reason, retry_in = ?delay, "connection to server failed");
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
        let mut birth_changed = self.birth_changed.clone();
        birth_changed.mark_unchanged();
        let birth = (self.birth)();
        let will = Presence::offline(&self.agent, birth.ts);
        let mut options = fleetbus_mqtt::options(
            &self.server,
            &self.agent,
            self.connection.keepalive,
            self.connection.inflight,
        );
        if let Some(token) = self.current_token() {
            options.set_credentials(self.agent.clone(), token);
        }
        if let Some(payload) = encoded(&will) {
            // not retained: the broker keeps no stale presence for operators to see
            options.set_last_will(LastWill::new(
                topics::presence(&self.agent),
                payload,
                QoS::AtLeastOnce,
                false,
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, window + 16);
        let (events_tx, mut events) = mpsc::channel(4096);
        let poller = tokio::spawn(poll_events(eventloop, events_tx));
        let end = self
            .serve(
                &client,
                &mut events,
                shutdown,
                birth,
                &mut birth_changed,
                window,
            )
            .await;
        poller.abort();
        end
    }

    /// The token for this connection attempt. `connection.token_file` is read again each
    /// time, so a token replaced by `fleetbus agents enroll --replace` (the old one is
    /// refused from then on) is used at the next attempt without a restart; if the file
    /// cannot be read now, the token read at start is used.
    fn current_token(&self) -> Option<String> {
        if self.connection.token.is_some() || self.connection.token_file.is_none() {
            return self.token.clone();
        }
        match self.connection.load_token() {
            Ok(Some(token)) => {
                if self.token.as_ref() != Some(&token) {
                    tracing::debug!(agent = %self.agent, "connection.token_file holds a newer token than at start: using it");
                }
                Some(token)
            }
            Ok(None) => self.token.clone(),
            Err(e) => {
                tracing::warn!(agent = %self.agent, error = %e, "token file unreadable: the token read at start is used");
                self.token.clone()
            }
        }
    }

    async fn serve(
        &self,
        client: &AsyncClient,
        events: &mut Events,
        shutdown: &mut watch::Receiver<bool>,
        birth: Presence,
        birth_changed: &mut watch::Receiver<u64>,
        window: usize,
    ) -> SessionEnd {
        // 1. be accepted, and subscribed to our acknowledgements and replies before sending
        //    anything
        let acks_topic = topics::acks(&self.agent);
        let mut files = FileSender::new(
            &self.agent,
            self.uploads.clone(),
            self.uploads_config.clone(),
        );
        let replies_topic = files.replies_topic();
        let job_topics = self.jobs.notify_topics();
        let mut filters = vec![
            rumqttc::SubscribeFilter::new(acks_topic.clone(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(replies_topic.clone(), QoS::AtLeastOnce),
        ];
        filters.extend(
            job_topics
                .iter()
                .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
        );
        let mut job_reports = self.job_reports.lock().await;
        let status_topic = fleetbus_protocol::jobs::status(&self.agent);
        // a report the client could not take yet
        let mut unsent_report: Option<Vec<u8>> = None;
        if let Err(reason) = client.try_subscribe_many(filters) {
            return SessionEnd::Failed {
                reason: format!("cannot subscribe: {reason}"),
                connected: false,
            };
        }
        let ready = tokio::time::timeout(self.connection.connect_timeout, async {
            loop {
                match events.recv().await {
                    Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            return Err(format!(
                                "the broker refused one of our subscriptions ({acks_topic}, {replies_topic}, job topics)"
                            ));
                        }
                        return Ok(());
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(describe(&e)),
                    None => return Err("connection task ended".to_string()),
                }
            }
        });
        let outcome = tokio::select! {
            r = ready => r,
            _ = crate::stopped(shutdown) => return SessionEnd::Shutdown,
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return SessionEnd::Failed {
                    reason,
                    connected: false,
                }
            }
            Err(_) => {
                return SessionEnd::Failed {
                    reason: format!(
                        "not connected and subscribed within {:?}",
                        self.connection.connect_timeout
                    ),
                    connected: false,
                }
            }
        }
        tracing::info!(server = %self.server.url(), agent = %self.agent, "connected");

        // 2. announce ourselves, and report losses the operator must know about
        if let Some(payload) = encoded(&birth) {
            let _ = client.try_publish(
                topics::presence(&self.agent),
                QoS::AtLeastOnce,
                false,
                payload,
            );
        }
        if let Err(e) = self.outbox.report_drops() {
            tracing::error!(error = %e, "could not store the outbox overflow report");
        }

        // 3. publish the outbox from its oldest unacknowledged record on; acknowledgements
        //    remove records; silence for `ack_timeout` means: send the unacknowledged again
        let mut cursor = self.outbox.head();
        let mut last_progress = Instant::now();
        let mut housekeeping = tokio::time::interval(Duration::from_millis(50));
        let mut last_queue_scan = Instant::now();
        // 4. uploads go over the same connection, a window of chunks at a time
        files.on_connected(client);
        let mut birth_live = true;
        loop {
            let head = self.outbox.head();
            let unacked = cursor.saturating_sub(head) as usize;
            if unacked < window {
                match self.outbox.read_from(cursor, window - unacked) {
                    Ok(items) => {
                        for item in items {
                            let index = item.index;
                            if client
                                .try_publish(item.topic, QoS::AtLeastOnce, false, item.payload)
                                .is_err()
                            {
                                break;
                            }
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
            let busy = cursor.saturating_sub(self.outbox.head()) as usize >= window;
            let wake = files.wake_at();
            let wants_chunk = files.wants_chunk();
            let idle = files.idle();
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == acks_topic => {
                        if self.apply_ack(&p.payload) > 0 {
                            last_progress = Instant::now();
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == replies_topic => {
                        files.on_reply(&p.payload, client);
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) if job_topics.contains(&p.topic) => {
                        self.jobs.on_command(&p.payload);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Failed { reason: describe(&e), connected: true },
                    None => return SessionEnd::Failed { reason: "connection task ended".into(), connected: true },
                },
                _ = self.outbox.durable_notified(), if !busy => {}
                prepared = files.next_chunk(), if wants_chunk => files.on_prepared(prepared, client),
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                    files.on_timer(client);
                }
                _ = self.uploads.changed(), if idle => files.start_next(client),
                report = job_reports.recv(), if unsent_report.is_none() => {
                    if let Some(payload) = report.and_then(|r| r.encode().ok()) {
                        unsent_report = publish_report(client, &status_topic, payload);
                    }
                }
                _ = housekeeping.tick() => {
                    if let Some(payload) = unsent_report.take() {
                        unsent_report = publish_report(client, &status_topic, payload);
                    }
                    if files.idle() && last_queue_scan.elapsed() >= Duration::from_secs(1) {
                        // jobs other processes dropped into the queue directory
                        last_queue_scan = Instant::now();
                        files.start_next(client);
                    }
                    if let Err(e) = self.outbox.maintain() {
                        tracing::error!(error = %e, "outbox housekeeping failed");
                    }
                    let head = self.outbox.head();
                    if cursor > head && last_progress.elapsed() >= self.connection.ack_timeout {
                        tracing::info!(unacknowledged = cursor - head, timeout = ?self.connection.ack_timeout, "no acknowledgement from the server: sending unacknowledged records again");
                        cursor = head;
                        last_progress = Instant::now();
                    } else if cursor <= head {
                        last_progress = Instant::now();
                    }
                }
                changed = birth_changed.changed(), if birth_live => {
                    if changed.is_ok() {
                        if let Some(payload) = encoded(&(self.birth)()) {
                            tracing::info!("what the birth message says changed: publishing it again");
                            let _ = client.try_publish(topics::presence(&self.agent), QoS::AtLeastOnce, false, payload);
                        }
                    } else {
                        birth_live = false; // its sender is gone: nothing changes any more
                    }
                }
                _ = crate::stopped(shutdown) => {
                    self.goodbye(client, events, cursor, &acks_topic).await;
                    return SessionEnd::Shutdown;
                }
            }
        }
    }

    /// Applies one acknowledgement message; returns how many records it removed. An
    /// acknowledgement from another store than `connection.store` removes nothing: that
    /// store holding a record says nothing about ours.
    fn apply_ack(&self, payload: &[u8]) -> usize {
        match Ack::decode(payload) {
            Ok(ack) if ack.store != self.connection.store => {
                tracing::debug!(store = %ack.store, ours = %self.connection.store, "acknowledgement of another store ignored");
                0
            }
            Ok(ack) => ack
                .streams
                .iter()
                .map(|(stream, sa)| self.outbox.ack_ranges(stream, sa.epoch, &sa.ranges))
                .sum(),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable acknowledgement ignored");
                0
            }
        }
    }

    /// On shutdown: wait briefly for the acknowledgements of what was sent, say we are
    /// going offline, disconnect cleanly.
    async fn goodbye(
        &self,
        client: &AsyncClient,
        events: &mut Events,
        cursor: u64,
        acks_topic: &str,
    ) {
        let drain = async {
            while self.outbox.head() < cursor {
                match events.recv().await {
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == acks_topic => {
                        self.apply_ack(&p.payload);
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        let offline = Presence::offline(&self.agent, chrono::Utc::now());
        if let Some(payload) = encoded(&offline) {
            let _ = client.try_publish(
                topics::presence(&self.agent),
                QoS::AtLeastOnce,
                false,
                payload,
            );
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            while let Some(Ok(_)) = events.recv().await {}
        })
        .await;
    }
}

/// Hands a job status report to the client; gives it back when the client's queue is full.
fn publish_report(client: &AsyncClient, topic: &str, payload: Vec<u8>) -> Option<Vec<u8>> {
    match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
        Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p))) => {
            Some(p.payload.to_vec())
        }
        _ => None,
    }
}

/// Drives rumqttc's event loop (nothing happens unless `poll` keeps being called) and hands
/// over the events the session acts on; stops at the first connection error. Outgoing
/// packets, PUBACKs and ping responses are dropped here: delivery is decided by the
/// server's end-to-end acknowledgements, and passing two events per record to the session
/// would cost more than the publishing itself.
async fn poll_events(mut eventloop: EventLoop, tx: mpsc::Sender<Result<Event, ConnectionError>>) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if matches!(
            event,
            Ok(Event::Outgoing(_))
                | Ok(Event::Incoming(Packet::PubAck(_)))
                | Ok(Event::Incoming(Packet::PingResp))
        ) {
            continue;
        }
        if tx.send(event).await.is_err() || failed {
            return;
        }
    }
}

/// A log-friendly reason for a connection error.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => {
                    "bad credentials: no token, or not this agent's token (connection.token_file)"
                }
                ConnectReturnCode::NotAuthorized => {
                    "not authorized: this agent id is not enrolled or was revoked (fleetbus agents enroll)"
                }
                ConnectReturnCode::BadClientId => "client id rejected",
                _ => "",
            };
            format!("broker refused the connection: {code:?} {why}")
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
