//! `flux2-tuner plan train|generate ...` and `--dry_run` on `train` and `generate`: the memory
//! plan of a command line (`flux2_tuner::plan`), printed before anything is loaded. Only
//! safetensors headers, the dataset TOML and prompt files are read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Subcommand;
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::data::config::{ConfigFallbacks, DatasetConfig};
use flux2_tuner::models::ModelVersion;
use flux2_tuner::plan::{
    plan, render, suggest, GenerationJob, ImageSize, Job, MemorySettings, OptimizerKind, PlanModel,
    TrainingJob, TEXT_TOKENS,
};
use flux2_tuner::quant::Fp8Mode;
use flux2_tuner::sample::{parse_prompt_file, ImageRequest};
use flux2_tuner::train::network::NetworkConfig;

use crate::generate::GenerateArgs;
use crate::train::TrainArgs;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Arguments of `plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub job: PlanJob,
}

/// The command line to plan.
#[derive(Debug, Subcommand)]
pub enum PlanJob {
    /// Plan a `train` command line (same flags; the largest dataset bucket and batch size come
    /// from --dataset_config, or --resolution / --batch_size).
    Train(Box<PlanTrainArgs>),
    /// Plan a `generate` command line (same flags).
    Generate(Box<GenerateArgs>),
}

/// `plan train`: the training flags plus what a dataset config would say.
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct PlanTrainArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Training resolution WIDTH HEIGHT (instead of the dataset config's largest).
    #[arg(long, num_args = 2, value_names = ["WIDTH", "HEIGHT"])]
    pub resolution: Vec<usize>,
    /// Batch size (instead of the dataset config's largest).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Control-image tokens per sample (edit training), instead of the dataset config's.
    #[arg(long)]
    pub control_tokens: Option<usize>,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    match &args.job {
        PlanJob::Train(train) => crate::train::check_flags(&train.train)?,
        PlanJob::Generate(generate) => crate::generate::check_flags(generate)?,
    }
    match &args.job {
        PlanJob::Train(train) => print_training(
            &train.train,
            &TrainingOverrides {
                resolution: train.resolution.clone(),
                batch_size: train.batch_size,
                control_tokens: train.control_tokens,
            },
            true,
        ),
        PlanJob::Generate(generate) => print_generation(generate, true),
    }
}

/// `train --dry_run`.
pub fn dry_run_train(args: &TrainArgs) -> Result<()> {
    print_training(args, &TrainingOverrides::default(), false)
}

/// `generate --dry_run`.
pub fn dry_run_generate(args: &GenerateArgs) -> Result<()> {
    print_generation(args, false)
}

/// What `plan train` may give beyond the training flags.
#[derive(Debug, Default)]
struct TrainingOverrides {
    resolution: Vec<usize>,
    batch_size: Option<usize>,
    control_tokens: Option<usize>,
}

/// Whether the command would run on the CPU (`--device`, else CUDA when built with it and a GPU
/// answers).
fn runs_on_cpu(device: Option<&str>) -> Result<bool> {
    match device {
        Some("cpu") => Ok(true),
        Some(_) => Ok(false),
        None if cfg!(feature = "cuda") => Ok(crate::device::parse_device(None)?.is_cpu()),
        None => Ok(true),
    }
}

/// `--vram_gb`, else the memory of GPU 0 as `nvidia-smi` reports it (CUDA builds), else `None`.
fn available_vram(vram_gb: Option<f64>, cpu: bool, required: bool) -> Result<Option<u64>> {
    if let Some(gb) = vram_gb {
        if gb.is_nan() || gb <= 0.0 {
            bail!("--vram_gb {gb}: expected a positive number of GiB");
        }
        return Ok(Some((gb * GIB) as u64));
    }
    if cfg!(feature = "cuda") && !cpu {
        if let Some(mib) = nvidia_smi_total_mib() {
            return Ok(Some(mib * 1024 * 1024));
        }
    }
    if required {
        bail!("--vram_gb is required: there is no CUDA device to ask for its memory");
    }
    Ok(None)
}

fn nvidia_smi_total_mib() -> Option<u64> {
    let output = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.total",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// The model from the DiT header when the file exists, else from the version table.
fn plan_model(version: ModelVersion, dit: Option<&PathBuf>) -> Result<(PlanModel, Option<String>)> {
    match dit {
        Some(path) if path.exists() => Ok((
            PlanModel::from_checkpoint(path, version)
                .with_context(|| format!("reading the header of {}", path.display()))?,
            None,
        )),
        Some(path) => Ok((
            PlanModel::of_version(version),
            Some(format!(
                "{} not found: sizes from the {version} table",
                path.display()
            )),
        )),
        None => Ok((PlanModel::of_version(version), None)),
    }
}

fn fp8_mode(base: bool, scaled: bool) -> Fp8Mode {
    match (base, scaled) {
        (_, true) => Fp8Mode::Scaled,
        (true, false) => Fp8Mode::Plain,
        _ => Fp8Mode::Off,
    }
}

/// The largest bucket, batch size and control tokens of a dataset config.
fn dataset_shape(path: &Path) -> Result<(ImageSize, usize, usize)> {
    let config = DatasetConfig::load(path, &ConfigFallbacks::default())?;
    let mut image = ImageSize {
        width: 0,
        height: 0,
    };
    let (mut batch, mut control) = (1, 0);
    for dataset in &config.datasets {
        let (width, height) = (dataset.resolution.0 as usize, dataset.resolution.1 as usize);
        if width * height > image.width * image.height {
            image = ImageSize { width, height };
        }
        batch = batch.max(dataset.batch_size);
        if dataset.control_directory.is_some() {
            let (cw, ch) = dataset
                .control_resolution
                .map(|(w, h)| (w as usize, h as usize))
                .unwrap_or((width, height));
            control = control.max((cw / 16) * (ch / 16));
        }
    }
    if image.width == 0 {
        bail!("{}: no [[datasets]] entry", path.display());
    }
    Ok((image, batch, control))
}

/// The largest image of a prompt file (Musubi's training default 256x256 when unreadable).
fn largest_prompt_image(path: &Path, defaults: &ImageRequest) -> ImageSize {
    let requests = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| parse_prompt_file(&text, defaults).ok())
        .unwrap_or_default();
    requests
        .iter()
        .map(|r| ImageSize {
            width: r.width,
            height: r.height,
        })
        .max_by_key(|s| s.width * s.height)
        .unwrap_or(ImageSize {
            width: defaults.width,
            height: defaults.height,
        })
}

fn default_request(height: usize, width: usize) -> ImageRequest {
    ImageRequest {
        prompt: String::new(),
        negative_prompt: None,
        height,
        width,
        steps: 20,
        guidance: 4.0,
        seed: 0,
        flow_shift: None,
        control_images: Vec::new(),
    }
}

fn print_training(
    args: &TrainArgs,
    overrides: &TrainingOverrides,
    vram_required: bool,
) -> Result<()> {
    let version: ModelVersion = args.model_version.parse()?;
    let (model, mut note) = plan_model(version, args.dit.as_ref())?;
    let cpu = runs_on_cpu(args.device.as_deref())?;
    let dtype = match args.mixed_precision.as_str() {
        "no" => DType::F32,
        _ => DType::BF16,
    };
    let settings = MemorySettings {
        fp8: fp8_mode(args.fp8_base, args.fp8_scaled),
        blocks_to_swap: args.blocks_to_swap.unwrap_or(0),
        gradient_checkpointing: args.gradient_checkpointing,
        cpu_offload: args.gradient_checkpointing_cpu_offload,
        fp8_text_encoder: args.fp8_text_encoder,
        ..MemorySettings::for_device(dtype, cpu, true)
    };
    let mut network = NetworkConfig {
        dim: args.network_dim.unwrap_or(4),
        alpha: args.network_alpha,
        ..NetworkConfig::default()
    };
    network.apply_args(&args.network_args)?;
    let (mut image, mut batch_size, mut control_tokens) = (
        ImageSize {
            width: 1024,
            height: 1024,
        },
        1,
        0,
    );
    match &args.dataset_config {
        Some(path) if overrides.resolution.is_empty() || overrides.batch_size.is_none() => {
            (image, batch_size, control_tokens) = dataset_shape(path)
                .with_context(|| format!("reading --dataset_config {}", path.display()))?;
        }
        None if overrides.resolution.is_empty() => {
            note = Some("no --dataset_config or --resolution: planned for 1024x1024".into());
        }
        _ => {}
    }
    if let [width, height] = overrides.resolution[..] {
        image = ImageSize { width, height };
    }
    batch_size = overrides.batch_size.unwrap_or(batch_size);
    control_tokens = overrides.control_tokens.unwrap_or(control_tokens);
    let sample = args
        .sample_prompts
        .as_ref()
        .map(|path| largest_prompt_image(path, &default_request(256, 256)));
    let job = Job::Training(TrainingJob {
        batch_size,
        image,
        control_tokens,
        text_tokens: TEXT_TOKENS,
        network,
        optimizer: OptimizerKind::parse(&args.optimizer_type)?,
        sample,
    });
    let vram = available_vram(args.vram_gb, cpu, vram_required)?;
    print_plan(&model, &settings, &job, vram, note)
}

fn print_generation(args: &GenerateArgs, vram_required: bool) -> Result<()> {
    let version: ModelVersion = args.model_version.parse()?;
    let (model, note) = plan_model(version, args.dit.as_ref())?;
    let cpu = runs_on_cpu(args.device.as_deref())?;
    let dtype = if args.dit_f32 {
        DType::F32
    } else {
        DType::BF16
    };
    let fp8 = fp8_mode(args.fp8, args.fp8_scaled);
    let settings = MemorySettings {
        fp8,
        blocks_to_swap: args.blocks_to_swap,
        fp8_text_encoder: args.fp8_text_encoder,
        ..MemorySettings::for_device(dtype, cpu, false)
    };
    let (height, width) = (
        args.image_size.first().copied().unwrap_or(1024),
        args.image_size.get(1).copied().unwrap_or(1024),
    );
    let mut image = ImageSize { width, height };
    if let Some(path) = &args.from_file {
        let largest = largest_prompt_image(path, &default_request(height, width));
        if largest.width * largest.height > width * height {
            image = largest;
        }
    }
    let control_tokens = control_tokens(&args.control_image_path);
    let unmerged_lora_bytes = if args.lora_unmerged || fp8 != Fp8Mode::Off {
        args.lora_weight
            .iter()
            .map(|path| file_tensor_bytes(path))
            .sum::<Result<u64>>()?
    } else {
        0
    };
    let job = Job::Generation(GenerationJob {
        image,
        control_tokens,
        text_tokens: TEXT_TOKENS,
        unmerged_lora_bytes,
        uses_ae: args.output_type != "latent" || !args.control_image_path.is_empty(),
    });
    let vram = available_vram(args.vram_gb, cpu, vram_required)?;
    print_plan(&model, &settings, &job, vram, note)
}

/// Control tokens at Musubi's pixel cap: 2024² for one image, 1024² each for several (an
/// upper bound: smaller images keep their own area; --no_resize_control is planned at the cap too).
fn control_tokens(paths: &[PathBuf]) -> usize {
    let cap = if paths.len() == 1 {
        2024 * 2024
    } else {
        1024 * 1024
    };
    paths.len() * (cap / 256)
}

/// Bytes of every tensor in a safetensors file (header only).
fn file_tensor_bytes(path: &Path) -> Result<u64> {
    let checkpoint = Checkpoint::open(path)?;
    let keys: Vec<String> = checkpoint.keys().map(str::to_string).collect();
    Ok(keys
        .iter()
        .filter_map(|key| checkpoint.entry(key))
        .map(|(_, entry)| (entry.end - entry.start) as u64)
        .sum())
}

fn print_plan(
    model: &PlanModel,
    settings: &MemorySettings,
    job: &Job,
    vram: Option<u64>,
    note: Option<String>,
) -> Result<()> {
    let planned = plan(model, settings, job)?;
    let suggestion = match vram {
        Some(vram) if !planned.fits(vram) => Some(suggest(model, settings, job, vram)?),
        _ => None,
    };
    if let Some(note) = note {
        println!("note: {note}");
    }
    print!("{}", render(&planned, vram, suggestion.as_ref()));
    Ok(())
}
