//! The stdout sink: one JSON line per message (at-least-once: a batch interrupted by a
//! crash is printed again).

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::{json_line, Batch, BatchConfig, BoxFuture, BufferConfig, Sink, SinkError};

/// `type = "stdout"`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Sink that receives batches this sink gives up on.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Backpressure settings.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Batch and retry settings.
    #[serde(default)]
    pub batch: BatchConfig,
}

/// Writes each message as a JSON line on standard output.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
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
