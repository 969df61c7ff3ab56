//! The FLUX.2 autoencoder (BFL `ae.safetensors`): configuration inferred from the file, encoder,
//! decoder, latent patchify and BatchNorm, and a writer of random checkpoints.

mod blocks;
mod config;
mod decoder;
mod direct;
mod encoder;
mod kernels;
mod latents;
mod layers;
mod model;
mod writer;

pub use config::{is_harmless_extra, AeConfig, CONFIG_FILE_NAME, PATCH_SIZE};
pub use latents::{patchify, unpatchify};
pub use model::{check_ae_checkpoint, AutoEncoder};
pub use writer::write_random_ae;
