//! `fleetbus bench ...`: the benchmarks are their own binary, `fleetbus-bench`, built and
//! installed beside `fleetbus` (`cargo build --release` makes both). This hands the
//! arguments over to it, so `fleetbus bench ingest ...` keeps working.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// The benchmark binary's file name.
pub const BENCH_BINARY: &str = "fleetbus-bench";

/// Runs `fleetbus-bench ARGS...` from this executable's directory and returns its exit
/// status.
pub fn run(args: &[OsString]) -> anyhow::Result<ExitCode> {
    let binary = beside_this_executable()?;
    if !binary.exists() {
        anyhow::bail!(
            "{} is not installed beside this binary: build it with `cargo build --release --bin {BENCH_BINARY}`",
            binary.display()
        );
    }
    let status = std::process::Command::new(&binary)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

fn beside_this_executable() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let dir = me.parent().context("this executable has no directory")?;
    Ok(dir.join(BENCH_BINARY))
}
