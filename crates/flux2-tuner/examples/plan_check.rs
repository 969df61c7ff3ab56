//! Checks the memory planner (`flux2_tuner::plan`, issue 9 point 4) against measured peaks on the
//! CPU, where the "device" is host memory: the mid-size DiT of the benchmarks (hidden 512 = 8 heads
//! x 64, 2 double + 4 single blocks, text width 384) with random weights, a rank-32 LoRA and AdamW,
//! 1024 image tokens (a 32 x 32 latent grid) and 128 text tokens.
//!
//! Each setting runs in a child process of this example (re-executed with `--run`): it notes its
//! resident memory, loads the DiT, closes the checkpoint (so no mapped file pages count), resets
//! the peak (`/proc/self/clear_refs` 5), runs two training steps (or one sampling forward) and
//! reports `VmHWM` minus the resident memory before loading. The children run with
//! `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors go back to the system and the peak is that of
//! live tensors (a GPU caching allocator behaves alike). The parent prints predicted against
//! measured and the relative error. Training steps go through candle's autograd
//! (`training_step_by_autograd`), the path a CUDA device runs and the planner models; the CPU's
//! own direct backward (`train::direct`) keeps less.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example plan_check -- [--grid 32] [--threads 2]
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

mod bench_support;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::tokens::{image_position_ids, pack_latents, text_position_ids};
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use flux2_tuner::models::ModelVersion;
use flux2_tuner::plan::{
    plan, GenerationJob, ImageSize, Job, MemorySettings, OptimizerKind, PlanModel, TrainingJob,
};
use flux2_tuner::quant::Fp8Mode;
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::optim::{AdamW, Optimizer};
use flux2_tuner::train::step::{training_step_by_autograd, StepBatch};
use flux2_tuner::util::rng::SeededRng;

type CheckResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TEXT_TOKENS: usize = 128;
const TEXT_WIDTH: usize = 384;
const RANK: usize = 32;

/// One measured setting.
#[derive(Debug, Clone, Copy)]
struct Setting {
    name: &'static str,
    /// Weight dtype of the DiT.
    dtype: DType,
    training: bool,
    checkpointing: bool,
    fp8: Fp8Mode,
}

const SETTINGS: [Setting; 7] = [
    Setting {
        name: "train-f32",
        dtype: DType::F32,
        training: true,
        checkpointing: false,
        fp8: Fp8Mode::Off,
    },
    Setting {
        name: "train-f32-ckpt",
        dtype: DType::F32,
        training: true,
        checkpointing: true,
        fp8: Fp8Mode::Off,
    },
    Setting {
        name: "train-bf16",
        dtype: DType::BF16,
        training: true,
        checkpointing: false,
        fp8: Fp8Mode::Off,
    },
    Setting {
        name: "train-bf16-ckpt",
        dtype: DType::BF16,
        training: true,
        checkpointing: true,
        fp8: Fp8Mode::Off,
    },
    Setting {
        name: "train-bf16-fp8-ckpt",
        dtype: DType::BF16,
        training: true,
        checkpointing: true,
        fp8: Fp8Mode::Scaled,
    },
    Setting {
        name: "generate-f32",
        dtype: DType::F32,
        training: false,
        checkpointing: false,
        fp8: Fp8Mode::Off,
    },
    Setting {
        name: "generate-bf16",
        dtype: DType::BF16,
        training: false,
        checkpointing: false,
        fp8: Fp8Mode::Off,
    },
];

fn setting(name: &str) -> CheckResult<Setting> {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| format!("unknown setting {name}").into())
}

/// A line of `/proc/self/status` in bytes.
fn status_bytes(field: &str) -> CheckResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .ok_or_else(|| format!("no {field} in /proc/self/status"))?;
    let kilobytes: u64 = line
        .trim_start_matches(field)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kilobytes * 1024)
}

fn random_tensor(rng: &mut SeededRng, shape: &[usize]) -> CheckResult<Tensor> {
    let count = shape.iter().product();
    Ok(Tensor::from_vec(
        rng.normal_vec(count),
        shape,
        &Device::Cpu,
    )?)
}

