//! The `fleetbus` command: a thin layer that parses arguments and calls the libraries.
//! The benchmarks are a binary of their own (`fleetbus-bench`, `src/bin/`), so this one
//! carries none of their code or dependencies; `fleetbus bench ...` hands over to it.

use fleetbus::cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the server allocates many small, short-lived objects per message (decoded
/// records, topics); it is markedly faster than the system allocator there (see
/// docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fleet telemetry bus: embedded MQTT broker, agents with a disk outbox, TOML rules, sinks.
#[derive(Debug, Parser)]
#[command(name = "fleetbus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: embedded broker + rules engine + sinks in one process.
    Serve {
        /// Server configuration file (TOML). Without it: built-in defaults and FLEETBUS_* variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run an agent: collectors, disk outbox, uploads, one outbound MQTT connection.
    Agent(fleetbus_agent_cli::AgentArgs),
    /// Check or run a rules file.
    Rules {
        #[command(subcommand)]
        command: cmd::rules::RulesCommand,
    },
    /// Measure throughput: runs `fleetbus-bench` (installed beside this binary) with the
    /// same arguments (`fleetbus bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        /// `ingest`, `upload`, `jobs` or `wal`, and their options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Jobs: push to one agent or a group, follow, list, cancel (via the admin endpoint).
    Job(cmd::job::JobArgs),
    /// Agents the server knows from their presence messages (via the admin endpoint).
    Agents(cmd::agents::AgentsArgs),
    /// The event console: folded events, acknowledge, close, silence (via the admin
    /// endpoint).
    Events(cmd::events::EventsArgs),
    /// The topic authorization policy: who may publish and subscribe where.
    Acl {
        #[command(subcommand)]
        command: cmd::acl::AclCommand,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: cmd::keys::KeysCommand,
    },
    /// Start a server and three agents on the embedded defaults, show what arrived where.
    Demo(cmd::demo::DemoArgs),
}

fn main() -> ExitCode {
    cmd::tune_allocator();
    let cli = Cli::parse();
    let quiet = match &cli.command {
        Command::Demo(_) | Command::Bench { .. } => true,
        Command::Agent(args) => args.is_upload(),
        _ => false,
    };
    cmd::init_logging(quiet);
    cmd::raise_open_file_limit();
    fleetbus_agent_cli::edge::run_async(None, async move {
        match cli.command {
            Command::Serve { config } => cmd::serve::run(config.as_deref()).await,
            Command::Agent(args) => fleetbus_agent_cli::run(args).await,
            Command::Rules { command } => cmd::rules::run(command).await,
            Command::Bench { args } => cmd::bench_binary::run(&args),
            Command::Demo(args) => cmd::demo::run(args).await,
            Command::Job(args) => cmd::job::run(args).await,
            Command::Agents(args) => cmd::agents::run(args).await,
            Command::Events(args) => cmd::events::run(args).await,
            Command::Acl { command } => cmd::acl::run(command),
            Command::Keys { command } => cmd::keys::run(command),
        }
    })
}
