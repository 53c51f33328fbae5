//! A sink's saved resume position in the write-ahead log: one number in a small file,
//! replaced atomically.

use std::path::{Path, PathBuf};

use fleetbus_sinks::{write_atomically, SinkError};

/// The file holding a sink's resume position.
#[derive(Debug, Clone)]
pub struct PositionFile {
    path: PathBuf,
}

impl PositionFile {
    /// The position file `NAME.pos` in `dir`.
    pub fn new(dir: &Path, name: &str) -> PositionFile {
        PositionFile {
            path: dir.join(format!("{name}.pos")),
        }
    }

    /// The saved position (0 when none was saved yet).
    pub fn load(&self) -> Result<u64, SinkError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse().map_err(|_| {
                SinkError::Config(format!("{}: not a position: {text:?}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(SinkError::io(&self.path, "read", e)),
        }
    }

    /// Saves `position` durably.
    pub fn save(&self, position: u64) -> Result<(), SinkError> {
        write_atomically(&self.path, position.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = PositionFile::new(dir.path(), "s");
        assert_eq!(p.load().unwrap(), 0);
        p.save(42).unwrap();
        assert_eq!(p.load().unwrap(), 42);
    }
}
