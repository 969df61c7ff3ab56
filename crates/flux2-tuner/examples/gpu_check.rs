//! GPU checks and benchmarks of issue 10, one job per call (run by `scripts/gpu-check.sh`); every
//! job also runs on the CPU with small sizes, which is how it is tested without a GPU.
//!
//! ```text
//! gpu_check attention [--device cuda] [--real]     fused kernel vs composed: output and gradients
//! gpu_check write-dit PATH [--config klein-4b|tiny]  random DiT checkpoint (bf16)
//! gpu_check generate --dit PATH [--size 1024] [--steps 4] [--attn flash|composed] [--device cuda]
//! gpu_check train --dit PATH [--size 1024] [--checkpointing] [--attn flash|composed] [--device cuda]
//! ```
//! Common: `--warmup N`, `--iterations N`. Results are printed as one `RESULT` line of
//! `key=value` pairs; peak device memory is the largest `total - free` seen by a sampling thread,
//! less the value right after the device was opened (the same measure as
//! `tools/gpu/torch_reference.py`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};
use flux2_tuner::models::ae::{write_random_ae, AeConfig, AutoEncoder};
use flux2_tuner::models::dit::{DitConfig, Flux2Dit};
use flux2_tuner::models::ModelVersion;
use flux2_tuner::nn::flash::{self, AttentionKernel};
use flux2_tuner::sample::generate::{decode_image, sample_latents, Conditioning};
use flux2_tuner::sample::ImageRequest;
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::optim::{AdamW, Optimizer};
use flux2_tuner::train::step::{training_step, StepBatch};
use flux2_tuner::util::rng::SeededRng;
use rayon::prelude::*;

type CheckResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TEXT_TOKENS: usize = 512;
const RANK: usize = 32;
const LEARNING_RATE: f64 = 1e-4;
const SIGMA: f64 = 0.7;
/// Tolerances of the kernel against the f32 composed attention on the same bf16 inputs.
const OUTPUT_TOLERANCE: f64 = 1e-2;
const GRADIENT_TOLERANCE: f64 = 2e-2;

struct Options {
    job: String,
    path: Option<PathBuf>,
    device: String,
    config: String,
    size: usize,
    steps: usize,
    attn: String,
    checkpointing: bool,
    real: bool,
    warmup: usize,
    iterations: usize,
}

fn parse_options() -> CheckResult<Options> {
    let mut args = std::env::args().skip(1);
    let job = args
        .next()
        .ok_or("expected a job: attention, write-dit, generate, train")?;
    let mut options = Options {
        job,
        path: None,
        device: "cuda".into(),
        config: "klein-4b".into(),
        size: 1024,
        steps: 4,
        attn: "flash".into(),
        checkpointing: false,
        real: false,
        warmup: 1,
        iterations: 3,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dit" => options.path = Some(PathBuf::from(value()?)),
            "--device" => options.device = value()?,
            "--config" => options.config = value()?,
            "--size" => options.size = value()?.parse()?,
            "--steps" => options.steps = value()?.parse()?,
            "--attn" => options.attn = value()?,
            "--warmup" => options.warmup = value()?.parse()?,
            "--iterations" => options.iterations = value()?.parse::<usize>()?.max(1),
            "--checkpointing" => options.checkpointing = true,
            "--real" => options.real = true,
            other if !other.starts_with("--") && options.path.is_none() => {
                options.path = Some(PathBuf::from(other))
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(options)
}

fn open_device(name: &str) -> CheckResult<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("--device {other}: expected cpu or cuda").into()),
    })
}

fn select_attention(name: &str) -> CheckResult<()> {
    flash::select(match name {
        "flash" => AttentionKernel::Fused,
        "composed" => AttentionKernel::Composed,
        other => return Err(format!("--attn {other}: expected flash or composed").into()),
    });
    Ok(())
}

fn dit_config(name: &str) -> CheckResult<DitConfig> {
    Ok(match name {
        // klein-base-4B has the same architecture.
        "klein-4b" => ModelVersion::Klein4b.info().dit,
        // A small model with the real head dim (128) and RoPE, for CPU runs of the jobs.
        "tiny" => DitConfig {
            in_channels: 128,
            context_in_dim: 7680,
            hidden_size: 256,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 1,
            mlp_hidden_size: 768,
            axes_dim: [32; 4],
            theta: 2000.0,
            guidance_embed: false,
        },
        other => return Err(format!("--config {other}: expected klein-4b or tiny").into()),
    })
}

