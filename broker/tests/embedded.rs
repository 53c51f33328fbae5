//! The embedded broker over real sockets: a client publishes, an in-process link receives;
//! a stopped broker refuses traffic.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fleetbus_broker::{free_port, BrokerConfig, BrokerError, EmbeddedBroker, Notification};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn config(port: u16) -> BrokerConfig {
    BrokerConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        ..BrokerConfig::default()
    }
}

async fn wait_for_puback(eventloop: &mut rumqttc::EventLoop) -> Result<(), String> {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_local_link_and_stop_refuses_traffic() {
    let port = free_port().unwrap();
    let mut broker = EmbeddedBroker::start(config(port)).unwrap();
    let (mut tx, mut rx) = broker.local_link("observer").unwrap();
    tx.subscribe("#").unwrap();
    let addr = broker.listen().await.unwrap();
    assert_eq!(addr.port(), port);

    let mut opts = MqttOptions::new("client-1", "127.0.0.1", port);
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    // a 130 KiB payload: a file chunk plus headers must fit
    let big = vec![7u8; 130 * 1024];
    client
        .publish("fleet/a/telemetry/x", QoS::AtLeastOnce, false, big.clone())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), wait_for_puback(&mut eventloop))
        .await
        .unwrap()
        .unwrap();
    let forwarded = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Some(Notification::Forward(f))) = rx.next().await {
                return f.publish;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&forwarded.topic[..], b"fleet/a/telemetry/x");
    assert_eq!(forwarded.payload.len(), big.len());

    broker.stop();
    // the open connection gets no acknowledgement any more
    client
        .publish("fleet/a/telemetry/x", QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    let after_stop =
        tokio::time::timeout(Duration::from_secs(3), wait_for_puback(&mut eventloop)).await;
    assert!(
        matches!(after_stop, Ok(Err(_))),
        "a stopped broker acknowledged a publish: {after_stop:?}"
    );
    // and the port is free again
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[tokio::test]
async fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut broker = EmbeddedBroker::start(config(port)).unwrap();
    let err = broker.listen().await.unwrap_err();
    assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn invalid_config_is_refused_before_rumqttd_sees_it() {
    let mut c = config(1);
    c.max_connections = 0;
    let err = EmbeddedBroker::start(c).err().unwrap();
    assert!(err.to_string().contains("broker.max_connections"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_mark_comes_after_every_message_stored_before_it() {
    // a consumer that has not read anything yet, with a backlog on several topics and more
    // than its outgoing buffer holds at once (the router pauses it as busy in between)
    const TOPICS: usize = 5;
    const EACH: usize = 800;
    let broker = EmbeddedBroker::start(config(free_port().unwrap())).unwrap();
    let (mut consumer_tx, mut consumer_rx) = broker.local_link("consumer").unwrap();
    consumer_tx.subscribe("#").unwrap();
    let (mut publisher, mut publisher_rx) = broker.local_link("publisher").unwrap();
    // the publisher's own notifications (acks) must be read for it to go on
    tokio::spawn(async move { while let Ok(Some(_)) = publisher_rx.next().await {} });
    // let the subscription settle before the backlog
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..TOPICS * EACH {
        let topic = format!("fleet/a/telemetry/s{}", i % TOPICS);
        publisher.publish(topic, i.to_string()).unwrap();
    }
    consumer_tx.drain().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match consumer_rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    let n: usize = std::str::from_utf8(&f.publish.payload)
                        .unwrap()
                        .parse()
                        .unwrap();
                    seen.insert(n);
                }
                Ok(Some(Notification::Unschedule)) => consumer_rx.wake().await.unwrap(),
                Ok(Some(Notification::Drained)) => return,
                Ok(_) => {}
                Err(e) => panic!("consumer link lost: {e}"),
            }
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "no drain mark; {} messages seen",
        seen.len()
    );
    assert_eq!(seen.len(), TOPICS * EACH, "messages before the drain mark");
}
