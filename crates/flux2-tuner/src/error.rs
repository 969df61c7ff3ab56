//! The library's error type. Every variant names the file, key or flag involved, what was found
//! and what was expected, so that the command-line program can print it as it is.

use std::path::PathBuf;

/// Errors raised by the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Io {
        path: PathBuf,
        message: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },

    #[error("{path}: tensor `{key}` is missing (expected shape {expected:?})")]
    MissingKey {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
    },

    #[error("{path}: {count} expected tensors are missing, first: {first}")]
    MissingKeys {
        path: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor `{key}` has dtype {found}, expected one of {expected}")]
    WrongDtype {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },

    #[error("{path}: {count} unexpected tensors, first: `{first}` ({hint})")]
    UnexpectedKeys {
        path: PathBuf,
        count: usize,
        first: String,
        hint: String,
    },

    #[error("{path}: the weights are not {expected}: {reason}")]
    WrongModelVersion {
        path: PathBuf,
        expected: String,
        reason: String,
    },

    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },

    #[error("{path}: LoRA module `{module}`: {message}")]
    InvalidLora {
        path: PathBuf,
        module: String,
        message: String,
    },

    #[error("invalid value for {name}: {message}")]
    InvalidArgument { name: String, message: String },

    #[error("{0}")]
    Shape(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },

    #[error("block swap: {0}")]
    BlockSwap(String),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error with the path it happened on and what was being done.
    pub fn io(
        path: impl Into<PathBuf>,
        message: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            message: message.into(),
            source,
        }
    }
}
