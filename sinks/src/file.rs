//! The file sink: each message as one JSON line, appended to the file its path template
//! names (directories are created as needed).
//!
//! Exactly once: before a batch is appended, a marker file records for every file it
//! touches the length before and after the batch (and fsyncs it); the appends are then
//! written and fsynced. If a crash or an error interrupts a batch, the files are cut back
//! to their lengths before it and the batch is written again, so nothing is duplicated.
//! Each file sink must have files of its own (no two sinks appending to one file).
//!
//! A file completion message (see [`crate::completion`]) is not written as a line: the
//! verified file is placed at the path the template names for it (e.g.
//! `files/{agent}/{file.name}`) under a temporary name, then renamed into place and the
//! directory fsynced, so writing it again after a crash just replaces it. By default it is
//! hard-linked to the spool file (already fsynced and never written again once verified:
//! no second copy of the bytes); across filesystems, or with `completed_files = "copy"`,
//! it is copied and fsynced.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::completion::completed_file;
use crate::template::PathTemplate;
use crate::write_atomically;
use fleetbus_config::Problems;
use fleetbus_protocol::Message;

use crate::config::{SinkPlace, SinkType};
use crate::{json_line, Batch, BoxFuture, ErrorClass, Sink, SinkError};

/// `type = "file"`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Path template relative to the server's `data_dir` (see [`PathTemplate`]).
    pub path: String,
    /// How a completed file reaches its path: a hard link to the verified spool file where
    /// the filesystem allows it (the default), or always a copy.
    #[serde(default)]
    pub completed_files: CompletedFiles,
}

impl SinkType for FileSinkConfig {
    fn check(&self, p: &mut Problems) {
        if let Err(e) = PathTemplate::parse(&self.path) {
            p.add("path", e.to_string());
        }
    }

    fn file_destination(&self, msg: &Message) -> Option<String> {
        let path = PathTemplate::parse(&self.path).ok()?;
        Some(format!("file {}", path.render(msg)))
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(FileSink::new(
            place.name,
            self,
            place.data_dir,
            place.state_dir,
        )?))
    }
}

/// How the file sink places a completed file at its templated path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompletedFiles {
    /// A hard link to the verified spool file (no bytes copied); a copy where the spool and
    /// the destination are on different filesystems or the filesystem has no hard links.
    #[default]
    Link,
    /// Always a copy of its own (fsynced).
    Copy,
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
    completed_files: CompletedFiles,
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
            completed_files: config.completed_files,
        })
    }

    /// Renders a batch into its lines, grouped per file in first-seen order, and the
    /// completed files to place. No I/O but the spool file's size check. Messages that can
    /// never be written here (a path the filesystem cannot take, a completion whose file is
    /// gone, a body that cannot be encoded) are refused together, by position
    /// ([`SinkError::Rejected`]), before anything is written.
    fn render(&self, batch: &Batch) -> Result<Rendered, SinkError> {
        let mut rendered = Rendered::default();
        let mut slot: HashMap<PathBuf, usize> = HashMap::new();
        let mut rejected: Vec<(usize, SinkError)> = Vec::new();
        for (n, item) in batch.items.iter().enumerate() {
            let message = match item.message() {
                Ok(m) => m,
                Err(e) => {
                    rejected.push((n, e));
                    continue;
                }
            };
            let relative = self.template.render(message);
            if let Err(e) = usable_path(&relative) {
                rejected.push((n, e));
                continue;
            }
            let path = self.base.join(relative);
            if item.dead_letter().is_none() {
                if let Some(file) = completed_file(&self.base, message) {
                    match file {
                        Ok(file) => rendered.copies.push((file.path, path, n)),
                        Err(e) => rejected.push((n, e)),
                    }
                    continue;
                }
            }
            let i = match slot.get(&path) {
                Some(&i) => i,
                None => {
                    slot.insert(path.clone(), rendered.files.len());
                    rendered.files.push((path, Vec::new(), Vec::new()));
                    rendered.files.len() - 1
                }
            };
            let (_, lines, items) = &mut rendered.files[i];
            let before = lines.len();
            match json_line(item, lines) {
                Ok(()) => items.push(n),
                Err(e) => {
                    lines.truncate(before);
                    rejected.push((n, e));
                }
            }
        }
        // a retryable problem (a completed file's spool unreadable for now) retries it all
        if let Some(i) = rejected
            .iter()
            .position(|(_, e)| e.class() == ErrorClass::Retryable)
        {
            return Err(rejected.swap_remove(i).1);
        }
        match rejected.first() {
            None => Ok(rendered),
            Some(_) => {
                let items = rejected.iter().map(|(n, _)| *n).collect();
                let (_, error) = rejected.swap_remove(0);
                Err(SinkError::Rejected {
                    items,
                    error: Box::new(error),
                })
            }
        }
    }
}

/// A batch rendered for the file sink.
#[derive(Default)]
struct Rendered {
    /// (file, its new lines, positions of the batch's messages in them)
    files: Vec<(PathBuf, Vec<u8>, Vec<usize>)>,
    /// (spool file, where it goes, position of its completion message)
    copies: Vec<(PathBuf, PathBuf, usize)>,
}

/// Longest name of one path component on the filesystems we write to (NAME_MAX).
const MAX_NAME_BYTES: usize = 255;
/// Longest relative path accepted (PATH_MAX is 4096 with the data directory in front).
const MAX_PATH_BYTES: usize = 2048;

