//! Cloud identity: the instance's id, image, type, region, zone and role, read from its
//! cloud's metadata service (`[metadata]`), because cloud hostnames and addresses change
//! while these do not. The identity goes into the birth message and onto every record as
//! tags, and is read again every `refresh` (a changed identity is announced with a new
//! birth message).
//!
//! Each provider speaks its own protocol ([`aws`]: IMDSv2 with a session token, [`gcp`]:
//! `Metadata-Flavor: Google`, [`azure`]: `Metadata: true`). `auto` asks each in turn; a
//! provider that is not there answers nothing, quickly (short timeouts).

mod aws;
mod azure;
mod gcp;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetbus_protocol::CloudIdentity;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::http_client::{self, HttpError};

/// Which metadata service to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Ask AWS, then GCP, then Azure; the first that answers.
    Auto,
    /// AWS EC2 (IMDSv2).
    Aws,
    /// Google Compute Engine.
    Gcp,
    /// Azure Instance Metadata Service.
    Azure,
    /// No cloud identity.
    None,
}

/// `[metadata]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    /// Which service to ask (`none` unless set: machines outside a cloud are not made to
    /// probe a link-local address).
    pub provider: Provider,
    /// The service's base URL, instead of the provider's own (`http://169.254.169.254`,
    /// `http://metadata.google.internal`): a proxy, or a test.
    pub endpoint: Option<String>,
    /// How long one request to the service may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How often the identity is read again.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// The instance tag (AWS, Azure) or metadata attribute (GCP) that names the role. When
    /// there is none, a `FLEETBUS_ROLE=...` line of the user data does.
    pub role_tag: String,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            provider: Provider::None,
            endpoint: None,
            timeout: Duration::from_secs(1),
            refresh: Duration::from_secs(3600),
            role_tag: "Role".into(),
        }
    }
}

impl MetadataConfig {
    /// The values serde cannot check, keys relative to `[metadata]`.
    pub(crate) fn check(&self, p: &mut fleetbus_config::Problems) {
        if let Some(e) = &self.endpoint {
            if let Err(why) = http_client::parse_url(e) {
                p.add("endpoint", why);
            }
        }
        p.require(
            (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.timeout),
            "timeout",
            "must be between 10ms and 60s",
        );
        p.require(
            self.refresh >= Duration::from_secs(1),
            "refresh",
            "must be at least 1s",
        );
        p.require(!self.role_tag.is_empty(), "role_tag", "is empty");
    }
}

/// The identity as last read, shared by the birth message and the outbox.
#[derive(Clone)]
pub struct CloudState {
    current: Arc<RwLock<Option<CloudIdentity>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for CloudState {
    fn default() -> Self {
        CloudState {
            current: Arc::new(RwLock::new(None)),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl CloudState {
    /// The identity, if one was read.
    pub fn get(&self) -> Option<CloudIdentity> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Notified each time the identity changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn set(&self, identity: CloudIdentity) -> bool {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.as_ref() == Some(&identity) {
            return false;
        }
        *current = Some(identity);
        self.changed.send_modify(|n| *n += 1);
        true
    }
}

/// Why no identity could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// No provider answered (`auto`), or the one configured did not.
    #[error("no cloud metadata service answered ({0})")]
    NotFound(String),
    /// The provider answered, but not as it should.
    #[error("{provider} metadata: {why}")]
    Provider {
        /// The provider.
        provider: &'static str,
        /// What went wrong, with a hint where one helps.
        why: String,
    },
}

/// Reads the identity once, from the configured provider (or the first that answers).
pub async fn detect(config: &MetadataConfig) -> Result<Option<CloudIdentity>, MetadataError> {
    let ask = Asker { config };
    let order: &[Provider] = match config.provider {
        Provider::None => return Ok(None),
        Provider::Auto => &[Provider::Aws, Provider::Gcp, Provider::Azure],
        Provider::Aws => &[Provider::Aws],
        Provider::Gcp => &[Provider::Gcp],
        Provider::Azure => &[Provider::Azure],
    };
    let mut tried = Vec::new();
    for provider in order {
        let found = match provider {
            Provider::Aws => aws::identity(&ask).await,
            Provider::Gcp => gcp::identity(&ask).await,
            Provider::Azure => azure::identity(&ask).await,
            Provider::Auto | Provider::None => Ok(None),
        };
        match found {
            Ok(Some(identity)) => return Ok(Some(identity)),
            Ok(None) => tried.push(format!("{provider:?}").to_lowercase()),
            Err(e) => return Err(e),
        }
    }
    Err(MetadataError::NotFound(format!(
        "asked {}",
        tried.join(", ")
    )))
}

/// Reads the identity now and every `refresh` until `shutdown`; each change goes into
/// `state` (and so into the birth message and the records' tags).
pub async fn run_refresh(
    config: MetadataConfig,
    state: CloudState,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.provider == Provider::None {
        return;
    }
    loop {
        match detect(&config).await {
            Ok(Some(identity)) => {
                if state.set(identity.clone()) {
                    tracing::info!(provider = %identity.provider, instance_id = %identity.instance_id, role = ?identity.role, "cloud identity");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "no cloud identity (the records carry none until it can be read)")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.refresh) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
    }
}

/// Asks a provider's service: the base URL, the timeout, the role tag.
pub(crate) struct Asker<'a> {
    config: &'a MetadataConfig,
}

/// A provider's answer to one request.
pub(crate) enum Answer {
    /// 200, with the body.
    Found(http_client::Response),
    /// Another status (404: the item is not set).
    Status(u16),
}

impl Asker<'_> {
    /// The base URL: the configured endpoint or `default`.
    fn base<'b>(&'b self, default: &'b str) -> &'b str {
        self.config
            .endpoint
            .as_deref()
            .unwrap_or(default)
            .trim_end_matches('/')
    }

    fn role_tag(&self) -> &str {
        &self.config.role_tag
    }

    /// `method` `base + path` with `headers`.
    async fn ask(
        &self,
        method: hyper::Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, HttpError> {
        let response = http_client::send(&http_client::Request {
            method,
            url,
            headers,
            timeout: self.config.timeout,
            ca_file: None,
            // an Azure instance document is a few KiB; a tag list can make it more
            body_limit: 1024 * 1024,
        })
        .await?;
        if response.status == 200 {
            Ok(Answer::Found(response))
        } else {
            Ok(Answer::Status(response.status))
        }
    }
}

/// The role from user data: the value of a `FLEETBUS_ROLE=...` line (`export` and quotes
/// allowed, as a cloud-init shell script would have it).
pub(crate) fn role_in_user_data(user_data: &str) -> Option<String> {
    user_data.lines().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let value = line.strip_prefix("FLEETBUS_ROLE=")?;
        let value = value.trim().trim_matches(['"', '\'']);
        (!value.is_empty()).then(|| value.to_string())
    })
}

/// `Some(text)` for a found item, `None` for a 404 or an empty value.
pub(crate) fn found_text(answer: Answer) -> Option<String> {
    match answer {
        Answer::Found(r) => Some(r.text()).filter(|t| !t.is_empty()),
        Answer::Status(_) => None,
    }
}

#[cfg(test)]
mod tests;
