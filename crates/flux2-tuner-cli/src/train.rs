//! `flux2-tuner train`: Musubi's `flux_2_train_network.py` with its flag names. Every Musubi
//! training flag is either implemented or refused with the reason (none is silently ignored).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use flux2_tuner::models::ModelVersion;
use flux2_tuner::train::metadata::RunDescription;
use flux2_tuner::train::network::NetworkConfig;
use flux2_tuner::train::timesteps::{TimestepConfig, TimestepSampling, WeightingScheme};
use flux2_tuner::train::trainer::{recommended_sampling, train, TrainObserver, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::parse_device;

/// Arguments of `train` (Musubi's names). A flag given twice takes its last value, so the
/// command line overrides `--config_file`.
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case", args_override_self = true)]
pub struct TrainArgs {
    /// FLUX.2 version of the DiT: dev, klein-4b, klein-base-4b, klein-9b, klein-base-9b.
    #[arg(long, default_value = "dev")]
    pub model_version: String,
    /// DiT file (BFL format) to train a LoRA for.
    #[arg(long)]
    pub dit: Option<PathBuf>,
    /// AE file (for sample images during training; recorded in the metadata).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// AE dtype for sample images: float32 (default for FLUX.2, as Musubi) or bfloat16.
    #[arg(long)]
    pub vae_dtype: Option<String>,
    /// Text encoder for --sample_prompts (Mistral-3 for dev, Qwen3 for klein; a file or the
    /// first shard). Loaded once before training to encode the sample prompts, then freed.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Dataset TOML (Musubi's format); run cache-latents and cache-text-encoder-outputs first.
    #[arg(long)]
    pub dataset_config: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Output file base name.
    #[arg(long, default_value = "lora")]
    pub output_name: String,
    /// Must be networks.lora_flux_2 (accepted for compatibility).
    #[arg(long)]
    pub network_module: Option<String>,
    /// LoRA rank.
    #[arg(long)]
    pub network_dim: Option<usize>,
    /// LoRA alpha (scale = alpha / rank; 0 means alpha = rank).
    #[arg(long, default_value_t = 1.0)]
    pub network_alpha: f64,
    /// Dropout on the LoRA down-projection outputs.
    #[arg(long)]
    pub network_dropout: Option<f64>,
    /// key=value network options: rank_dropout, module_dropout, include_patterns,
    /// exclude_patterns, loraplus_lr_ratio.
    #[arg(long, num_args = 1..)]
    pub network_args: Vec<String>,
    /// Continue from this LoRA file.
    #[arg(long)]
    pub network_weights: Option<PathBuf>,
    /// Optimizer (as Musubi): AdamW, AdamW8bit, Adafactor (built-ins, any case);
    /// prodigyopt.Prodigy, lion_pytorch.Lion, bitsandbytes.optim.Lion,
    /// bitsandbytes.optim.AdamW8bit, transformers.optimization.Adafactor (Python paths; plain
    /// Prodigy and Lion are accepted too). Adafactor defaults to relative_step=True: its own
    /// rate, with --learning_rate as the initial one and the adafactor schedule (no warmup).
    #[arg(long, default_value = "AdamW")]
    pub optimizer_type: String,
    /// key=value optimizer options, values as Python literals (e.g. weight_decay=0.01
    /// betas=(0.9,0.999) relative_step=False d_coef=2); an unknown key is an error listing the
    /// optimizer's keys.
    #[arg(long, num_args = 1..)]
    pub optimizer_args: Vec<String>,
    #[arg(long, default_value_t = 2e-6)]
    pub learning_rate: f64,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial,
    /// cosine_with_min_lr.
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    /// Warmup: steps, a ratio below 1, or N%.
    #[arg(long, default_value = "0")]
    pub lr_warmup_steps: String,
    #[arg(long, default_value_t = 1)]
    pub lr_scheduler_num_cycles: usize,
    #[arg(long, default_value_t = 1.0)]
    pub lr_scheduler_power: f64,
    #[arg(long)]
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    #[arg(long, default_value_t = 1600)]
    pub max_train_steps: usize,
    /// Overrides --max_train_steps.
    #[arg(long)]
    pub max_train_epochs: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Gradient clipping (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of initialisation, noise, timesteps and data order (default 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// bf16 (default) or no (f32).
    #[arg(long, default_value = "bf16")]
    pub mixed_precision: String,
    /// Recompute each block in the backward instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Save every N epochs.
    #[arg(long)]
    pub save_every_n_epochs: Option<usize>,
    /// Save every N steps.
    #[arg(long)]
    pub save_every_n_steps: Option<usize>,
    /// Also save a resumable state folder (`NAME-state/`) with each save.
    #[arg(long)]
    pub save_state: bool,
    /// Resume from a state folder: continues at the same step, epoch, batch, optimizer and
    /// random state.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// LoRA file dtype: fp32 (default), float, bf16, fp16.
    #[arg(long, default_value = "fp32")]
    pub save_precision: String,
    /// sigma (Musubi's default), uniform, sigmoid, shift, flux_shift, flux2_shift (recommended),
    /// qwen_shift, krea2_shift, ideogram4_shift, logsnr, qinglong_flux, qinglong_qwen.
    #[arg(long, default_value = "sigma")]
    pub timestep_sampling: String,
    #[arg(long, default_value_t = 1.0)]
    pub discrete_flow_shift: f64,
    #[arg(long, default_value_t = 1.0)]
    pub sigmoid_scale: f64,
    /// none, logit_normal, mode, cosmap, sigma_sqrt.
    #[arg(long, default_value = "none")]
    pub weighting_scheme: String,
    #[arg(long, default_value_t = 0.0)]
    pub logit_mean: f64,
    #[arg(long, default_value_t = 1.0)]
    pub logit_std: f64,
    #[arg(long, default_value_t = 1.29)]
    pub mode_scale: f64,
    #[arg(long)]
    pub min_timestep: Option<f64>,
    #[arg(long)]
    pub max_timestep: Option<f64>,
    #[arg(long)]
    pub preserve_distribution_shape: bool,
    /// Stratified timesteps: equal draws from N sub-intervals per epoch.
    #[arg(long)]
    pub num_timestep_buckets: Option<usize>,
    /// Metadata only for FLUX.2 (training uses guidance 1.0, as Musubi).
    #[arg(long, default_value_t = 1.0)]
    pub guidance_scale: f64,
    /// cpu or cuda.
    #[arg(long)]
    pub device: Option<String>,
    /// Minimum metadata only.
    #[arg(long)]
    pub no_metadata: bool,
    #[arg(long)]
    pub training_comment: Option<String>,
    #[arg(long)]
    pub metadata_title: Option<String>,
    #[arg(long)]
    pub metadata_author: Option<String>,
    #[arg(long)]
    pub metadata_description: Option<String>,
    #[arg(long)]
    pub metadata_license: Option<String>,
    #[arg(long)]
    pub metadata_tags: Option<String>,
    #[arg(long)]
    pub metadata_reso: Option<String>,
    #[arg(long)]
    pub metadata_arch: Option<String>,
    /// Attention: torch / sdpa (composed) or flash (the fused CUDA kernel for bf16; composed on
    /// the CPU). Default: from --sdpa / --flash_attn, else torch.
    #[arg(long)]
    pub attn_mode: Option<String>,
    /// Musubi's switch: the composed attention (as --attn_mode sdpa).
    #[arg(long)]
    pub sdpa: bool,
    /// Musubi's switch: the fused CUDA attention kernel (as --attn_mode flash).
    #[arg(long)]
    pub flash_attn: bool,
    /// Refused: not available.
    #[arg(long)]
    pub xformers: bool,
    /// Refused: not available.
    #[arg(long)]
    pub sage_attn: bool,
    /// Refused: not available.
    #[arg(long)]
    pub flash3: bool,
    /// Accepted: attention always handles the batch at once.
    #[arg(long)]
    pub split_attn: bool,
    /// fp8 DiT: with --fp8_scaled, the block linears (the LoRA targets) are stored as F8E4M3 with
    /// one scale per 64 inputs, quantised while loading and dequantised on use; the rest stays in
    /// the compute dtype. Alone it is refused (Musubi casts the whole DiT unscaled).
    #[arg(long)]
    pub fp8_base: bool,
    /// Block-wise scaled fp8 for --fp8_base (required with it, as the FLUX.2 docs say).
    #[arg(long)]
    pub fp8_scaled: bool,
    /// Store the text encoder's linears as F8E4M3 while encoding the sample prompts (Qwen3 /
    /// klein only, as Musubi).
    #[arg(long)]
    pub fp8_text_encoder: bool,
    /// Keep the Linear weights of N blocks in host memory and copy each to the device just before
    /// use, the next one while the current one computes (forward, then reverse for the backward;
    /// without --gradient_checkpointing the step then also runs block-wise). Musubi's split: one
    /// double block counts as two single blocks, double = round(N / (1 + r/2)) with r = singles /
    /// doubles, at most n - 2 of each type. Maxima: dev 29, klein-4B 13, klein-9B 16.
    #[arg(long)]
    pub blocks_to_swap: Option<usize>,
    /// Refused: candle has no pinned host memory; the swap copies from pageable memory.
    #[arg(long)]
    pub use_pinned_memory_for_block_swap: bool,
    /// Refused: Musubi's CUDA-only streaming offloader (evenly spaced blocks, ring of buffers).
    #[arg(long)]
    pub block_swap_h2d_only: bool,
    /// With --gradient_checkpointing: keep the activations saved at block boundaries in host
    /// memory, copied back to the device for each block's recompute (an error without it).
    #[arg(long)]
    pub gradient_checkpointing_cpu_offload: bool,
    /// Sample prompts (.txt with inline options --w --h --d --s --g --fs --n --ci, .toml with
    /// [prompt] defaults and [[prompt.subset]] entries, or .json); images go to
    /// OUTPUT_DIR/sample/ with their parameters. Needs --vae and --text_encoder. Defaults:
    /// 256x256, 20 steps, guidance 4.0; without --d a seed fixed per run and prompt.
    #[arg(long)]
    pub sample_prompts: Option<PathBuf>,
    /// Write samples after every N optimizer steps.
    #[arg(long)]
    pub sample_every_n_steps: Option<usize>,
    /// Write samples at the end of every N epochs.
    #[arg(long)]
    pub sample_every_n_epochs: Option<usize>,
    /// Write samples before the first step (also when resuming, named by the resumed step).
    #[arg(long)]
    pub sample_at_first: bool,
    /// Write TensorBoard event files (loss, average loss, lr, timestep histogram) and a JSONL log
    /// of every step here.
    #[arg(long)]
    pub logging_dir: Option<PathBuf>,
    /// tensorboard (the only tracker available offline).
    #[arg(long)]
    pub log_with: Option<String>,
    /// TOML file with the same options as the flags (tables flattened, keys without `--`); flags
    /// on the command line override it.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Keep only the LoRA files of the last N epochs (older ones are deleted).
    #[arg(long)]
    pub save_last_n_epochs: Option<usize>,
    /// Keep only the state folders of the last N epochs.
    #[arg(long)]
    pub save_last_n_epochs_state: Option<usize>,
    /// Keep only the LoRA files of the last N steps (older ones are deleted).
    #[arg(long)]
    pub save_last_n_steps: Option<usize>,
    /// Keep only the state folders of the last N steps.
    #[arg(long)]
    pub save_last_n_steps_state: Option<usize>,
    /// After each step, scale down every LoRA module whose update (scale * up @ down) has a
    /// Frobenius norm above this value to exactly this value (max-norm regularisation, as Musubi;
    /// logged as max_norm/keys_scaled, average_key_norm, max_key_norm).
    #[arg(long)]
    pub scale_weight_norms: Option<f64>,
    /// LoRA files (any format generate reads) merged into the DiT before training; the new LoRA
    /// trains on top of them. Merged in full precision, before any fp8 quantisation.
    #[arg(long, num_args = 1..)]
    pub base_weights: Vec<PathBuf>,
    /// One multiplier per --base_weights file (default 1.0 each).
    #[arg(long, num_args = 1..)]
    pub base_weights_multiplier: Vec<f64>,
    /// torch.compile does not exist here (refused).
    #[arg(long)]
    pub compile: bool,
    // Memory plan (issue 9; `plan.rs`).
    /// Print the expected peak device memory of this command line, broken down, and exit
    /// without loading anything (same as `flux2-tuner plan train ...`).
    #[arg(long)]
    pub dry_run: bool,
    /// Device memory to fit, in GiB, for --dry_run (default: asked from the CUDA device).
    #[arg(long)]
    pub vram_gb: Option<f64>,
    // Beyond Musubi: caption dropout and validation loss (sd-scripts' flag names).
    /// Probability (0..1) of training an item on the empty-prompt embedding instead of its
    /// caption's (written by cache-text-encoder-outputs next to the text caches). Decided per item
    /// from --seed, epoch and batch, so --resume stays exact.
    #[arg(long, default_value_t = 0.0)]
    pub caption_dropout_rate: f64,
    /// Held-out dataset TOML (Musubi's format, cached like the training set): its loss is logged
    /// as loss/validation at fixed timesteps and noise, without gradients.
    #[arg(long)]
    pub validation_dataset_config: Option<PathBuf>,
    /// Validate every N steps (needs --validation_dataset_config).
    #[arg(long)]
    pub validate_every_n_steps: Option<usize>,
    /// Validate at the end of every N epochs (default: every epoch).
    #[arg(long)]
    pub validate_every_n_epochs: Option<usize>,
    /// Use at most N validation batches per evaluation (default: all).
    #[arg(long)]
    pub max_validation_steps: Option<usize>,
    /// Seed of the validation noise (default: --seed).
    #[arg(long)]
    pub validation_seed: Option<u64>,
    /// Validation timesteps in 0..1000 (noise level t/1000), e.g. 200,400,600,800; default: four
    /// evenly spaced inside --min_timestep..--max_timestep.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub validation_timesteps: Vec<f64>,
    // Beyond Musubi: masked loss (sd-scripts' flag name).
    /// Weight the loss by the masks cache-latents stored for datasets with `alpha_mask = true` or
    /// `mask_directory` (white trains, black is ignored); the mean is over the whole image, not
    /// renormalised by the mask, as sd-scripts.
    #[arg(long)]
    pub masked_loss: bool,
}

fn refuse_unsupported(args: &TrainArgs) -> Result<()> {
    crate::device::AttentionMode::resolve(args.attn_mode.as_deref(), args.sdpa, args.flash_attn)?;
    if let Some(tracker) = &args.log_with {
        if tracker != "tensorboard" {
            bail!("--log_with {tracker}: only tensorboard is available (wandb needs the network)");
        }
        if args.logging_dir.is_none() {
            bail!("--log_with tensorboard needs --logging_dir");
        }
    }
    // Block swap's Musubi side flags (issue 9).
    flux2_tuner::offload::refuse_block_swap_variants(
        args.use_pinned_memory_for_block_swap,
        args.block_swap_h2d_only,
    )?;
    let refused: [(&str, bool, &str); 4] = [
        (
            "--xformers",
            args.xformers,
            "not available; attention is the built-in kernel",
        ),
        (
            "--sage_attn",
            args.sage_attn,
            "not available for training (as Musubi)",
        ),
        (
            "--flash3",
            args.flash3,
            "not supported for FLUX.2 (as Musubi)",
        ),
        (
            "--compile",
            args.compile,
            "torch.compile does not exist in this program",
        ),
    ];
    for (flag, given, why) in refused {
        if given {
            bail!("{flag}: {why}");
        }
    }
    if let Some(module) = &args.network_module {
        if module != "networks.lora_flux_2" {
            bail!(
                "--network_module {module}: only networks.lora_flux_2 (LoRA) can be trained here"
            );
        }
    }
    Ok(())
}

fn save_precision(value: &str) -> Result<DType> {
    Ok(match value {
        "fp32" | "float" => DType::F32,
        "bf16" => DType::BF16,
        "fp16" => DType::F16,
        other => bail!("--save_precision: `{other}` is not one of fp32, float, bf16, fp16"),
    })
}

fn required<'a>(value: &'a Option<PathBuf>, flag: &str) -> Result<&'a PathBuf> {
    value
        .as_ref()
        .with_context(|| format!("{flag} is required"))
}

fn base_name(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "None".into())
}

