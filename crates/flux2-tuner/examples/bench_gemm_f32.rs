//! f32 matrix-product benchmark on CPU: the `gemm` crate (candle's CPU matmul, and the f32
//! products of `train::direct`) against PyTorch's `torch.mm` (MKL, `tools/bench/gemm_torch.py`,
//! same thread count), on the shapes of the mid-size training step (1152 rows = 1024 image + 128
//! text tokens, hidden 512, MLP 1536, attention head dim 64) in the layouts the step uses (`tA` /
//! `tB`: that operand read transposed). Median of 9 runs each.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_gemm_f32 -- [--threads 2]
//! ```

use std::time::Instant;

mod bench_support;

use flux2_tuner::util::rng::SeededRng;

/// `(m, k, n, a transposed, b transposed)`.
const SHAPES: [(usize, usize, usize, bool, bool); 10] = [
    (1152, 512, 1536, false, true),  // qkv forward: x W^T
    (1152, 1536, 512, false, false), // qkv backward: dy W
    (1152, 512, 4608, false, true),  // single linear1 forward
    (1152, 2048, 512, false, true),  // single linear2 forward
    (1152, 4608, 512, false, false), // single linear1 backward
    (1152, 64, 1152, false, true),   // attention scores q k^T
    (1152, 1152, 64, false, false),  // attention output p v
    (1152, 1152, 64, true, false),   // attention backward p^T do
    (1536, 1152, 32, true, false),   // LoRA up gradient dy^T h
    (32, 1152, 512, true, false),    // LoRA down gradient g^T x
];

fn random(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..count).map(|_| rng.normal() as f32).collect()
}

/// `out = a b` for `a` `[m, k]` and `b` `[k, n]`, each stored transposed when its flag is set.
fn product(
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    (a, a_transposed): (&[f32], bool),
    (b, b_transposed): (&[f32], bool),
    threads: usize,
) {
    // (column stride, row stride) of each operand.
    let a_strides = if a_transposed { (m, 1) } else { (1, k) };
    let b_strides = if b_transposed { (k, 1) } else { (1, n) };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    assert!(a.len() >= m * k && b.len() >= k * n && out.len() >= m * n);
    // SAFETY: the strides above address exactly the `m * k`, `k * n` and `m * n` values checked.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_strides.0 as isize,
            a_strides.1 as isize,
            b.as_ptr(),
            b_strides.0 as isize,
            b_strides.1 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

fn time_median(mut run: impl FnMut()) -> f64 {
    for _ in 0..3 {
        run();
    }
    let seconds = (0..9)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    bench_support::median(seconds)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = bench_support::parse_options(bench_support::Options {
        threads: 2,
        warmup: 3,
        iterations: 9,
    })?;
    let threads = options.threads;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let shapes: Vec<String> = SHAPES
        .iter()
        .map(|&(m, k, n, ta, tb)| format!("{m},{k},{n},{},{}", ta as u8, tb as u8))
        .collect();
    let reference = bench_support::run_reference(
        "gemm_torch.py",
        &[
            "--threads".into(),
            threads.to_string(),
            "--shapes".into(),
            shapes.join(";"),
        ],
    );
    let torch_seconds: Vec<Option<f64>> = match &reference {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            (0..SHAPES.len())
                .map(|i| {
                    lines
                        .get(i)
                        .and_then(|line| line.split_whitespace().nth(5))
                        .and_then(|v| v.parse().ok())
                })
                .collect()
        }
        Err(why) => {
            eprintln!("PyTorch reference skipped: {why}");
            vec![None; SHAPES.len()]
        }
    };
    println!("f32 products, CPU, {threads} threads, GMAC/s (median of 9 runs)");
    println!("| m | k | n | tA | tB | gemm crate | pytorch | gemm / pytorch time |");
    println!("|---|---|---|---|---|---|---|---|");
    for (index, &(m, k, n, ta, tb)) in SHAPES.iter().enumerate() {
        let a_data = random(m * k, 1);
        let b_data = random(k * n, 2);
        let mut out = vec![0f32; m * n];
        let ours =
            time_median(|| product(&mut out, m, k, n, (&a_data, ta), (&b_data, tb), threads));
        let rate = |seconds: f64| (m * k * n) as f64 / seconds / 1e9;
        let (torch_rate, ratio) = match torch_seconds[index] {
            Some(seconds) => (
                format!("{:.1}", rate(seconds)),
                format!("{:.2}", ours / seconds),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {m} | {k} | {n} | {} | {} | {:.1} | {torch_rate} | {ratio} |",
            ta as u8,
            tb as u8,
            rate(ours),
        );
    }
    Ok(())
}
