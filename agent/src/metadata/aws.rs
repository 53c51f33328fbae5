//! AWS EC2: IMDSv2. A session token first (`PUT /latest/api/token`), then each item with
//! it (`GET /latest/meta-data/...`). The token's answer is the one a container behind the
//! instance's default hop limit (1) never gets: that case is said, with the fix.

use fleetbus_protocol::CloudIdentity;
use hyper::Method;

use super::{found_text, role_in_user_data, Answer, Asker, MetadataError};
use crate::http_client::HttpError;

const BASE: &str = "http://169.254.169.254";
const TOKEN_TTL: (&str, &str) = ("x-aws-ec2-metadata-token-ttl-seconds", "21600");

fn failed(why: String) -> MetadataError {
    MetadataError::Provider {
        provider: "aws",
        why,
    }
}

/// The identity, `None` when no IMDS answers.
pub(super) async fn identity(ask: &Asker<'_>) -> Result<Option<CloudIdentity>, MetadataError> {
    let base = ask.base(BASE);
    let token = match ask
        .ask(Method::PUT, &format!("{base}/latest/api/token"), &[TOKEN_TTL])
        .await
    {
        Ok(Answer::Found(r)) => r.text(),
        Ok(Answer::Status(status)) => {
            tracing::debug!(status, "no IMDSv2 session token: not AWS");
            return Ok(None);
        }
        Err(HttpError::NoAnswer(within)) => {
            return Err(failed(format!(
                "the session token request (PUT /latest/api/token) was accepted but got no answer within {within:?}. \
                 From a container this is the instance's metadata hop limit (1 by default): raise it to 2 \
                 (aws ec2 modify-instance-metadata-options --instance-id ID --http-put-response-hop-limit 2)"
            )))
        }
        Err(HttpError::NotConnected(_) | HttpError::Failed(_)) => return Ok(None),
    };
    if token.is_empty() {
        return Err(failed("an empty session token".into()));
    }
    let headers = [("x-aws-ec2-metadata-token", token.as_str())];
    let get = |path: String| {
        let url = format!("{base}/latest/{path}");
        async move {
            ask.ask(Method::GET, &url, &headers)
                .await
                .map_err(|e| failed(format!("GET /latest/{path}: {e}")))
        }
    };
    let item = |path: &str| get(format!("meta-data/{path}"));
    let instance_id = found_text(item("instance-id").await?)
        .ok_or_else(|| failed("no meta-data/instance-id".into()))?;
    let image_id = found_text(item("ami-id").await?);
    let instance_type = found_text(item("instance-type").await?);
    let region = found_text(item("placement/region").await?);
    let zone = found_text(item("placement/availability-zone").await?);
    let mut role = found_text(item(&format!("tags/instance/{}", ask.role_tag())).await?);
    if role.is_none() {
        role = found_text(get("user-data".into()).await?).and_then(|u| role_in_user_data(&u));
    }
    Ok(Some(CloudIdentity {
        provider: "aws".into(),
        instance_id,
        image_id,
        instance_type,
        region,
        zone,
        role,
    }))
}
