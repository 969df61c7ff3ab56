//! Throughput of the AMX bf16 product (`nn::amx::multiply`) on the DiT benchmark's linear shapes,
//! single-threaded, in GMAC/s (packing excluded and timed separately).

mod bench_support;

use flux2_tuner::nn::amx::{self, PackedB};
use half::bf16;

fn main() {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    if !amx::available() {
        println!("no AMX");
        return;
    }
    // One attention call of the DiT benchmark: 8 heads x 64, 1152 tokens.
    let shape = (1, 8, 1152, 64);
    let random = |seed: u64| {
        let mut rng = flux2_tuner::util::rng::SeededRng::new(seed);
        let values: Vec<f32> = (0..8 * 1152 * 64).map(|_| rng.normal() as f32).collect();
        candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::BF16))
    };
    if let (Ok(q), Ok(k), Ok(v)) = (random(1), random(2), random(3)) {
        let seconds = minimum(20, || {
            let _ = flux2_tuner::nn::attention::attention(&q, &k, &v);
        });
        println!("attention bf16 [1, 8, 1152, 64]: {:.3} ms", seconds * 1e3);
    }
    if std::env::args().nth(1).as_deref() == Some("attention") {
        return;
    }
    for (m, k, n) in [
        (1152, 512, 1536),
        (1152, 512, 512),
        (1152, 512, 3072),
        (1152, 1536, 512),
        (1152, 512, 4608),
        (1152, 2048, 512),
    ] {
        let a: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7) % 13) as f32 * 0.1))
            .collect();
        let w: Vec<bf16> = (0..k * n)
            .map(|i| bf16::from_f32(((i * 5) % 11) as f32 * 0.1))
            .collect();
        let mut out = vec![bf16::ZERO; m * n];
        let repeats = 40;
        let mut packed = PackedB::new(&w, k, n, 1, k);
        let pack_seconds = minimum(repeats, || {
            packed = PackedB::new(&w, k, n, 1, k);
        });
        let seconds = minimum(repeats, || {
            amx::multiply(
                &a,
                m,
                k,
                &packed,
                n,
                &mut out,
                flux2_tuner::nn::fused::round_to_bf16,
            );
        });
        let mut out32 = vec![0f32; m * n];
        let seconds32 = minimum(repeats, || {
            amx::multiply(&a, m, k, &packed, n, &mut out32, |v| v);
        });
        println!(
            "m {m} k {k} n {n}: {:.1} GMAC/s ({:.3} ms), f32 out {:.1} GMAC/s, packing {:.3} ms",
            (m * k * n) as f64 / seconds / 1e9,
            seconds * 1e3,
            (m * k * n) as f64 / seconds32 / 1e9,
            pack_seconds * 1e3
        );
    }
}

/// The shortest of `repeats` CPU-time measurements of `f`.
fn minimum(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let start = bench_support::cpu_seconds();
            f();
            bench_support::cpu_seconds() - start
        })
        .fold(f64::INFINITY, f64::min)
}
