//! The broker's configuration: our keys, our defaults, validated before rumqttd sees them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleetbus_config::{Check, Problems};
use serde::{Deserialize, Serialize};

/// Smallest payload limit accepted: a 128 KiB file chunk plus room for topic and headers.
pub const MIN_PAYLOAD_BYTES: usize = 128 * 1024 + 4 * 1024;

/// `[broker]` in the server configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Address of the MQTT (TCP) listener.
    pub listen: SocketAddr,
    /// Most simultaneous connections (agents + server clients).
    pub max_connections: usize,
    /// Largest accepted publish payload in bytes (at least 128 KiB + 4 KiB).
    pub max_payload_bytes: usize,
    /// Most unacknowledged QoS 1 messages in flight to one subscriber.
    pub max_inflight: usize,
    /// How long a new connection may take to send CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bytes of one in-memory log segment per topic filter in the router.
    pub segment_bytes: usize,
    /// Segments kept per filter: a subscriber further behind than
    /// `segment_bytes * (segment_count - 1)` may lose the oldest messages. The router
    /// keeps this much of the latest traffic in memory whether or not anyone is behind,
    /// so it is most of the server's memory under load. Agents send again what is lost
    /// (records on a missing acknowledgement, file chunks when told or after
    /// `uploads.reply_timeout`).
    pub segment_count: usize,
    /// Authentication and topic authorization.
    pub security: SecurityConfig,
    /// TLS listeners (MQTT over TLS, MQTT over WebSocket over TLS).
    pub tls: TlsConfig,
    /// What one credential or one client may hold (connections, enrollments, topics).
    pub limits: LimitsConfig,
}

/// `[broker.limits]`: bounds on what one credential or one client can take from everyone
/// else. Each bound that is hit is counted (`fleetbus_broker_limited_total{limit=...}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Live connections logged in with bootstrap credentials, all of them together
    /// (enrollment takes one short exchange per new machine).
    pub bootstrap_connections: usize,
    /// A bootstrap connection is dropped after this long (an enrollment takes a second).
    #[serde(with = "humantime_serde")]
    pub bootstrap_lifetime: Duration,
    /// Enrollments one bootstrap credential may make per minute (a burst of as many is
    /// allowed after a quiet minute); requests beyond are refused, the agent asks again.
    pub enrollments_per_minute: u32,
    /// Live connections one `server` or `operator` credential may hold.
    pub connections_per_credential: usize,
    /// Connection slots (of `max_connections`) that only enrolled agents may take: other
    /// logins (bootstrap, operator, server) are refused once the rest is in use. Unset: a
    /// tenth of `max_connections`.
    pub reserved_for_agents: Option<usize>,
    /// Bytes of retained messages the broker keeps (outside `fleet/`, where only the
    /// server may retain): a retained publish beyond is a violation.
    pub retained_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            bootstrap_connections: 32,
            bootstrap_lifetime: Duration::from_secs(60),
            enrollments_per_minute: 120,
            connections_per_credential: 16,
            reserved_for_agents: None,
            retained_bytes: 16 * 1024 * 1024,
        }
    }
}

impl LimitsConfig {
    /// The slots kept for agents out of `max_connections`.
    pub fn agent_slots(&self, max_connections: usize) -> usize {
        self.reserved_for_agents.unwrap_or(max_connections / 10)
    }
}

/// `[broker.tls]`: encrypted listeners beside the plain one. Each is opened when its
/// address is set; both need `cert` and `key`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// MQTT over TLS (`mqtts://`), e.g. `0.0.0.0:8883`.
    pub listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (`wss://`), e.g. `0.0.0.0:443`: the one outbound port
    /// most firewalls and proxies let through.
    pub websocket_listen: Option<SocketAddr>,
    /// The server's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to: set, every TLS client must
    /// present one (mutual TLS); unset, none is asked for.
    pub client_ca: Option<PathBuf>,
}

/// `[broker.security]`: who may connect and what each client may publish and subscribe to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Authenticate every client against the credential store (`fleetbus agents enroll`)
    /// and enforce the topic policy on every PUBLISH and SUBSCRIBE. Off by default, so
    /// that the demo runs with no set-up: turn it on for any broker others can reach.
    pub enforce: bool,
    /// A policy file (`[[rule]]` tables, see docs/security.md); the built-in policy when
    /// unset.
    pub policy: Option<PathBuf>,
    /// Allow listeners on addresses other than loopback while `enforce` is off (anyone who
    /// reaches them may publish and subscribe as anyone). Off: such a configuration is
    /// refused at start.
    pub allow_insecure: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 10_000,
            max_payload_bytes: 256 * 1024,
            max_inflight: 1_000,
            connect_timeout: Duration::from_secs(10),
            segment_bytes: 2 * 1024 * 1024,
            segment_count: 5,
            security: SecurityConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// Refuses every value rumqttd would accept but misbehave with (keys relative to
