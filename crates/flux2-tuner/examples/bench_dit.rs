//! DiT forward benchmark on CPU (issue 2, point 9): a mid-size FLUX.2 transformer (hidden 512 =
//! 8 heads x 64, 2 double + 4 single blocks, MLP ratio 3, RoPE 4 x 16, no guidance embedding) with
//! random weights in the BFL key format, 1024 image tokens (a 32 x 32 grid) and 128 text tokens,
//! batch 1, timed in f32 and bf16 (warm-up, then the median of several runs).
//!
//! The same config is then timed in PyTorch by `tools/bench/dit_diffusers.py` (diffusers
//! `Flux2Transformer2DModel`) with the same thread count, when a Python with torch and diffusers is
//! found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`), and both are printed side by side.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_dit -- [--threads 2] [--warmup 2] [--iterations 5]
//! ```

use std::path::Path;

use std::time::Instant;

mod bench_support;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::tokens::{image_position_ids, text_position_ids};
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use flux2_tuner::util::rng::SeededRng;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const GRID_SIDE: usize = 32;
const TEXT_TOKENS: usize = 128;
const TEXT_WIDTH: usize = 384;

fn random_tensor(rng: &mut SeededRng, shape: (usize, usize, usize)) -> BenchResult<Tensor> {
    let count = shape.0 * shape.1 * shape.2;
    let values: Vec<f32> = (0..count).map(|_| rng.normal() as f32).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Median seconds of one forward pass of the checkpoint at `path` in `dtype`.
fn time_rust(path: &Path, dtype: DType, options: &bench_support::Options) -> BenchResult<f64> {
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(path)?;
    let dit = Flux2Dit::load(&checkpoint, None, dtype, &device)?;
    let config = &dit.config;
    let mut rng = SeededRng::new(0);
    let image_tokens = random_tensor(&mut rng, (1, GRID_SIDE * GRID_SIDE, config.in_channels))?;
    let text = random_tensor(&mut rng, (1, TEXT_TOKENS, config.context_in_dim))?;
    let image_ids = image_position_ids(1, GRID_SIDE, GRID_SIDE, 0, &device)?;
    let text_ids = text_position_ids(1, TEXT_TOKENS, &device)?;
    let timesteps = Tensor::new(&[0.7f32], &device)?;
    let input = DitInput {
        image_tokens: &image_tokens,
        image_position_ids: &image_ids,
        text_embeddings: &text,
        text_position_ids: &text_ids,
        timesteps: &timesteps,
        guidance: None,
    };
    let mut seconds = Vec::new();
    for index in 0..options.warmup + options.iterations {
        let start = Instant::now();
        let output = dit.forward(&input)?;
        // Reading one value makes sure the whole graph has run (it always has on the CPU).
        let first: f32 = output.flatten_all()?.get(0)?.to_scalar()?;
        let elapsed = start.elapsed().as_secs_f64();
        if !first.is_finite() {
            return Err(format!("non-finite output in {dtype:?}").into());
        }
        if index >= options.warmup {
            seconds.push(elapsed);
        }
    }
    Ok(bench_support::median(seconds))
}

/// The reference timings `(f32, bf16)` from the Python script, or why they are missing.
fn time_pytorch(
    options: &bench_support::Options,
) -> std::result::Result<(f64, f64, String), String> {
    let script = "dit_diffusers.py";
    let stdout = bench_support::run_reference(
        script,
        &[
            "--threads".to_string(),
            options.threads.to_string(),
            "--warmup".to_string(),
            options.warmup.to_string(),
            "--iterations".to_string(),
            options.iterations.to_string(),
        ],
    )?;
    let line = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("unexpected output {line:?}: {e}"))?;
    let f32_seconds = json["dit_forward_f32_s"]
        .as_f64()
        .ok_or("no dit_forward_f32_s")?;
    let bf16_seconds = json["dit_forward_bf16_s"]
        .as_f64()
        .ok_or("no dit_forward_bf16_s")?;
    let torch = json["torch"].as_str().unwrap_or("?").to_string();
    Ok((f32_seconds, bf16_seconds, torch))
}

fn main() -> BenchResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    let options = bench_support::parse_options(bench_support::Options {
        threads: 2,
        warmup: 2,
        iterations: 5,
    })?;
    // candle's CPU matmul and rayon both read this; set it before the first tensor op.
    std::env::set_var("RAYON_NUM_THREADS", options.threads.to_string());

    let config = bench_support::mid_size_dit_config(TEXT_WIDTH);
    let directory = std::env::temp_dir().join(format!("flux2-bench-dit-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let path = directory.join("dit.safetensors");
    write_random_dit(&config, &path, 0, DType::F32)?;
    let rust = [DType::F32, DType::BF16].map(|dtype| time_rust(&path, dtype, &options));
    std::fs::remove_dir_all(&directory)?;
    let rust_f32 = rust[0].as_ref().map_err(|e| e.to_string())?;
    let rust_bf16 = rust[1].as_ref().map_err(|e| e.to_string())?;

    println!(
        "DiT forward, CPU, {} threads: hidden {}, {} heads, {} double + {} single blocks, {} image + {} text tokens, \
         {} parameters; warm-up {}, median of {}",
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
    match time_pytorch(&options) {
        Ok((torch_f32, torch_bf16, version)) => {
            println!("reference: diffusers Flux2Transformer2DModel, torch {version}");
            for (name, rust_seconds, torch_seconds) in [
                ("f32", rust_f32, torch_f32),
                ("bf16", rust_bf16, torch_bf16),
            ] {
                println!(
                    "dit_forward {name}: rust {rust_seconds:.3} s, pytorch {torch_seconds:.3} s, ratio {:.2}",
                    rust_seconds / torch_seconds
                );
            }
        }
        Err(reason) => {
            println!("PyTorch unavailable: {reason}");
            println!("dit_forward f32: rust {rust_f32:.3} s");
            println!("dit_forward bf16: rust {rust_bf16:.3} s");
        }
    }
    Ok(())
}