/// Builds the library options from the flags (validating each).
pub fn options(args: &TrainArgs) -> Result<TrainOptions> {
    refuse_unsupported(args)?;
    let version: ModelVersion = args.model_version.parse()?;
    let dit = required(&args.dit, "--dit")?.clone();
    let dataset_config = required(&args.dataset_config, "--dataset_config")?.clone();
    let output_dir = required(&args.output_dir, "--output_dir")?.clone();
    let sampling = TimestepSampling::parse(&args.timestep_sampling)?;
    if !recommended_sampling(sampling) {
        eprintln!(
            "warning: --timestep_sampling {} assumes unpacked FLUX.1 latents and uses a quarter of the \
             token count on FLUX.2; flux2_shift is the FLUX.2 equivalent",
            args.timestep_sampling
        );
    }
    let dit_dtype = dit_dtype(&args.mixed_precision)?;
    let mut network = NetworkConfig {
        dim: args.network_dim.unwrap_or(4),
        alpha: args.network_alpha,
        dropout: args.network_dropout,
        ..NetworkConfig::default()
    };
    network.apply_args(&args.network_args)?;
    let seed = args.seed.unwrap_or(42);
    let timesteps = TimestepConfig {
        sampling,
        sigmoid_scale: args.sigmoid_scale,
        discrete_flow_shift: args.discrete_flow_shift,
        weighting_scheme: WeightingScheme::parse(&args.weighting_scheme)?,
        logit_mean: args.logit_mean,
        logit_std: args.logit_std,
        mode_scale: args.mode_scale,
        min_timestep: args.min_timestep,
        max_timestep: args.max_timestep,
        preserve_distribution_shape: args.preserve_distribution_shape,
    };
    let run = RunDescription {
        output_name: args.output_name.clone(),
        seed,
        training_comment: args.training_comment.clone(),
        learning_rate: args.learning_rate,
        lr_scheduler: args.lr_scheduler.clone(),
        gradient_checkpointing: args.gradient_checkpointing,
        gradient_checkpointing_cpu_offload: args.gradient_checkpointing_cpu_offload,
        fp8_base: args.fp8_base,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        mixed_precision: args.mixed_precision.clone(),
        network_dim: network.dim,
        network_alpha: args.network_alpha,
        network_dropout: args.network_dropout,
        network_args: args.network_args.clone(),
        max_grad_norm: args.max_grad_norm,
        timestep_sampling: args.timestep_sampling.clone(),
        weighting_scheme: args.weighting_scheme.clone(),
        sigmoid_scale: args.sigmoid_scale,
        discrete_flow_shift: args.discrete_flow_shift,
        logit_mean: args.logit_mean,
        logit_std: args.logit_std,
        mode_scale: args.mode_scale,
        datasets_json: format!(
            "[{{\"dataset_config\": {:?}}}]",
            base_name(&args.dataset_config)
        ),
        dit_name: base_name(&args.dit),
        vae_name: base_name(&args.vae),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        no_metadata: args.no_metadata,
        title: args.metadata_title.clone(),
        author: args.metadata_author.clone(),
        description: args.metadata_description.clone(),
        license: args.metadata_license.clone(),
        tags: args.metadata_tags.clone(),
        resolution: args.metadata_reso.clone(),
        architecture: args.metadata_arch.clone(),
        min_timestep: args.min_timestep,
        max_timestep: args.max_timestep,
        ..RunDescription::default()
    };
    Ok(TrainOptions {
        version,
        dit,
        vae: args.vae.clone(),
        dataset_config,
        output_dir,
        output_name: args.output_name.clone(),
        device: parse_device(args.device.as_deref())?,
        dit_dtype,
        network,
        network_args: args.network_args.clone(),
        network_weights: args.network_weights.clone(),
        timesteps,
        num_timestep_buckets: args.num_timestep_buckets,
        optimizer_type: args.optimizer_type.clone(),
        optimizer_args: args.optimizer_args.clone(),
        learning_rate: args.learning_rate,
        lr_scheduler: args.lr_scheduler.clone(),
        lr_warmup_steps: args.lr_warmup_steps.clone(),
        lr_scheduler_num_cycles: args.lr_scheduler_num_cycles,
        lr_scheduler_power: args.lr_scheduler_power,
        lr_scheduler_min_lr_ratio: args.lr_scheduler_min_lr_ratio,
        max_train_steps: args.max_train_steps,
        max_train_epochs: args.max_train_epochs,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        max_grad_norm: args.max_grad_norm,
        seed,
        gradient_checkpointing: args.gradient_checkpointing,
        blocks_to_swap: args.blocks_to_swap.unwrap_or(0),
        save_every_n_epochs: args.save_every_n_epochs,
        save_every_n_steps: args.save_every_n_steps,
        save_state: args.save_state,
        resume: args.resume.clone(),
        save_precision: save_precision(&args.save_precision)?,
        guidance: 1.0,
        logging_dir: args.logging_dir.clone(),
        save_last_n_epochs: args.save_last_n_epochs,
        save_last_n_epochs_state: args.save_last_n_epochs_state,
        save_last_n_steps: args.save_last_n_steps,
        save_last_n_steps_state: args.save_last_n_steps_state,
        interrupt: None,
        run,
        caption_dropout_rate: args.caption_dropout_rate,
        validation: validation_options(args, seed)?,
        samples: crate::train_samples::sample_options(args, version)?,
        fp8: fp8_mode(args)?,
        gradient_checkpointing_cpu_offload: activation_offload(args)?,
        masked_loss: args.masked_loss,
        base_weights: flux2_tuner::train::base_weights::pair_multipliers(
            &args.base_weights,
            &args.base_weights_multiplier,
        )?,
        scale_weight_norms: scale_weight_norms(args.scale_weight_norms)?,
    })
}

