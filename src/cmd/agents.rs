//! `fleetbus agents ...`: the agents a running server knows from their presence messages
//! (through the admin endpoint).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use fleetbus_jobs::KnownAgent;

use super::admin_client::AdminEndpoint;

/// `fleetbus agents ...`
#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    admin: AdminEndpoint,
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
}

/// Runs `fleetbus agents ...`.
pub async fn run(args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let client = args.admin.client();
    match args.command {
        AgentsCommand::List { group } => {
            let path = match &group {
                Some(g) => format!("/agents?group={g}"),
                None => "/agents".to_string(),
            };
            let agents: Vec<KnownAgent> = client.get(&path).await?;
            println!("{:<32} {:<8} {:<24} groups", "agent", "online", "last seen");
            for a in &agents {
                println!(
                    "{:<32} {:<8} {:<24} {}",
                    a.agent,
                    if a.online { "yes" } else { "no" },
                    a.last_seen
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into()),
                    a.groups.join(",")
                );
            }
            let online = agents.iter().filter(|a| a.online).count();
            println!("{} agent(s), {online} online", agents.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}
