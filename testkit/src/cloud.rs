//! Cloud metadata services as the agent meets them, spoken by an HTTP server in the test
//! (the clouds cannot be reached from here): AWS IMDSv2 (a session token, then each item
//! with it), GCP (`Metadata-Flavor: Google` both ways) and Azure IMDS (`Metadata: true`,
//! one JSON document, base64 user data). What each requires of a request is enforced, so
//! a client that skips it gets nothing.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which cloud's metadata service to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fake {
    /// AWS IMDSv2: instance `i-0abc123`, role `web` from its user data.
    Aws,
    /// AWS whose token answer never comes back (a container behind hop limit 1).
    AwsHopLimited,
    /// Google Compute Engine: instance `4520031799277581759`, role `db` from an attribute.
    Gcp,
    /// Azure IMDS: vm `02aab8a4-...`, role `cache` from its (base64) user data.
    Azure,
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

fn reply(status: u16, body: &str) -> Option<Reply> {
    Some(Reply {
        status,
        headers: Vec::new(),
        body: body.to_string(),
    })
}

/// What the fake `cloud` answers to `method path` with `headers`; `None`: no answer.
fn answer(
    cloud: Fake,
    method: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
) -> Option<Reply> {
    let header = |name: &str| headers.get(name).map(String::as_str);
    match cloud {
        Fake::Aws | Fake::AwsHopLimited => {
            if method == "PUT" && path == "/latest/api/token" {
                if cloud == Fake::AwsHopLimited {
                    return None;
                }
                return match header("x-aws-ec2-metadata-token-ttl-seconds") {
                    Some(_) => reply(200, "AQAEAtoken=="),
                    None => reply(400, ""),
                };
            }
            let Some(item) = path.strip_prefix("/latest/") else {
                return reply(404, "");
            };
            if header("x-aws-ec2-metadata-token") != Some("AQAEAtoken==") {
                return reply(401, "");
            }
            match item {
                "meta-data/instance-id" => reply(200, "i-0abc123"),
                "meta-data/ami-id" => reply(200, "ami-0f00"),
                "meta-data/instance-type" => reply(200, "t3.micro"),
                "meta-data/placement/region" => reply(200, "eu-west-1"),
                "meta-data/placement/availability-zone" => reply(200, "eu-west-1b"),
                "user-data" => reply(
                    200,
                    "#!/bin/sh\nexport FLEETBUS_ROLE=\"web\"\napt-get update\n",
                ),
                _ => reply(404, ""),
            }
        }
        Fake::Gcp => {
            let Some(item) = path.strip_prefix("/computeMetadata/v1/instance/") else {
                return reply(404, "");
            };
            if header("metadata-flavor") != Some("Google") {
                return reply(403, "Missing Metadata-Flavor:Google header.");
            }
            let body = match item {
                "id" => "4520031799277581759",
                "image" => "projects/debian-cloud/global/images/debian-12-bookworm-v20240110",
                "machine-type" => "projects/123/machineTypes/e2-medium",
                "zone" => "projects/123/zones/europe-west1-b",
                "attributes/Role" => "db",
                _ => return reply(404, ""),
            };
            Some(Reply {
                status: 200,
                headers: vec![("Metadata-Flavor", "Google")],
                body: body.to_string(),
            })
        }
        Fake::Azure => {
            if header("metadata") != Some("true") {
                return reply(
                    400,
                    r#"{"error":"Bad request. Required metadata header not specified"}"#,
                );
            }
            if path.starts_with("/metadata/instance?api-version=") {
                return reply(
                    200,
                    r#"{"compute":{"vmId":"02aab8a4-74ef-476e-8182-f6d2ba4166a6","vmSize":"Standard_B2s",
                       "location":"westeurope","zone":"2","tagsList":[{"name":"env","value":"prod"}],
                       "storageProfile":{"imageReference":{"id":"","publisher":"Canonical",
                       "offer":"ubuntu-24_04-lts","sku":"server","version":"latest"}}},"network":{}}"#,
                );
            }
            if path.starts_with("/metadata/instance/compute/userData?") {
                return reply(200, "RkxFRVRCVVNfUk9MRT1jYWNoZQo=");
            }
            reply(404, "")
        }
    }
}

/// A fake metadata service on a free loopback port, stopped when dropped.
pub struct CloudServer {
    /// Its base URL (`http://127.0.0.1:PORT`): the agent's `metadata.endpoint`.
    pub base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CloudServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a fake metadata service for `cloud` (on the current tokio runtime).
pub async fn serve(cloud: Fake) -> std::io::Result<CloudServer> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or_default().split(' ');
                let (method, path) = (
                    first.next().unwrap_or_default(),
                    first.next().unwrap_or_default(),
                );
                let headers: BTreeMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    .collect();
                let Some(r) = answer(cloud, method, path, &headers) else {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    return;
                };
                let mut out = format!(
                    "HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    r.status,
                    r.body.len()
                );
                for (k, v) in r.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&r.body);
                let _ = socket.write_all(out.as_bytes()).await;
            });
        }
    });
    Ok(CloudServer { base, task })
}
