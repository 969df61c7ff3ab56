//! flux2-tuner: FLUX.2 models, LoRA, sampling and training on candle.
//!
//! Module map, in pipeline order:
//! - [`checkpoint`]: safetensors files and shards, strict key/shape/dtype checks, atomic writes;
//! - [`image_io`]: images in and out, Musubi's resize and crop rules;
//! - [`data`]: dataset TOML, buckets, latent and text-encoder caches;
//! - [`models`]: the version table, the DiT, the AE and the text encoders;
//! - [`nn`]: layers shared by the models (linear with LoRA, norms, RoPE, attention); `nn::trainable`
//!   holds the ops with their own backward;
//! - [`lora`]: LoRA files of every common format, applied unmerged or merged;
//! - [`quant`]: F8E4M3 weights with Musubi's block-wise scale;
//! - [`sample`]: the sigma schedule, the Euler sampler and the generation pipeline;
//! - [`train`]: timestep sampling, the LoRA network, optimizer, schedules, logs and the loop;
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
pub mod offload;
pub mod plan;
pub mod quant;
pub mod sample;
pub mod train;
pub mod util;

pub use error::{Error, Result};
