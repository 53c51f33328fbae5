//! MQTT client plumbing shared by everything that connects to a broker as a client (the
//! agent, `fleetbus rules run`, the benchmarks): broker URLs, connection options that avoid
//! rumqttc's traps, and reconnect backoff with jitter.
//!
//! rumqttc traps handled here (each measured when the project began): its default maximum packet size is 10 KiB
//! (we raise it to [`MAX_PACKET_BYTES`]); it has no backoff of its own ([`Backoff`]); and
//! with `clean_session = true` it silently drops publishes pending at a disconnect, so
//! callers must never rely on its queue: the agent keeps its own disk outbox and builds a
//! fresh client for every connection attempt.

mod backoff;
mod transport;
mod url;

pub use backoff::Backoff;
pub use transport::{
    crypto_provider, https_client_config, read_certificates, read_private_key, ClientTransport,
    TlsFiles, TransportError,
};
pub use url::{BrokerUrl, Scheme, UrlError};

use std::time::Duration;

/// Largest MQTT packet a fleetbus client sends or accepts: a 128 KiB file chunk plus
/// generous room for topic and headers (the broker's default payload limit).
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// Connection options for `client_id` talking to the broker of `transport`: clean
/// session, our packet size limits, `keepalive` pings and at most `inflight`
/// unacknowledged QoS 1 publishes.
pub fn options(
    transport: &ClientTransport,
    client_id: &str,
    keepalive: Duration,
    inflight: u16,
) -> rumqttc::MqttOptions {
    let url = transport.url();
    // rumqttc takes a WebSocket broker as its whole URL
    let addr = match url.scheme.is_websocket() {
        true => url.to_string(),
        false => url.host.clone(),
    };
    let mut opts = rumqttc::MqttOptions::new(client_id, addr, url.port);
    opts.set_keep_alive(keepalive.max(Duration::from_secs(1)))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_inflight(inflight.max(1));
    transport.apply(&mut opts);
    opts
}
