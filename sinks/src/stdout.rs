//! The stdout sink: one JSON line per message.

use std::io::Write;
use std::sync::Arc;

use fleetbus_protocol::Message;
use serde::{Deserialize, Serialize};

use crate::{BatchConfig, BoxFuture, BufferConfig, Sink, SinkError, SinkErrorKind};

/// `type = "stdout"`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Queue settings.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Batch settings.
    #[serde(default)]
    pub batch: BatchConfig,
}

/// Writes each message's body as a JSON line on standard output.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn write<'a>(&'a mut self, batch: &'a [Arc<Message>]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut out = std::io::stdout().lock();
            for (i, msg) in batch.iter().enumerate() {
                serde_json::to_writer(&mut out, &msg.body)
                    .map_err(|e| SinkError::after(i, SinkErrorKind::Encode(e.to_string())))?;
                out.write_all(b"\n").map_err(|source| {
                    SinkError::after(
                        i,
                        SinkErrorKind::Io {
                            path: "<stdout>".into(),
                            op: "write",
                            source,
                        },
                    )
                })?;
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            std::io::stdout().flush().map_err(|source| {
                SinkError::after(
                    0,
                    SinkErrorKind::Io {
                        path: "<stdout>".into(),
                        op: "flush",
                        source,
                    },
                )
            })
        })
    }
}
