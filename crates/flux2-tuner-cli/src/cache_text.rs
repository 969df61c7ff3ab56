//! `flux2-tuner cache-text-encoder-outputs`: Musubi's `flux_2_cache_text_encoder_outputs.py` with
//! its flag names.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use flux2_tuner::data::{
    cache_text_encoder_outputs, ConfigFallbacks, DatasetConfig, TextCacheOptions,
};
use flux2_tuner::models::ModelVersion;

use crate::cache_progress::CacheProgress;
use crate::device::parse_device;

/// Arguments of `cache-text-encoder-outputs`.
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct CacheTextArgs {
    /// Dataset configuration (Musubi's TOML or JSON).
    #[arg(long)]
    pub dataset_config: PathBuf,
    /// Text encoder weights (Mistral-3 for dev, Qwen3 for klein): a file or the first shard.
    #[arg(long)]
    pub text_encoder: PathBuf,
    /// tokenizer.json (or its folder); by default looked for next to the text encoder and in a
    /// sibling `tokenizer/` folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// FLUX.2 version; selects the text encoder and the cache suffix (f2d, f2k4b, f2k9b).
    #[arg(long, default_value = "dev")]
    pub model_version: String,
    /// Captions per forward pass within a dataset batch; also the dataset batch_size where the
    /// config sets none.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Store the text encoder's linear weights as F8E4M3 (computed in bfloat16).
    #[arg(long)]
    pub fp8_text_encoder: bool,
    /// Skip items whose cache exists with the same caption.
    #[arg(long)]
    pub skip_existing: bool,
    /// Keep caches in the cache directories that no longer belong to the dataset (they are
    /// deleted otherwise, and listed).
    #[arg(long)]
    pub keep_cache: bool,
    /// cpu or cuda (cuda needs a build with `--features cuda`). Default: cuda when available.
    #[arg(long)]
    pub device: Option<String>,
    /// Accepted for Musubi compatibility: captions are small files read while listing the
    /// dataset, so there is no reader pool to size.
    #[arg(long)]
    pub num_workers: Option<usize>,
}

pub fn run(args: &CacheTextArgs) -> Result<()> {
    if args.batch_size == Some(0) {
        bail!("--batch_size must be at least 1");
    }
    let version: ModelVersion = args.model_version.parse()?;
    let fallbacks = ConfigFallbacks {
        batch_size: args.batch_size,
    };
    let config = DatasetConfig::load(&args.dataset_config, &fallbacks)?;
    let options = TextCacheOptions {
        text_encoder: args.text_encoder.clone(),
        tokenizer: args.tokenizer.clone(),
        version,
        device: parse_device(args.device.as_deref())?,
        // Musubi runs the encoder in bfloat16 and stores ctx_vec_bfloat16.
        dtype: DType::BF16,
        fp8: args.fp8_text_encoder,
        batch_size: args.batch_size,
        skip_existing: args.skip_existing,
        keep_cache: args.keep_cache,
    };
    let mut progress = CacheProgress::new();
    let summary = match cache_text_encoder_outputs(&config, &options, &mut progress) {
        Ok(summary) => summary,
        Err(error) => {
            progress.abandon();
            return Err(error.into());
        }
    };
    progress.finish(&summary);
    Ok(())
}
