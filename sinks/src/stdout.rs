//! The stdout sink: one JSON line per message (at-least-once: a batch interrupted by a
//! crash is printed again).

use std::io::Write;

use serde::{Deserialize, Serialize};

use fleetbus_config::Problems;
use fleetbus_protocol::Message;

use crate::config::{SinkPlace, SinkType};
use crate::{json_line, Batch, BoxFuture, Sink, SinkError};

/// `type = "stdout"`: no keys of its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

impl SinkType for StdoutSinkConfig {
    fn check(&self, _: &mut Problems) {}

    fn file_destination(&self, _: &Message) -> Option<String> {
        Some("stdout".into())
    }

    fn build(&self, _: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(StdoutSink))
    }
}

/// Writes each message as a JSON line on standard output.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn writes_json(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut buf = Vec::new();
            for item in &batch.items {
                json_line(item, &mut buf)?;
            }
            let mut out = std::io::stdout().lock();
            out.write_all(&buf)
                .and_then(|_| out.flush())
                .map_err(|e| SinkError::io("<stdout>", "write", e))
        })
    }
}