// --- Flag checks shared by `options` and `--dry_run` ---

/// The checks of [`options`] that read no file, run by `--dry_run` before it plans, so that a
/// flag this build refuses is refused there too instead of planned. Paths are not required here:
/// the plan works from the version table when they are missing.
pub fn check_flags(args: &TrainArgs) -> Result<()> {
    refuse_unsupported(args)?;
    let _: ModelVersion = args.model_version.parse()?;
    TimestepSampling::parse(&args.timestep_sampling)?;
    WeightingScheme::parse(&args.weighting_scheme)?;
    dit_dtype(&args.mixed_precision)?;
    NetworkConfig::default().apply_args(&args.network_args)?;
    save_precision(&args.save_precision)?;
    fp8_mode(args)?;
    activation_offload(args)?;
    validation_options(args, 0)?;
    flux2_tuner::train::base_weights::pair_multipliers(
        &args.base_weights,
        &args.base_weights_multiplier,
    )?;
    scale_weight_norms(args.scale_weight_norms)?;
    Ok(())
}

/// `--mixed_precision`: the DiT's compute dtype.
fn dit_dtype(value: &str) -> Result<DType> {
    Ok(match value {
        "bf16" => DType::BF16,
        "no" => DType::F32,
        "fp16" => bail!("--mixed_precision fp16: FLUX.2 trains in bf16 or f32 (no)"),
        other => bail!("--mixed_precision: `{other}` is not one of bf16, no"),
    })
}

