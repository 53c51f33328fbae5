//! The MQTT sink: republishes each message (its JSON) on a topic made from a template,
//! either into the server's own broker or to another broker (a bridge).
//!
//! - Without `url`: through the server's in-process broker link (no port, no credential).
//!   A message is published once the broker's router has taken it; subscribers get it at
//!   the QoS they subscribed with. The router's queue being full is retried.
//! - With `url` (`mqtt://`, `mqtts://`, `ws://`, `wss://`): one client connection of its
//!   own, made at the first write and made again after any failure. A batch is written
//!   when the broker has acknowledged every message of it (QoS 1) or when every message
//!   has been written to the connection (QoS 0). A batch that fails part-way is sent again
//!   whole on a new connection: at least once.
//!
//! A message larger than [`MAX_MESSAGE_BYTES`] (topic and payload) can never be published:
//! it goes to the dead letter before anything of its batch is sent.
//!
//! Republishing into the server's own broker can feed the rules again, so `rules check`
//! refuses a rule set in which a rule's messages can come back to it
//! ([`MqttSinkConfig::republished_filter`] and the rules' `from` filters); and such a
//! topic may not be in the fleet's own namespace (`fleet/...`, which agents and the server
//! speak) nor a `$` topic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetbus_config::Problems;
use fleetbus_mqtt::{BrokerUrl, ClientTransport, TlsFiles, MAX_PACKET_BYTES};
use fleetbus_protocol::Message;
use fleetbus_support::Publisher;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{BatchConfig, SinkPlace, SinkType};
use crate::secret::Secret;
use crate::template::PathTemplate;
use crate::{Batch, BoxFuture, Sink, SinkError};

/// The largest message (topic plus payload) the sink publishes: what every fleetbus MQTT
/// client and the embedded broker accept, less room for the packet's own header.
pub const MAX_MESSAGE_BYTES: usize = MAX_PACKET_BYTES - 64;

/// The first topic level of the fleet's own traffic (agents' records, jobs, acks, files).
const FLEET_ROOT: &str = "fleet";

/// `type = "mqtt"`: republish into the server's broker, or bridge to another one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// The topic of each message, a template as for file paths (`alerts/{agent}/{stream}`,
    /// `{topic.N}`, strftime): a substituted value never contains `/`, `+` or `#`.
    pub topic: String,
    /// The broker (`mqtt://`, `mqtts://`, `ws://`, `wss://`); unset: the server's own.
    #[serde(default)]
    pub url: Option<String>,
    /// 0 (at most once per attempt) or 1 (acknowledged by the broker). Used with `url`; the
    /// server's own broker hands each subscriber the QoS it subscribed with.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish as retained messages (the broker keeps the last one per topic).
    #[serde(default)]
    pub retain: bool,
    /// The MQTT user name (with `url`).
    #[serde(default)]
    pub username: Option<String>,
    /// The password, from the environment or a file (with `url`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// The client id at the broker (with `url`); default `fleetbus-sink-NAME`. Two servers
    /// bridging to one broker need different ids (the broker drops the older connection).
    #[serde(default)]
    pub client_id: Option<String>,
    /// CA certificates (PEM) for `mqtts://`/`wss://`, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long connecting and one batch may take (with `url`).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_qos() -> u8 {
    1
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl MqttSinkConfig {
    /// The topic filter every topic this sink can publish into its own server's broker
    /// matches (a placeholder's level is `+`; from a strftime field on, `#`), or None when
    /// it publishes elsewhere. The rules check compares it with the rules' `from` filters.
    pub fn republished_filter(&self) -> Option<String> {
        if self.url.is_some() {
            return None;
        }
        let mut levels = Vec::new();
        for level in self.topic.split('/') {
            if level.contains('%') {
                levels.push("#");
                break;
            }
            levels.push(if level.contains('{') { "+" } else { level });
        }
        Some(levels.join("/"))
    }

    fn check_topic(&self, p: &mut Problems) {
        if let Err(e) = PathTemplate::parse(&self.topic) {
            p.add("topic", e.to_string());
            return;
        }
        if self.topic.contains(['+', '#', '\0']) {
            p.add(
                "topic",
                format!("`{}`: `+`, `#` and NUL cannot be in a topic", self.topic),
            );
        }
        if self.topic.starts_with('$') {
            p.add(
                "topic",
                format!("`{}`: `$` topics are the broker's own", self.topic),
            );
        }
        if self.url.is_none() {
            let first = self.topic.split('/').next().unwrap_or_default();
            if first.contains(['{', '%']) {
                p.add(
                    "topic",
                    format!(
                        "`{}`: republished into the server's own broker, the topic's first level must be fixed text (so it cannot land in the fleet's own topics)",
                        self.topic
                    ),
                );
            } else if first == FLEET_ROOT {
                p.add(
                    "topic",
                    format!(
                        "`{}`: `{FLEET_ROOT}/...` is the fleet's own namespace (agents' records, jobs, acks); republish under another first level",
                        self.topic
                    ),
                );
            }
        }
    }

    fn broker_url(&self) -> Option<Result<BrokerUrl, String>> {
        self.url
            .as_deref()
            .map(|u| u.parse::<BrokerUrl>().map_err(|e| format!("`{u}`: {e}")))
    }
}

