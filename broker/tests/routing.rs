//! Routing through the embedded broker with the patched router (vendor/README.md): a
//! filter without wildcards is found by lookup instead of by matching every filter, so
//! these check that every subscriber still gets exactly what MQTT says it should —
//! exact and wildcard filters, subscriptions made before and after a topic is first seen,
//! retained messages, many per-agent filters side by side.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fleetbus_broker::{free_port, BrokerConfig, EmbeddedBroker};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

async fn broker() -> (EmbeddedBroker, u16) {
    let port = free_port().unwrap();
    let mut broker = EmbeddedBroker::start(BrokerConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        ..BrokerConfig::default()
    })
    .unwrap();
    broker.listen().await.unwrap();
    (broker, port)
}

/// A client subscribed to `filters` (returns once the broker acknowledged them) and the
/// (topic, payload) of everything it receives.
async fn subscriber(
    port: u16,
    id: &str,
    filters: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 100);
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = subscribed_tx.send(());
                }
                _ => {}
            }
        }
    });
    for _ in filters {
        tokio::time::timeout(Duration::from_secs(5), subscribed.recv())
            .await
            .expect("no SUBACK within 5 s");
    }
    (client, rx)
}

async fn publisher(port: u16, id: &str) -> AsyncClient {
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 100);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

/// Everything `rx` receives within `wait`.
async fn drain(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    wait: Duration,
) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(wait, rx.recv()).await {
        got.push(m);
    }
    got
}

fn msg(topic: &str, payload: &str) -> (String, Vec<u8>) {
    (topic.to_string(), payload.as_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_and_wildcard_filters_before_and_after_a_topic_is_first_seen() {
    let (_broker, port) = broker().await;
    let (_w, mut wildcard) = subscriber(port, "server", &["fleet/+/jobs/notify"]).await;
    let (_a, mut a1) = subscriber(port, "a1", &["fleet/a1/jobs/notify"]).await;
    let p = publisher(port, "pub").await;

    // a topic nobody subscribed exactly yet (only the wildcard matches it)
    p.publish("fleet/a2/jobs/notify", QoS::AtLeastOnce, false, "first")
        .await
        .unwrap();
    p.publish("fleet/a1/jobs/notify", QoS::AtLeastOnce, false, "for a1")
        .await
        .unwrap();
    let waited = Duration::from_millis(500);
    assert_eq!(
        drain(&mut wildcard, waited).await,
        vec![
            msg("fleet/a2/jobs/notify", "first"),
            msg("fleet/a1/jobs/notify", "for a1")
        ]
    );
    assert_eq!(
        drain(&mut a1, waited).await,
        vec![msg("fleet/a1/jobs/notify", "for a1")]
    );

    // an exact subscriber arriving after its topic is known gets what follows, once
    let (_b, mut a2) = subscriber(port, "a2", &["fleet/a2/jobs/notify"]).await;
    p.publish("fleet/a2/jobs/notify", QoS::AtLeastOnce, false, "second")
        .await
        .unwrap();
    assert_eq!(
        drain(&mut a2, waited).await,
        vec![msg("fleet/a2/jobs/notify", "second")]
    );
    assert_eq!(
        drain(&mut wildcard, waited).await,
        vec![msg("fleet/a2/jobs/notify", "second")]
    );
    assert!(drain(&mut a1, waited).await.is_empty());

    // a filter with a trailing `#` and one equal to a longer topic's prefix
    let (_c, mut hash) = subscriber(port, "c", &["fleet/a3/#", "fleet/a3"]).await;
    p.publish("fleet/a3/files/x/reply", QoS::AtLeastOnce, false, "deep")
        .await
        .unwrap();
    p.publish("fleet/a3", QoS::AtLeastOnce, false, "root")
        .await
        .unwrap();
    let got = drain(&mut hash, waited).await;
    // `fleet/a3/#` also matches `fleet/a3` itself: the root arrives once per filter
    assert_eq!(
        got.iter().filter(|(_, p)| p == b"deep").count(),
        1,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|(_, p)| p == b"root").count(),
        2,
        "{got:?}"
    );
}

/// (Outside `fleet/`: only the server may retain messages there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_exact_and_wildcard_subscribers() {
    let (_broker, port) = broker().await;
    let p = publisher(port, "agent-r1").await;
    p.publish("site/r1/presence", QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    p.publish("site/r2/telemetry/x", QoS::AtLeastOnce, true, "other")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waited = Duration::from_millis(500);

    let (_e, mut exact) = subscriber(port, "e", &["site/r1/presence"]).await;
    assert_eq!(
        drain(&mut exact, waited).await,
        vec![msg("site/r1/presence", "online")]
    );
    let (_w, mut wildcard) = subscriber(port, "w", &["site/+/presence"]).await;
    assert_eq!(
        drain(&mut wildcard, waited).await,
        vec![msg("site/r1/presence", "online")]
    );
    let (_n, mut none) = subscriber(port, "n", &["fleet/r3/presence"]).await;
    assert!(drain(&mut none, waited).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_per_agent_filters_each_get_only_their_own_messages() {
    let (_broker, port) = broker().await;
    let mut agents = Vec::new();
    for i in 0..40 {
        let id = format!("agent-{i:02}");
        let topic = format!("fleet/{id}/jobs/notify");
        let (client, rx) = subscriber(port, &id, &[&topic, "fleet/groups/all/jobs/notify"]).await;
        agents.push((id, client, rx));
    }
    let p = publisher(port, "server").await;
    for (id, _, _) in &agents {
        p.publish(
            format!("fleet/{id}/jobs/notify"),
            QoS::AtLeastOnce,
            false,
            id.clone(),
        )
        .await
        .unwrap();
    }
    p.publish(
        "fleet/groups/all/jobs/notify",
        QoS::AtLeastOnce,
        false,
        "all",
    )
    .await
    .unwrap();
    for (id, _, rx) in &mut agents {
        let mut got = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(m)) => got.push(m),
                _ => break,
            }
        }
        assert_eq!(
            got,
            vec![
                msg(&format!("fleet/{id}/jobs/notify"), id),
                msg("fleet/groups/all/jobs/notify", "all")
            ],
            "{id}"
        );
    }
    // and nothing more for anyone
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (id, _, rx) in &mut agents {
        assert!(rx.try_recv().is_err(), "{id} got more than its own");
    }
}
