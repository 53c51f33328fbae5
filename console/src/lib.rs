//! The event console: events folded into rows an operator works through.
//!
//! Events arrive as records with an `event` (from the log, like a sink: durable, exactly
//! once). Duplicates fold, as cloud event management does, by class, source (the agent),
//! rule and resources: one row with a count, the first and last time, the latest severity
//! and text, and the agent's tags (its cloud identity). A clearing event (a check's
//! recovery, a flapping stop) closes the row with its key. Operators acknowledge a row
//! with a comment, close it, and silence events for a while by agent, rule or group; an
//! event a silence covers is still folded (nothing is lost) but its row is marked
//! silenced. Closed rows are kept for a retention period. It also keeps each agent's
//! checks with their latest result (from records on stream `checks`), for `fleetbus
//! agents show`. One agent has at most a bounded
//! number of open rows; events that would open more fold into its one overflow row.
//!
//! This crate's store is SQLite ([`Console`]), in the server's `data_dir` by default; the
//! sinks crate keeps the same rows in PostgreSQL when the console is configured with a
//! `url` (`fleetbus_sinks::console`), folding by [`fold_key`] the same way.

mod store;

pub use store::{
    fold_key, json, ms, overflow_event, time, CheckRow, CheckUpdate, Console, ConsoleError,
    EventRow, Filter, FilterValue, Incoming, RowState, Silence, SilenceRow,
    DEFAULT_MAX_OPEN_PER_AGENT, MAX_LIST, OVERFLOW_CLASS,
};
