//! The error type shared by every crate of the workspace.

use thiserror::Error;

/// Result alias used across the workspace.
pub type Result<T, E = KvError> = core::result::Result<T, E>;

/// Everything that can go wrong when configuring or using a cache, a policy or a model.
///
/// Each variant names the offending value and what would have been valid, so the CLI can print
/// it as one readable line.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KvError {
    /// A configuration field holds a value outside its valid range.
    #[error("invalid {field} = {value}: {expected}")]
    InvalidConfig {
        /// The field, as it is spelled in config files.
        field: String,
        /// The rejected value, formatted.
        value: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// A tensor handed to the cache or an attention module has the wrong shape.
    #[error("shape mismatch for {what}: got {got:?}, expected {expected}")]
    Shape {
        /// Which tensor.
        what: String,
        /// Its actual dimensions.
        got: Vec<usize>,
        /// The expected dimensions, described.
        expected: String,
    },
    /// A lookup by name found nothing (side data, preset, policy, ...).
    #[error("unknown {kind} '{name}'; valid: {valid}")]
    Unknown {
        /// What kind of thing was looked up.
        kind: String,
        /// The name asked for.
        name: String,
        /// The names that exist.
        valid: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file involved.
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl KvError {
    /// Builds an [`KvError::InvalidConfig`] from anything printable.
    pub fn config(
        field: impl Into<String>,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// Checks that every `(field, value)` count is at least 1, naming the first that is not.
    pub fn require_positive(fields: &[(&str, usize)]) -> Result<()> {
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((field, v)) => Err(Self::config(*field, v, "at least 1")),
            None => Ok(()),
        }
    }

    /// Builds an [`KvError::Shape`].
    pub fn shape(what: impl Into<String>, got: &[usize], expected: impl Into<String>) -> Self {
        Self::Shape {
            what: what.into(),
            got: got.to_vec(),
            expected: expected.into(),
        }
    }

    /// Builds an [`KvError::Io`] for a path.
    pub fn io(path: impl AsRef<std::path::Path>, message: impl ToString) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            message: message.to_string(),
        }
    }
}
