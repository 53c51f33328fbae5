//! File transfer, agent → server: a file travels as an `init` carrying its manifest, then
//! its chunks (each one MQTT publish of at most [`MAX_PUBLISH_BYTES`]), then `finish`.
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `fleet/{agent}/files/{file_id}/init` | agent → server | [`FileInit`] |
//! | `fleet/{agent}/files/{file_id}/chunk` | agent → server | [`FileChunk`] |
//! | `fleet/{agent}/files/{file_id}/status` | agent → server | empty (any payload ignored) |
//! | `fleet/{agent}/files/{file_id}/finish` | agent → server | empty (any payload ignored) |
//! | `fleet/{agent}/files/{file_id}/abort` | agent → server | empty (any payload ignored) |
//! | `fleet/{agent}/replies/files` | server → agent | [`FileReply`] |
//! | `fleet/{agent}/files/{file_id}/complete` | server → rules engine | [`FileCompleted`] (JSON) |
//!
//! `init` and `status` are answered with [`FileReply::Status`] (which chunks the server
//! already holds: the agent sends only the others), every chunk with
//! [`FileReply::Chunk`] (stored, duplicate, or rejected with the reason: the agent sends a
//! rejected chunk again), `finish` with [`FileReply::Complete`] once the whole file is
//! verified and its completion message is durable, or [`FileReply::Failed`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::topics::ROOT;

/// Largest MQTT PUBLISH packet a file chunk may produce, fixed header, topic and
/// properties included (AWS IoT Core's and our payload limit).
pub const MAX_PUBLISH_BYTES: usize = 128 * 1024;

/// Chunk size agents use unless configured otherwise: the largest multiple of 1 KiB whose
/// chunk message fits [`MAX_PUBLISH_BYTES`] on the longest possible topic.
pub const DEFAULT_CHUNK_SIZE: u32 = 127 * 1024;

/// Bytes a [`FileChunk`] payload adds around its data, at most (MessagePack map with four
/// named fields, 64-character hash, 32-bit index, 64-bit offset, 32-bit bin length).
pub const CHUNK_ENVELOPE_BYTES: usize = 128;

/// The last segment of a file topic: what the message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAction {
    /// Announces an upload ([`FileInit`]).
    Init,
    /// One chunk ([`FileChunk`]).
    Chunk,
    /// Asks which chunks the server holds.
    Status,
    /// Says every chunk was sent: verify the whole file.
    Finish,
    /// Gives up the upload: the server frees its spool space.
    Abort,
    /// Published by the server when a file is verified ([`FileCompleted`]).
    Complete,
}

impl FileAction {
    /// The topic segment of the action.
    pub fn as_str(self) -> &'static str {
        match self {
            FileAction::Init => "init",
            FileAction::Chunk => "chunk",
            FileAction::Status => "status",
            FileAction::Finish => "finish",
            FileAction::Abort => "abort",
            FileAction::Complete => "complete",
        }
    }

    /// The action a topic segment names.
    pub fn parse(segment: &str) -> Option<FileAction> {
        Some(match segment {
            "init" => FileAction::Init,
            "chunk" => FileAction::Chunk,
            "status" => FileAction::Status,
            "finish" => FileAction::Finish,
            "abort" => FileAction::Abort,
            "complete" => FileAction::Complete,
            _ => return None,
        })
    }
}

/// Topic of `action` for upload `file_id` of `agent`.
pub fn file_topic(agent: &str, file_id: &str, action: FileAction) -> String {
    format!("{ROOT}/{agent}/files/{file_id}/{}", action.as_str())
}

/// Topic on which the server answers `agent`'s file messages.
pub fn file_replies(agent: &str) -> String {
    format!("{ROOT}/{agent}/replies/files")
}

/// Topic filter matching every file completion message.
pub const ALL_FILE_COMPLETIONS: &str = "fleet/+/files/+/complete";

/// Splits the part of a file topic after `files/` into file id and action.
pub fn parse_file_rest(rest: &str) -> Option<(&str, FileAction)> {
    let (file_id, action) = rest.split_once('/')?;
    if file_id.is_empty() || action.contains('/') {
        return None;
    }
    Some((file_id, FileAction::parse(action)?))
}

