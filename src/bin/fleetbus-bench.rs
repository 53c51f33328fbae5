//! `fleetbus-bench`: the benchmarks (`ingest`, `upload`, `jobs`, `wal`), a binary of their
//! own so the product binary carries none of their code or dependencies. It runs the
//! server in-process with the product's allocator settings, so its figures are the
//! product's (docs/benchmarks.md).

use std::process::ExitCode;

use clap::Parser;
use fleetbus::cmd;

/// Same allocator as `fleetbus` (see `src/main.rs`): the figures must be the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure fleetbus side by side with a plain broker, a raw copy, embedded stores.
#[derive(Debug, Parser)]
#[command(name = "fleetbus-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: cmd::bench::BenchCommand,
}

fn main() -> ExitCode {
    cmd::tune_allocator();
    let cli = Cli::parse();
    cmd::init_logging(true);
    cmd::raise_open_file_limit();
    fleetbus_agent_cli::edge::run_async(None, cmd::bench::run(cli.command))
}
