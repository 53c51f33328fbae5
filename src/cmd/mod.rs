//! One module per subcommand; what they share at the edge (logging, signals) is the
//! agent command line's ([`fleetbus_agent_cli::edge`]), which the lean agent binary uses too.

pub mod acl;
pub mod admin_client;
pub mod agents;
pub mod bench;
pub mod bench_binary;
pub mod demo;
pub mod events;
pub mod job;
pub mod keys;
pub mod rules;
pub mod serve;
pub mod table;
pub mod tap;

pub use fleetbus_agent_cli::edge::{init_logging, shutdown_signal, stopped};

/// mimalloc's `mi_option_purge_delay` (the same index in mimalloc v2 and v3; the -sys crate
/// has no constant for it).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Freed memory goes back to the OS after 2 ms instead of mimalloc's default 10 ms: file
/// chunks are 128 KiB buffers allocated on one thread and freed on another at 300+ MB/s,
/// and with the default delay a 1 GiB upload's server peaked at 42-69 MiB instead of 36
/// (docs/benchmarks.md, "File uploads"). Telemetry ingest pays ~5 %. For binaries whose
/// global allocator is mimalloc (`fleetbus`, `fleetbus-bench`).
pub fn tune_allocator() {
    // SAFETY: mi_option_set only stores an option value; any value is valid for this one.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 2) };
}

/// Raises the open-file limit to the hard limit: every connected agent is a socket in the
/// server (and a simulated one in `bench jobs` too), and the usual soft limit of 1024
/// would refuse the 1,021st agent. Failure is only logged: the limit stays as it was.
pub fn raise_open_file_limit() {
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