impl SinkType for MqttSinkConfig {
    fn default_batch(&self) -> BatchConfig {
        BatchConfig {
            max_events: 100,
            ..BatchConfig::default()
        }
    }

    fn check(&self, p: &mut Problems) {
        self.check_topic(p);
        p.require(self.qos <= 1, "qos", "must be 0 or 1");
        crate::http::check_timeout(self.timeout, p);
        match self.broker_url() {
            None => {
                for (key, set) in [
                    ("username", self.username.is_some()),
                    ("password", self.password.is_some()),
                    ("client_id", self.client_id.is_some()),
                    ("ca_file", self.ca_file.is_some()),
                ] {
                    p.require(
                        !set,
                        key,
                        "is for another broker (`url`); the server's own broker is reached in-process",
                    );
                }
            }
            Some(Err(e)) => p.add("url", e),
            Some(Ok(url)) => {
                p.require(
                    self.ca_file.is_none() || url.scheme.is_tls(),
                    "ca_file",
                    format!("is for mqtts:// or wss://, not `{url}`"),
                );
                crate::tls::check_ca_file(self.ca_file.as_deref(), p);
            }
        }
        if let Some(secret) = &self.password {
            p.require(self.username.is_some(), "password", "needs a `username`");
            if let Err(e) = secret.resolve() {
                p.add("password", e);
            }
        }
        if let Some(id) = &self.client_id {
            p.require(
                !id.is_empty() && id.len() <= 128,
                "client_id",
                "must be 1 to 128 bytes",
            );
        }
    }

