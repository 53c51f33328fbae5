//! Identifiers that appear as topic segments: agent ids, stream names, group names.

/// Longest identifier accepted as a topic segment.
pub const MAX_ID_LEN: usize = 128;

/// Why a string cannot be used as an identifier inside a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("{what} is empty")]
    Empty {
        /// What kind of identifier was checked (e.g. "agent id").
        what: &'static str,
    },
    /// The identifier is longer than [`MAX_ID_LEN`].
    #[error("{what} `{value}` is longer than {MAX_ID_LEN} characters")]
    TooLong {
        /// What kind of identifier was checked.
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// The identifier contains a character outside `[A-Za-z0-9._-]`, or is `.`/`..`.
    #[error("{what} `{value}` may only contain letters, digits, '.', '_' and '-' (and is not '.' or '..')")]
    BadChar {
        /// What kind of identifier was checked.
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

/// Checks that `value` is usable as one topic segment and as one path component:
/// 1 to [`MAX_ID_LEN`] characters from `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            what,
            value: value.to_string(),
        });
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_chars || value == "." || value == ".." {
        return Err(IdError::BadChar {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids_and_rejects_topic_metacharacters() {
        assert!(validate_id("agent id", "web-01.eu_1").is_ok());
        for bad in ["", "a/b", "a+b", "#", "..", ".", "a b", "é"] {
            assert!(validate_id("agent id", bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_id("agent id", &"x".repeat(MAX_ID_LEN + 1)).is_err());
    }
}
