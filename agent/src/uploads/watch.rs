//! The upload directory: files dropped into `uploads.watch_dir` are queued once they stop
//! changing, and removed (or archived) after the server confirmed them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::config::UploadsConfig;
use crate::uploads::queue::{AfterUpload, UploadQueue};

/// Size and modification time: a file is stable when these did not change between scans.
type Signature = (u64, Option<SystemTime>);

/// Scans `config.watch_dir` every `poll_interval` until `shutdown`.
pub async fn run_watcher(
    queue: Arc<UploadQueue>,
    config: UploadsConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(dir) = config.watch_dir.clone() else {
        return;
    };
    let after = match &config.archive_dir {
        Some(a) => AfterUpload::Archive(a.clone()),
        None => AfterUpload::Remove,
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot create the upload directory");
    }
    tracing::info!(dir = %dir.display(), "watching the upload directory");
    let mut seen: HashMap<PathBuf, Signature> = HashMap::new();
    let mut queued: HashSet<PathBuf> = HashSet::new();
    let mut ticker = tokio::time::interval(config.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        let now = scan(&dir);
        // files gone from the directory (uploaded and removed) may be queued again later
        queued.retain(|p| now.contains_key(p));
        for (path, sig) in &now {
            if queued.contains(path) || seen.get(path) != Some(sig) {
                continue;
            }
            let (q, p, a) = (queue.clone(), path.clone(), after.clone());
            let chunk_size = queue.chunk_size();
            let prepared = tokio::task::spawn_blocking(move || {
                let job = UploadQueue::prepare(&p, chunk_size, BTreeMap::new(), a)?;
                q.submit(&job)?;
                Ok::<_, crate::AgentError>(job)
            })
            .await;
            match prepared {
                Ok(Ok(job)) => {
                    tracing::info!(file = %path.display(), file_id = %job.manifest.file_id, size = job.manifest.size, "file queued for upload");
                    queued.insert(path.clone());
                }
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot queue file for upload (tried again next scan)")
                }
                Err(e) => tracing::error!(error = %e, "upload preparation task failed"),
            }
        }
        seen = now;
    }
}

/// Regular, visible files directly in `dir` with their signatures.
fn scan(dir: &std::path::Path) -> HashMap<PathBuf, Signature> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_file() {
            out.insert(e.path(), (meta.len(), meta.modified().ok()));
        }
    }
    out
}
