//! The FLUX.2 diffusion transformer.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod model;
pub mod tokens;
pub mod weights;
pub mod writer;

pub use config::{DitConfig, CONFIG_FILE_NAME};
pub use model::{check_dit_checkpoint, DitInput, Flux2Dit};
