//! The manifest: what a file is, sent before its chunks.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Rejection;

/// A SHA-256 digest as 64 lowercase hex characters.
pub type Sha256Hex = String;

/// Describes one file to transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Identifies the upload: derived from the content and name (see
    /// [`Manifest::for_reader`]), so uploading the same file again is the same upload.
    pub file_id: String,
    /// The file's name (no directories).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: Sha256Hex,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// Number of chunks (`ceil(size / chunk_size)`, 0 for an empty file).
    pub chunk_count: u32,
    /// MIME type, if known.
    #[serde(default)]
    pub content_type: Option<String>,
    /// User metadata (`--meta key=value`).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads `reader` to its end once, computing size and SHA-256, and describes it as
    /// `name` cut into `chunk_size`-byte chunks. The file id is a hash of the content hash,
    /// the name and the chunk size: the same file uploaded again gets the same id.
    pub fn for_reader(
        mut reader: impl Read,
        name: &str,
        chunk_size: u32,
    ) -> std::io::Result<Manifest> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let sha256 = hex::encode(hasher.finalize());
        let chunk_size = chunk_size.max(1);
        let file_id = file_id(&sha256, name, chunk_size);
        Ok(Manifest {
            file_id,
            name: name.to_string(),
            size,
            sha256,
            chunk_size,
            chunk_count: chunk_count(size, chunk_size),
            content_type: None,
            meta: BTreeMap::new(),
        })
    }

    /// Where chunk `index` starts.
    pub fn offset_of(&self, index: u32) -> u64 {
        index as u64 * self.chunk_size as u64
    }

    /// How long chunk `index` is (`None` past the end).
    pub fn len_of(&self, index: u32) -> Option<u64> {
        (index < self.chunk_count).then(|| {
            let start = self.offset_of(index);
            (self.size - start).min(self.chunk_size as u64)
        })
    }

    /// Checks that the manifest agrees with itself: a usable id and name, a chunk count
    /// that matches size and chunk size, a hash that looks like a SHA-256.
    pub fn validate(&self, max_chunk_size: u32) -> Result<(), Rejection> {
        let bad = |why: String| Err(Rejection::Manifest(why));
        if self.file_id.is_empty()
            || self.file_id.len() > 64
            || !self
                .file_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(format!(
                "file_id {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                self.file_id
            ));
        }
        if self.name.is_empty()
            || self.name.len() > 255
            || self.name.contains(['/', '\\', '\0'])
            || self.name == "."
            || self.name == ".."
        {
            return bad(format!(
                "name {:?} must be a plain file name (1-255 bytes, no path separators)",
                self.name
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!("sha256 {:?} is not 64 hex characters", self.sha256));
        }
        if self.chunk_size == 0 || self.chunk_size > max_chunk_size {
            return bad(format!(
                "chunk_size {} must be between 1 and {max_chunk_size}",
                self.chunk_size
            ));
        }
        let expected = chunk_count(self.size, self.chunk_size);
        if self.chunk_count != expected {
            return bad(format!(
                "chunk_count {} disagrees with size {} / chunk_size {} (expected {expected})",
                self.chunk_count, self.size, self.chunk_size
            ));
        }
        Ok(())
    }
}

/// `ceil(size / chunk_size)`, saturating (a manifest that needs more chunks than a u32 holds
/// fails validation).
fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    u32::try_from(size.div_ceil(chunk_size.max(1) as u64)).unwrap_or(u32::MAX)
}

/// The deterministic id of a file: 32 hex characters of SHA-256(sha256 | name | chunk size).
fn file_id(sha256: &str, name: &str, chunk_size: u32) -> String {
    let mut h = Sha256::new();
    h.update(sha256.as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    h.update([0]);
    h.update(chunk_size.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

/// SHA-256 of `data` as hex.
pub(crate) fn sha256_hex(data: &[u8]) -> Sha256Hex {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_file_and_its_chunks() {
        let data = vec![7u8; 2500];
        let m = Manifest::for_reader(&data[..], "core.dump", 1000).unwrap();
        assert_eq!(m.size, 2500);
        assert_eq!(m.chunk_count, 3);
        assert_eq!(m.sha256, sha256_hex(&data));
        assert_eq!(m.len_of(2), Some(500));
        assert_eq!(m.len_of(3), None);
        assert_eq!(m.offset_of(2), 2000);
        m.validate(1000).unwrap();
        let again = Manifest::for_reader(&data[..], "core.dump", 1000).unwrap();
        assert_eq!(again.file_id, m.file_id, "same file, same id");
        let other = Manifest::for_reader(&data[..], "other.dump", 1000).unwrap();
        assert_ne!(other.file_id, m.file_id);
    }

    #[test]
    fn an_empty_file_has_no_chunks() {
        let m = Manifest::for_reader(&[][..], "empty", 1000).unwrap();
        assert_eq!((m.size, m.chunk_count), (0, 0));
        m.validate(1000).unwrap();
    }

    #[test]
    fn contradictions_are_rejected_naming_the_field() {
        let m = Manifest::for_reader(&[1u8; 10][..], "f", 4).unwrap();
        let reason = |m: &Manifest| m.validate(4).unwrap_err().to_string();
        let mut lie = m.clone();
        lie.size = 100;
        assert!(reason(&lie).contains("chunk_count 3 disagrees with size 100"));
        let mut lie = m.clone();
        lie.name = "../etc/passwd".into();
        assert!(reason(&lie).contains("name"));
        let mut lie = m.clone();
        lie.chunk_size = 8;
        assert!(reason(&lie).contains("chunk_size 8 must be between 1 and 4"));
        let mut lie = m;
        lie.sha256 = "zz".into();
        assert!(reason(&lie).contains("sha256"));
    }
}