    fn file_destination(&self, msg: &Message) -> Option<String> {
        let topic = PathTemplate::parse(&self.topic).ok()?.render(msg);
        Some(match &self.url {
            Some(url) => format!("{url} {topic}"),
            None => format!("topic {topic}"),
        })
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        let config_error = |e: String| SinkError::Config(format!("sink `{}`: {e}", place.name));
        let topic = PathTemplate::parse(&self.topic).map_err(|e| config_error(e.to_string()))?;
        let target = match self.broker_url() {
            None => Target::Own(OwnBroker {
                publisher: place.broker.clone(),
                progress: None,
            }),
            Some(url) => {
                let url = url.map_err(&config_error)?;
                let files = TlsFiles {
                    ca_file: self.ca_file.clone(),
                    ..TlsFiles::default()
                };
                let transport = ClientTransport::for_url(&url, &files, None)
                    .map_err(|e| config_error(e.to_string()))?;
                let password = match &self.password {
                    Some(secret) => Some(secret.resolve().map_err(&config_error)?),
                    None => None,
                };
                let qos = match self.qos {
                    0 => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                Target::Other(OtherBroker {
                    settings: Arc::new(Settings {
                        sink: place.name.to_string(),
                        transport,
                        client_id: self
                            .client_id
                            .clone()
                            .unwrap_or_else(|| format!("fleetbus-sink-{}", place.name)),
                        username: self.username.clone(),
                        password,
                        timeout: self.timeout,
                    }),
                    qos,
                    connection: None,
                })
            }
        };
        Ok(Box::new(MqttSink {
            topic,
            retain: self.retain,
            target,
        }))
    }
}

/// Publishes each batch's messages (see the module documentation).
pub struct MqttSink {
    topic: PathTemplate,
    retain: bool,
    target: Target,
}

enum Target {
    Own(OwnBroker),
    Other(OtherBroker),
}

/// The server's own broker, through its in-process link.
struct OwnBroker {
    publisher: Publisher,
    /// How many messages of the batch `(first, next, len)` are published already: a batch
    /// retried after the router's queue was full goes on where it stopped.
    progress: Option<((u64, u64, usize), usize)>,
}

/// Another broker, over a connection of the sink's own.
struct OtherBroker {
    settings: Arc<Settings>,
    qos: QoS,
    connection: Option<Connection>,
}

/// How to connect to another broker.
struct Settings {
    sink: String,
    transport: ClientTransport,
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    timeout: Duration,
}

/// A connected client: its handle, and what its event loop saw.
struct Connection {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

/// What the event loop reports to the writer.
enum Seen {
    Connected,
    /// A QoS 1 message acknowledged.
    Acked,
    /// A message written to the connection.
    Sent,
    /// The connection failed (the event loop has ended).
    Failed(String),
}

impl Connection {
    /// True when its event loop has reported a failure or ended (it reports nothing else
    /// between batches).
    fn has_failed(&self) -> bool {
        self.events.is_closed() || !self.events.is_empty()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Settings {
    /// Connects and waits for the broker's CONNACK, within the timeout.
    async fn connect(&self) -> Result<Connection, String> {
        let mut opts = fleetbus_mqtt::options(
            &self.transport,
            &self.client_id,
            Duration::from_secs(30),
            100,
        );
        if let Some(user) = &self.username {
            opts.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::Connected,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Seen::Acked,
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => Seen::Sent,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Seen::Failed(crate::error_chain(&e)));
                        return;
                    }
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        let mut connection = Connection {
            client,
            events,
            task,
        };
        let connected = tokio::time::timeout(self.timeout, async {
            match connection.events.recv().await {
                Some(Seen::Connected) => Ok(()),
                Some(Seen::Failed(e)) => Err(e),
                _ => Err("the connection ended before the broker answered".to_string()),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no CONNACK within {:?}", self.timeout)));
        connected.map(|_| connection)
    }

    /// The start-up check: can the broker be reached and does it accept the sink's
    /// credentials? A warning when not; never fails the start (the writes retry).
    async fn probe(self: Arc<Self>) {
        let url = self.transport.url().to_string();
        match self.connect().await {
            Ok(_) => tracing::info!(sink = %self.sink, %url, "mqtt sink: broker reachable"),
            Err(e) => {
                tracing::warn!(sink = %self.sink, %url, error = %e, "mqtt sink: broker not reachable at start; its messages wait in the log and every write retries")
            }
        }
    }
}

impl OtherBroker {
    /// Publishes `messages` and waits until each is acknowledged (QoS 1) or written (QoS 0).
    async fn publish(
        &mut self,
        messages: Vec<(String, Vec<u8>)>,
        retain: bool,
    ) -> Result<(), String> {
        // a connection the broker closed while idle is replaced at once, not after a
        // failed attempt (between batches its event loop reports nothing else)
        let alive = self.connection.take().filter(|c| !c.has_failed());
        let mut connection = match alive {
            Some(c) => c,
            None => self.settings.connect().await?,
        };
        let want = messages.len();
        let qos = self.qos;
        let sent = tokio::time::timeout(self.settings.timeout, async {
            // the event loop runs in its own task and reports into an unbounded channel
            // (at most two reports per message of the batch), so queueing never waits on
            // reading them
            for (topic, payload) in messages {
                if let Err(e) = connection.client.publish(topic, qos, retain, payload).await {
                    // the event loop has ended: its report says why
                    while let Ok(seen) = connection.events.try_recv() {
                        if let Seen::Failed(reason) = seen {
                            return Err(reason);
                        }
                    }
                    return Err(e.to_string());
                }
            }
            let mut done = 0;
            while done < want {
                match connection.events.recv().await {
                    Some(seen) => done += counts(seen, qos)?,
                    None => return Err("the connection ended".to_string()),
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "not every message acknowledged within {:?}",
                self.settings.timeout
            ))
        });
        if sent.is_ok() {
            self.connection = Some(connection);
        }
        sent
    }
}

/// How many messages `seen` settles at `qos`: an acknowledgement (QoS 1) or a write (QoS
/// 0) one; a failed connection is the error.
fn counts(seen: Seen, qos: QoS) -> Result<usize, String> {
    match (seen, qos) {
        (Seen::Acked, QoS::AtLeastOnce) | (Seen::Sent, QoS::AtMostOnce) => Ok(1),
        (Seen::Failed(e), _) => Err(e),
        _ => Ok(0),
    }
}

impl MqttSink {
    /// Topic and payload of every message, or the positions of those too large to publish.
    fn messages(&self, batch: &Batch) -> Result<Vec<(String, Vec<u8>)>, SinkError> {
        let mut messages = Vec::with_capacity(batch.items.len());
        let mut too_large = Vec::new();
        for (n, item) in batch.items.iter().enumerate() {
            let topic = self.topic.render(item.message()?);
            let mut payload = Vec::new();
            crate::json_line(item, &mut payload)?;
            payload.pop(); // the line's newline
            if topic.len() + payload.len() > MAX_MESSAGE_BYTES {
                too_large.push(n);
            }
            messages.push((topic, payload));
        }
        match too_large.is_empty() {
            true => Ok(messages),
            false => Err(SinkError::Refused(format!(
                "larger than an MQTT message may be ({MAX_MESSAGE_BYTES} bytes of topic and payload)"
            ))
            .for_items(too_large)),
        }
    }
}

impl Sink for MqttSink {
    fn writes_json(&self) -> bool {
        true
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        if let Target::Other(other) = &self.target {
            // beside the start, not before it
            tokio::spawn(other.settings.clone().probe());
        }
        Box::pin(async move { Ok(saved) })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let messages = self.messages(batch)?;
            let retain = self.retain;
            match &mut self.target {
                Target::Own(own) => {
                    let key = (batch.first, batch.next, batch.items.len());
                    let start = match own.progress {
                        Some((k, done)) if k == key => done,
                        _ => 0,
                    };
                    for (n, (topic, payload)) in messages.into_iter().enumerate().skip(start) {
                        if let Err(e) = own.publisher.publish_retained(topic, payload, retain) {
                            own.progress = Some((key, n));
                            return Err(SinkError::Remote(format!(
                                "the server's broker did not take the message: {e}"
                            )));
                        }
                    }
                    own.progress = None;
                    Ok(())
                }
                Target::Other(other) => other.publish(messages, retain).await.map_err(|e| {
                    SinkError::Remote(format!("{}: {e}", other.settings.transport.url()))
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests;
