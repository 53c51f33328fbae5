//! Relay throughput of a plain MQTT broker: N publishers, one subscriber.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetbus_mqtt::BrokerUrl;
use rumqttc::{AsyncClient, Event, Packet, QoS};

use super::{IngestArgs, Measurement};

const TOPIC_ROOT: &str = "fleetbus-bench";
/// Most messages published but not yet received, across all publishers. Brokers drop what
/// a slow subscriber cannot take (Mosquitto queues 1000 per client by default), so an
/// open-loop publisher would measure the drop rate, not the relay rate.
const MAX_BACKLOG: u64 = 500;

/// A `mosquitto` process on a free loopback port, killed on drop.
pub struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    /// Starts `mosquitto -p PORT` (listening on loopback only) and waits until it accepts.
    pub async fn start() -> anyhow::Result<Mosquitto> {
        let port = fleetbus_broker::free_port()?;
        let child = Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start `mosquitto` (install the Debian package `mosquitto`)")?;
        let m = Mosquitto { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("mosquitto did not listen on 127.0.0.1:{port} within 5 s")
    }

    /// Its URL.
    pub fn url(&self) -> BrokerUrl {
        BrokerUrl::mqtt("127.0.0.1", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Measures how fast `url` relays `args.clients` publishers to one subscriber.
pub async fn measure(
    args: &IngestArgs,
    url: &BrokerUrl,
    label: &str,
) -> anyhow::Result<Measurement> {
    let qos = qos(args.qos);
    let received = Arc::new(AtomicU64::new(0));
    let last_received = Arc::new(std::sync::Mutex::new(Instant::now()));
    let run_id = std::process::id();

    let transport = fleetbus_mqtt::ClientTransport::to(url)?;
    // the subscriber, subscribed before anyone publishes
    let opts = fleetbus_mqtt::options(
        &transport,
        &format!("bench-sub-{run_id}"),
        Duration::from_secs(30),
        1000,
    );
    let (sub, mut sub_loop) = AsyncClient::new(opts, 100);
    sub.subscribe(format!("{TOPIC_ROOT}/#"), qos).await?;
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .context("subscriber: no SUBACK within 10 s")?;
    subscribed.with_context(|| format!("subscriber cannot connect to {url}"))?;
    let counter = received.clone();
    let last = last_received.clone();
    let sub_task = tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "bench subscriber failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    let payload = vec![b'x'; args.payload];
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut publishers = Vec::new();
    let mut loops = Vec::new();
    let sent_total = Arc::new(AtomicU64::new(0));
    for i in 0..args.clients {
        let opts = fleetbus_mqtt::options(
            &transport,
            &format!("bench-pub-{run_id}-{i}"),
            Duration::from_secs(30),
            100,
        );
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        loops.push(tokio::spawn(async move {
            loop {
                if let Err(e) = eventloop.poll().await {
                    tracing::error!(error = %e, "bench publisher connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
        let payload = payload.clone();
        let topic = format!("{TOPIC_ROOT}/{i}");
        let rate = args.rate;
        let sent_total = sent_total.clone();
        let received = received.clone();
        publishers.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut pace = (rate > 0)
                .then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64)));
            while Instant::now() < deadline {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                if sent_total.load(Ordering::Relaxed)
                    > received.load(Ordering::Relaxed) + MAX_BACKLOG
                {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    continue;
                }
                if client
                    .publish(topic.clone(), qos, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
                sent_total.fetch_add(1, Ordering::Relaxed);
            }
            sent
        }));
    }
    let mut sent = 0;
    for p in publishers {
        sent += p.await.unwrap_or(0);
    }
    // drain: until everything arrived, or nothing arrived for 3 s
    let mut idle_since = Instant::now();
    let mut seen = received.load(Ordering::Relaxed);
    while seen < sent && idle_since.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            idle_since = Instant::now();
        }
    }
    let end = *last_received.lock().unwrap_or_else(|p| p.into_inner());
    sub_task.abort();
    for l in loops {
        l.abort();
    }
    Ok(Measurement {
        target: label.to_string(),
        sent,
        received: received.load(Ordering::Relaxed),
        elapsed: end.saturating_duration_since(start),
    })
}