fn scale_weight_norms(value: Option<f64>) -> Result<Option<f64>> {
    match value {
        Some(limit) if limit <= 0.0 || !limit.is_finite() => {
            bail!("--scale_weight_norms: {limit} must be a positive number")
        }
        limit => Ok(limit),
    }
}

// --- end of the shared flag checks ---

/// `--fp8_base` / `--fp8_scaled` (issue 9). Musubi's `--fp8_base` alone casts every DiT weight to
/// unscaled F8E4M3; the FLUX.2 docs say to always add `--fp8_scaled`, and an unscaled cast flushes
/// weights below 2^-9 to zero, so only the scaled form is offered. `--fp8_scaled` alone fails an
/// assertion in Musubi.
fn fp8_mode(args: &TrainArgs) -> Result<flux2_tuner::quant::Fp8Mode> {
    use flux2_tuner::quant::Fp8Mode;
    match (args.fp8_base, args.fp8_scaled) {
        (true, true) => Ok(Fp8Mode::Scaled),
        (false, false) => Ok(Fp8Mode::Off),
        (false, true) => bail!("--fp8_scaled needs --fp8_base (as Musubi): add --fp8_base"),
        (true, false) => bail!(
            "--fp8_base without --fp8_scaled: Musubi then casts the whole DiT to unscaled fp8,              which the FLUX.2 docs advise against and which flushes small weights to zero; add              --fp8_scaled (block-wise scaled fp8 of the LoRA-targeted linears)"
        ),
    }
}

