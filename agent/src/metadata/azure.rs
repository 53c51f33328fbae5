//! Azure Instance Metadata Service: `GET /metadata/instance?api-version=2021-02-01` with
//! `Metadata: true`, one JSON document; the user data (base64) from its own path.

use fleetbus_protocol::CloudIdentity;
use hyper::Method;
use serde_json::Value;

use super::{found_text, role_in_user_data, Answer, Asker, MetadataError};

const BASE: &str = "http://169.254.169.254";
const METADATA: (&str, &str) = ("metadata", "true");

fn text(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// The identity, `None` when no Azure IMDS answers.
pub(super) async fn identity(ask: &Asker<'_>) -> Result<Option<CloudIdentity>, MetadataError> {
    let base = ask.base(BASE);
    let url = format!("{base}/metadata/instance?api-version=2021-02-01");
    let document: Value = match ask.ask(Method::GET, &url, &[METADATA]).await {
        Ok(Answer::Found(r)) => match serde_json::from_slice(&r.body) {
            Ok(v) => v,
            Err(_) => return Ok(None), // not Azure's JSON: not Azure
        },
        _ => return Ok(None),
    };
    let compute = &document["compute"];
    let Some(instance_id) = text(&compute["vmId"]) else {
        return Ok(None);
    };
    let image = &compute["storageProfile"]["imageReference"];
    let image_id = text(&image["id"]).or_else(|| {
        let parts: Vec<String> = ["publisher", "offer", "sku", "version"]
            .iter()
            .filter_map(|k| text(&image[*k]))
            .collect();
        (!parts.is_empty()).then(|| parts.join(":"))
    });
    let mut role = compute["tagsList"].as_array().and_then(|tags| {
        tags.iter()
            .find(|t| t["name"].as_str() == Some(ask.role_tag()))
            .and_then(|t| text(&t["value"]))
    });
    if role.is_none() {
        let user_data =
            format!("{base}/metadata/instance/compute/userData?api-version=2021-01-01&format=text");
        let encoded = ask
            .ask(Method::GET, &user_data, &[METADATA])
            .await
            .ok()
            .and_then(found_text);
        role = encoded
            .and_then(|b64| data_encoding::BASE64.decode(b64.as_bytes()).ok())
            .and_then(|bytes| role_in_user_data(&String::from_utf8_lossy(&bytes)));
    }
    Ok(Some(CloudIdentity {
        provider: "azure".into(),
        instance_id,
        image_id,
        instance_type: text(&compute["vmSize"]),
        region: text(&compute["location"]),
        zone: text(&compute["zone"]),
        role,
    }))
}
