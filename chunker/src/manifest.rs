//! Computing a file's manifest (the protocol's [`FileManifest`]: what a file is, sent
//! before its chunks) in one streaming pass, and the hashes chunks are checked with.

use std::collections::BTreeMap;
use std::io::Read;

use fleetbus_protocol::files::chunk_count;
use fleetbus_protocol::FileManifest;
use sha2::{Digest, Sha256};

/// A SHA-256 digest as 64 lowercase hex characters.
pub type Sha256Hex = String;

/// Reads `reader` to its end once, computing size and SHA-256, and describes it as `name`
/// cut into `chunk_size`-byte chunks. The file id is a hash of the content hash, the name
/// and the chunk size: the same file uploaded again gets the same id.
pub fn manifest_of(
    mut reader: impl Read,
    name: &str,
    chunk_size: u32,
) -> std::io::Result<FileManifest> {
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
    Ok(FileManifest {
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
        let m = manifest_of(&data[..], "core.dump", 1000).unwrap();
        assert_eq!(m.size, 2500);
        assert_eq!(m.chunk_count, 3);
        assert_eq!(m.sha256, sha256_hex(&data));
        assert_eq!(m.len_of(2), Some(500));
        assert_eq!(m.len_of(3), None);
        assert_eq!(m.offset_of(2), 2000);
        m.validate(1000).unwrap();
        let again = manifest_of(&data[..], "core.dump", 1000).unwrap();
        assert_eq!(again.file_id, m.file_id, "same file, same id");
        let other = manifest_of(&data[..], "other.dump", 1000).unwrap();
        assert_ne!(other.file_id, m.file_id);
    }

    #[test]
    fn an_empty_file_has_no_chunks() {
        let m = manifest_of(&[][..], "empty", 1000).unwrap();
        assert_eq!((m.size, m.chunk_count), (0, 0));
        m.validate(1000).unwrap();
    }

    #[test]
    fn contradictions_are_rejected_naming_the_field() {
        let m = manifest_of(&[1u8; 10][..], "f", 4).unwrap();
        let reason = |m: &FileManifest| m.validate(4).unwrap_err().to_string();
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
