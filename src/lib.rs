//! The commands of the `fleetbus` binaries, as a library both binaries share: `fleetbus`
//! (the product: server, agent, operators' commands) and `fleetbus-bench` (the
//! benchmarks). Code only one binary calls is not linked into the other, so the product
//! carries neither the benchmarks nor what only they use (the in-process S3 server,
//! redb, fjall).

pub mod cmd;
