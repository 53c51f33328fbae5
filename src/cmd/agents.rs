//! `fleetbus agents ...`: credentials (enroll, revoke, list: written to the server's
//! credential store, with or without the server running) and the agents a running server
//! knows from their presence messages (through the admin endpoint).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetbus_broker::acl::Role;
use fleetbus_broker::credentials::CredentialStore;
use fleetbus_jobs::{Forgotten, KnownAgent};

use super::admin_client::AdminEndpoint;

/// Where the server keeps its data (and so its credential store).
#[derive(Debug, Args)]
pub(crate) struct ServerData {
    /// The server's configuration file (its `data_dir` holds the credential store).
    #[arg(long, global = true, env = "FLEETBUS_CONFIG")]
    config: Option<PathBuf>,
    /// The server's data directory (instead of --config).
    #[arg(long, global = true, conflicts_with = "config")]
    data_dir: Option<PathBuf>,
}

impl ServerData {
    pub(crate) fn store(&self) -> anyhow::Result<CredentialStore> {
        let data_dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => {
                super::serve::load_config(self.config.as_deref())?
                    .into_inner()
                    .data_dir
            }
        };
        CredentialStore::open_in(&data_dir).context("opening the credential store")
    }
}

/// A role on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum RoleArg {
    Agent,
    Server,
    Operator,
    /// May only enroll agents (its token can be baked into an image).
    Bootstrap,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Agent => Role::Agent,
            RoleArg::Server => Role::Server,
            RoleArg::Operator => Role::Operator,
            RoleArg::Bootstrap => Role::Bootstrap,
        }
    }
}

