//! DiT forward benchmark on CPU (issue 2, point 9): a mid-size FLUX.2 transformer (hidden 512 =
//! 8 heads x 64, 2 double + 4 single blocks, MLP ratio 3, RoPE 4 x 16, no guidance embedding) with
//! random weights in the BFL key format, 1024 image tokens (a 32 x 32 grid) and 128 text tokens,
//! batch 1, timed in f32 and bf16 (warm-up, then the median of several runs).
//!
//! The same config runs in PyTorch in `tools/bench/dit_diffusers.py --serve` (diffusers
//! `Flux2Transformer2DModel`) with the same thread count, when a Python with torch and diffusers is
//! found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`). The passes alternate, Rust then
//! PyTorch: single timings on a shared machine move by up to 40 % with other tenants' load, and
//! neighbouring passes see the same load. The ratio printed is the median of the per-pair ratios.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_dit -- [--threads 2] [--warmup 2] [--iterations 5]
//! ```

use std::path::Path;

use std::time::Instant;

mod bench_support;

use bench_support::StepServer;

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::Flux2Dit;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

use bench_support::{GRID_SIDE, TEXT_TOKENS};
const TEXT_WIDTH: usize = 384;

/// Timed forward passes of the checkpoint at `path` in `dtype`, each followed by one PyTorch pass
/// when `pytorch` serves (so that both see the same machine load). Returns the Rust seconds and
/// the PyTorch seconds, pass by pass.
fn time_paired(
    path: &Path,
    dtype: DType,
    options: &bench_support::Options,
    pytorch: &mut Option<StepServer>,
) -> BenchResult<(Vec<f64>, Vec<f64>)> {
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(path)?;
    let dit = Flux2Dit::load(&checkpoint, None, dtype, &device)?;
    let config = &dit.config;
    let inputs = bench_support::MidSizeInput::new(config, &device)?;
    let input = inputs.input();
    let (mut rust, mut torch) = (Vec::new(), Vec::new());
    for index in 0..options.warmup + options.iterations {
        let start = Instant::now();
        let output = dit.forward(&input)?;
        // Reading one value makes sure the whole graph has run (it always has on the CPU).
        let first: f32 = output.flatten_all()?.get(0)?.to_scalar()?;
        let elapsed = start.elapsed().as_secs_f64();
        if !first.is_finite() {
            return Err(format!("non-finite output in {dtype:?}").into());
        }
        let reference = pytorch.as_mut().map(|server| server.step()).transpose()?;
        if index >= options.warmup {
            rust.push(elapsed);
            torch.extend(reference);
        }
    }
    Ok((rust, torch))
}

/// The PyTorch side in `dtype`, stepping on demand, or why there is none.
fn pytorch_server(
    options: &bench_support::Options,
    dtype: &str,
) -> std::result::Result<StepServer, String> {
    let mut command = bench_support::reference_command("dit_diffusers.py")?;
    command.args(["--threads", &options.threads.to_string(), "--serve", dtype]);
    StepServer::spawn(command, &format!("pytorch {dtype}"))
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
    let mut lines = Vec::new();
    let mut version = None;
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let mut pytorch = match pytorch_server(&options, name) {
            Ok(server) => Some(server),
            Err(reason) => {
                println!("PyTorch unavailable: {reason}");
                None
            }
        };
        let (rust, torch) = time_paired(&path, dtype, &options, &mut pytorch)?;
        if let Some(server) = pytorch {
            let report: serde_json::Value = serde_json::from_str(&server.done()?)?;
            version = report["torch"].as_str().map(str::to_string);
        }
        let rust_seconds = bench_support::median(rust.clone());
        lines.push(if torch.len() == rust.len() {
            let ratios = rust.iter().zip(&torch).map(|(r, t)| r / t).collect();
            format!(
                "dit_forward {name}: rust {rust_seconds:.3} s, pytorch {:.3} s, ratio {:.2}",
                bench_support::median(torch),
                bench_support::median(ratios)
            )
        } else {
            format!("dit_forward {name}: rust {rust_seconds:.3} s")
        });
    }
    std::fs::remove_dir_all(&directory)?;

    println!(
        "DiT forward, CPU, {} threads: hidden {}, {} heads, {} double + {} single blocks, {} image + {} text tokens, \
         {} parameters; warm-up {}, then {} passes, each Rust pass followed by a PyTorch pass; medians, and the \
         median of the per-pair time ratios",
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
    if let Some(version) = version {
        println!("reference: diffusers Flux2Transformer2DModel, torch {version}");
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
