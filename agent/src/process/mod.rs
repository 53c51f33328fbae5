//! Running a program for the agent (a job's handler, a check's plugin): no shell, its own
//! process group, every process it started ended with it, output captured up to a limit,
//! and on timeout SIGTERM, a grace period, then SIGKILL, with every child reaped.
//! Telegraf's exec input left timed-out scripts as zombies (influxdata/telegraf#2476) and
//! killed without SIGTERM, orphaning children (#2526).

pub(crate) mod contain;
pub(crate) mod exec;
