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
    /// Known agents: id, online or not, last presence message, groups.
    List {
        /// Only the members of this group (the targets a group job would get now).
        #[arg(long)]
        group: Option<String>,
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
        AgentsCommand::List { group } => {
            let client = args.admin.client()?;
            let path = match &group {
                Some(g) => format!("/agents?group={g}"),
                None => "/agents".to_string(),
            };
            let agents: Vec<KnownAgent> = client.get(&path).await?;
            let rows: Vec<[String; 4]> = agents
                .iter()
                .map(|a| {
                    [
                        a.agent.clone(),
                        if a.online { "yes" } else { "no" }.to_string(),
                        a.last_seen
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "-".into()),
                        a.groups.join(","),
                    ]
                })
                .collect();
            super::table::print_table(["agent", "online", "last seen", "groups"], &rows);
            let online = agents.iter().filter(|a| a.online).count();
            println!("{} agent(s), {online} online", agents.len());
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
