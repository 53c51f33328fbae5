//! Google Compute Engine: `GET /computeMetadata/v1/instance/...` with
//! `Metadata-Flavor: Google`, and an answer carrying the same header (anything else at
//! that address is not GCE's metadata server).

use fleetbus_protocol::CloudIdentity;
use hyper::Method;

use super::{found_text, role_in_user_data, Answer, Asker, MetadataError};

const BASE: &str = "http://metadata.google.internal";
const FLAVOR: (&str, &str) = ("metadata-flavor", "Google");

/// The last `/` segment (`projects/1/zones/europe-west1-b` → `europe-west1-b`).
fn last_segment(text: String) -> String {
    text.rsplit('/').next().unwrap_or_default().to_string()
}

/// The identity, `None` when no GCE metadata server answers.
pub(super) async fn identity(ask: &Asker<'_>) -> Result<Option<CloudIdentity>, MetadataError> {
    let base = ask.base(BASE);
    let url = |path: &str| format!("{base}/computeMetadata/v1/instance/{path}");
    let instance_id = match ask.ask(Method::GET, &url("id"), &[FLAVOR]).await {
        Ok(Answer::Found(r)) if r.header("metadata-flavor") == Some("Google") => r.text(),
        _ => return Ok(None),
    };
    let item = |path: &'static str| {
        let url = url(path);
        async move {
            ask.ask(Method::GET, &url, &[FLAVOR])
                .await
                .map(found_text)
                .map_err(|e| MetadataError::Provider {
                    provider: "gcp",
                    why: format!("GET instance/{path}: {e}"),
                })
        }
    };
    let image_id = item("image").await?;
    let instance_type = item("machine-type").await?.map(last_segment);
    let zone = item("zone").await?.map(last_segment);
    let region = zone
        .as_deref()
        .and_then(|z| z.rsplit_once('-'))
        .map(|(region, _)| region.to_string());
    let role_url = url(&format!("attributes/{}", ask.role_tag()));
    let mut role = ask
        .ask(Method::GET, &role_url, &[FLAVOR])
        .await
        .ok()
        .and_then(found_text);
    if role.is_none() {
        for script in ["attributes/user-data", "attributes/startup-script"] {
            let text = ask
                .ask(Method::GET, &url(script), &[FLAVOR])
                .await
                .ok()
                .and_then(found_text);
            role = text.and_then(|t| role_in_user_data(&t));
            if role.is_some() {
                break;
            }
        }
    }
    Ok(Some(CloudIdentity {
        provider: "gcp".into(),
        instance_id,
        image_id,
        instance_type,
        region,
        zone,
        role,
    }))
}
