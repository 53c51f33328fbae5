//! `fleetbus rules run`: the rules engine as its own process against any MQTT broker
//! (the embedded one, Mosquitto, EMQX, ...). With a group name, every filter is subscribed
//! as a shared subscription (`$share/{group}/{filter}`), so several engines split the load.

use std::time::Duration;

use fleetbus_mqtt::{Backoff, BrokerUrl};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::watch;

use crate::engine::Engine;

/// Where and how the standalone engine connects.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// The broker.
    pub broker: BrokerUrl,
    /// MQTT client id.
    pub client_id: String,
    /// Shared-subscription group, if several engines split the traffic.
    pub group: Option<String>,
}

/// Subscribes `engine`'s filters on the broker and dispatches every message until
/// `shutdown` turns true, reconnecting with backoff.
pub async fn run_standalone(
    engine: &Engine,
    options: &StandaloneOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let opts = fleetbus_mqtt::options(
            &options.broker,
            &options.client_id,
            Duration::from_secs(15),
            100,
        );
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        for filter in engine.filters() {
            let filter = match &options.group {
                Some(g) => format!("$share/{g}/{filter}"),
                None => filter.clone(),
            };
            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                tracing::error!(%filter, error = %e, "cannot queue subscription");
            }
        }
        let reason = loop {
            tokio::select! {
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => engine.dispatch(&p.topic, &p.payload),
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        tracing::info!(broker = %options.broker, filters = ?engine.filters(), "rules engine connected");
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            tracing::error!(broker = %options.broker, "broker refused a subscription");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        };
        let delay = backoff.next_delay();
        tracing::warn!(broker = %options.broker, %reason, retry_in = ?delay, "rules engine connection failed");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
