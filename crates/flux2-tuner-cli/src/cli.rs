//! Command-line definition. Flag names follow Musubi Tuner's (`--model_version`, `--dit`, ...), so
//! existing command lines keep working.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Fine-tune (LoRA) and run Black Forest Labs' FLUX.2 models: dev, klein 4B/9B and klein-base
/// 4B/9B, from the original checkpoint files.
#[derive(Debug, Parser)]
#[command(name = "flux2-tuner", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The jobs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the installation without downloading anything: writes tiny random models and a
    /// dataset, then caches, trains a few steps and generates, checking every stage.
    Selftest(crate::selftest::SelftestArgs),
    /// Generate images (text to image, or editing with --control_image_path), as Musubi's
    /// flux_2_generate_image.py.
    Generate(Box<crate::generate::GenerateArgs>),
    /// Train a LoRA on cached latents and text-encoder outputs, as Musubi's
    /// flux_2_train_network.py.
    Train(Box<crate::train::TrainArgs>),
    /// Print the expected peak device memory of a `train` or `generate` command line, broken
    /// down, whether it fits --vram_gb and the cheapest settings that would (`plan train ...`,
    /// `plan generate ...`, with the same flags). Nothing is loaded.
    Plan(crate::plan::PlanArgs),
    /// Check a DiT checkpoint without running it: infers its configuration, checks every key,
    /// shape and dtype, and says which FLUX.2 version it is.
    Inspect(InspectArgs),
    /// Encode every dataset image (and its control images) with the AE into Musubi-compatible
    /// latent caches, as Musubi's flux_2_cache_latents.py.
    CacheLatents(crate::cache_latents::CacheLatentsArgs),
    /// Encode every caption with the text encoder into Musubi-compatible caches, as Musubi's
    /// flux_2_cache_text_encoder_outputs.py.
    CacheTextEncoderOutputs(crate::cache_text::CacheTextArgs),
}

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct InspectArgs {
    /// The DiT file (BFL format: flux2-dev.safetensors, flux-2-klein-*.safetensors), or the first
    /// shard of a split checkpoint.
    #[arg(long)]
    pub dit: PathBuf,

    /// The version the file must be: dev, klein-4b, klein-base-4b, klein-9b, klein-base-9b.
    /// Without it the version is only reported.
    #[arg(long)]
    pub model_version: Option<String>,
}
