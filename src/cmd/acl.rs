//! `fleetbus acl ...`: the topic authorization policy, explained, and exported for an
//! external broker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use fleetbus_broker::acl::{export, Action, Identity, Policy};

/// `fleetbus acl ...`
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Whether a client may publish on a topic or subscribe to a filter, and which rule
    /// decides (exit 0 allowed, 1 denied).
    Check(CheckArgs),
    /// The policy, filled in for every enrolled client (not revoked), in an external
    /// broker's format, on stdout.
    Export(ExportArgs),
}

/// `fleetbus acl export` options.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// A policy file (`[[rule]]` tables); default: the built-in policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Whose credential store.
    #[command(flatten)]
    data: super::agents::ServerData,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// Mosquitto's `acl_file`.
    Mosquitto,
    /// EMQX 5's file authorizer (`acl.conf`).
    Emqx,
}

/// `fleetbus acl check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The client id (the agent id for agents).
    #[arg(long)]
    client: String,
    /// Its role.
    #[arg(long, value_enum, default_value = "agent")]
    role: super::agents::RoleArg,
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

/// Runs `fleetbus acl ...`.
pub fn run(command: AclCommand) -> anyhow::Result<ExitCode> {
    match command {
        AclCommand::Check(args) => check(args),
        AclCommand::Export(args) => export(args),
    }
}

fn load_policy(path: Option<&std::path::Path>) -> anyhow::Result<Policy> {
    Ok(match path {
        Some(path) => Policy::load(path)?,
        None => Policy::default(),
    })
}

fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(args.policy.as_deref())?;
    let clients: Vec<Identity> = args
        .data
        .store()?
        .list()?
        .into_iter()
        .filter(|c| c.revoked_at.is_none())
        .map(|c| c.identity())
        .collect();
    let format = match args.format {
        ExportFormat::Mosquitto => export::Format::Mosquitto,
        ExportFormat::Emqx => export::Format::Emqx,
    };
    print!("{}", export::export(format, &policy, &clients));
    Ok(ExitCode::SUCCESS)
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(args.policy.as_deref())?;
    let who = Identity {
        client_id: args.client,
        role: args.role.into(),
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
