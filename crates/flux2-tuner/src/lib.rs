//! flux2-tuner: FLUX.2 models, LoRA, sampling and training on candle.
//!
//! Module map, in pipeline order:
//! - [`checkpoint`]: safetensors files and shards, strict key/shape/dtype checks, atomic writes;
//! - [`models`]: the version table and the DiT;
//! - [`nn`]: layers shared by the models (linear with LoRA, norms, RoPE, attention);
//! - [`lora`]: LoRA files (Musubi format) applied unmerged or merged;
//! - [`sample`]: the sigma schedule;
//! - [`util`]: a seeded random generator.
//!
//! Shape notation in docs: `b` batch, `l` sequence, `n` image tokens, `c` channels, `h`/`w` latent
//! grid.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod image_io;
pub mod lora;
pub mod models;
pub mod nn;
pub mod sample;
pub mod train;
pub mod util;

pub use error::{Error, Result};
