//! Generation benchmark on CPU (issue 5, point 9): one 512x512 image (1024 image tokens) in 4
//! steps with the mid-size FLUX.2 transformer of `bench_dit` (hidden 512 = 8 heads x 64, 2 double
//! and 4 single blocks, MLP ratio 3, text width 384, RoPE 4 x 16, no guidance embedding) run as a
//! distilled klein (no CFG, the FLUX.2 schedule, Euler), then decoded by a small AE (ch 32,
//! ch_mult [1, 1, 2, 2], one ResNet block per level, z 32, 32 groups) in f32, both with random
//! weights. The prompt embeddings are precomputed random `[1, 512, 384]`: text encoding is left
//! out on both sides. The DiT runs in f32 and in bf16; timed per image (sampling + decode to an
//! RGB image) and per step, warm-up then the median of several runs.
//!
//! The same generation is then timed with diffusers' `Flux2KleinPipeline` by
//! `tools/bench/generate_diffusers.py` with the same thread count, when a Python with torch and
//! diffusers is found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`).
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_generate -- [--threads 2] [--warmup 1] [--iterations 3]
//! ```

use std::path::Path;

use std::time::Instant;

mod bench_support;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::ae::{write_random_ae, AeConfig, AutoEncoder};
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::models::ModelVersion;
use flux2_tuner::sample::generate::{decode_image, sample_latents, Conditioning};
use flux2_tuner::sample::ImageRequest;
use flux2_tuner::util::rng::SeededRng;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const IMAGE_SIZE: usize = 512;
const STEPS: usize = 4;
const TEXT_TOKENS: usize = 512;
const TEXT_WIDTH: usize = 384;

/// The small AE; diffusers' `block_out_channels=(32, 32, 64, 64)`, `layers_per_block=1`.
fn ae_config() -> AeConfig {
    AeConfig {
        ch: 32,
        ch_mult: vec![1, 1, 2, 2],
        num_res_blocks: 1,
        ..AeConfig::real()
    }
}

/// Median seconds per image and per step, the DiT in `dtype`.
struct Timing {
    image: f64,
    step: f64,
}

fn time_rust(
    dit_path: &Path,
    ae_path: &Path,
    dtype: DType,
    options: &bench_support::Options,
) -> BenchResult<Timing> {
    let device = Device::Cpu;
    let dit = Flux2Dit::load(&Checkpoint::open(dit_path)?, None, dtype, &device)?;
    let ae = AutoEncoder::load(&Checkpoint::open(ae_path)?, DType::F32, &device)?;
    let values = SeededRng::new(0).normal_vec(TEXT_TOKENS * TEXT_WIDTH);
    let text = Tensor::from_vec(values, (1, TEXT_TOKENS, TEXT_WIDTH), &device)?.to_dtype(dtype)?;
    let conditioning = Conditioning {
        positive: text,
        negative: None,
    };
    let mut image_seconds = Vec::new();
    let mut step_seconds = Vec::new();
    for index in 0..options.warmup + options.iterations {
        let request = ImageRequest {
            prompt: String::new(),
            negative_prompt: None,
            height: IMAGE_SIZE,
            width: IMAGE_SIZE,
            steps: STEPS,
            guidance: 1.0,
            seed: index as u64,
            flow_shift: None,
            control_images: Vec::new(),
        };
        let start = Instant::now();
        let mut last_step = start;
        let latents = sample_latents(
            &dit,
            ModelVersion::Klein4b,
            &conditioning,
            None,
            &request,
            |_, _| last_step = Instant::now(),
        )?;
        let image = decode_image(&ae, &latents)?;
        let elapsed = start.elapsed().as_secs_f64();
        let sampled = (last_step - start).as_secs_f64();
        let first: f32 = latents.flatten_all()?.get(0)?.to_scalar()?;
        if !first.is_finite() {
            return Err(format!("non-finite latents in {dtype:?}").into());
        }
        if (image.width() as usize, image.height() as usize) != (IMAGE_SIZE, IMAGE_SIZE) {
            return Err(format!("unexpected image size in {dtype:?}").into());
        }
        if index >= options.warmup {
            image_seconds.push(elapsed);
            step_seconds.push(sampled / STEPS as f64);
        }
    }
    Ok(Timing {
        image: bench_support::median(image_seconds),
        step: bench_support::median(step_seconds),
    })
}