/// Largest chunk data that fits one publish on `topic` (see [`MAX_PUBLISH_BYTES`]).
pub fn max_chunk_data(topic: &str) -> usize {
    // fixed header (1 + up to 4 bytes of remaining length), topic length prefix, packet id
    let packet = 5 + 2 + topic.len() + 2;
    MAX_PUBLISH_BYTES.saturating_sub(packet + CHUNK_ENVELOPE_BYTES)
}

/// What a file is: sent in [`FileInit`] before its chunks, kept by the server's spool
/// beside the file. The chunker computes it (`fleetbus_chunker::manifest_of`) and checks
/// chunks against it; this is its one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// The upload's id (derived from content, name and chunk size by the sender).
    pub file_id: String,
    /// The file's name (no directories).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file, 64 hex characters.
    pub sha256: String,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunk_count: u32,
    /// MIME type, if known.
    #[serde(default)]
    pub content_type: Option<String>,
    /// User metadata (`--meta key=value`).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// Why a manifest does not agree with itself (the field and the problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadManifest(pub String);

impl FileManifest {
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
    pub fn validate(&self, max_chunk_size: u32) -> Result<(), BadManifest> {
        let bad = |why: String| Err(BadManifest(why));
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
pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    u32::try_from(size.div_ceil(chunk_size.max(1) as u64)).unwrap_or(u32::MAX)
}

/// `init`: announces an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInit {
    /// What will be sent.
    pub manifest: FileManifest,
}

/// `chunk`: one piece of a file, borrowed from the payload it is decoded from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunk<'a> {
    /// Chunk number, from 0.
    pub index: u32,
    /// Where the data starts in the file (`index × chunk_size`).
    pub offset: u64,
    /// SHA-256 of `data`, 64 hex characters.
    #[serde(borrow)]
    pub sha256: std::borrow::Cow<'a, str>,
    /// The bytes.
    #[serde(with = "serde_bytes", borrow)]
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// What happened to one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkOutcome {
    /// Written to the spool.
    Stored,
    /// Already held: nothing written.
    Duplicate,
    /// Refused; nothing written. The agent sends it again (after a `status` if the upload
    /// itself is unknown).
    Rejected,
    /// Never arrived: a later chunk of the same upload did. Chunks travel in order, so it
    /// was lost on the way (the server sheds chunks when it is overloaded); the agent sends
    /// it again at once. Not counted as a refusal.
    Lost,
}

/// Why the server refused something, for programs to act on (the text says it for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The upload is unknown (never initialised, aborted or collected): send `init` again.
    UnknownUpload,
    /// The chunk's data, hash, offset or length disagrees with the manifest: send it again.
    BadChunk,
    /// The manifest is unusable or breaks a limit (file too large): do not retry as is.
    BadManifest,
    /// The agent's spool quota is used up: retry later.
    Quota,
    /// Not every chunk is held yet: send the missing ones (see `status`).
    Incomplete,
    /// The whole file did not hash to the manifest's SHA-256: the server forgot every
    /// chunk; send the file again.
    FileHash,
    /// The server cannot take it now (storage error, sink backlog): retry later.
    Busy,
    /// The payload could not be decoded.
    Malformed,
}

/// The server's answers on `fleet/{agent}/replies/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileReply {
    /// Which chunks the server holds (answers `init` and `status`).
    Status {
        /// The upload.
        file_id: String,
        /// Chunks in the file.
        chunk_count: u32,
        /// Inclusive index ranges held.
        held: Vec<(u32, u32)>,
        /// True when the file is already verified (nothing to send; `finish` confirms).
        complete: bool,
    },
    /// The fate of one chunk.
    Chunk {
        /// The upload.
        file_id: String,
        /// The chunk.
        index: u32,
        /// What happened.
        outcome: ChunkOutcome,
        /// Why it was rejected.
        #[serde(default)]
        reason: Option<String>,
    },
    /// The file is verified and its completion message is durable: the agent may delete
    /// its copy.
    Complete {
        /// The upload.
        file_id: String,
        /// The verified size.
        size: u64,
        /// The verified SHA-256.
        sha256: String,
        /// Where the file lands, one entry per sink the server's rules routed it to:
        /// `SINK: file PATH` (relative to the server's data directory), `SINK:
        /// s3://BUCKET/KEY`... Empty when the server does not say (an upload it delivered
        /// before).
        #[serde(default)]
        landed: Vec<String>,
    },
    /// The upload was aborted and its spool space freed.
    Aborted {
        /// The upload.
        file_id: String,
    },
    /// Something was refused (see [`RefusalKind`]).
    Failed {
        /// The upload.
        file_id: String,
        /// What the agent should do about it.
        kind: RefusalKind,
        /// What is wrong, for people.
        reason: String,
    },
}

