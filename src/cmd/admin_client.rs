//! The admin endpoint's client, shared by `fleetbus job`, `fleetbus agents` and the jobs
//! benchmark: JSON over HTTP (ureq), with the endpoint's `{"error": ...}` answers turned
//! into errors that name the URL.

use std::time::Duration;

use anyhow::Context;

/// The `--admin URL` option of the commands that talk to the admin endpoint.
#[derive(Debug, clap::Args)]
pub struct AdminEndpoint {
    /// The server's admin endpoint.
    #[arg(
        long = "admin",
        global = true,
        env = "FLEETBUS_ADMIN",
        default_value = "http://127.0.0.1:7070"
    )]
    pub url: String,
}

impl AdminEndpoint {
    /// A client for it.
    pub fn client(&self) -> AdminClient {
        AdminClient::new(&self.url)
    }
}

/// A small JSON client for the admin endpoint.
pub struct AdminClient {
    base: String,
    http: ureq::Agent,
}

impl AdminClient {
    /// A client for the endpoint at `base` (`http://host:port`).
    pub fn new(base: &str) -> AdminClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            http: config.into(),
        }
    }

    /// GET `path`, answer decoded from JSON.
    pub async fn get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let http = self.http.clone();
        tokio::task::spawn_blocking(move || answer(http.get(&url).call(), &url)).await?
    }

    /// POST `body` as JSON to `path`, answer decoded from JSON.
    pub async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let http = self.http.clone();
        let body = serde_json::to_value(body)?;
        tokio::task::spawn_blocking(move || answer(http.post(&url).send_json(&body), &url)).await?
    }
}

fn answer<T: serde::de::DeserializeOwned>(
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    url: &str,
) -> anyhow::Result<T> {
    let mut response = result.with_context(|| format!("cannot reach the admin endpoint at {url} (is `fleetbus serve` running with [admin] listen and [jobs] signing_key?)"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        anyhow::bail!("{url}: {status}: {message}");
    }
    response
        .body_mut()
        .read_json::<T>()
        .with_context(|| format!("{url}: unreadable answer"))
}