/// The child: prints the measured peak in bytes above the resident memory before loading.
fn run_one(path: &Path, setting: Setting, grid: usize) -> CheckResult<()> {
    let device = Device::Cpu;
    let before = status_bytes("VmRSS:")?;
    let mut dit = {
        let checkpoint = Checkpoint::open(path)?;
        Flux2Dit::load(&checkpoint, None, setting.dtype, &device)?
    };
    if setting.fp8 != Fp8Mode::Off {
        dit.quantize_blocks(setting.fp8)?;
    }
    std::fs::write("/proc/self/clear_refs", "5")?;
    let mut rng = SeededRng::new(0);
    let channels = dit.config.in_channels;
    let latents = random_tensor(&mut rng, &[1, channels, grid, grid])?;
    let noise = random_tensor(&mut rng, &[1, channels, grid, grid])?;
    let text = random_tensor(&mut rng, &[1, TEXT_TOKENS, dit.config.context_in_dim])?;
    if setting.training {
        let network = LoraNetwork::new(
            &dit.config,
            NetworkConfig {
                dim: RANK,
                alpha: RANK as f64,
                ..Default::default()
            },
            &mut SeededRng::new(0),
            &device,
        )?;
        network.attach(&mut dit, 1.0)?;
        let with_factors = network.parameters();
        let parameters: Vec<_> = with_factors.iter().map(|(p, _)| p.clone()).collect();
        let mut optimizer = AdamW::new(with_factors)?;
        let batch = StepBatch {
            latents: &latents,
            noise: &noise,
            sigmas: &[0.7],
            model_timesteps: &[0.7],
            text: &text,
            controls: &[],
            guidance: None,
            weights: &[1.0],
        };
        for _ in 0..2 {
            let step = training_step_by_autograd(
                &dit,
                &batch,
                None,
                &parameters,
                setting.checkpointing,
                None,
            )?;
            optimizer.step(&step.gradients, 1e-4)?;
        }
    } else {
        let tokens = pack_latents(&noise)?.to_dtype(setting.dtype)?;
        let input = DitInput {
            image_tokens: &tokens,
            image_position_ids: &image_position_ids(1, grid, grid, 0, &device)?,
            text_embeddings: &text.to_dtype(setting.dtype)?,
            text_position_ids: &text_position_ids(1, TEXT_TOKENS, &device)?,
            timesteps: &Tensor::full(0.7f32, 1, &device)?,
            guidance: None,
        };
        let output = dit.forward(&input)?;
        output.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    }
    println!("{}", status_bytes("VmHWM:")?.saturating_sub(before));
    Ok(())
}

/// The planner's peak for `setting` on the CPU.
fn predicted(model: &PlanModel, setting: Setting, grid: usize) -> CheckResult<u64> {
    let settings = MemorySettings {
        fp8: setting.fp8,
        gradient_checkpointing: setting.checkpointing,
        ..MemorySettings::for_device(setting.dtype, true, setting.training)
    };
    let image = ImageSize {
        width: 16 * grid,
        height: 16 * grid,
    };
    let job = if setting.training {
        Job::Training(TrainingJob {
            batch_size: 1,
            image,
            control_tokens: 0,
            text_tokens: TEXT_TOKENS,
            network: NetworkConfig {
                dim: RANK,
                alpha: RANK as f64,
                ..Default::default()
            },
            optimizer: OptimizerKind::AdamW,
            sample: None,
        })
    } else {
        Job::Generation(GenerationJob {
            image,
            control_tokens: 0,
            text_tokens: TEXT_TOKENS,
            unmerged_lora_bytes: 0,
            uses_ae: false,
        })
    };
    let planned = plan(model, &settings, &job)?;
    let phase = planned
        .phases
        .iter()
        .find(|p| p.name == "training step" || p.name == "sampling")
        .ok_or("no DiT phase in the plan")?;
    Ok(phase.total())
}

/// `--grid`, `--threads`, and the child's `--run <checkpoint> <setting>`.
type Arguments = (usize, usize, Option<(PathBuf, String)>);

fn parse_arguments() -> CheckResult<Arguments> {
    let (mut grid, mut threads, mut run) = (32, 2, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--grid" => grid = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--run" => run = Some((PathBuf::from(value()?), value()?)),
            other => {
                return Err(format!("unknown option {other}; expected --grid, --threads").into())
            }
        }
    }
    Ok((grid, threads, run))
}

fn main() -> CheckResult<()> {
    let (grid, threads, run) = parse_arguments()?;
    if let Some((path, name)) = run {
        return run_one(&path, setting(&name)?, grid);
    }
    let directory = std::env::temp_dir().join(format!("flux2-plan-check-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let config = bench_support::mid_size_dit_config(TEXT_WIDTH);
    let mut results = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let path = directory.join(format!("dit-{dtype:?}.safetensors"));
        write_random_dit(&config, &path, 0, dtype)?;
        let model = PlanModel::from_checkpoint(&path, ModelVersion::Klein4b)?;
        for setting in SETTINGS.iter().filter(|s| s.dtype == dtype) {
            let output = Command::new(std::env::current_exe()?)
                .args(["--grid", &grid.to_string(), "--run"])
                .arg(&path)
                .arg(setting.name)
                .env("RAYON_NUM_THREADS", threads.to_string())
                .env("MALLOC_MMAP_THRESHOLD_", "65536")
                .output()?;
            if !output.status.success() {
                return Err(format!(
                    "{} failed: {}",
                    setting.name,
                    String::from_utf8_lossy(&output.stderr)
                )
                .into());
            }
            let measured: u64 = String::from_utf8(output.stdout)?.trim().parse()?;
            results.push((setting.name, predicted(&model, *setting, grid)?, measured));
        }
    }
    let _ = std::fs::remove_dir_all(&directory);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!(
        "mid-size DiT (hidden 512, 2 double + 4 single blocks), {}x{} latent grid ({} image + {TEXT_TOKENS} text tokens), LoRA rank {RANK}, AdamW, {threads} threads",
        grid,
        grid,
        grid * grid
    );
    println!("| setting | predicted MiB | measured MiB | relative error |");
    println!("|---|---:|---:|---:|");
    for (name, predicted, measured) in results {
        let error = (predicted as f64 - measured as f64) / measured.max(1) as f64;
        println!(
            "| {name} | {:.1} | {:.1} | {:+.1}% |",
            mib(predicted),
            mib(measured),
            100.0 * error
        );
    }
    Ok(())
}
