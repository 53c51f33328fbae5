//! The spool's layout, in one place: where it lives under a server's data directory, where
//! an upload's directory and its verified bytes are, and how a path a file completion
//! message carries is resolved without leaving the spool. The file service and the sinks
//! that store files both go through here.
//!
//! ```text
//! {data_dir}/files/spool/{owner}/{file_id}/
//!     manifest.json  held.json  data     (the reassembler's, see `Reassembler`)
//!     ...                                (the server's own notes, e.g. delivery.json)
//! ```

use std::path::{Component, Path, PathBuf};

/// The spool directory, relative to the server's data directory.
pub const SPOOL_DIR: &str = "files/spool";

/// The spool directory under `data_dir`.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(SPOOL_DIR)
}

/// The directory of `owner`'s upload `file_id` under the spool `root`.
pub fn upload_dir(root: &Path, owner: &str, file_id: &str) -> PathBuf {
    root.join(owner).join(file_id)
}

/// The reassembled bytes of an upload, relative to the spool (the form a file completion
/// message carries).
pub fn relative_data_path(owner: &str, file_id: &str) -> String {
    format!("{owner}/{file_id}/{DATA_FILE}")
}

/// The file an upload's bytes are reassembled into, inside its directory.
pub(crate) const DATA_FILE: &str = "data";

/// `relative` (from a completion message) under the spool `root`; `None` when it is empty
/// or would leave the spool (`..`, an absolute path).
pub fn resolve(root: &Path, relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    let inside = !path.as_os_str().is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    inside.then(|| root.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_path_resolves_inside_the_spool_only() {
        let root = Path::new("/data/files/spool");
        let rel = relative_data_path("web-1", "f1");
        assert_eq!(rel, "web-1/f1/data");
        assert_eq!(
            resolve(root, &rel),
            Some(upload_dir(root, "web-1", "f1").join(DATA_FILE))
        );
        for escape in ["", "../etc/passwd", "/etc/passwd", "a/../../b"] {
            assert_eq!(resolve(root, escape), None, "{escape}");
        }
        assert_eq!(spool_dir(Path::new("/data")), root);
    }
}
