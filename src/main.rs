//! The `fleetbus` command: a thin layer that parses arguments and calls the libraries.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the server and agent allocate many small, short-lived objects per message
/// (decoded records, topics); it is markedly faster than the system allocator there
/// (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in mimalloc v2 and v3; the -sys crate
/// has no constant for it).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Freed memory goes back to the OS after 2 ms instead of mimalloc's default 10 ms: file
/// chunks are 128 KiB buffers allocated on one thread and freed on another at 300+ MB/s,
/// and with the default delay a 1 GiB upload's server peaked at 42-69 MiB instead of 36
/// (docs/benchmarks.md, "File uploads"). Telemetry ingest pays ~5 %.
fn tune_allocator() {
    // SAFETY: mi_option_set only stores an option value; any value is valid for this one.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 2) };
}

/// Raises the open-file limit to the hard limit: every connected agent is a socket in the
/// server (and a simulated one in `bench jobs` too), and the usual soft limit of 1024
/// would refuse the 1,021st agent. Failure is only logged: the limit stays as it was.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

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
    Agent(cmd::agent::AgentArgs),
    /// Check or run a rules file.
    Rules {
        #[command(subcommand)]
        command: cmd::rules::RulesCommand,
    },
    /// Measure throughput.
    Bench {
        #[command(subcommand)]
        command: cmd::bench::BenchCommand,
    },
    /// Jobs: push to one agent or a group, follow, list, cancel (via the admin endpoint).
    Job(cmd::job::JobArgs),
    /// Agents the server knows from their presence messages (via the admin endpoint).
    Agents(cmd::agents::AgentsArgs),
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
    tune_allocator();
    let cli = Cli::parse();
    let quiet = match &cli.command {
        Command::Demo(_) | Command::Bench { .. } => true,
        Command::Agent(args) => args.is_upload(),
        _ => false,
    };
    cmd::init_logging(quiet);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => cmd::serve::run(config.as_deref()).await,
            Command::Agent(args) => cmd::agent::run(args).await,
            Command::Rules { command } => cmd::rules::run(command).await,
            Command::Bench { command } => cmd::bench::run(command).await,
            Command::Demo(args) => cmd::demo::run(args).await,
            Command::Job(args) => cmd::job::run(args).await,
            Command::Agents(args) => cmd::agents::run(args).await,
            Command::Acl { command } => cmd::acl::run(command),
            Command::Keys { command } => cmd::keys::run(command),
        }
    });
    // don't wait for blocked threads (rumqttd's router has no shutdown)
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, each said once: many of our errors already end with their cause's
/// text (`open /x: No such file or directory (os error 2)`), which anyhow's `{:#}` would
/// repeat after them.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}