/// `[broker]`).
impl Check for BrokerConfig {
    fn check(&self, p: &mut Problems) {
        if self.max_connections == 0 {
            p.add(
                "max_connections",
                "must be at least 1 (0 refuses every client)",
            );
        }
        if self.max_payload_bytes < MIN_PAYLOAD_BYTES {
            p.add(
                "max_payload_bytes",
                format!(
                    "{} is below {MIN_PAYLOAD_BYTES} (a 128 KiB file chunk plus topic and headers)",
                    self.max_payload_bytes
                ),
            );
        }
        if self.max_inflight == 0 || self.max_inflight > u16::MAX as usize {
            p.add("max_inflight", "must be between 1 and 65535");
        }
        let timeout_ms = self.connect_timeout.as_millis();
        if timeout_ms == 0 || timeout_ms > u16::MAX as u128 {
            p.add("connect_timeout", "must be between 1ms and 65s");
        }
        if self.segment_bytes < self.max_payload_bytes.max(1024 * 1024) {
            p.add(
                "segment_bytes",
                "must be at least 1 MiB and at least max_payload_bytes",
            );
        }
        if self.segment_count < 2 {
            p.add("segment_count", "must be at least 2");
        }
        let limits = &self.limits;
        if limits.agent_slots(self.max_connections) >= self.max_connections {
            p.add(
                "limits.reserved_for_agents",
                "must be below max_connections (other logins need a slot too)",
            );
        }
        if limits.bootstrap_lifetime < Duration::from_secs(1) {
            p.add("limits.bootstrap_lifetime", "must be at least 1s");
        }
        if limits.connections_per_credential == 0 {
            p.add("limits.connections_per_credential", "must be at least 1");
        }
        let tls = &self.tls;
        let listening = tls.listen.is_some() || tls.websocket_listen.is_some();
        if listening && (tls.cert.is_none() || tls.key.is_none()) {
            p.add(
                "tls",
                "tls.listen and tls.websocket_listen need tls.cert and tls.key",
            );
        }
        let addresses = [Some(self.listen), tls.listen, tls.websocket_listen];
        let security = &self.security;
        if !security.enforce && !security.allow_insecure {
            if let Some(open) = addresses.iter().flatten().find(|a| !a.ip().is_loopback()) {
                p.add(
                    "security",
                    format!(
                        "{open} is reachable beyond this machine but security.enforce is off: \
                         anyone could publish and subscribe as anyone. Set \
                         [broker.security] enforce = true (docs/security.md), listen on \
                         127.0.0.1, or say security.allow_insecure = true"
                    ),
                );
            }
        }
        let mut taken: Vec<SocketAddr> = addresses.into_iter().flatten().collect();
        taken.sort();
        if taken.windows(2).any(|w| w[0] == w[1]) {
            p.add(
                "tls",
                "listen, tls.listen and tls.websocket_listen must be different addresses",
            );
        }
    }
}

impl BrokerConfig {
    pub(crate) fn router_config(&self) -> rumqttd::RouterConfig {
        rumqttd::RouterConfig {
            max_connections: self.max_connections,
            max_outgoing_packet_count: 1_000,
            max_segment_size: self.segment_bytes,
            max_segment_count: self.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        }
    }

    pub(crate) fn server_settings(&self) -> rumqttd::ServerSettings {
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: self.connect_timeout.as_millis() as u16,
            max_payload_size: self.max_payload_bytes,
            max_inflight_count: self.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        };
        rumqttd::ServerSettings {
            name: "fleetbus-v4".to_string(),
            listen: self.listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first problem `c` has.
    fn first_problem(c: &BrokerConfig) -> fleetbus_config::Problem {
        fleetbus_config::problems_of(c).remove(0)
    }

    fn valid(c: &BrokerConfig) {
        let problems = fleetbus_config::problems_of(c);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn defaults_are_valid() {
        valid(&BrokerConfig::default());
    }

    #[test]
    fn open_listeners_need_security_or_an_explicit_insecure() {
        let mut c = BrokerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            ..Default::default()
        };
        let e = first_problem(&c);
        assert_eq!(e.key, "security");
        assert!(e.message.contains("0.0.0.0:1883"), "{e}");
        c.security.allow_insecure = true;
        valid(&c);
        c.security.allow_insecure = false;
        c.security.enforce = true;
        valid(&c);
        c.security.enforce = false;
        c.listen = SocketAddr::from(([127, 0, 0, 1], 1883));
        c.tls.websocket_listen = Some(SocketAddr::from(([10, 0, 0, 1], 443)));
        c.tls.cert = Some("c.pem".into());
        c.tls.key = Some("k.pem".into());
        assert_eq!(first_problem(&c).key, "security");
    }

    #[test]
    fn rumqttd_traps_are_refused() {
        let mut c = BrokerConfig {
            max_connections: 0,
            ..Default::default()
        };
        assert_eq!(first_problem(&c).key, "max_connections");
        c.max_connections = 10;
        c.limits.reserved_for_agents = Some(10);
        assert_eq!(first_problem(&c).key, "limits.reserved_for_agents");
        c.limits.reserved_for_agents = None;
        c.max_payload_bytes = 128 * 1024;
        assert_eq!(first_problem(&c).key, "max_payload_bytes");
    }
}
