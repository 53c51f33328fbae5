//! The broker against the normative statements of MQTT 3.1.1, with a raw client (packets
//! written and read one by one, so nothing a client library smooths over is hidden), run
//! against `fleetbus serve` and, side by side in the same test, against Mosquitto (Debian
//! package) where it is installed. fleetbus must pass every check; a check Mosquitto fails
//! is printed, not asserted (it is Mosquitto's choice). Deliberate deviations are in
//! docs/protocol.md ("Broker conformance").

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::ServeProc;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubRel, Publish, Subscribe,
    SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;

const MAX: usize = 1024 * 1024;

/// What reading the next packet gave.
#[derive(Debug)]
enum Next {
    Packet(Packet),
    /// The server closed the connection.
    Closed,
    /// Nothing within the wait.
    Silent,
}

/// Why no PUBLISH came.
#[derive(Debug)]
enum Ended {
    /// The server closed the connection.
    Closed,
    /// Nothing within the wait.
    Silent,
}

/// One raw MQTT 3.1.1 connection.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn open(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects with `connect` and returns the server's first answer.
    fn connect_with(port: u16, connect: Connect) -> (Raw, Next) {
        let mut raw = Raw::open(port);
        raw.send(Packet::Connect(connect));
        let next = raw.next(Duration::from_secs(5));
        (raw, next)
    }

    /// A clean-session connection with keep-alive 30 s, which must be accepted.
    fn connected(port: u16, id: &str) -> Result<Raw, String> {
        let mut c = Connect::new(id);
        c.keep_alive = 30;
        match Raw::connect_with(port, c) {
            (
                raw,
                Next::Packet(Packet::ConnAck(ConnAck {
                    code: ConnectReturnCode::Success,
                    ..
                })),
            ) => Ok(raw),
            (_, other) => Err(format!("{id}: CONNECT not accepted: {other:?}")),
        }
    }

    fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, MAX).unwrap();
        let _ = self.stream.write_all(&out);
    }

    fn next(&mut self, wait: Duration) -> Next {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(p) = Packet::read(&mut self.buf, MAX) {
                return Next::Packet(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Silent;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Next::Silent
                }
                Err(_) => return Next::Closed,
            }
        }
    }

    /// The next PUBLISH within `wait` (other packets skipped), or what ended the wait.
    fn next_publish(&mut self, wait: Duration) -> Result<Publish, Ended> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Packet(Packet::Publish(p)) => return Ok(p),
                Next::Packet(_) => continue,
                Next::Closed => return Err(Ended::Closed),
                Next::Silent => return Err(Ended::Silent),
            }
        }
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<Vec<SubscribeReasonCode>, String> {
        let mut s = Subscribe::new(filter, qos);
        s.pkid = 7;
        self.send(Packet::Subscribe(s));
        match self.next(Duration::from_secs(5)) {
            Next::Packet(Packet::SubAck(ack)) if ack.pkid == 7 => Ok(ack.return_codes),
            other => Err(format!("SUBSCRIBE {filter}: {other:?}")),
        }
    }

    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8], pkid: u16) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        p.pkid = pkid;
        self.send(Packet::Publish(p));
    }

    /// Whether the server closed the connection within `wait`.
    fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Closed => return true,
                Next::Silent => return false,
                Next::Packet(_) => continue,
            }
        }
    }
}

type Check = fn(u16, &str) -> Result<(), String>;

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// 3.1.2.10: keep-alive 0 turns the mechanism off; a server refusing it must say so in a
/// CONNACK, never close silently.
fn keep_alive_zero_gets_a_connack(port: u16, p: &str) -> Result<(), String> {
    let mut c = Connect::new(format!("{p}-ka0"));
    c.keep_alive = 0;
    match Raw::connect_with(port, c) {
        (mut raw, Next::Packet(Packet::ConnAck(_))) => {
            raw.send(Packet::PingReq);
            match raw.next(Duration::from_secs(5)) {
                Next::Packet(Packet::PingResp) => Ok(()),
                other => Err(format!("PINGREQ after keep-alive 0: {other:?}")),
            }
        }
        (_, other) => Err(format!("keep-alive 0: {other:?} instead of a CONNACK")),
    }
}