fn random(shape: &[usize], seed: u64, device: &Device) -> CheckResult<Tensor> {
    let values = SeededRng::new(seed).normal_vec(shape.iter().product());
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
}

/// Device memory in use (`total - free`, bytes); 0 on the CPU.
#[cfg(feature = "cuda")]
fn device_memory_used(device: &Device) -> usize {
    match device {
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_or(0, |(free, total)| total - free),
        _ => 0,
    }
}

#[cfg(not(feature = "cuda"))]
fn device_memory_used(_: &Device) -> usize {
    0
}

/// Samples [`device_memory_used`] every 2 ms until dropped; `peak_mib` is over the baseline.
struct MemoryPeak {
    baseline: usize,
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoryPeak {
    fn start(device: &Device) -> Self {
        let baseline = device_memory_used(device);
        let peak = Arc::new(AtomicUsize::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (device, peak, stop) = (device.clone(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(device_memory_used(&device), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        Self {
            baseline,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak_mib(&self) -> f64 {
        (self.peak.load(Ordering::Relaxed) - self.baseline) as f64 / (1024.0 * 1024.0)
    }
}

impl Drop for MemoryPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    let middle = seconds.len() / 2;
    if seconds.len() % 2 == 0 {
        (seconds[middle - 1] + seconds[middle]) / 2.0
    } else {
        seconds[middle]
    }
}

/// `|a - b| / |b|` (Frobenius norms).
fn relative_error(a: &Tensor, b: &Tensor) -> CheckResult<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let difference = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((difference / norm.max(f64::MIN_POSITIVE)).sqrt())
}

/// Composed attention in f32 with autograd: `[b, h, l, d]` in, `[b, l, h, d]` out.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> CheckResult<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?
        .matmul(v)?
        .transpose(1, 2)?)
}

/// The fused op against the composed attention on fresh random bf16 inputs: relative errors of
/// the output and of dq, dk, dv (loss `sum(out * w)`), then timings at FLUX.2 size.
fn attention_job(options: &Options) -> CheckResult<bool> {
    let device = open_device(&options.device)?;
    let mut cases = vec![
        (1, 3, 300, 24),
        (2, 2, 257, 32),
        (1, 2, 130, 16),
        (1, 4, 500, 64),
        (1, 4, 1000, 128),
    ];
    if options.real || device.is_cuda() {
        // klein at 1024x1024: 4096 image + 512 text tokens, 24 heads of 128.
        cases.push((1, 24, 4608, 128));
    }
    let mut all_pass = true;
    for (index, &(batch, heads, length, head_dim)) in cases.iter().enumerate() {
        let seed = 100 + 10 * index as u64;
        let shape = [batch, heads, length, head_dim];
        // f32 variables holding bf16-exact values: both paths see the same inputs.
        let vars: Vec<Var> = (0..3)
            .map(|i| {
                let t = (random(&shape, seed + i, &device)? * if i < 2 { 2.0 } else { 1.0 })?;
                Ok(Var::from_tensor(
                    &t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
                )?)
            })
            .collect::<CheckResult<_>>()?;
        let weights = random(&[batch, length, heads, head_dim], seed + 5, &device)?;
        let bf16 = |v: &Var| v.as_tensor().to_dtype(DType::BF16);
        let fused = flash::attention_rows(&bf16(&vars[0])?, &bf16(&vars[1])?, &bf16(&vars[2])?)?;
        let fused_grads = (fused.to_dtype(DType::F32)? * &weights)?
            .sum_all()?
            .backward()?;
        let reference = composed(&vars[0], &vars[1], &vars[2])?;
        let reference_grads = (&reference * &weights)?.sum_all()?.backward()?;
        let mut line = format!(
            "attention [{batch}, {heads}, {length}, {head_dim}] out rel_err={:.2e}",
            relative_error(&fused, &reference)?
        );
        let mut pass = relative_error(&fused, &reference)? < OUTPUT_TOLERANCE;
        for (name, var) in ["dq", "dk", "dv"].iter().zip(&vars) {
            let (Some(ours), Some(theirs)) = (fused_grads.get(var), reference_grads.get(var))
            else {
                return Err(format!("attention: no {name}").into());
            };
            let error = relative_error(ours, theirs)?;
            pass &= error < GRADIENT_TOLERANCE;
            line.push_str(&format!(" {name}={error:.2e}"));
        }
        println!(
            "{line} tol={OUTPUT_TOLERANCE:.0e}/{GRADIENT_TOLERANCE:.0e} {}",
            if pass { "PASS" } else { "FAIL" }
        );
        all_pass &= pass;
    }
    if device.is_cuda() {
        time_attention(&device, options)?;
    }
    Ok(all_pass)
}

/// Seconds per call (median) of the fused forward, fused forward + backward and the composed
/// trainable attention's forward + backward, bf16 at klein 1024x1024 size.
fn time_attention(device: &Device, options: &Options) -> CheckResult<()> {
    let shape = [1, 24, 4608, 128];
    let vars: Vec<Var> = (0..3)
        .map(|i| {
            Ok(Var::from_tensor(
                &random(&shape, 7 + i, device)?.to_dtype(DType::BF16)?,
            )?)
        })
        .collect::<CheckResult<_>>()?;
    let (q, k, v) = (
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    );
    let time = |label: &str, f: &dyn Fn() -> CheckResult<()>| -> CheckResult<()> {
        let mut seconds = Vec::new();
        for index in 0..options.warmup + options.iterations.max(5) {
            device.synchronize()?;
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            if index >= options.warmup {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        println!(
            "RESULT attention_time {label}_ms={:.3}",
            1e3 * median(seconds)
        );
        Ok(())
    };
    time("fused_forward", &|| {
        flash::attention(q, k, v)?;
        Ok(())
    })?;
    time("fused_forward_backward", &|| {
        flash::attention(q, k, v)?.sum_all()?.backward()?;
        Ok(())
    })?;
    time("composed_forward_backward", &|| {
        flux2_tuner::nn::trainable::attention(q, k, v)?
            .sum_all()?
            .backward()?;
        Ok(())
    })?;
    Ok(())
}

/// A random DiT in bf16, `N(0, 1/in_features)` weights (norm scales near 1) as
/// `write_random_dit`, drawn in parallel (the real size has 4 billion values).
fn write_dit_job(options: &Options) -> CheckResult<()> {
    let path = options.path.as_ref().ok_or("write-dit needs a path")?;
    let config = dit_config(&options.config)?;
    let start = Instant::now();
    let tensors: Vec<(String, Tensor)> = config
        .expected_keys()
        .into_par_iter()
        .enumerate()
        .map(|(index, spec)| {
            let count: usize = spec.shape.iter().product();
            let mut rng = SeededRng::new(1000 + index as u64);
            let scale_key = spec.key.ends_with(".scale");
            let std = if scale_key {
                0.1
            } else {
                1.0 / (spec.shape[1] as f64).sqrt()
            };
            let values: Vec<half::bf16> = (0..count)
                .map(|_| {
                    let value = std * rng.normal() + if scale_key { 1.0 } else { 0.0 };
                    half::bf16::from_f64(value)
                })
                .collect();
            let tensor = Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)?;
            Ok((spec.key, tensor))
        })
        .collect::<candle_core::Result<_>>()?;
    save_safetensors(path, &tensors, None)?;
    println!(
        "RESULT write_dit parameters={} seconds={:.1}",
        config.parameter_count(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// klein generation: `steps` steps at `size` x `size` from random text embeddings
/// `[1, 512, context]` (text encoding left out, as in the PyTorch reference), DiT in bf16, then
/// the real-size AE (random weights) decodes in f32 to an RGB image. Seconds per image and per
/// step (median), peak device memory.
fn generate_job(options: &Options) -> CheckResult<()> {
    let device = open_device(&options.device)?;
    select_attention(&options.attn)?;
    let memory = MemoryPeak::start(&device);
    let dit_path = options.path.as_ref().ok_or("generate needs --dit")?;
    let dit = Flux2Dit::load(&Checkpoint::open(dit_path)?, None, DType::BF16, &device)?;
    let ae_path =
        std::env::temp_dir().join(format!("gpu-check-ae-{}.safetensors", std::process::id()));
    write_random_ae(&AeConfig::real(), &ae_path, 0, DType::F32)?;
    let ae = AutoEncoder::load(&Checkpoint::open(&ae_path)?, DType::F32, &device)?;
    std::fs::remove_file(&ae_path)?;
    let text =
        random(&[1, TEXT_TOKENS, dit.config.context_in_dim], 1, &device)?.to_dtype(DType::BF16)?;
    let conditioning = Conditioning {
        positive: text,
        negative: None,
    };
    let (mut image_seconds, mut step_seconds) = (Vec::new(), Vec::new());
    for index in 0..options.warmup + options.iterations {
        let request = ImageRequest {
            prompt: String::new(),
            negative_prompt: None,
            height: options.size,
            width: options.size,
            steps: options.steps,
            guidance: 1.0,
            seed: index as u64,
            flow_shift: None,
            control_images: Vec::new(),
        };
        device.synchronize()?;
        let start = Instant::now();
        let latents = sample_latents(
            &dit,
            ModelVersion::Klein4b,
            &conditioning,
            None,
            &request,
            |_, _| {},
        )?;
        device.synchronize()?;
        let sampled = start.elapsed().as_secs_f64();
        let image = decode_image(&ae, &latents)?;
        let elapsed = start.elapsed().as_secs_f64();
        if image.width() as usize != options.size {
            return Err("unexpected image size".into());
        }
        if index >= options.warmup {
            image_seconds.push(elapsed);
            step_seconds.push(sampled / options.steps as f64);
        }
    }
    println!(
        "RESULT generate attn={} size={} steps={} s_per_image={:.4} s_per_step={:.4} peak_mib={:.0}",
        options.attn,
        options.size,
        options.steps,
        median(image_seconds),
        median(step_seconds),
        memory.peak_mib()
    );
    Ok(())
}

/// One LoRA training step (rank 32 on Musubi's targets, bf16 base, f32 LoRA, AdamW), batch 1 at
/// `size` x `size` with 512 text tokens: seconds per step (median), peak device memory.
fn train_job(options: &Options) -> CheckResult<()> {
    let device = open_device(&options.device)?;
    select_attention(&options.attn)?;
    let memory = MemoryPeak::start(&device);
    let dit_path = options.path.as_ref().ok_or("train needs --dit")?;
    let mut dit = Flux2Dit::load(&Checkpoint::open(dit_path)?, None, DType::BF16, &device)?;
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
    let side = options.size / 16;
    let latents = random(&[1, dit.config.in_channels, side, side], 2, &device)?;
    let noise = random(&[1, dit.config.in_channels, side, side], 3, &device)?;
    let text = random(&[1, TEXT_TOKENS, dit.config.context_in_dim], 4, &device)?;
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
    let mut seconds = Vec::new();
    for index in 0..options.warmup + options.iterations {
        device.synchronize()?;
        let start = Instant::now();
        let step = training_step(&dit, &batch, &parameters, options.checkpointing)?;
        optimizer.step(&step.gradients, LEARNING_RATE)?;
        device.synchronize()?;
        if !step.loss.is_finite() {
            return Err("non-finite loss".into());
        }
        if index >= options.warmup {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    println!(
        "RESULT train attn={} size={} checkpointing={} s_per_step={:.4} peak_mib={:.0}",
        options.attn,
        options.size,
        options.checkpointing,
        median(seconds),
        memory.peak_mib()
    );
    Ok(())
}

fn main() -> CheckResult<()> {
    let options = parse_options()?;
    match options.job.as_str() {
        "attention" => {
            if !attention_job(&options)? {
                std::process::exit(1);
            }
        }
        "write-dit" => write_dit_job(&options)?,
        "generate" => generate_job(&options)?,
        "train" => train_job(&options)?,
        other => return Err(format!("unknown job {other}").into()),
    }
    Ok(())
}
