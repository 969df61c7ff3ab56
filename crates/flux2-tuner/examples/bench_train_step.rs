//! LoRA training-step benchmark on CPU (issue 7, point 7): the mid-size FLUX.2 transformer of
//! `bench_dit` (hidden 512 = 8 heads x 64, 2 double + 4 single blocks, MLP ratio 3, text width
//! 384, RoPE 4 x 16, no guidance embedding) with random weights in the BFL key format, a rank-32
//! LoRA (alpha 32) on Musubi's default targets, batch 1 of 1024 image tokens (a 32 x 32 grid) and
//! 128 text tokens. One step is `training_step` (noise, forward, flow-matching MSE, backward)
//! plus an AdamW step; timed in f32 and bf16 (bf16 base weights, f32 LoRA), with and without
//! gradient checkpointing (warm-up, then the median of several steps). On the CPU the step's
//! blocks take the direct backward (`train::direct`); each configuration is also timed through
//! candle's autograd (`FLUX2_AUTOGRAD_BACKWARD=1`) for comparison.
//!
//! Each configuration runs in a child process of this example (re-executed with `--run`), so that
//! its peak resident memory (`VmHWM` of `/proc/self/status`) is its own.
//!
//! The same step runs in PyTorch in `tools/bench/train_step_diffusers.py --serve` (diffusers
//! `Flux2Transformer2DModel` + peft LoRA + torch AdamW) with the same thread count, when a Python
//! with torch, diffusers and peft is found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`).
//! Both children step on demand and the steps alternate, Rust then PyTorch, `--iterations` times:
//! on a shared machine single step times move by up to 40 % with other tenants' load, and a pair
//! of neighbouring steps sees the same load. The time ratio printed is the median of the per-pair
//! ratios.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_train_step -- [--threads 2] [--warmup 1] [--iterations 5]
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod bench_support;

use bench_support::StepServer;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::optim::{AdamW, Optimizer};
use flux2_tuner::train::step::{training_step, StepBatch};
use flux2_tuner::util::rng::SeededRng;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const GRID_SIDE: usize = 32;
const TEXT_TOKENS: usize = 128;
const TEXT_WIDTH: usize = 384;
const RANK: usize = 32;
const LEARNING_RATE: f64 = 1e-4;
const SIGMA: f64 = 0.7;

struct Options {
    threads: usize,
    warmup: usize,
    iterations: usize,
}

/// One configuration, as passed to the child process: `--run <checkpoint> <dtype> <checkpointing>`.
struct RunSpec {
    checkpoint: PathBuf,
    dtype: DType,
    checkpointing: bool,
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

fn parse_options() -> BenchResult<(Options, Option<RunSpec>)> {
    let mut options = Options {
        threads: 2,
        warmup: 1,
        iterations: 5,
    };
    let mut run = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => options.threads = value()?.parse()?,
            "--warmup" => options.warmup = value()?.parse()?,
            "--iterations" => options.iterations = value()?.parse::<usize>()?.max(1),
            // Writes the benchmark's random checkpoint and exits (for profiling one `--run`).
            "--write" => {
                let path = PathBuf::from(value()?);
                let config = bench_support::mid_size_dit_config(TEXT_WIDTH);
                write_random_dit(&config, &path, 0, DType::F32)?;
                std::process::exit(0);
            }
            "--run" => {
                let checkpoint = PathBuf::from(value()?);
                let dtype = match value()?.as_str() {
                    "bf16" => DType::BF16,
                    _ => DType::F32,
                };
                let checkpointing = value()? == "checkpointing";
                run = Some(RunSpec {
                    checkpoint,
                    dtype,
                    checkpointing,
                });
            }
            _ => {
                return Err(format!(
                    "unknown option {flag}; expected --threads, --warmup, --iterations, --write"
                )
                .into())
            }
        }
    }
    Ok((options, run))
}

fn random_tensor(rng: &mut SeededRng, shape: &[usize]) -> BenchResult<Tensor> {
    let count = shape.iter().product();
    Ok(Tensor::from_vec(
        rng.normal_vec(count),
        shape,
        &Device::Cpu,
    )?)
}

/// Peak resident memory of this process in MiB (`VmHWM`, reported in kB).
fn peak_rss_mib() -> BenchResult<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    let kilobytes: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kilobytes / 1024.0)
}