impl FileReply {
    /// The upload the reply is about.
    pub fn file_id(&self) -> &str {
        match self {
            FileReply::Status { file_id, .. }
            | FileReply::Chunk { file_id, .. }
            | FileReply::Complete { file_id, .. }
            | FileReply::Aborted { file_id }
            | FileReply::Failed { file_id, .. } => file_id,
        }
    }
}

/// The message the server publishes (through the rules engine, as an ordinary message)
/// when a file is verified: on `fleet/{agent}/files/{file_id}/complete`, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCompleted {
    /// The uploading agent.
    pub agent: String,
    /// Always `file`, so rule conditions can tell completions from records.
    pub kind: String,
    /// The file's description.
    pub file: FileManifest,
    /// Where the verified bytes are, relative to the server's spool directory
    /// (`{agent}/{file_id}/data`). Sinks stream the file from there.
    pub spool: String,
    /// When the file was verified (RFC 3339).
    pub ts: String,
}

/// Encodes a file message or reply as MessagePack with named fields.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, crate::EncodeError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MAX_ID_LEN;

    #[test]
    fn a_full_chunk_on_the_longest_topic_fits_one_publish() {
        let agent = "a".repeat(MAX_ID_LEN);
        let topic = file_topic(&agent, &"f".repeat(32), FileAction::Chunk);
        assert!(DEFAULT_CHUNK_SIZE as usize <= max_chunk_data(&topic));
        let data = vec![7u8; DEFAULT_CHUNK_SIZE as usize];
        let chunk = FileChunk {
            index: u32::MAX,
            offset: u64::MAX,
            sha256: "e".repeat(64).into(),
            data: data.as_slice().into(),
        };
        let payload = encode(&chunk).unwrap();
        assert!(payload.len() - data.len() <= CHUNK_ENVELOPE_BYTES);
        // fixed header 1 + 4, topic 2 + len, packet id 2
        let packet = 1 + 4 + 2 + topic.len() + 2 + payload.len();
        assert!(
            packet <= MAX_PUBLISH_BYTES,
            "{packet} > {MAX_PUBLISH_BYTES}"
        );
    }

    #[test]
    fn chunk_decodes_without_copying_and_replies_round_trip() {
        let chunk = FileChunk {
            index: 3,
            offset: 9,
            sha256: "ab".into(),
            data: (&b"xyz"[..]).into(),
        };
        let bytes = encode(&chunk).unwrap();
        let back: FileChunk<'_> = rmp_serde::from_slice(&bytes).unwrap();
        assert!(matches!(back.data, std::borrow::Cow::Borrowed(_)));
        assert_eq!(back, chunk);
        let reply = FileReply::Failed {
            file_id: "f".into(),
            kind: RefusalKind::Quota,
            reason: "full".into(),
        };
        let back: FileReply = crate::message::decode_as(&encode(&reply).unwrap()).unwrap();
        assert_eq!(back, reply);
        assert_eq!(back.file_id(), "f");
    }

    #[test]
    fn file_topics_parse() {
        let t = file_topic("a1", "f00d", FileAction::Finish);
        assert_eq!(t, "fleet/a1/files/f00d/finish");
        assert_eq!(
            parse_file_rest("f00d/finish"),
            Some(("f00d", FileAction::Finish))
        );
        assert_eq!(parse_file_rest("f00d/bogus"), None);
        assert_eq!(parse_file_rest("f00d"), None);
        assert_eq!(parse_file_rest("/init"), None);
        assert_eq!(parse_file_rest("a/b/init"), None);
    }
}
