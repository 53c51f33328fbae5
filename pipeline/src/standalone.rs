//! `fleetbus rules run`: the rules engine as its own process against any MQTT broker
//! (the embedded one, Mosquitto, EMQX, ...). With a group name, every filter is subscribed
//! as a shared subscription (`$share/{group}/{filter}`), so several engines split the load.
//!
//! The durable path is the same as inside `fleetbus serve`: records are acknowledged to
//! their agents (on `fleet/{agent}/acks`, through the same broker) only once they are in
//! this engine's write-ahead log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbus_mqtt::{Backoff, ClientTransport};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::watch;

use crate::engine::Engine;
use fleetbus_support::{NotPublished, Publisher};

/// The connection acknowledgements go out on, replaced at every reconnect.
#[derive(Clone, Default)]
pub struct AckChannel {
    client: Arc<Mutex<Option<AsyncClient>>>,
}

impl AckChannel {
    /// The publisher to give to [`Engine::start`].
    pub fn publisher(&self) -> Publisher {
        let client = self.client.clone();
        Publisher::with_retain(move |topic, payload, retain| {
            let guard = client.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                // QoS 0: acknowledgements are idempotent; a lost one means a re-send
                Some(c) => c
                    .try_publish(topic, QoS::AtMostOnce, retain, payload)
                    .map_err(|e| NotPublished(e.to_string())),
                None => Err(NotPublished("not connected".into())),
            }
        })
    }

    fn set(&self, client: Option<AsyncClient>) {
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = client;
    }
}

/// Where and how the standalone engine connects.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// The broker and how to reach it.
    pub broker: ClientTransport,
    /// MQTT client id.
    pub client_id: String,
    /// The client's token (MQTT password, the client id as user name), if the broker
    /// authenticates clients.
    pub token: Option<String>,
    /// Shared-subscription group, if several engines split the traffic.
    pub group: Option<String>,
}

/// Subscribes `engine`'s filters on the broker and dispatches every message until
/// `shutdown` turns true, reconnecting with backoff.
pub async fn run_standalone(
    engine: &Engine,
    acks: &AckChannel,
    options: &StandaloneOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let mut opts = fleetbus_mqtt::options(
            &options.broker,
            &options.client_id,
            Duration::from_secs(15),
            100,
        );
        if let Some(token) = &options.token {
            opts.set_credentials(options.client_id.clone(), token.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        acks.set(Some(client.clone()));
        let shared = |filter: &str| match &options.group {
            Some(g) => format!("$share/{g}/{filter}"),
            None => filter.to_string(),
        };
        let mut subscribed = engine.filters();
        for filter in &subscribed {
            let filter = shared(filter);
            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                tracing::error!(%filter, error = %e, "cannot queue subscription");
            }
        }
        // a reload may change the rules' filters: looked at every second
        let mut refilter = tokio::time::interval(Duration::from_secs(1));
        let reason = loop {
            tokio::select! {
                _ = refilter.tick() => {
                    let now = engine.filters();
                    if now != subscribed {
                        for filter in now.iter().filter(|f| !subscribed.contains(f)) {
                            let filter = shared(filter);
                            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                                tracing::error!(%filter, error = %e, "cannot queue subscription");
                            }
                        }
                        for filter in subscribed.iter().filter(|f| !now.contains(f)) {
                            let filter = shared(filter);
                            if let Err(e) = client.try_unsubscribe(filter.clone()) {
                                tracing::error!(%filter, error = %e, "cannot queue unsubscription");
                            }
                        }
                        tracing::info!(filters = ?now, "rules reloaded: subscriptions follow their filters");
                        subscribed = now;
                    }
                }
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        engine.dispatch_from_network(&p.topic, &p.payload);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        tracing::info!(broker = %options.broker.url(), filters = ?engine.filters(), "rules engine connected");
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            tracing::error!(broker = %options.broker.url(), "broker refused a subscription");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        };
        acks.set(None);
        let delay = backoff.next_delay();
        tracing::warn!(broker = %options.broker.url(), %reason, retry_in = ?delay, "rules engine connection failed");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
