//! `flux2-tuner cache-latents`: Musubi's `flux_2_cache_latents.py` with its flag names.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use flux2_tuner::data::{cache_latents, ConfigFallbacks, DatasetConfig, LatentCacheOptions};
use flux2_tuner::models::ModelVersion;

use crate::cache_progress::CacheProgress;
use crate::device::parse_device;

/// Arguments of `cache-latents`.
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct CacheLatentsArgs {
    /// Dataset configuration (Musubi's TOML or JSON).
    #[arg(long)]
    pub dataset_config: PathBuf,
    /// Autoencoder file (ae.safetensors, BFL format).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// FLUX.2 version; selects the cache suffix (dev: f2d, klein 4B: f2k4b, klein 9B: f2k9b).
    #[arg(long, default_value = "dev")]
    pub model_version: String,
    /// AE dtype, also the dtype of the cached latents: float32 (default) or bfloat16.
    #[arg(long)]
    pub vae_dtype: Option<String>,
    /// cpu or cuda (cuda needs a build with `--features cuda`). Default: cuda when available.
    #[arg(long)]
    pub device: Option<String>,
    /// Images per AE call within a bucket batch; also the dataset batch_size where the config
    /// sets none.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Images read and resized in parallel. Default: CPU count - 1.
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Skip items whose cache exists with the current bucket and control sizes (a cache whose
    /// bucket no longer matches is re-encoded).
    #[arg(long)]
    pub skip_existing: bool,
    /// Keep caches in the cache directories that no longer belong to the dataset (they are
    /// deleted otherwise, and listed).
    #[arg(long)]
    pub keep_cache: bool,
    /// List unreadable images and go on, instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Musubi's dataset preview (image, console, video): not available here.
    #[arg(long)]
    pub debug_mode: Option<String>,
    /// Dataset preview option (with --debug_mode): not available here.
    #[arg(long)]
    pub console_width: Option<usize>,
    /// Dataset preview option (with --debug_mode): not available here.
    #[arg(long)]
    pub console_back: Option<String>,
    /// Dataset preview option (with --debug_mode): not available here.
    #[arg(long)]
    pub console_num_images: Option<usize>,
    /// Accepted for Musubi compatibility: this program does not use cuDNN.
    #[arg(long)]
    pub disable_cudnn_backend: bool,
}

/// `--vae_dtype` (Musubi's `str_to_dtype` names).
pub fn parse_vae_dtype(value: Option<&str>) -> Result<DType> {
    Ok(match value {
        None | Some("float32" | "fp32" | "float") => DType::F32,
        Some("bfloat16" | "bf16") => DType::BF16,
        Some(other) => bail!("--vae_dtype: `{other}` is not float32 or bfloat16"),
    })
}

/// Musubi's default number of loader threads: CPU count - 1, at least 1.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1).max(1))
        .unwrap_or(1)
}

pub fn run(args: &CacheLatentsArgs) -> Result<()> {
    if args.debug_mode.is_some()
        || args.console_width.is_some()
        || args.console_back.is_some()
        || args.console_num_images.is_some()
    {
        bail!(
            "--debug_mode / --console_*: the dataset preview is not supported by this program; \
             remove these flags"
        );
    }
    if args.batch_size == Some(0) || args.num_workers == Some(0) {
        bail!("--batch_size and --num_workers must be at least 1");
    }
    let version: ModelVersion = args.model_version.parse()?;
    let vae = args
        .vae
        .clone()
        .context("--vae is required (the ae.safetensors file)")?;
    let fallbacks = ConfigFallbacks {
        batch_size: args.batch_size,
    };
    let config = DatasetConfig::load(&args.dataset_config, &fallbacks)?;
    let options = LatentCacheOptions {
        vae,
        version,
        vae_dtype: parse_vae_dtype(args.vae_dtype.as_deref())?,
        device: parse_device(args.device.as_deref())?,
        batch_size: args.batch_size,
        num_workers: args.num_workers.unwrap_or_else(default_workers),
        skip_existing: args.skip_existing,
        keep_cache: args.keep_cache,
        skip_bad_images: args.skip_bad_images,
    };
    let mut progress = CacheProgress::new();
    let summary = cache_latents(&config, &options, &mut progress);
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => {
            progress.abandon();
            return Err(error.into());
        }
    };
    progress.finish(&summary);
    Ok(())
}
