//! `fleetbus rules tap FILTER`: the live view of what the server's rules engine does with
//! the messages on some topics, read from the admin endpoint (`GET /rules/tap`, an
//! operator token) and printed one message at a time. The server closes a view at its
//! connection's lifetime (`http.connection_lifetime`); the command opens it again.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;

use super::admin_client::{refusal, AdminEndpoint};

/// What to show and where from.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    /// MQTT topic filter of the messages to show (`fleet/+/telemetry/#`).
    pub filter: String,
    /// Only this rule: the messages its topic filters match too, and what it did.
    #[arg(long)]
    pub rule: Option<String>,
    /// Print each message as the endpoint sends it (one JSON object a line).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// The admin endpoint and the operator token.
    #[command(flatten)]
    pub admin: AdminEndpoint,
}

/// Runs the view until Ctrl-C, `--count` messages, or an error from the endpoint.
pub async fn run(args: TapArgs) -> anyhow::Result<()> {
    let token = args.admin.token()?;
    let base = args.admin.url.trim_end_matches('/').to_string();
    tokio::task::spawn_blocking(move || watch(&base, token, &args)).await?
}

fn watch(base: &str, token: Option<String>, args: &TapArgs) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut url = format!("{base}/rules/tap?filter={}", encode(&args.filter));
    if let Some(rule) = &args.rule {
        url.push_str(&format!("&rule={}", encode(rule)));
    }
    let mut shown = 0u64;
    loop {
        let mut request = agent.get(&url);
        if let Some(token) = &token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request
            .call()
            .with_context(|| format!("cannot reach the admin endpoint at {url}"))?;
        if !response.status().is_success() {
            return Err(refusal(&mut response, &url));
        }
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if args.json {
                println!("{line}");
            } else {
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(event) => print!("{}", describe(&event)),
                    Err(_) => println!("{line}"),
                }
            }
            shown += 1;
            if args.count.is_some_and(|c| shown >= c) {
                return Ok(());
            }
        }
        // the server ended the view (its connection's lifetime): open it again
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One message as lines for a person.
fn describe(event: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let mut out = String::new();
    if let Some(skipped) = event["skipped"].as_u64().filter(|&n| n > 0) {
        out.push_str(&format!(
            "({skipped} messages not shown: more than the view takes)\n"
        ));
    }
    out.push_str(&format!(
        "{} {} {}\n",
        s(&event["received"]),
        s(&event["topic"]),
        s(&event["outcome"])
    ));
    if !event["message"].is_null() {
        out.push_str(&format!("  message {}\n", event["message"]));
    }
    let rules = event["rules"].as_array().cloned().unwrap_or_default();
    if rules.is_empty() {
        out.push_str("  no rule matched\n");
    }
    for r in rules {
        let sinks: Vec<String> = r["sinks"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        let mut line = format!(
            "  rule {} [{}]: {}",
            s(&r["rule"]),
            r["part"],
            s(&r["outcome"])
        );
        if !sinks.is_empty() {
            line.push_str(&format!(" -> {}", sinks.join(", ")));
        }
        if let Some(e) = r["error"].as_str() {
            line.push_str(&format!(": {e}"));
        }
        match &r["made"] {
            serde_json::Value::Null if s(&r["outcome"]) == "sent" => {
                line.push_str(" (as published)")
            }
            serde_json::Value::Null => {}
            made => line.push_str(&format!(" {made}")),
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}