/// The child: sets up one configuration, then serves `bench_support::StepServer`'s protocol on
/// stdin / stdout (`step`: one training step and AdamW step, prints its seconds; `done`: prints
/// `<peak MiB> <LoRA modules> <LoRA parameters>` and exits).
fn run_one(spec: &RunSpec) -> BenchResult<()> {
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(&spec.checkpoint)?;
    let mut dit = Flux2Dit::load(&checkpoint, None, spec.dtype, &device)?;
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
    let parameter_count: usize = parameters.iter().map(|p| p.elem_count()).sum();
    let mut optimizer = AdamW::new(with_factors)?;

    let mut rng = SeededRng::new(0);
    let latents = random_tensor(&mut rng, &[1, dit.config.in_channels, GRID_SIDE, GRID_SIDE])?;
    let noise = random_tensor(&mut rng, &[1, dit.config.in_channels, GRID_SIDE, GRID_SIDE])?;
    let text = random_tensor(&mut rng, &[1, TEXT_TOKENS, dit.config.context_in_dim])?;
    let batch = StepBatch {
        latents: &latents,
        noise: &noise,
        sigmas: &[SIGMA],
        model_timesteps: &[SIGMA],
        text: &text,
        controls: &[],
        guidance: None,
        weights: &[1.0],
    };
    bench_support::serve_steps(
        || {
            let start = Instant::now();
            let step = training_step(&dit, &batch, &parameters, spec.checkpointing)?;
            optimizer.step(&step.gradients, LEARNING_RATE)?;
            let elapsed = start.elapsed().as_secs_f64();
            if !step.loss.is_finite() {
                return Err(format!("non-finite loss in {}", dtype_name(spec.dtype)).into());
            }
            Ok(elapsed)
        },
        || {
            Ok(format!(
                "{} {} {parameter_count}",
                peak_rss_mib()?,
                network.modules.len()
            ))
        },
    )
}

struct Measured {
    /// Each timed step, in order.
    seconds: Vec<f64>,
    peak_mib: f64,
    modules: usize,
    parameters: usize,
}

impl Measured {
    fn median(&self) -> f64 {
        bench_support::median(self.seconds.clone())
    }
}

/// A child process of this executable serving one configuration. With `autograd`, the child
/// takes candle's autograd path (`FLUX2_AUTOGRAD_BACKWARD`) instead of the direct backward.
fn rust_server(
    path: &Path,
    dtype: DType,
    checkpointing: bool,
    autograd: bool,
    options: &Options,
) -> BenchResult<StepServer> {
    let mut command = Command::new(std::env::current_exe()?);
    if autograd {
        command.env("FLUX2_AUTOGRAD_BACKWARD", "1");
    } else {
        command.env_remove("FLUX2_AUTOGRAD_BACKWARD");
    }
    command
        .args(["--threads", &options.threads.to_string()])
        .arg("--run")
        .arg(path)
        .arg(dtype_name(dtype))
        .arg(if checkpointing {
            "checkpointing"
        } else {
            "full"
        });
    Ok(StepServer::spawn(
        command,
        &format!("rust {}", dtype_name(dtype)),
    )?)
}

/// Ends a Rust child; its peak memory and LoRA size.
fn finish_rust(server: StepServer, seconds: Vec<f64>) -> BenchResult<Measured> {
    let line = server.done()?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() != 3 {
        return Err(format!("unexpected child output {line:?}").into());
    }
    Ok(Measured {
        seconds,
        peak_mib: fields[0].parse()?,
        modules: fields[1].parse()?,
        parameters: fields[2].parse()?,
    })
}

/// Warm-up steps, then `--iterations` timed steps of `server`, each followed by `after_step` (a
/// PyTorch step when paired); ends the child.
fn timed_steps(
    mut server: StepServer,
    options: &Options,
    mut after_step: impl FnMut(),
) -> BenchResult<Measured> {
    for _ in 0..options.warmup {
        server.step()?;
    }
    let mut seconds = Vec::new();
    for _ in 0..options.iterations {
        seconds.push(server.step()?);
        after_step();
    }
    finish_rust(server, seconds)
}

/// The autograd path alone (not paired with PyTorch: it is shown for comparison only).
fn measure_autograd(
    path: &Path,
    dtype: DType,
    checkpointing: bool,
    options: &Options,
) -> BenchResult<Measured> {
    timed_steps(
        rust_server(path, dtype, checkpointing, true, options)?,
        options,
        || {},
    )
}

/// One dtype's rows: the direct backward without and with checkpointing, each step alternated
/// with a PyTorch step (when PyTorch runs) so both see the same machine load. Returns per
/// checkpointing mode the Rust steps and the PyTorch steps paired with them, and PyTorch's
/// final report (peak memory, LoRA size, version).
#[allow(clippy::type_complexity)]
fn measure_paired(
    path: &Path,
    dtype: DType,
    options: &Options,
) -> (
    Vec<(bool, BenchResult<Measured>, Vec<f64>)>,
    Result<serde_json::Value, String>,
) {
    let mut pytorch =
        bench_support::reference_command("train_step_diffusers.py").and_then(|mut command| {
            command.args([
                "--threads",
                &options.threads.to_string(),
                "--dtype",
                dtype_name(dtype),
                "--serve",
            ]);
            StepServer::spawn(command, &format!("pytorch {}", dtype_name(dtype)))
        });
    if let Ok(server) = pytorch.as_mut() {
        for _ in 0..options.warmup {
            if let Err(error) = server.step() {
                pytorch = Err(error);
                break;
            }
        }
    }
    let mut rows = Vec::new();
    for checkpointing in [false, true] {
        let mut torch_seconds = Vec::new();
        let measured = rust_server(path, dtype, checkpointing, false, options).and_then(|server| {
            timed_steps(server, options, || {
                if let Ok(reference) = pytorch.as_mut() {
                    match reference.step() {
                        Ok(step) => torch_seconds.push(step),
                        Err(error) => pytorch = Err(error),
                    }
                }
            })
        });
        rows.push((checkpointing, measured, torch_seconds));
    }
    let report = pytorch.and_then(|server| {
        let line = server.done()?;
        serde_json::from_str(&line).map_err(|e| format!("unexpected output {line:?}: {e}"))
    });
    (rows, report)
}

