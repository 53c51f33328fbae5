//! `fleetbus-agent`: the agent alone, for the machines of a fleet. The same commands as
//! `fleetbus agent` in the full binary, without the broker, the rules engine, the sinks
//! (S3 SDK, SQLite) or the benchmarks: a smaller file to ship and less memory per machine.

use std::process::ExitCode;

use clap::Parser;
use fleetbus_agent_cli::{edge, AgentArgs};

/// The fleetbus agent: collectors, disk outbox, uploads, jobs, one outbound MQTT connection.
#[derive(Debug, Parser)]
#[command(name = "fleetbus-agent", version, about)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edge::init_logging(cli.args.is_upload());
    // an agent needs few threads: collectors, the connection, uploads, one job at a time
    edge::run_async(Some(2), fleetbus_agent_cli::run(cli.args))
}
