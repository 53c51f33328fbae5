//! Crash-safe file replacement: the one helper every piece of state that is rewritten in
//! place (identities, positions, snapshots, upload state, markers) goes through.
//!
//! A `rename` is atomic, but it is only *durable* once the directory holding the name is
//! fsynced: without that, a power loss can bring back the old name (or no file at all)
//! although the rename had returned. The order is: write the bytes to a temporary file in
//! the same directory, fsync it, rename it over the target, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` durably (see the module documentation). The temporary file
/// is `path` with `.tmp` appended to its name; `mode` (e.g. `0o600` for secrets) is set when
/// it is created, so the content is never readable by others, even for an instant.
pub fn replace_file_with_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    let tmp = temporary_name(path);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if let Some(mode) = mode {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let written = options.open(&tmp).and_then(|mut f| {
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)?;
    sync_dir(parent_of(path))
}

/// [`replace_file_with_mode`] with the process's default permissions.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file_with_mode(path, bytes, None)
}

/// Renames `from` to `to` and fsyncs the directories involved, so the move survives a
/// power loss.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    let (a, b) = (parent_of(from), parent_of(to));
    sync_dir(b)?;
    if a != b {
        sync_dir(a)?;
    }
    Ok(())
}

/// fsyncs directory `dir`, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory a path's name lives in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `path` with `.tmp` appended to its file name.
fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace_file(&path, b"one").unwrap();
        replace_file(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_secret_is_owner_only_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential.json");
        replace_file_with_mode(&path, b"token", Some(0o600)).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_failure_names_nothing_half_written() {
        let dir = tempfile::tempdir().unwrap();
        // the target's directory does not exist: the temporary file cannot be made
        let path = dir.path().join("missing").join("x");
        assert!(replace_file(&path, b"x").is_err());
        assert!(!path.exists());
    }

    #[test]
    fn rename_moves_across_directories() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::create_dir(dir.path().join("b")).unwrap();
        let (from, to) = (dir.path().join("a/f"), dir.path().join("b/f"));
        fs::write(&from, b"x").unwrap();
        rename(&from, &to).unwrap();
        assert!(!from.exists() && to.exists());
    }
}

/// Creates `dir` and its parents (like `create_dir_all`), with an error that says what is
/// wrong when something that is not a directory is in the way ("exists and is not a
/// directory" instead of the OS's bare "File exists").
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(std::io::Error::new(
            e.kind(),
            "exists and is not a directory",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(std::io::Error::new(
            e.kind(),
            "a part of the path is a file, not a directory",
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod create_dir_tests {
    #[test]
    fn a_file_in_the_way_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = super::create_dir(&file).unwrap_err().to_string();
        assert_eq!(err, "exists and is not a directory");
        let err = super::create_dir(&file.join("sub"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a file, not a directory"), "{err}");
        super::create_dir(&dir.path().join("a/b")).unwrap();
    }
}