/// The reference timings `(f32, bf16, torch version)` from the Python script, or why they are missing.
fn time_pytorch(
    options: &bench_support::Options,
) -> std::result::Result<(Timing, Timing, String), String> {
    let script = "generate_diffusers.py";
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
    let field = |name: &str| json[name].as_f64().ok_or(format!("no {name} in {line:?}"));
    let f32_timing = Timing {
        image: field("image_f32_s")?,
        step: field("step_f32_s")?,
    };
    let bf16_timing = Timing {
        image: field("image_bf16_s")?,
        step: field("step_bf16_s")?,
    };
    let torch = json["torch"].as_str().unwrap_or("?").to_string();
    Ok((f32_timing, bf16_timing, torch))
}

fn main() -> BenchResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    let options = bench_support::parse_options(bench_support::Options {
        threads: 2,
        warmup: 1,
        iterations: 3,
    })?;
    // candle's CPU matmul and rayon both read this; set it before the first tensor op.
    std::env::set_var("RAYON_NUM_THREADS", options.threads.to_string());

    let dit = bench_support::mid_size_dit_config(TEXT_WIDTH);
    let ae = ae_config();
    let directory =
        std::env::temp_dir().join(format!("flux2-bench-generate-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let dit_path = directory.join("dit.safetensors");
    let ae_path = directory.join("ae.safetensors");
    write_random_dit(&dit, &dit_path, 0, DType::F32)?;
    write_random_ae(&ae, &ae_path, 0, DType::F32)?;
    let rust =
        [DType::F32, DType::BF16].map(|dtype| time_rust(&dit_path, &ae_path, dtype, &options));
    std::fs::remove_dir_all(&directory)?;
    let [rust_f32, rust_bf16] = rust;
    let rust_f32 = rust_f32.map_err(|e| e.to_string())?;
    let rust_bf16 = rust_bf16.map_err(|e| e.to_string())?;

    println!(
        "Generation, CPU, {} threads: {IMAGE_SIZE}x{IMAGE_SIZE} ({} image tokens), {STEPS} steps, \
         {TEXT_TOKENS} text tokens (precomputed), DiT {} parameters, AE {} parameters (f32 decode); \
         warm-up {}, median of {}",
        options.threads,
        (IMAGE_SIZE / 16) * (IMAGE_SIZE / 16),
        dit.parameter_count(),
        ae.parameter_count(),
        options.warmup,
        options.iterations
    );
    let reference = time_pytorch(&options);
    match &reference {
        Ok((_, _, version)) => println!("reference: diffusers Flux2KleinPipeline, torch {version}"),
        Err(reason) => println!("PyTorch unavailable: {reason}"),
    }
    println!("| DiT dtype | Rust s/image | PyTorch s/image | Rust s/step | PyTorch s/step | ratio image | ratio step |");
    println!("|---|---|---|---|---|---|---|");
    for (index, (name, rust)) in [("f32", &rust_f32), ("bf16", &rust_bf16)]
        .into_iter()
        .enumerate()
    {
        match &reference {
            Ok((torch_f32, torch_bf16, _)) => {
                let torch = if index == 0 { torch_f32 } else { torch_bf16 };
                println!(
                    "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
                    rust.image,
                    torch.image,
                    rust.step,
                    torch.step,
                    rust.image / torch.image,
                    rust.step / torch.step
                );
            }
            Err(_) => println!(
                "| {name} | {:.3} | - | {:.3} | - | - | - |",
                rust.image, rust.step
            ),
        }
    }
    Ok(())
}
