//! `fleetbus acl ...`: the topic authorization policy, explained.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetbus_broker::acl::{Action, Identity, Policy, Role};

/// `fleetbus acl ...`
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Whether a client may publish on a topic or subscribe to a filter, and which rule
    /// decides (exit 0 allowed, 1 denied).
    Check(CheckArgs),
}

/// `fleetbus acl check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The client id (the agent id for agents).
    #[arg(long)]
    client: String,
    /// Its role.
    #[arg(long, value_enum, default_value = "agent")]
    role: RoleArg,
    /// Its groups, comma-separated.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// A topic to publish on.
    #[arg(
        long,
        conflicts_with = "subscribe",
        required_unless_present = "subscribe"
    )]
    publish: Option<String>,
    /// A filter to subscribe to.
    #[arg(long)]
    subscribe: Option<String>,
    /// A policy file (`[[rule]]` tables); default: the built-in policy.
    #[arg(long)]
    policy: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Agent,
    Server,
    Operator,
}

/// Runs `fleetbus acl ...`.
pub fn run(command: AclCommand) -> anyhow::Result<ExitCode> {
    match command {
        AclCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let policy = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Policy::from_toml(&text).with_context(|| path.display().to_string())?
        }
        None => Policy::default(),
    };
    let who = Identity {
        client_id: args.client,
        role: match args.role {
            RoleArg::Agent => Role::Agent,
            RoleArg::Server => Role::Server,
            RoleArg::Operator => Role::Operator,
        },
        groups: args.groups,
    };
    let (action, topic) = match (args.publish, args.subscribe) {
        (Some(t), _) => (Action::Publish, t),
        (None, Some(f)) => (Action::Subscribe, f),
        (None, None) => anyhow::bail!("--publish or --subscribe is required"),
    };
    let decision = policy.check(&who, action, &topic);
    match &decision.rule {
        Some(rule) => println!("allow: rule `{rule}` ({})", decision.reason),
        None => println!("deny: {}", decision.reason),
    }
    Ok(if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
