//! The Rust side of `bench_dit` alone, for profiling (`perf record`) and quick A/B timings: one
//! forward pass of the mid-size DiT, repeated, in one dtype.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example dit_forward_rust -- [--threads 1] [--warmup 2] [--iterations 5] [--f32 1] [--serve 1]
//! ```
//! `--serve 1` warms up, prints `ready`, then runs one forward per `step` line on stdin and prints
//! its seconds, until `done`: two builds served side by side give paired A/B timings.

use std::time::Instant;

mod bench_support;

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::Flux2Dit;

type RunResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> RunResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    // `--f32 1` times f32 instead of bf16 (the option parser takes numbers only).
    let mut arguments: Vec<String> = std::env::args().collect();
    let mut switch = |name: &str| match arguments.iter().position(|a| a == name) {
        Some(index) => {
            let value = arguments.get(index + 1).cloned().unwrap_or_default();
            arguments.drain(index..(index + 2).min(arguments.len()));
            value == "1"
        }
        None => false,
    };
    let f32_mode = switch("--f32");
    let serve = switch("--serve");
    let options = bench_support::parse_options_from(
        arguments.into_iter().skip(1),
        bench_support::Options {
            threads: 1,
            warmup: 2,
            iterations: 5,
        },
    )?;
    std::env::set_var("RAYON_NUM_THREADS", options.threads.to_string());
    let dtype = if f32_mode { DType::F32 } else { DType::BF16 };

    let config = bench_support::mid_size_dit_config(384);
    let directory = std::env::temp_dir().join(format!("flux2-dit-rust-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let path = directory.join("dit.safetensors");
    write_random_dit(&config, &path, 0, DType::F32)?;
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(&path)?;
    let dit = Flux2Dit::load(&checkpoint, None, dtype, &device)?;
    std::fs::remove_dir_all(&directory)?;

    let inputs = bench_support::MidSizeInput::new(&config, &device)?;
    let input = inputs.input();
    if serve {
        for _ in 0..options.warmup {
            dit.forward(&input)?;
        }
        return bench_support::serve_steps(
            || {
                let start = Instant::now();
                let output = dit.forward(&input)?;
                let first: f32 = output.flatten_all()?.get(0)?.to_scalar()?;
                if !first.is_finite() {
                    return Err("non-finite output".into());
                }
                Ok(start.elapsed().as_secs_f64())
            },
            || Ok(String::new()),
        );
    }
    let mut seconds = Vec::new();
    let mut cpu = Vec::new();
    for index in 0..options.warmup + options.iterations {
        let start = Instant::now();
        let cpu_start = bench_support::cpu_seconds();
        let output = dit.forward(&input)?;
        let first: f32 = output.flatten_all()?.get(0)?.to_scalar()?;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_elapsed = bench_support::cpu_seconds() - cpu_start;
        if !first.is_finite() {
            return Err("non-finite output".into());
        }
        if index >= options.warmup {
            seconds.push(elapsed);
            cpu.push(cpu_elapsed);
        }
    }
    let all: Vec<String> = seconds.iter().map(|s| format!("{s:.3}")).collect();
    println!(
        "dit_forward {dtype:?}, {} threads: median {:.3} s, CPU time median {:.3} s min {:.3} s (runs {})",
        options.threads,
        bench_support::median(seconds),
        bench_support::median(cpu.clone()),
        cpu.iter().copied().fold(f64::INFINITY, f64::min),
        all.join(" ")
    );
    Ok(())
}