/// 3.1.4-1/3.2.2-1: a clean session is accepted with session present 0.
fn clean_session_connack(port: u16, p: &str) -> Result<(), String> {
    let mut c = Connect::new(format!("{p}-clean"));
    c.keep_alive = 30;
    match Raw::connect_with(port, c) {
        (_, Next::Packet(Packet::ConnAck(ack))) => ensure(
            !ack.session_present && ack.code == ConnectReturnCode::Success,
            || format!("{ack:?}"),
        ),
        (_, other) => Err(format!("{other:?}")),
    }
}

/// 3.1.0-2: a second CONNECT on a connection is a protocol violation: disconnect.
fn second_connect_disconnects(port: u16, p: &str) -> Result<(), String> {
    let mut raw = Raw::connected(port, &format!("{p}-twice"))?;
    raw.send(Packet::Connect(Connect::new(format!("{p}-twice"))));
    ensure(raw.closed_within(Duration::from_secs(5)), || {
        "still connected after a second CONNECT".into()
    })
}

/// 3.1.3-7/3.1.3-8: an empty client id with clean session 0 is refused with CONNACK 2.
fn empty_id_without_clean_session_is_refused(port: u16, _p: &str) -> Result<(), String> {
    let mut c = Connect::new("");
    c.clean_session = false;
    c.keep_alive = 30;
    match Raw::connect_with(port, c) {
        (_, Next::Packet(Packet::ConnAck(ack))) => {
            ensure(ack.code == ConnectReturnCode::BadClientId, || {
                format!("{ack:?}")
            })
        }
        (_, other) => Err(format!("{other:?} instead of CONNACK 2")),
    }
}

/// 3.12.4-1: PINGREQ is answered with PINGRESP.
fn ping(port: u16, p: &str) -> Result<(), String> {
    let mut raw = Raw::connected(port, &format!("{p}-ping"))?;
    raw.send(Packet::PingReq);
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::PingResp) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// 3.3.4 / 4.3.2: a QoS 1 PUBLISH is answered with a PUBACK of its packet id.
fn qos1_puback(port: u16, p: &str) -> Result<(), String> {
    let mut raw = Raw::connected(port, &format!("{p}-q1"))?;
    raw.publish("conformance/q1", QoS::AtLeastOnce, false, b"x", 41);
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::PubAck(ack)) => ensure(ack.pkid == 41, || format!("{ack:?}")),
        other => Err(format!("{other:?}")),
    }
}

/// 4.3.3: QoS 2 flow: PUBREC, then PUBCOMP for our PUBREL; the subscriber gets it once.
fn qos2_flow(port: u16, p: &str) -> Result<(), String> {
    let mut sub = Raw::connected(port, &format!("{p}-q2s"))?;
    sub.subscribe("conformance/q2", QoS::ExactlyOnce)?;
    let mut raw = Raw::connected(port, &format!("{p}-q2"))?;
    raw.publish("conformance/q2", QoS::ExactlyOnce, false, b"two", 42);
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::PubRec(rec)) if rec.pkid == 42 => {}
        other => return Err(format!("PUBREC: {other:?}")),
    }
    raw.send(Packet::PubRel(PubRel::new(42)));
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::PubComp(comp)) if comp.pkid == 42 => {}
        other => return Err(format!("PUBCOMP: {other:?}")),
    }
    match sub.next_publish(Duration::from_secs(5)) {
        Ok(m) => ensure(&m.payload[..] == b"two", || format!("{m:?}")),
        Err(e) => Err(format!("subscriber: {e:?}")),
    }
}