/// `fleetbus agents ...`
#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    admin: AdminEndpoint,
    #[command(flatten)]
    data: ServerData,
    #[command(subcommand)]
    command: AgentsCommand,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Known agents: id, online or not, last presence message, groups, cloud identity.
    List {
        /// Only the members of this group (the targets a group job would get now).
        #[arg(long)]
        group: Option<String>,
        /// Only agents with this operator tag (`KEY=VALUE`).
        #[arg(long)]
        tag: Option<String>,
        /// Only agents whose cloud identity has this (`region=eu-west-1`, `role=web`,
        /// `provider=aws`, `instance_type=...`).
        #[arg(long)]
        meta: Option<String>,
        /// Only agents online, or only those offline.
        #[arg(long, value_parser = ["online", "offline"])]
        state: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One agent: identity, cloud identity, groups, tags, online and last seen, its open
    /// events and check problems (from the event console), its latest jobs.
    Show {
        /// The agent id.
        id: String,
    },
    /// How many agents were online per hour (of a group, of a role): "how many web
    /// servers did we run last week".
    Hours {
        /// Only members of this group.
        #[arg(long)]
        group: Option<String>,
        /// Only agents of this role (their cloud identity's).
        #[arg(long)]
        role: Option<String>,
        /// How far back (`24h`, `7d`; at most 35 days).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
    },
    /// Creates a client's credential and prints its token once (only a hash is kept).
    Enroll {
        /// The client id (the agent id for agents).
        id: String,
        /// Its groups, comma-separated (agents: the group job topics it may subscribe to).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Its role.
        #[arg(long, value_enum, default_value = "agent")]
        role: RoleArg,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Issue a new token for an enrolled id (the old token stops working, and a
        /// running server drops the connection that used it).
        #[arg(long)]
        replace: bool,
    },
    /// Revokes a credential: refused from the next CONNECT on, and a running server drops
    /// the live connection within a second.
    Revoke {
        /// The client id.
        id: String,
    },
    /// Enrolled credentials: id, role, groups, enrolled, revoked.
    Credentials,
    /// Forgets an agent the server knows (an id it no longer uses): it leaves `agents list`,
    /// the targets of group jobs pushed from now on and of active jobs it has not started.
    /// Its credential is untouched (`revoke` refuses it); if it connects again it is known
    /// again.
    Forget {
        /// The agent id.
        id: String,
    },
}

/// `fleetbus agents show ID`: the registry's record, the agent's checks with their latest
/// results and its open rows (from the event console), its latest jobs.
async fn show(admin: &AdminEndpoint, id: &str) -> anyhow::Result<ExitCode> {
    let client = admin.client()?;
    let detail: fleetbus_jobs::AgentDetail = client.get(&format!("/agents/{id}")).await?;
    let a = &detail.agent;
    let seen = a
        .last_seen
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into());
    println!("agent       {}", a.agent);
    println!(
        "online      {} (last seen {seen})",
        if a.online { "yes" } else { "no" }
    );
    println!("groups      {}", a.groups.join(", "));
    if let Some(b) = &a.birth {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        println!("hostname    {}", or_dash(&b.hostname));
        println!("addresses   {}", b.ips.join(", "));
        println!("os          {}", or_dash(&b.os));
        println!("version     {}", or_dash(&b.agent_version));
        let tags: Vec<String> = b.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("tags        {}", tags.join(", "));
        match &b.cloud {
            Some(c) => {
                let fields: Vec<String> =
                    c.tags().iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("cloud       {}", fields.join(", "));
            }
            None => println!("cloud       -"),
        }
    }
    let open: Vec<fleetbus_console::EventRow> = client
        .get(&format!(
            "/events{}",
            super::admin_client::query(&[
                ("agent", Some(id.to_string())),
                ("open", Some("true".into())),
                ("silenced", Some("true".into()))
            ])
        ))
        .await
        .unwrap_or_default();
    let checks: Vec<fleetbus_console::CheckRow> = client
        .get(&format!(
            "/checks{}",
            super::admin_client::query(&[("agent", Some(id.to_string()))])
        ))
        .await
        .unwrap_or_default();
    println!("\nchecks ({}):", checks.len());
    for c in &checks {
        let state = fleetbus_protocol::CheckState::of_code(c.status)
            .map(|s| s.to_string())
            .unwrap_or_else(|| c.status.to_string());
        println!(
            "  {:<20} {state} ({}) at {}: {}",
            c.name,
            c.state_type,
            c.last.format("%Y-%m-%d %H:%M:%S"),
            c.output
        );
    }
    println!("open events ({}):", open.len());
    for r in &open {
        println!(
            "  #{} {} severity {} x{}: {}",
            r.id, r.class, r.severity, r.count, r.text
        );
    }
    println!("latest jobs ({}):", detail.jobs.len());
    for j in &detail.jobs {
        println!(
            "  {} {} {}{}",
            j.job_id,
            j.operation,
            j.execution.state,
            j.execution
                .finished
                .map(|t| format!(" at {}", t.format("%Y-%m-%d %H:%M:%S")))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `fleetbus agents ...`.
pub async fn run(args: AgentsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentsCommand::Enroll {
            id,
            groups,
            role,
            out,
            replace,
        } => {
            let token = args
                .data
                .store()?
                .enroll(&id, role.into(), &groups, replace)?;
            match out {
                Some(path) => {
                    super::keys::write_secret(&path, &token)?;
                    eprintln!("enrolled {id}: token written to {}", path.display());
                }
                None => {
                    eprintln!("enrolled {id}; its token (shown once, give it to the agent as connection.token_file):");
                    println!("{token}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AgentsCommand::Revoke { id } => {
            args.data.store()?.revoke(&id)?;
            eprintln!("revoked {id}: a running server drops its connection within a second");
            Ok(ExitCode::SUCCESS)
        }
        AgentsCommand::Credentials => {
            let all = args.data.store()?.list()?;
            let rows: Vec<[String; 5]> = all
                .iter()
                .map(|c| {
                    [
                        c.id.clone(),
                        c.role.as_str().to_string(),
                        c.groups.join(","),
                        c.enrolled_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                        c.revoked_at
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            super::table::print_table(["id", "role", "groups", "enrolled", "revoked"], &rows);
            Ok(ExitCode::SUCCESS)
        }
        AgentsCommand::List {
            group,
            tag,
            meta,
            state,
            json,
        } => {
            let client = args.admin.client()?;
            let path = format!(
                "/agents{}",
                super::admin_client::query(&[
                    ("group", group),
                    ("tag", tag),
                    ("meta", meta),
                    ("state", state)
                ])
            );
            let agents: Vec<KnownAgent> = client.get(&path).await?;
            if json {
                for a in &agents {
                    println!("{}", serde_json::to_string(a)?);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<[String; 7]> = agents
                .iter()
                .map(|a| {
                    let cloud = a.birth.as_ref().and_then(|b| b.cloud.as_ref());
                    let dash = || "-".to_string();
                    [
                        a.agent.clone(),
                        if a.online { "yes" } else { "no" }.to_string(),
                        a.last_seen
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(dash),
                        a.groups.join(","),
                        cloud.map(|c| c.provider.clone()).unwrap_or_else(dash),
                        cloud.and_then(|c| c.region.clone()).unwrap_or_else(dash),
                        cloud.and_then(|c| c.role.clone()).unwrap_or_else(dash),
                    ]
                })
                .collect();
            super::table::print_table(
                [
                    "agent",
                    "online",
                    "last seen",
                    "groups",
                    "cloud",
                    "region",
                    "role",
                ],
                &rows,
            );
            let online = agents.iter().filter(|a| a.online).count();
            println!("{} agent(s), {online} online", agents.len());
            Ok(ExitCode::SUCCESS)
        }
        AgentsCommand::Show { id } => show(&args.admin, &id).await,
        AgentsCommand::Hours { group, role, since } => {
            let client = args.admin.client()?;
            let hours = (since.as_secs() / 3600).max(1);
            let path = format!(
                "/agents/hours{}",
                super::admin_client::query(&[
                    ("hours", Some(hours.to_string())),
                    ("group", group),
                    ("role", role)
                ])
            );
            let counts: Vec<fleetbus_jobs::HourCount> = client.get(&path).await?;
            let rows: Vec<[String; 2]> = counts
                .iter()
                .map(|c| {
                    [
                        c.hour.format("%Y-%m-%d %H:00").to_string(),
                        c.agents.to_string(),
                    ]
                })
                .collect();
            super::table::print_table(["hour (UTC)", "agents"], &rows);
            let most = counts.iter().map(|c| c.agents).max().unwrap_or(0);
            let sum: u64 = counts.iter().map(|c| c.agents).sum();
            let mean = if counts.is_empty() {
                0.0
            } else {
                sum as f64 / counts.len() as f64
            };
            println!(
                "{} hour(s) with agents online; at most {most}, on average {mean:.1} in those hours",
                counts.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        AgentsCommand::Forget { id } => {
            let client = args.admin.client()?;
            let forgotten: Forgotten = client
                .post(&format!("/agents/{id}/forget"), &serde_json::json!({}))
                .await?;
            println!(
                "forgot {}; removed from {} active job(s) it had not started",
                forgotten.agent,
                forgotten.removed_from.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