/// `--gradient_checkpointing_cpu_offload` only acts on checkpointed block inputs; Musubi silently
/// ignores it without `--gradient_checkpointing`, which would leave the activations on the device
/// that the user meant to free, so that is an error here.
fn activation_offload(args: &TrainArgs) -> Result<bool> {
    if args.gradient_checkpointing_cpu_offload && !args.gradient_checkpointing {
        bail!(
            "--gradient_checkpointing_cpu_offload needs --gradient_checkpointing: it moves the              activations that checkpointing saves at block boundaries to host memory (Musubi              ignores it otherwise); add --gradient_checkpointing or drop the flag"
        );
    }
    Ok(args.gradient_checkpointing_cpu_offload)
}

/// `--validation_dataset_config` and its schedule; the schedule flags need the dataset.
fn validation_options(
    args: &TrainArgs,
    seed: u64,
) -> Result<Option<flux2_tuner::train::validation::ValidationOptions>> {
    use flux2_tuner::train::validation::{default_timesteps, ValidationOptions};
    let Some(dataset_config) = &args.validation_dataset_config else {
        let given = args.validate_every_n_steps.is_some()
            || args.validate_every_n_epochs.is_some()
            || args.max_validation_steps.is_some()
            || args.validation_seed.is_some()
            || !args.validation_timesteps.is_empty();
        if given {
            bail!("--validate_every_n_steps / --validate_every_n_epochs / --max_validation_steps / --validation_seed / --validation_timesteps need --validation_dataset_config");
        }
        return Ok(None);
    };
    let timesteps = if args.validation_timesteps.is_empty() {
        default_timesteps(args.min_timestep, args.max_timestep)
    } else {
        args.validation_timesteps.clone()
    };
    Ok(Some(ValidationOptions {
        dataset_config: dataset_config.clone(),
        every_n_steps: args.validate_every_n_steps,
        every_n_epochs: args.validate_every_n_epochs,
        timesteps,
        seed: args.validation_seed.unwrap_or(seed),
        max_steps: args.max_validation_steps,
    }))
}

