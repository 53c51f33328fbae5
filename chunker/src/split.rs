//! The sending side: a file read chunk by chunk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::ChunkError;
use crate::manifest::{sha256_hex, Sha256Hex};
use fleetbus_protocol::FileManifest;

/// One chunk of a file, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its number, from 0.
    pub index: u32,
    /// Where it starts in the file.
    pub offset: u64,
    /// Its bytes.
    pub data: Vec<u8>,
    /// SHA-256 of `data`.
    pub sha256: Sha256Hex,
}

/// Reads chunks of one file described by a manifest. Holds one chunk in memory at a time.
#[derive(Debug)]
pub struct Splitter {
    file: File,
    path: PathBuf,
    manifest: FileManifest,
}

impl Splitter {
    /// Opens `path`, whose manifest is `manifest` (see [`manifest_of`](crate::manifest_of)). Fails if
    /// the file's size no longer matches it.
    pub fn open(path: &Path, manifest: FileManifest) -> Result<Splitter, ChunkError> {
        let file = File::open(path).map_err(|e| ChunkError::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| ChunkError::io(path, "stat", e))?
            .len();
        if len != manifest.size {
            return Err(ChunkError::io(
                path,
                "read",
                std::io::Error::other(format!(
                    "file changed: {len} bytes now, {} when its manifest was made",
                    manifest.size
                )),
            ));
        }
        Ok(Splitter {
            file,
            path: path.to_path_buf(),
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &FileManifest {
        &self.manifest
    }

    /// Reads chunk `index` (`None` past the last chunk).
    pub fn chunk(&self, index: u32) -> Result<Option<Chunk>, ChunkError> {
        let Some(len) = self.manifest.len_of(index) else {
            return Ok(None);
        };
        let offset = self.manifest.offset_of(index);
        let mut data = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut data, offset)
            .map_err(|e| ChunkError::io(&self.path, "read", e))?;
        let sha256 = sha256_hex(&data);
        Ok(Some(Chunk {
            index,
            offset,
            data,
            sha256,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest_of;
    use std::io::Write;

    #[test]
    fn chunks_cover_the_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let m = manifest_of(File::open(&path).unwrap(), "f", 4096).unwrap();
        let s = Splitter::open(&path, m).unwrap();
        let mut joined = Vec::new();
        for i in 0..3 {
            let c = s.chunk(i).unwrap().unwrap();
            assert_eq!(c.offset, i as u64 * 4096);
            assert_eq!(c.sha256, sha256_hex(&c.data));
            joined.extend_from_slice(&c.data);
        }
        assert!(s.chunk(3).unwrap().is_none());
        assert_eq!(joined, data);
    }

    #[test]
    fn a_file_that_changed_since_its_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        let m = manifest_of(File::open(&path).unwrap(), "f", 4).unwrap();
        std::fs::write(&path, b"hello world").unwrap();
        let e = Splitter::open(&path, m).unwrap_err().to_string();
        assert!(e.contains("file changed"), "{e}");
    }
}
