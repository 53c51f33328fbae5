//! End to end: agents on each cloud (a fake of its metadata service, speaking the
//! provider's protocol) carry their cloud identity in their birth message and as tags on
//! their records, through a real `fleetbus serve` and its rules engine.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::Fixture;
use fleetbus_agent::metadata::Provider;
use fleetbus_agent::{Agent, AgentConfig};
use fleetbus_testkit::cloud::{serve, Fake};
use serde_json::Value;
use tokio::sync::watch;

const RULES: &str = r#"
[sinks.out]
type = "file"
path = "out/{agent}.jsonl"

[[rules]]
name = "all"
from = ["fleet/+/presence", "fleet/+/telemetry/heartbeat"]
to = ["out"]
"#;

fn lines(dir: &Path, agent: &str) -> Vec<Value> {
    fs::read_to_string(dir.join(format!("data/out/{agent}.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_clouds_identity_is_in_the_birth_message_and_on_every_record() {
    let fx = Fixture::new();
    let dir = fx.path();
    common::enroll_operator(&fx.data, &dir.join("ops.token"));
    let mut server = fx.serve(Some(RULES), "serve");
    fx.wait_listening();
    let mut running = Vec::new();
    for (fake, provider, instance, role) in [
        (Fake::Aws, "aws", "i-0abc123", "web"),
        (Fake::Gcp, "gcp", "4520031799277581759", "db"),
        (
            Fake::Azure,
            "azure",
            "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
            "cache",
        ),
    ] {
        let cloud = serve(fake).await.unwrap();
        let id = format!("vm-{provider}");
        let mut config = AgentConfig {
            server: format!("mqtt://127.0.0.1:{}", fx.port).parse().unwrap(),
            state_dir: dir.join(format!("state-{provider}")),
            id: Some(id.clone()),
            ..AgentConfig::default()
        };
        config.metrics.enabled = false;
        config.heartbeat.enabled = true;
        config.heartbeat.interval = Duration::from_millis(100);
        config.metadata.provider = Provider::Auto;
        config.metadata.endpoint = Some(cloud.base.clone());
        let agent = Agent::open(fleetbus_agent::Valid::new(config).unwrap()).unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move { agent.run(rx).await.unwrap() });
        running.push((cloud, stop, task, id, provider, instance, role));
    }
    for (_, _, _, id, provider, instance, role) in &running {
        let seen = common::poll_until(Duration::from_secs(20), || {
            let all = lines(dir, id);
            let birth = all
                .iter()
                .any(|m| m["status"] == "online" && m["cloud"]["provider"] == *provider);
            let tagged = all
                .iter()
                .any(|m| m["stream"] == "heartbeat" && m["tags"]["cloud"] == *provider);
            birth && tagged
        });
        let all = lines(dir, id);
        assert!(seen, "{id}: {all:?}");
        let birth = all
            .iter()
            .rev()
            .find(|m| m["cloud"]["provider"] == *provider)
            .unwrap();
        assert_eq!(birth["cloud"]["instance_id"], *instance);
        assert_eq!(birth["cloud"]["role"], *role);
        let record = all
            .iter()
            .rev()
            .find(|m| m["stream"] == "heartbeat")
            .unwrap();
        assert_eq!(record["tags"]["instance_id"], *instance, "{record}");
        assert_eq!(record["tags"]["role"], *role);
        assert!(record["tags"]["region"].is_string(), "{record}");
    }
    // the registry keeps what the birth messages said: list by cloud identity, show one,
    // count them per hour
    let admin = format!("http://{}", common::admin_addr(dir));
    let fleetbus = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .arg("agents")
            .args(args)
            .args(["--admin", &admin, "--admin-token-file"])
            .arg(dir.join("ops.token"))
            .env_remove("FLEETBUS_ADMIN_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    common::wait_until(
        Duration::from_secs(10),
        "the registry knows every cloud",
        || {
            fleetbus(&["list", "--json", "--state", "online"])
                .lines()
                .filter(|l| l.contains("\"cloud\":{"))
                .count()
                == 3
        },
    );
    let listed = fleetbus(&["list", "--meta", "provider=gcp"]);
    assert!(
        listed.contains("vm-gcp") && !listed.contains("vm-aws"),
        "{listed}"
    );
    assert!(
        listed.contains("europe-west1") && listed.contains("1 agent(s), 1 online"),
        "{listed}"
    );
    let by_role = fleetbus(&["list", "--json", "--meta", "role=cache"]);
    assert_eq!(by_role.lines().count(), 1);
    assert!(by_role.contains("\"agent\":\"vm-azure\""), "{by_role}");
    let shown = fleetbus(&["show", "vm-aws"]);
    assert!(shown.contains("online      yes"), "{shown}");
    assert!(
        shown.contains("cloud       cloud=aws, image_id=ami-0f00, instance_id=i-0abc123, instance_type=t3.micro, region=eu-west-1, role=web, zone=eu-west-1b"),
        "{shown}"
    );
    let hours = fleetbus(&["hours", "--role", "web", "--since", "2h"]);
    assert!(
        hours.contains("1 hour(s) with agents online; at most 1"),
        "{hours}"
    );
    let all_hours = fleetbus(&["hours", "--since", "2h"]);
    assert!(all_hours.contains("at most 3,"), "{all_hours}");

    for (_, stop, task, ..) in running {
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    server.terminate(Duration::from_secs(10));
}