/// A progress bar with loss, learning rate, s/it and ETA.
struct TrainProgress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl TrainObserver for TrainProgress {
    fn start(&mut self, total_steps: usize, first_step: usize, epochs: usize) {
        eprintln!("training {total_steps} steps over {epochs} epoch(s)");
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(
            ProgressStyle::with_template("steps {pos}/{len} [{bar:30}] {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(first_step as u64);
        self.bar = Some(bar);
        self.started = Instant::now();
    }

    fn step(&mut self, step: usize, loss: f64, average_loss: f64, lr: f64) {
        if let Some(bar) = &self.bar {
            let per_step = self.started.elapsed().as_secs_f64() / (step as f64).max(1.0);
            bar.set_message(format!(
                "loss {loss:.4} avg {average_loss:.4} lr {lr:.2e} {per_step:.2} s/it"
            ));
            bar.set_position(step as u64);
        }
    }

    fn validation(&mut self, step: usize, loss: f64) {
        let line = format!("step {step}: validation loss {loss:.5}");
        match &self.bar {
            // A hidden bar (output not a terminal) prints nothing.
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn saved(&mut self, path: &Path) {
        match &self.bar {
            Some(bar) => bar.println(format!("saved {}", path.display())),
            None => eprintln!("saved {}", path.display()),
        }
    }

    fn sampled(&mut self, path: &Path) {
        // A hidden bar (stderr not a terminal) drops its println: print directly then.
        match self.bar.as_ref().filter(|bar| !bar.is_hidden()) {
            Some(bar) => bar.println(format!("sample {}", path.display())),
            None => eprintln!("sample {}", path.display()),
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    if args.dry_run {
        check_flags(args)?;
        return crate::plan::dry_run_train(args);
    }
    let mut options = options(args)?;
    crate::device::AttentionMode::resolve(args.attn_mode.as_deref(), args.sdpa, args.flash_attn)?
        .apply(&options.device);
    // Ctrl-C / SIGTERM: finish the current step, save the LoRA and a resumable state, then exit.
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupt.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A second Ctrl-C exits at once.
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: saving the LoRA and a state after this step (Ctrl-C again to quit now)"
        );
    });
    if installed.is_ok() {
        options.interrupt = Some(interrupt);
    }
    let mut progress = TrainProgress {
        bar: None,
        started: Instant::now(),
    };
    let summary = train(&options, &mut progress)?;
    if let Some(bar) = progress.bar.take() {
        bar.finish_and_clear();
    }
    let seconds = progress.started.elapsed().as_secs_f64();
    let last = summary.losses.last().copied().unwrap_or(f64::NAN);
    if summary.interrupted {
        println!(
            "interrupted after {} steps; saved {} and its -state folder (continue with --resume)",
            summary.steps,
            summary.output.display()
        );
        return Ok(());
    }
    println!(
        "trained {} steps in {seconds:.1} s ({:.3} s/step), final loss {last:.5}, LoRA saved to {}",
        summary.steps,
        seconds / summary.steps.max(1) as f64,
        summary.output.display()
    );
    Ok(())
}
