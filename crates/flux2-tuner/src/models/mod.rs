//! The FLUX.2 models.

pub mod ae;
pub mod dit;
pub mod text;
pub mod version;

pub use version::{GuidanceMode, ModelVersion, TextEncoderKind, VersionInfo};