/// Whether the rendered relative `path` can exist at all: a message whose substituted
/// values make a component longer than the filesystem allows would fail on every retry.
fn usable_path(path: &str) -> Result<(), SinkError> {
    let too_long = path.len() > MAX_PATH_BYTES || path.split('/').any(|c| c.len() > MAX_NAME_BYTES);
    match too_long {
        false => Ok(()),
        true => Err(SinkError::io(
            path,
            "render path",
            std::io::Error::from_raw_os_error(36), // ENAMETOOLONG
        )),
    }
}

/// Appends a rendered batch exactly once (see the module documentation): blocking I/O. A
/// permanent error on one file names the batch positions of the messages bound for it.
fn append_batch(
    marker_path: &Path,
    first: u64,
    next: u64,
    files: &[(PathBuf, Vec<u8>, Vec<usize>)],
) -> Result<(), SinkError> {
    if let Some(marker) = load_marker(marker_path)? {
        if !complete(&marker) {
            roll_back(&marker)?;
        }
    }
    let mut lengths = Vec::with_capacity(files.len());
    for (path, data, items) in files {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| SinkError::io(dir, "create directory", e).for_items(items.clone()))?;
        }
        let pre = match fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(SinkError::io(path, "stat", e).for_items(items.clone())),
        };
        lengths.push((path.clone(), pre, pre + data.len() as u64));
    }
    let marker = Marker {
        first,
        next,
        files: lengths,
    };
    let bytes = serde_json::to_vec(&marker).map_err(|e| SinkError::Encode(e.to_string()))?;
    write_atomically(marker_path, &bytes)?;
    for (path, data, items) in files {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| SinkError::io(path, "open", e).for_items(items.clone()))?;
        f.write_all(data)
            .and_then(|_| f.sync_data())
            .map_err(|e| SinkError::io(path, "append", e).for_items(items.clone()))?;
    }
    Ok(())
}

/// Places a completed file at `to`: a hard link (or, with [`CompletedFiles::Copy`] or where
/// linking fails, an fsynced copy) under a temporary name, renamed into place, directory
/// fsynced. Idempotent: placing it again replaces it, or finds it already linked.
fn place_file(from: &Path, to: &Path, how: CompletedFiles) -> Result<(), SinkError> {
    let dir = to.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| SinkError::io(dir, "create directory", e))?;
    if how == CompletedFiles::Link && same_file(from, to) {
        // placed before (a retry after a crash): make sure the name is durable
        return sync_dir(dir);
    }
    let mut tmp_name = to.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".fleetbus-tmp");
    let tmp = to.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SinkError::io(&tmp, "remove stale temporary file", e)),
    }
    let linked = how == CompletedFiles::Link
        && match fs::hard_link(from, &tmp) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(from = %from.display(), to = %tmp.display(), error = %e, "cannot link the completed file; copying it");
                false
            }
        };
    if !linked {
        fs::copy(from, &tmp)
            .and_then(|_| fs::File::open(&tmp)?.sync_all())
            .map_err(|e| SinkError::io(&tmp, "copy completed file", e))?;
    }
    fleetbus_support::durable::rename(&tmp, to)
        .map_err(|e| SinkError::io(to, "rename completed file", e))?;
    tracing::info!(from = %from.display(), to = %to.display(), linked, "completed file placed");
    Ok(())
}

/// fsyncs directory `dir`, so that a rename into it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    fleetbus_support::sync_dir(dir).map_err(|e| SinkError::io(dir, "fsync directory", e))
}

/// True when `a` and `b` name the same file (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The marker of the last batch, if there is one. A marker that cannot be parsed (garbled
/// by something outside fleetbus; two servers on one `data_dir` did it before the data
/// directory was locked) is set aside as `{name}.marker.garbled-{ms}` and treated as
/// absent: the sink resumes from its saved position, so the batches written since that
/// save are written again. Nothing acknowledged is lost; those few batches may appear
/// twice.
fn load_marker(marker_path: &Path) -> Result<Option<Marker>, SinkError> {
    let bytes = match fs::read(marker_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SinkError::io(marker_path, "read", e)),
    };
    let error = match serde_json::from_slice(&bytes) {
        Ok(marker) => return Ok(Some(marker)),
        Err(e) => e,
    };
    let mut aside = marker_path.as_os_str().to_owned();
    aside.push(format!(
        ".garbled-{}",
        chrono::Utc::now().timestamp_millis()
    ));
    let aside = PathBuf::from(aside);
    fleetbus_support::durable::rename(marker_path, &aside)
        .map_err(|e| SinkError::io(marker_path, "set aside the unreadable batch marker", e))?;
    tracing::error!(marker = %marker_path.display(), kept_as = %aside.display(), %error, "file sink: unreadable batch marker set aside; resuming from the saved position (the last batches may be written twice)");
    Ok(None)
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

impl Sink for FileSink {
    fn writes_json(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let Rendered { files, copies } = self.render(batch)?;
            let marker_path = self.marker_path.clone();
            let (first, next) = (batch.first, batch.next);
            let how = self.completed_files;
            // fsyncs: off the async workers
            tokio::task::spawn_blocking(move || {
                for (from, to, n) in &copies {
                    place_file(from, to, how).map_err(|e| e.for_items(vec![*n]))?;
                }
                append_batch(&marker_path, first, next, &files)
            })
            .await
            .map_err(|e| SinkError::Task(e.to_string()))?
        })
    }

    fn recover(&mut self, saved: u64) -> BoxFuture<'_, Result<u64, SinkError>> {
        Box::pin(async move {
            let Some(marker) = load_marker(&self.marker_path)? else {
                return Ok(saved);
            };
            if marker.next <= saved {
                return Ok(saved);
            }
            if complete(&marker) {
                Ok(marker.next)
            } else {
                roll_back(&marker)?;
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
