//! Forward + backward time of the trainable attention op (`nn::trainable::attention_heads`,
//! chunked, logsumexp-only backward) against composed candle attention (full score matrix,
//! differentiable `softmax`, candle autograd) on CPU, f32, shape `[1, 8, 1024, 64]` by default.
//! Each variant runs in its own process so that the peak resident memory (`VmHWM`) is its own.
//! `FORWARD_ONLY=1` times the forward alone.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_trainable_attention -- [--length 1024] [--iterations 5]
//! ```

use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use flux2_tuner::nn::trainable::attention_heads;
use flux2_tuner::util::rng::SeededRng;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const BATCH: usize = 1;
const HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const ROUNDS: usize = 3;

fn random(shape: (usize, usize, usize, usize), seed: u64) -> BenchResult<Tensor> {
    let count = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(Tensor::from_vec(
        SeededRng::new(seed).normal_vec(count),
        shape,
        &Device::Cpu,
    )?)
}

fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(v)
}

fn peak_resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Times one variant in this process; prints `variant median_ms peak_kib`.
fn run_variant(variant: &str, length: usize, iterations: usize) -> BenchResult<()> {
    let shape = (BATCH, HEADS, length, HEAD_DIM);
    let vars = [
        Var::from_tensor(&random(shape, 1)?)?,
        Var::from_tensor(&random(shape, 2)?)?,
        Var::from_tensor(&random(shape, 3)?)?,
    ];
    let weights = random(shape, 4)?;
    let step = || -> BenchResult<f32> {
        let (q, k, v) = (
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let out = match variant {
            "trainable" => attention_heads(q, k, v)?,
            _ => composed(q, k, v)?,
        };
        if std::env::var_os("FORWARD_ONLY").is_some() {
            return Ok(out.sum_all()?.to_scalar::<f32>()?);
        }
        let grads = (out * &weights)?.sum_all()?.backward()?;
        let q_grad = grads.get(&vars[0]).ok_or("no gradient for q")?;
        Ok(q_grad.sum_all()?.to_scalar::<f32>()?)
    };
    step()?; // warm-up
    let mut times = Vec::new();
    let mut checksum = 0f32;
    for _ in 0..iterations {
        let start = Instant::now();
        checksum = step()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{variant} {:.1} {} {checksum:e}",
        times[times.len() / 2],
        peak_resident_kib()
    );
    Ok(())
}

fn main() -> BenchResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: usize| -> BenchResult<usize> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(args
                .get(i + 1)
                .ok_or(format!("{flag} needs a value"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let length = value("--length", 1024)?;
    let iterations = value("--iterations", 5)?.max(1);
    if let Some(i) = args.iter().position(|a| a == "--variant") {
        let variant = args.get(i + 1).ok_or("--variant needs a value")?;
        return run_variant(variant, length, iterations);
    }
    let what = if std::env::var_os("FORWARD_ONLY").is_some() {
        "forward"
    } else {
        "forward+backward"
    };
    println!(
        "attention {what}, f32, CPU, [{BATCH}, {HEADS}, {length}, {HEAD_DIM}], \
         median of {iterations}, best of {ROUNDS} alternating rounds"
    );
    println!(
        "{:<10} {:>10} {:>14} {:>14}",
        "variant", "ms", "peak RSS MiB", "sum dq"
    );
    // The variants alternate and each keeps its fastest round, so that load from other
    // processes on a shared machine hits both alike.
    let mut best: Vec<Option<(f64, String)>> = vec![None, None];
    for _ in 0..ROUNDS {
        for (slot, variant) in ["trainable", "composed"].into_iter().enumerate() {
            let output = Command::new(&args[0])
                .args(["--variant", variant, "--length", &length.to_string()])
                .args(["--iterations", &iterations.to_string()])
                .output()?;
            let text = String::from_utf8_lossy(&output.stdout).to_string();
            let fields: Vec<&str> = text.split_whitespace().collect();
            if !output.status.success() || fields.len() != 4 {
                let stderr = String::from_utf8_lossy(&output.stderr).to_string();
                return Err(format!("{variant} failed: {stderr}").into());
            }
            let ms: f64 = fields[1].parse()?;
            if best[slot].as_ref().is_none_or(|(fastest, _)| ms < *fastest) {
                best[slot] = Some((ms, text));
            }
        }
    }
    for (_, text) in best.into_iter().flatten() {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let peak_mib = fields[2].parse::<f64>()? / 1024.0;
        println!(
            "{:<10} {:>10} {:>14.1} {:>14}",
            fields[0], fields[1], peak_mib, fields[3]
        );
    }
    Ok(())
}
