//! Row softmax for inference attention with a vectorisable `exp` (what PyTorch's CPU softmax gets
//! from its SIMD exp). candle's `softmax_last_dim` calls the scalar libm `expf` per element, which
//! took as long as all the attention matmuls together.

use crate::nn::fused::Element;

/// `ln 2` split into a part exact in f32 and the remainder (Cody-Waite range reduction).
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;

/// `exp(x)` to about 2 ulp over the f32 range, branch-free so that loops over it vectorise.
///
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`; `exp(r)` is the degree-6 minimax polynomial of Cephes'
/// `expf`; `2^n` is built in the exponent bits. Inputs below -87 give about 1e-38 instead of 0,
/// which a softmax cannot tell apart.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to the nearest whole number by adding and removing 1.5 * 2^23 (no `floor` call,
    // which is a libm call on baseline x86-64).
    const ROUNDER: f32 = 12_582_912.0;
    let n = x.mul_add(std::f32::consts::LOG2_E, ROUNDER) - ROUNDER;
    // Fused multiply-adds (`mul_add`): Rust never contracts `a * b + c` by itself, and the
    // separate multiplies and adds were half of this loop's instructions. Every caller runs in a
    // function compiled with FMA (`vectorised`, the `_avx512` / `_avx2` variants); elsewhere a
    // `mul_add` is a libm call, correct but slow.
    let r = (-n).mul_add(LN2_LOW, (-n).mul_add(LN2_HIGH, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5); // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let poly = (p * r).mul_add(r, r + 1.0);
    // SAFETY: `n` is a whole number in [-126, 127] after the clamp. (The checked `as` cast does
    // not vectorise: it saturates lane by lane.)
    let whole: i32 = unsafe { n.to_int_unchecked() };
    let power = f32::from_bits(((whole + 127) << 23) as u32);
    poly * power
}

/// Lanes of the manual reductions below: one AVX-512 register of f32.
const LANES: usize = 16;

#[inline(always)]
fn shifted_exp_generic(row: &mut [f32], scale: f32) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            // A plain comparison: `f32::max`'s NaN rule costs a compare and blend per value.
            if chunk[lane] > maxima[lane] {
                maxima[lane] = chunk[lane];
            }
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max = maxima.iter().fold(max, |m, &v| m.max(v));
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            let value = exp((chunk[lane] - max) * scale);
            chunk[lane] = value;
            sums[lane] += value;
        }
    }
    let mut sum = 0f32;
    for value in chunks.into_remainder() {
        *value = exp((*value - max) * scale);
        sum += *value;
    }
    sum + sums.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
fn shifted_exp_avx512(row: &mut [f32], scale: f32) -> f32 {
    shifted_exp_generic(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn shifted_exp_avx2(row: &mut [f32], scale: f32) -> f32 {
    shifted_exp_generic(row, scale)
}

/// Replaces `row` by `exp(scale * (row - max(row)))` and returns its sum (`scale > 0`).
pub fn shifted_exp(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were just detected.
            return unsafe { shifted_exp_avx512(row, scale) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { shifted_exp_avx2(row, scale) };
        }
    }
    shifted_exp_generic(row, scale)
}

/// `out = softmax(scale * row)`, computed in f32 (`row` is overwritten) and rounded once to `T`.
pub fn softmax_row<T: Element>(row: &mut [f32], scale: f32, out: &mut [T]) {
    let inverse = 1.0 / shifted_exp(row, scale);
    for (o, &value) in out.iter_mut().zip(row.iter()) {
        *o = T::from_f32(value * inverse);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..=20_000 {
            let x = -87.0 + 175.0 * i as f32 / 20_000.0;
            let exact = (x as f64).exp();
            let relative = ((exp(x) as f64 - exact) / exact).abs();
            worst = worst.max(relative);
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
    }

    #[test]
    fn softmax_row_matches_its_definition() {
        // Lengths around the 16-lane chunking, with a scale as attention uses.
        for length in [1usize, 5, 16, 17, 40] {
            let values: Vec<f32> = (0..length)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
                .collect();
            let scale = 0.125f32;
            let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let weights: Vec<f64> = values
                .iter()
                .map(|&v| ((v as f64 - max) * scale as f64).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut row = values.clone();
            let mut out = vec![0f32; length];
            softmax_row(&mut row, scale, &mut out);
            for (o, w) in out.iter().zip(&weights) {
                assert!(
                    (*o as f64 - w / total).abs() < 1e-6,
                    "length {length}: {o} vs {}",
                    w / total
                );
            }
        }
    }
}