fn main() -> BenchResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    let (options, run) = parse_options()?;
    // candle's CPU matmul and rayon both read this; set it before the first tensor op.
    std::env::set_var("RAYON_NUM_THREADS", options.threads.to_string());
    if let Some(spec) = run {
        return run_one(&spec);
    }

    let config = bench_support::mid_size_dit_config(TEXT_WIDTH);
    let directory = std::env::temp_dir().join(format!("flux2-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let path = directory.join("dit.safetensors");
    write_random_dit(&config, &path, 0, DType::F32)?;
    let mut rows = Vec::new();
    let mut reference = Err("not run".to_string());
    for dtype in [DType::F32, DType::BF16] {
        let (paired, report) = measure_paired(&path, dtype, &options);
        for (checkpointing, measured, torch_seconds) in paired {
            let autograd = measure_autograd(&path, dtype, checkpointing, &options);
            rows.push((
                dtype,
                checkpointing,
                measured,
                torch_seconds,
                autograd,
                report.clone(),
            ));
        }
        if reference.is_err() {
            reference = report;
        }
    }
    std::fs::remove_dir_all(&directory)?;

    println!(
        "LoRA training step, CPU, {} threads: hidden {}, {} heads, {} double + {} single blocks, {} image + {} text \
         tokens, batch 1, {} base parameters, LoRA rank {RANK}; warm-up {}, then {} steps, each Rust step followed \
         by a PyTorch step; medians, and the median of the per-pair time ratios",
        options.threads,
        config.hidden_size,
        config.num_heads,
        config.depth,
        config.depth_single_blocks,
        GRID_SIDE * GRID_SIDE,
        TEXT_TOKENS,
        config.parameter_count(),
        options.warmup,
        options.iterations
    );
    match &reference {
        Ok(json) => println!(
            "reference: diffusers Flux2Transformer2DModel + peft LoRA ({} modules, {} parameters), torch {}",
            json["lora_modules"],
            json["lora_parameters"],
            json["torch"].as_str().unwrap_or("?")
        ),
        Err(reason) => println!("PyTorch unavailable: {reason}"),
    }
    println!(
        "| dtype | gradient checkpointing | rust s | rust peak MiB | pytorch s | pytorch peak MiB | time ratio | memory ratio | rust autograd s | autograd peak MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (dtype, checkpointing, measured, torch_seconds, autograd, report) in &rows {
        let name = dtype_name(*dtype);
        let measured = match measured {
            Ok(measured) => measured,
            Err(error) => {
                println!("| {name} | {checkpointing} | failed: {error} | | | | | | | |");
                continue;
            }
        };
        let torch_mib = report
            .as_ref()
            .ok()
            .and_then(|json| json["peak_rss_mib"].as_f64());
        let (torch_time, time_ratio) = if torch_seconds.len() == measured.seconds.len() {
            let ratios = measured
                .seconds
                .iter()
                .zip(torch_seconds)
                .map(|(rust, torch)| rust / torch)
                .collect();
            (
                format!("{:.3}", bench_support::median(torch_seconds.clone())),
                format!("{:.2}", bench_support::median(ratios)),
            )
        } else {
            ("-".into(), "-".into())
        };
        let (torch_memory, memory_ratio) = match torch_mib {
            Some(mib) => (
                format!("{mib:.0}"),
                format!("{:.2}", measured.peak_mib / mib),
            ),
            None => ("-".into(), "-".into()),
        };
        let (autograd_seconds, autograd_mib) = match autograd {
            Ok(autograd) => (
                format!("{:.3}", autograd.median()),
                format!("{:.0}", autograd.peak_mib),
            ),
            Err(_) => ("failed".into(), "-".into()),
        };
        println!(
            "| {name} | {} | {:.3} | {:.0} | {torch_time} | {torch_memory} | {time_ratio} | {memory_ratio} | {autograd_seconds} | {autograd_mib} |",
            if *checkpointing { "yes" } else { "no" },
            measured.median(),
            measured.peak_mib,
        );
    }
    if let Some(Ok(measured)) = rows.first().map(|row| &row.2) {
        println!(
            "rust LoRA: {} modules, {} parameters",
            measured.modules, measured.parameters
        );
    }
    Ok(())
}