/// 3.8.4-5, 3.9.3: a SUBSCRIBE gets a SUBACK with one return code per filter, granted QoS
/// at most the requested.
fn suback_one_code_per_filter(port: u16, p: &str) -> Result<(), String> {
    let mut raw = Raw::connected(port, &format!("{p}-subs"))?;
    let mut s = Subscribe::new_many([
        SubscribeFilter::new("conformance/a".into(), QoS::AtMostOnce),
        SubscribeFilter::new("conformance/b/+".into(), QoS::AtLeastOnce),
    ]);
    s.pkid = 9;
    raw.send(Packet::Subscribe(s));
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::SubAck(ack)) => ensure(
            ack.pkid == 9
                && ack.return_codes
                    == vec![
                        SubscribeReasonCode::Success(QoS::AtMostOnce),
                        SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    ],
            || format!("{ack:?}"),
        ),
        other => Err(format!("{other:?}")),
    }
}

/// 3.8.4-6 / 3.3.5: messages are delivered at the lower of published and granted QoS.
fn delivery_qos_is_the_minimum(port: u16, p: &str) -> Result<(), String> {
    let mut sub = Raw::connected(port, &format!("{p}-min"))?;
    sub.subscribe("conformance/min", QoS::AtMostOnce)?;
    let mut publ = Raw::connected(port, &format!("{p}-minp"))?;
    publ.publish("conformance/min", QoS::AtLeastOnce, false, b"m", 5);
    match sub.next_publish(Duration::from_secs(5)) {
        Ok(m) => ensure(m.qos == QoS::AtMostOnce && &m.payload[..] == b"m", || {
            format!("{m:?}")
        }),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// 3.3.1-5/-6/-10/-11: a retained message goes to later subscribers with RETAIN set; an
/// empty retained message removes it.
fn retained_messages(port: u16, p: &str) -> Result<(), String> {
    let topic = format!("conformance/retained/{p}");
    let mut publ = Raw::connected(port, &format!("{p}-ret"))?;
    publ.publish(&topic, QoS::AtLeastOnce, true, b"kept", 3);
    let _ = publ.next(Duration::from_secs(5));
    let mut sub = Raw::connected(port, &format!("{p}-rets"))?;
    sub.subscribe(&topic, QoS::AtLeastOnce)?;
    match sub.next_publish(Duration::from_secs(5)) {
        Ok(m) if m.retain && &m.payload[..] == b"kept" => {}
        other => return Err(format!("retained not delivered: {other:?}")),
    }
    publ.publish(&topic, QoS::AtLeastOnce, true, b"", 4);
    let _ = publ.next(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let mut later = Raw::connected(port, &format!("{p}-rets2"))?;
    later.subscribe(&topic, QoS::AtLeastOnce)?;
    match later.next_publish(Duration::from_secs(1)) {
        Err(Ended::Silent) => Ok(()),
        other => Err(format!(
            "an empty retained message did not remove it: {other:?}"
        )),
    }
}

/// 3.10.4-4/-5: UNSUBSCRIBE is answered with UNSUBACK of its id and delivery stops.
fn unsubscribe_stops_delivery(port: u16, p: &str) -> Result<(), String> {
    let mut sub = Raw::connected(port, &format!("{p}-uns"))?;
    sub.subscribe("conformance/uns", QoS::AtMostOnce)?;
    let mut u = Unsubscribe::new("conformance/uns");
    u.pkid = 11;
    sub.send(Packet::Unsubscribe(u));
    match sub.next(Duration::from_secs(5)) {
        Next::Packet(Packet::UnsubAck(a)) if a.pkid == 11 => {}
        other => return Err(format!("UNSUBACK: {other:?}")),
    }
    let mut publ = Raw::connected(port, &format!("{p}-unsp"))?;
    publ.publish("conformance/uns", QoS::AtLeastOnce, false, b"late", 6);
    match sub.next_publish(Duration::from_secs(1)) {
        Err(Ended::Silent) => Ok(()),
        other => Err(format!("delivered after UNSUBSCRIBE: {other:?}")),
    }
}

/// 4.7.2-1: `#` and `+/...` do not match topics starting with `$`; the publisher of a
/// `$` topic is not thrown out for it (a server may refuse it: acknowledged, not delivered).
fn dollar_topics_stay_out_of_wildcards(port: u16, p: &str) -> Result<(), String> {
    let mut all = Raw::connected(port, &format!("{p}-hash"))?;
    all.subscribe("#", QoS::AtMostOnce)?;
    let mut plus = Raw::connected(port, &format!("{p}-plus"))?;
    plus.subscribe("+/conformance", QoS::AtMostOnce)?;
    let mut publ = Raw::connected(port, &format!("{p}-dollar"))?;
    publ.publish(
        "$fleetbus-test/conformance",
        QoS::AtLeastOnce,
        false,
        b"$",
        8,
    );
    match publ.next(Duration::from_secs(5)) {
        Next::Packet(Packet::PubAck(a)) if a.pkid == 8 => {}
        other => return Err(format!("a $-topic PUBLISH got {other:?} instead of PUBACK")),
    }
    for (name, raw) in [("#", &mut all), ("+/conformance", &mut plus)] {
        loop {
            match raw.next_publish(Duration::from_millis(700)) {
                Ok(m) if m.topic.starts_with('$') => {
                    return Err(format!("`{name}` received {}", m.topic))
                }
                Ok(_) => continue, // other traffic (the server's own)
                Err(_) => break,
            }
        }
    }
    Ok(())
}

/// 3.1.2-8, 3.1.2.10: a client silent for 1.5 x its keep-alive is disconnected and its will
/// published, even while messages keep arriving for it (they are not its packets).
fn will_on_keep_alive_expiry(port: u16, p: &str) -> Result<(), String> {
    let topic = format!("conformance/will/{p}");
    let ticks = format!("conformance/ticks/{p}");
    let mut watcher = Raw::connected(port, &format!("{p}-willw"))?;
    watcher.subscribe(&topic, QoS::AtLeastOnce)?;
    let mut c = Connect::new(format!("{p}-silent"));
    c.keep_alive = 2;
    c.last_will = Some(LastWill::new(&topic, "gone", QoS::AtLeastOnce, false));
    let (mut silent, first) = Raw::connect_with(port, c);
    if !matches!(first, Next::Packet(Packet::ConnAck(_))) {
        return Err(format!("{first:?}"));
    }
    silent.subscribe(&ticks, QoS::AtMostOnce)?;
    let started = Instant::now();
    let mut ticker = Raw::connected(port, &format!("{p}-ticker"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let ticking = std::thread::spawn(move || {
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            ticker.publish(&ticks, QoS::AtMostOnce, false, b"tick", 0);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    // keep the socket open and say nothing
    let will = watcher.next_publish(Duration::from_secs(8));
    let after = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticking.join();
    drop(silent);
    match will {
        Ok(m) if &m.payload[..] == b"gone" => ensure(
            after >= Duration::from_millis(2500) && after <= Duration::from_secs(6),
            || format!("will after {after:?} (expected about 3 s)"),
        ),
        other => Err(format!("no will within 8 s: {other:?}")),
    }
}

/// 3.1.2-8 / 3.14.4-3: the will is published when the connection breaks, not after a
/// DISCONNECT.
fn will_on_broken_connection_only(port: u16, p: &str) -> Result<(), String> {
    let topic = format!("conformance/will2/{p}");
    let mut watcher = Raw::connected(port, &format!("{p}-will2w"))?;
    watcher.subscribe(&topic, QoS::AtLeastOnce)?;
    for (suffix, clean) in [("polite", true), ("rude", false)] {
        let mut c = Connect::new(format!("{p}-{suffix}"));
        c.keep_alive = 30;
        c.last_will = Some(LastWill::new(&topic, suffix, QoS::AtLeastOnce, false));
        let (mut raw, first) = Raw::connect_with(port, c);
        if !matches!(first, Next::Packet(Packet::ConnAck(_))) {
            return Err(format!("{first:?}"));
        }
        if clean {
            raw.send(Packet::Disconnect);
        }
        drop(raw);
    }
    match watcher.next_publish(Duration::from_secs(5)) {
        Ok(m) if &m.payload[..] == b"rude" => {}
        other => return Err(format!("first will: {other:?}")),
    }
    match watcher.next_publish(Duration::from_secs(1)) {
        Err(Ended::Silent) => Ok(()),
        other => Err(format!("a will after DISCONNECT: {other:?}")),
    }
}

/// 3.3.2-2: a PUBLISH topic with a wildcard is a protocol violation: disconnect.
fn wildcard_publish_disconnects(port: u16, p: &str) -> Result<(), String> {
    let mut raw = Raw::connected(port, &format!("{p}-wild"))?;
    raw.publish("conformance/+/x", QoS::AtLeastOnce, false, b"w", 12);
    ensure(raw.closed_within(Duration::from_secs(5)), || {
        "still connected after a PUBLISH to a wildcard topic".into()
    })
}

/// 3.9.3 / 4.7.1: a malformed filter (`#` not last, a wildcard inside a level) is refused:
/// 0x80 in its SUBACK (the others in the same SUBSCRIBE served), or the connection closed.
fn malformed_filter_refused(port: u16, p: &str) -> Result<(), String> {
    let mut raw = Raw::connected(port, &format!("{p}-badf"))?;
    let mut s = Subscribe::new_many([
        SubscribeFilter::new("conformance/#/x".into(), QoS::AtMostOnce),
        SubscribeFilter::new("conformance/ok".into(), QoS::AtMostOnce),
    ]);
    s.pkid = 13;
    raw.send(Packet::Subscribe(s));
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::SubAck(ack)) => ensure(
            ack.return_codes
                == vec![
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                ],
            || format!("{ack:?}"),
        ),
        Next::Closed => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

const CHECKS: [(&str, Check); 16] = [
    (
        "3.1.2.10 keep-alive 0 answered by a CONNACK",
        keep_alive_zero_gets_a_connack,
    ),
    (
        "3.2.2-1 clean session: session present 0",
        clean_session_connack,
    ),
    (
        "3.1.0-2 second CONNECT disconnects",
        second_connect_disconnects,
    ),
    (
        "3.1.3-8 empty id, clean session 0: CONNACK 2",
        empty_id_without_clean_session_is_refused,
    ),
    ("3.12.4-1 PINGREQ -> PINGRESP", ping),
    ("4.3.2 QoS 1 PUBLISH -> PUBACK", qos1_puback),
    ("4.3.3 QoS 2 PUBREC/PUBREL/PUBCOMP", qos2_flow),
    (
        "3.9.3 SUBACK: one code per filter",
        suback_one_code_per_filter,
    ),
    (
        "3.8.4-6 delivered at the lower QoS",
        delivery_qos_is_the_minimum,
    ),
    ("3.3.1-5/-10 retained kept, empty clears", retained_messages),
    (
        "3.10.4 UNSUBACK, delivery stops",
        unsubscribe_stops_delivery,
    ),
    (
        "4.7.2-1 $-topics not matched by # or +",
        dollar_topics_stay_out_of_wildcards,
    ),
    (
        "3.1.2.10 will on keep-alive expiry (1.5 x)",
        will_on_keep_alive_expiry,
    ),
    (
        "3.1.2-8 will on broken connection, not DISCONNECT",
        will_on_broken_connection_only,
    ),
    (
        "3.3.2-2 wildcard in a PUBLISH topic disconnects",
        wildcard_publish_disconnects,
    ),
    (
        "4.7.1 malformed filter: 0x80 (or close)",
        malformed_filter_refused,
    ),
];

/// Runs every check against the broker on `port`: (name, outcome).
fn run_checks(port: u16, prefix: &str) -> Vec<(&'static str, Result<(), String>)> {
    CHECKS
        .iter()
        .map(|(name, check)| (*name, check(port, prefix)))
        .collect()
}

#[test]
fn the_broker_speaks_mqtt_3_1_1_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _server = ServeProc::start(
        dir.path(),
        &format!(
            "data_dir = \"data\"\n{}[broker]\nlisten = \"127.0.0.1:{port}\"\n",
            common::admin_table()
        ),
        move || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let fleetbus = run_checks(port, "fb");
    let mosquitto_dir = tempfile::tempdir().unwrap();
    let mosquitto =
        common::mosquitto::Mosquitto::start(mosquitto_dir.path(), "allow_anonymous true")
            .map(|m| (run_checks(m.port, "mq"), m));
    let mut table = String::from("check | fleetbus | mosquitto\n");
    for (i, (name, outcome)) in fleetbus.iter().enumerate() {
        let theirs = match &mosquitto {
            Some((results, _)) => match &results[i].1 {
                Ok(()) => "pass".to_string(),
                Err(e) => format!("FAIL ({e})"),
            },
            None => "not installed".into(),
        };
        let ours = match outcome {
            Ok(()) => "pass".to_string(),
            Err(e) => format!("FAIL ({e})"),
        };
        table.push_str(&format!("{name} | {ours} | {theirs}\n"));
    }
    eprintln!("{table}");
    let failed: Vec<&str> = fleetbus
        .iter()
        .filter(|(_, o)| o.is_err())
        .map(|(n, _)| *n)
        .collect();
    assert!(failed.is_empty(), "fleetbus fails {failed:?}\n{table}");
}

/// With the policy enforced, a filter it refuses gets 0x80 in the SUBACK for an operator's
/// or a server's client (the protocol's answer), while an agent asking for one is
/// disconnected (a fleetbus agent never does: it is misbehaving). `$` filters get 0x80 for
/// everyone.
#[test]
fn a_refused_subscription_is_answered_0x80_and_an_agent_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::secured::Secured::start(dir.path());
    let ops = server.enroll("ops", &["--role", "operator"]);
    let agent = server.enroll("web-07", &["--groups", "web"]);
    let login = |id: &str, token: &str| {
        let mut c = Connect::new(id);
        c.keep_alive = 30;
        c.login = Some(rumqttc::mqttbytes::v4::Login::new(id, token));
        c
    };
    // a new credential is picked up by the running server within a second
    let accepted = |id: &str, token: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (raw, first) = Raw::connect_with(server.port, login(id, token));
            match first {
                Next::Packet(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                    return raw
                }
                other => assert!(Instant::now() < deadline, "{id}: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut raw = accepted("ops", &ops);
    let mut s = Subscribe::new_many([
        SubscribeFilter::new("fleet/+/acks".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("fleet/+/telemetry/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("$SYS/#".into(), QoS::AtLeastOnce),
    ]);
    s.pkid = 3;
    raw.send(Packet::Subscribe(s));
    match raw.next(Duration::from_secs(5)) {
        Next::Packet(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
            ]
        ),
        other => panic!("{other:?}\n{}", server.proc.log()),
    }
    raw.send(Packet::PingReq);
    assert!(
        matches!(
            raw.next(Duration::from_secs(5)),
            Next::Packet(Packet::PingResp)
        ),
        "the operator's connection stays up"
    );
    server.wait_event("violation", |e| {
        e["client_id"] == "ops" && e["topic"] == "fleet/+/acks"
    });

    let mut raw = accepted("web-07", &agent);
    assert_eq!(
        raw.subscribe("$SYS/#", QoS::AtMostOnce).unwrap(),
        vec![SubscribeReasonCode::Failure]
    );
    raw.send(Packet::Subscribe(Subscribe::new(
        "fleet/#",
        QoS::AtLeastOnce,
    )));
    assert!(
        raw.closed_within(Duration::from_secs(5)),
        "an agent asking for fleet/# stays connected"
    );
}
