//! The file sink: each message as one JSON line, appended to the file its path template
//! names (directories are created as needed).
//!
//! Exactly once: before a batch is appended, a marker file records for every file it
//! touches the length before and after the batch (and fsyncs it); the appends are then
//! written and fsynced. If a crash or an error interrupts a batch, the files are cut back
//! to their lengths before it and the batch is written again, so nothing is duplicated.
//! Each file sink must have files of its own (no two sinks appending to one file).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::position::write_atomically;
use crate::template::PathTemplate;
use crate::{json_line, Batch, BatchConfig, BoxFuture, BufferConfig, Sink, SinkError};

/// `type = "file"`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Path template relative to the server's `data_dir` (see [`PathTemplate`]).
    pub path: String,
    /// Sink that receives batches this sink gives up on (see `batch.max_attempts`).
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Backpressure settings.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Batch and retry settings.
    #[serde(default)]
    pub batch: BatchConfig,
}

impl FileSinkConfig {
    /// Checks the template.
    pub fn validate(&self) -> Result<(), String> {
        PathTemplate::parse(&self.path).map_err(|e| format!("path: {e}"))?;
        Ok(())
    }
}

/// What the last batch did to which files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    first: u64,
    next: u64,
    /// (file, length before, length after)
    files: Vec<(PathBuf, u64, u64)>,
}

/// Appends JSON lines to templated files under a base directory, exactly once per batch.
pub struct FileSink {
    base: PathBuf,
    template: PathTemplate,
    marker_path: PathBuf,
}

impl FileSink {
    /// A file sink writing under `data_dir`, keeping its marker in `state_dir`.
    pub fn new(
        name: &str,
        config: &FileSinkConfig,
        data_dir: &Path,
        state_dir: &Path,
    ) -> Result<FileSink, SinkError> {
        let template =
            PathTemplate::parse(&config.path).map_err(|e| SinkError::Config(e.to_string()))?;
        Ok(FileSink {
            base: data_dir.to_path_buf(),
            template,
            marker_path: state_dir.join(format!("{name}.marker")),
        })
    }

    fn load_marker(&self) -> Result<Option<Marker>, SinkError> {
        match fs::read(&self.marker_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                SinkError::Config(format!(
                    "{}: unreadable batch marker: {e}",
                    self.marker_path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SinkError::io(&self.marker_path, "read", e)),
        }
    }

    /// True when every file of the marker has its after-batch length.
    fn complete(marker: &Marker) -> bool {
        marker.files.iter().all(|(path, _, post)| {
            fs::metadata(path)
                .map(|m| m.len() == *post)
                .unwrap_or(false)
        })
    }

    /// Cuts the files of an interrupted batch back to their lengths before it.
    fn roll_back(marker: &Marker) -> Result<(), SinkError> {
        for (path, pre, _) in &marker.files {
            let Ok(meta) = fs::metadata(path) else {
                continue;
            };
            if meta.len() > *pre {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| SinkError::io(path, "open for roll-back", e))?;
                f.set_len(*pre)
                    .and_then(|_| f.sync_data())
                    .map_err(|e| SinkError::io(path, "roll back interrupted batch", e))?;
                tracing::warn!(file = %path.display(), from = meta.len(), to = pre, "file sink: cut back a batch that was interrupted; it is written again");
            }
        }
        Ok(())
    }

    fn write_batch(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if let Some(marker) = self.load_marker()? {
            if !Self::complete(&marker) {
                Self::roll_back(&marker)?;
            }
        }
        // group the lines per file, keeping their order
        let mut order: Vec<PathBuf> = Vec::new();
        let mut lines: HashMap<PathBuf, Vec<u8>> = HashMap::new();
        for item in &batch.items {
            let path = self.base.join(self.template.render(&item.message));
            let buf = match lines.get_mut(&path) {
                Some(b) => b,
                None => {
                    order.push(path.clone());
                    lines.entry(path).or_default()
                }
            };
            json_line(item, buf)?;
        }
        let mut files = Vec::with_capacity(order.len());
        for path in &order {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| SinkError::io(dir, "create directory", e))?;
            }
            let pre = match fs::metadata(path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(SinkError::io(path, "stat", e)),
            };
            let len = lines.get(path).map(|b| b.len() as u64).unwrap_or(0);
            files.push((path.clone(), pre, pre + len));
        }
        let marker = Marker {
            first: batch.first,
            next: batch.next,
            files,
        };
        let bytes = serde_json::to_vec(&marker).map_err(|e| SinkError::Encode(e.to_string()))?;
        write_atomically(&self.marker_path, &bytes)?;
        for path in &order {
            let data = lines.get(path).map(Vec::as_slice).unwrap_or_default();
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| SinkError::io(path, "open", e))?;
            f.write_all(data)
                .and_then(|_| f.sync_data())
                .map_err(|e| SinkError::io(path, "append", e))?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        // local appends: short enough to do on the async worker
        Box::pin(async move { self.write_batch(batch) })
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        Box::pin(async move {
            let Some(marker) = self.load_marker()? else {
                return Ok(saved);
            };
            if marker.next <= saved {
                return Ok(saved);
            }
            if Self::complete(&marker) {
                Ok(marker.next)
            } else {
                Self::roll_back(&marker)?;
                Ok(saved.max(marker.first))
            }
        })
    }

    fn exactly_once(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
