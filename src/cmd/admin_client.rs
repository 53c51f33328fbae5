//! The admin endpoint's client, shared by `fleetbus job`, `fleetbus agents` and the jobs
//! benchmark: JSON over HTTP (ureq) with the operator's token, and the endpoint's
//! `{"error": ...}` answers turned into errors that name the URL.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// The environment variable that may hold the operator token itself.
pub const TOKEN_ENV: &str = "FLEETBUS_ADMIN_TOKEN";

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
    /// A file holding an operator token (`fleetbus agents enroll NAME --role operator
    /// --out FILE`); or the token itself in FLEETBUS_ADMIN_TOKEN.
    #[arg(
        long = "admin-token-file",
        global = true,
        env = "FLEETBUS_ADMIN_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
}

impl AdminEndpoint {
    /// A client for it, with the operator token from `--admin-token-file` or
    /// FLEETBUS_ADMIN_TOKEN (none: the endpoint answers 401 saying what is missing).
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(&self.url, self.token()?))
    }

    /// The operator token from `--admin-token-file` or FLEETBUS_ADMIN_TOKEN, if given.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("--admin-token-file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()),
        };
        Ok(token.filter(|t| !t.is_empty()))
    }
}

/// A query string (`?a=1&b=x%20y`) of the pairs whose value is given, values
/// percent-encoded; empty when none is.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let encode = |v: &str| -> String {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// A small JSON client for the admin endpoint.
pub struct AdminClient {
    base: String,
    http: ureq::Agent,
    authorization: Option<String>,
}

impl AdminClient {
    /// A client for the endpoint at `base` (`http://host:port`) sending operator `token`.
    pub fn new(base: &str, token: Option<String>) -> AdminClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            http: config.into(),
            authorization: token.map(|t| format!("Bearer {t}")),
        }
    }

    /// GET `path`, answer decoded from JSON.
    pub async fn get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.get(&url);
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        tokio::task::spawn_blocking(move || answer(request.call(), &url)).await?
    }

    /// POST `body` as JSON to `path`, answer decoded from JSON.
    pub async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.post(&url);
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let body = serde_json::to_value(body)?;
        tokio::task::spawn_blocking(move || answer(request.send_json(&body), &url)).await?
    }
}

fn answer<T: serde::de::DeserializeOwned>(
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    url: &str,
) -> anyhow::Result<T> {
    let mut response = result.with_context(|| format!("cannot reach the admin endpoint at {url} (is `fleetbus serve` running with [admin] listen and [jobs] signing_key?)"))?;
    if !response.status().is_success() {
        return Err(refusal(&mut response, url));
    }
    response
        .body_mut()
        .read_json::<T>()
        .with_context(|| format!("{url}: unreadable answer"))
}

/// The error of an answer that is not a success: the endpoint's `{"error": ...}` (or the
/// body), with the URL and the status, and what to do about a 401.
pub fn refusal(response: &mut ureq::http::Response<ureq::Body>, url: &str) -> anyhow::Error {
    let status = response.status();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(text);
    if status == 401 {
        return anyhow::anyhow!("{url}: {status}: {message} (give an operator token with --admin-token-file FILE or {TOKEN_ENV})");
    }
    anyhow::anyhow!("{url}: {status}: {message}")
}
