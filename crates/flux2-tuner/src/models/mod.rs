//! The FLUX.2 models.

pub mod dit;
pub mod version;

pub use version::{GuidanceMode, ModelVersion, TextEncoderKind, VersionInfo};
