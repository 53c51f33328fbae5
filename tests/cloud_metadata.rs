//! The agent's cloud identity against a fake of each provider's metadata service
//! (`fleetbus_testkit::cloud`, which enforces what the provider requires of a request):
//! detection, the IMDSv2 hop-limit hint, the refresh loop.

use std::time::Duration;

use fleetbus_agent::metadata::{
    detect, run_refresh, CloudState, MetadataConfig, MetadataError, Provider,
};
use fleetbus_protocol::CloudIdentity;
use fleetbus_testkit::cloud::{serve, Fake};
use tokio::sync::watch;

fn config(provider: Provider, endpoint: &str) -> MetadataConfig {
    MetadataConfig {
        provider,
        endpoint: Some(endpoint.to_string()),
        timeout: Duration::from_millis(500),
        ..MetadataConfig::default()
    }
}

#[tokio::test]
async fn auto_finds_each_provider_by_its_own_protocol() {
    let aws = serve(Fake::Aws).await.unwrap();
    let gcp = serve(Fake::Gcp).await.unwrap();
    let azure = serve(Fake::Azure).await.unwrap();
    let found = |base: String| async move {
        detect(&config(Provider::Auto, &base))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(
        found(aws.base.clone()).await,
        CloudIdentity {
            provider: "aws".into(),
            instance_id: "i-0abc123".into(),
            image_id: Some("ami-0f00".into()),
            instance_type: Some("t3.micro".into()),
            region: Some("eu-west-1".into()),
            zone: Some("eu-west-1b".into()),
            role: Some("web".into()),
        }
    );
    assert_eq!(
        found(gcp.base.clone()).await,
        CloudIdentity {
            provider: "gcp".into(),
            instance_id: "4520031799277581759".into(),
            image_id: Some(
                "projects/debian-cloud/global/images/debian-12-bookworm-v20240110".into()
            ),
            instance_type: Some("e2-medium".into()),
            region: Some("europe-west1".into()),
            zone: Some("europe-west1-b".into()),
            role: Some("db".into()),
        }
    );
    assert_eq!(
        found(azure.base.clone()).await,
        CloudIdentity {
            provider: "azure".into(),
            instance_id: "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into(),
            image_id: Some("Canonical:ubuntu-24_04-lts:server:latest".into()),
            instance_type: Some("Standard_B2s".into()),
            region: Some("westeurope".into()),
            zone: Some("2".into()),
            role: Some("cache".into()),
        }
    );
}

#[tokio::test]
async fn a_provider_that_is_not_there_is_not_found_and_none_asks_nothing() {
    let aws = serve(Fake::Aws).await.unwrap();
    let e = detect(&config(Provider::Gcp, &aws.base)).await.unwrap_err();
    assert_eq!(e, MetadataError::NotFound("asked gcp".into()));
    // nothing listens: every provider says no, quickly
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let started = std::time::Instant::now();
    let e = detect(&config(Provider::Auto, &closed)).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "no cloud metadata service answered (asked aws, gcp, azure)"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(detect(&config(Provider::None, &closed)).await, Ok(None));
}

#[tokio::test]
async fn imdsv2_behind_hop_limit_one_says_how_to_fix_it() {
    let limited = serve(Fake::AwsHopLimited).await.unwrap();
    let e = detect(&config(Provider::Auto, &limited.base))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("aws metadata: the session token request"),
        "{e}"
    );
    assert!(e.contains("--http-put-response-hop-limit 2"), "{e}");
}

#[tokio::test]
async fn the_refresh_loop_shares_the_identity_and_announces_a_change_once() {
    let aws = serve(Fake::Aws).await.unwrap();
    let state = CloudState::default();
    let mut changed = state.subscribe();
    let (stop, rx) = watch::channel(false);
    let mut c = config(Provider::Aws, &aws.base);
    c.refresh = Duration::from_millis(100);
    let task = tokio::spawn(run_refresh(c, state.clone(), rx));
    tokio::time::timeout(Duration::from_secs(5), changed.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.get().unwrap().instance_id, "i-0abc123");
    let tags = state.get().unwrap().tags();
    assert_eq!(tags["cloud"], "aws");
    assert_eq!(tags["role"], "web");
    // the same identity read again is no change
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(!changed.has_changed().unwrap());
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
