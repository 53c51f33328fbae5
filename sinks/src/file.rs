//! The file sink: each message's body as one JSON line, appended to the file its path
//! template names (directories are created as needed).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbus_protocol::Message;
use serde::{Deserialize, Serialize};

use crate::template::PathTemplate;
use crate::{BatchConfig, BoxFuture, BufferConfig, Sink, SinkError, SinkErrorKind};

/// Files not written to for this long are closed at the next flush.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// `type = "file"`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Path template relative to the server's `data_dir` (see [`PathTemplate`]).
    pub path: String,
    /// Most files kept open at once.
    #[serde(default = "default_max_open_files")]
    pub max_open_files: usize,
    /// Queue settings.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Batch settings.
    #[serde(default)]
    pub batch: BatchConfig,
}

fn default_max_open_files() -> usize {
    64
}

impl FileSinkConfig {
    /// Checks the template and limits.
    pub fn validate(&self) -> Result<(), String> {
        PathTemplate::parse(&self.path).map_err(|e| format!("path: {e}"))?;
        if self.max_open_files == 0 {
            return Err("max_open_files must be at least 1".into());
        }
        Ok(())
    }
}

struct OpenFile {
    writer: BufWriter<File>,
    last_write: Instant,
}

/// Appends JSON lines to templated files under a base directory.
pub struct FileSink {
    base: PathBuf,
    template: PathTemplate,
    max_open: usize,
    open: HashMap<PathBuf, OpenFile>,
    line: Vec<u8>,
}

impl FileSink {
    /// A file sink writing under `data_dir`.
    pub fn new(config: &FileSinkConfig, data_dir: &Path) -> Result<FileSink, SinkError> {
        let template = PathTemplate::parse(&config.path)
            .map_err(|e| SinkError::after(0, SinkErrorKind::Config(e.to_string())))?;
        Ok(FileSink {
            base: data_dir.to_path_buf(),
            template,
            max_open: config.max_open_files,
            open: HashMap::new(),
            line: Vec::with_capacity(1024),
        })
    }

    fn write_one(&mut self, msg: &Message) -> Result<(), SinkErrorKind> {
        let path = self.base.join(self.template.render(msg));
        self.line.clear();
        serde_json::to_writer(&mut self.line, &msg.body)
            .map_err(|e| SinkErrorKind::Encode(e.to_string()))?;
        self.line.push(b'\n');
        if !self.open.contains_key(&path) {
            if self.open.len() >= self.max_open {
                self.close_all()?;
            }
            let file = open_append(&path)?;
            self.open.insert(
                path.clone(),
                OpenFile {
                    writer: BufWriter::with_capacity(64 * 1024, file),
                    last_write: Instant::now(),
                },
            );
        }
        let Some(open) = self.open.get_mut(&path) else {
            return Ok(());
        };
        open.last_write = Instant::now();
        open.writer
            .write_all(&self.line)
            .map_err(|source| SinkErrorKind::Io {
                path: path.clone(),
                op: "write",
                source,
            })
    }

    fn flush_all(&mut self) -> Result<(), SinkErrorKind> {
        let mut first_error = None;
        for (path, open) in self.open.iter_mut() {
            if let Err(source) = open.writer.flush() {
                first_error.get_or_insert(SinkErrorKind::Io {
                    path: path.clone(),
                    op: "flush",
                    source,
                });
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn close_all(&mut self) -> Result<(), SinkErrorKind> {
        self.flush_all()?;
        self.open.clear();
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, SinkErrorKind> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| SinkErrorKind::Io {
            path: dir.to_path_buf(),
            op: "create directory",
            source,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SinkErrorKind::Io {
            path: path.to_path_buf(),
            op: "open",
            source,
        })
}

impl Sink for FileSink {
    fn write<'a>(&'a mut self, batch: &'a [Arc<Message>]) -> BoxFuture<'a, Result<(), SinkError>> {
        // buffered appends to local files: short enough to do on the async worker
        Box::pin(async move {
            for (i, msg) in batch.iter().enumerate() {
                self.write_one(msg)
                    .map_err(|kind| SinkError::after(i, kind))?;
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.flush_all().map_err(|kind| SinkError::after(0, kind))?;
            self.open.retain(|_, f| f.last_write.elapsed() < IDLE_CLOSE);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(path: &str) -> FileSinkConfig {
        FileSinkConfig {
            path: path.into(),
            max_open_files: 2,
            buffer: BufferConfig::default(),
            batch: BatchConfig::default(),
        }
    }

    #[tokio::test]
    async fn writes_json_lines_into_templated_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(&config("t/{agent}/{stream}.jsonl"), dir.path()).unwrap();
        let batch: Vec<Arc<Message>> = (0..5)
            .map(|i| {
                let agent = ["a", "b", "c"][i % 3];
                Arc::new(
                    Message::decode(
                        &format!("fleet/{agent}/telemetry/m"),
                        format!(r#"{{"seq":{i}}}"#).as_bytes(),
                    )
                    .unwrap(),
                )
            })
            .collect();
        sink.write(&batch).await.unwrap();
        sink.flush().await.unwrap();
        let a = fs::read_to_string(dir.path().join("t/a/m.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = a
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["seq"], 0);
        assert_eq!(lines[1]["seq"], 3);
        assert_eq!(lines[0]["agent"], "a");
        assert!(dir.path().join("t/c/m.jsonl").exists());
    }

    #[tokio::test]
    async fn unwritable_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("blocker"),
            "a file where a directory should be",
        )
        .unwrap();
        let mut sink = FileSink::new(&config("blocker/{agent}.jsonl"), dir.path()).unwrap();
        let m = Arc::new(Message::decode("fleet/a/telemetry/m", b"{}").unwrap());
        let err = sink.write(&[m]).await.unwrap_err();
        assert_eq!(err.written, 0);
        assert!(err.to_string().contains("blocker"), "{err}");
    }
}
