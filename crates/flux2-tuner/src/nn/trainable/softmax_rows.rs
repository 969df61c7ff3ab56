//! The row-wise parts of chunked attention, fused: one pass per row instead of one candle op (and
//! one full-size temporary) per arithmetic step. CPU tensors of f32/f64 take hand-written loops,
//! split over threads by rows (f32 with a vectorisable `exp`); any other tensor takes the
//! equivalent candle operations.

use candle_core::{DType, Device, Storage, Tensor, WithDType, D};

/// A float type the row loops run in.
trait Real: WithDType {
    const NEG_INFINITY: Self;
    /// `exp` over a slice, in place.
    fn exp_in_place(values: &mut [Self]);
    fn ln(self) -> Self;
}

impl Real for f32 {
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn exp_in_place(values: &mut [Self]) {
        values.iter_mut().for_each(|v| *v = exp_f32(*v));
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn exp_in_place(values: &mut [Self]) {
        values.iter_mut().for_each(|v| *v = v.exp());
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// `exp(x)` for f32 without branches or library calls, so that loops over it vectorise (Cephes
/// `expf`: `x = n ln2 + r`, a degree-5 polynomial for `e^r` on `|r| <= ln2 / 2`, `2^n` from the
/// exponent bits); within 3 ulp of `f32::exp` on `[-87.33, 88.3]`. Inputs below -87.33 (where
/// `exp` leaves the normal range) give 0, as softmax wants.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HIGH` is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer with plain additions.
    const ROUNDING: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.33, 88.3);
    let n = (clamped * LOG2_E + ROUNDING) - ROUNDING;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let polynomial =
        ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
    let e_r = 1.0 + r + r * r * polynomial;
    let two_to_n = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let value = e_r * two_to_n;
    if x < -87.33 {
        0.0
    } else {
        value
    }
}

/// Rows below which splitting over threads costs more than it saves.
const MIN_ROWS_PER_THREAD: usize = 16;

/// Calls `f` with `tensor`'s values if it is a contiguous CPU tensor of `T`.
fn with_cpu_slice<T: Real, R>(tensor: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    if !tensor.device().is_cpu() || tensor.dtype() != T::DTYPE {
        return None;
    }
    let (storage, layout) = tensor.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => cpu.as_slice::<T>().ok().map(|s| f(&s[start..end])),
        _ => None,
    }
}

/// Runs `f(first_row, rows, row_values)` over blocks of rows (`values`: rows of `width`;
/// `row_values`: one value per row) on several threads.
fn for_row_blocks<T: Real>(
    values: &mut [T],
    row_values: &mut [T],
    width: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    let rows = row_values.len();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows / MIN_ROWS_PER_THREAD)
        .max(1);
    let rows_per_thread = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let blocks = values
            .chunks_mut(rows_per_thread * width)
            .zip(row_values.chunks_mut(rows_per_thread));
        for (index, (block, row_block)) in blocks.enumerate() {
            let f = &f;
            scope.spawn(move || f(index * rows_per_thread, block, row_block));
        }
    });
}

/// The values of `x` and `per_row` (`[.., 1]`, one per row of `x`) as owned vectors, if both are
/// contiguous CPU tensors of `T` that fit.
fn row_inputs<T: Real>(x: &Tensor, per_row: &Tensor) -> Option<(Vec<T>, Vec<T>, usize)> {
    let values = with_cpu_slice::<T, _>(x, <[T]>::to_vec)?;
    let row_values = with_cpu_slice::<T, _>(per_row, <[T]>::to_vec)?;
    let width = x.dim(D::Minus1).ok()?.max(1);
    (row_values.len() * width == values.len()).then_some((values, row_values, width))
}

/// Sum with eight independent accumulators (vectorisable, unlike one running sum).
fn sum<T: Real>(values: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    lanes.iter().fold(tail, |a, &v| a + v)
}

/// `softmax(scores)` over the last axis and its logsumexp `[.., 1]`.
pub(crate) fn softmax_with_logsumexp(scores: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let fast = match scores.dtype() {
        DType::F32 => softmax_rows::<f32>(scores),
        DType::F64 => softmax_rows::<f64>(scores),
        _ => None,
    };
    match fast {
        Some(result) => Ok(result),
        None => {
            let row_max = scores.max_keepdim(D::Minus1)?;
            let weights = scores.broadcast_sub(&row_max)?.exp()?;
            let total = weights.sum_keepdim(D::Minus1)?;
            Ok((weights.broadcast_div(&total)?, (row_max + total.log()?)?))
        }
    }
}

fn softmax_rows<T: Real>(scores: &Tensor) -> Option<(Tensor, Tensor)> {
    let mut values = with_cpu_slice::<T, _>(scores, <[T]>::to_vec)?;
    let width = scores.dim(D::Minus1).ok()?.max(1);
    let mut logsumexp = vec![T::zero(); values.len() / width];
    for_row_blocks(&mut values, &mut logsumexp, width, |_, block, row_block| {
        for (row, lse) in block.chunks_mut(width).zip(row_block.iter_mut()) {
            let max = row
                .iter()
                .fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            row.iter_mut().for_each(|v| *v -= max);
            T::exp_in_place(row);
            let total = sum(row);
            let inverse = T::one() / total;
            row.iter_mut().for_each(|v| *v *= inverse);
            *lse = max + total.ln();
        }
    });
    let mut lse_shape = scores.dims().to_vec();
    *lse_shape.last_mut()? = 1;
    let probabilities = Tensor::from_vec(values, scores.shape(), &Device::Cpu).ok()?;
    let logsumexp = Tensor::from_vec(logsumexp, lse_shape, &Device::Cpu).ok()?;
    Some((probabilities, logsumexp))
}

/// `exp(scores - logsumexp)`: the probabilities recomputed in the backward.
pub(crate) fn probabilities(scores: &Tensor, logsumexp: &Tensor) -> candle_core::Result<Tensor> {
    let fast = match scores.dtype() {
        DType::F32 => probabilities_rows::<f32>(scores, logsumexp),
        DType::F64 => probabilities_rows::<f64>(scores, logsumexp),
        _ => None,
    };
    match fast {
        Some(p) => Ok(p),
        None => scores.broadcast_sub(logsumexp)?.exp(),
    }
}

fn probabilities_rows<T: Real>(scores: &Tensor, logsumexp: &Tensor) -> Option<Tensor> {
    let (mut values, mut row_values, width) = row_inputs::<T>(scores, logsumexp)?;
    for_row_blocks(
        &mut values,
        &mut row_values,
        width,
        |_, block, row_block| {
            for (row, &lse) in block.chunks_mut(width).zip(row_block.iter()) {
                row.iter_mut().for_each(|v| *v -= lse);
                T::exp_in_place(row);
            }
        },
    );
    Tensor::from_vec(values, scores.shape(), &Device::Cpu).ok()
}

/// `p * (dp - delta)`: the score gradient (without the `1 / sqrt(d)` factor).
pub(crate) fn score_gradient(
    probabilities: &Tensor,
    probability_grad: &Tensor,
    delta: &Tensor,
) -> candle_core::Result<Tensor> {
    let fast = match probabilities.dtype() {
        DType::F32 => score_gradient_rows::<f32>(probabilities, probability_grad, delta),
        DType::F64 => score_gradient_rows::<f64>(probabilities, probability_grad, delta),
        _ => None,
    };
    match fast {
        Some(g) => Ok(g),
        None => probabilities * probability_grad.broadcast_sub(delta)?,
    }
}

fn score_gradient_rows<T: Real>(
    probabilities: &Tensor,
    probability_grad: &Tensor,
    delta: &Tensor,
) -> Option<Tensor> {
    if probabilities.dims() != probability_grad.dims() {
        return None;
    }
    let (mut values, mut row_values, width) = row_inputs::<T>(probability_grad, delta)?;
    with_cpu_slice::<T, _>(probabilities, |p| {
        for_row_blocks(
            &mut values,
            &mut row_values,
            width,
            |first_row, block, row_block| {
                let p = &p[first_row * width..first_row * width + block.len()];
                let rows = block.chunks_mut(width).zip(p.chunks(width));
                for ((row, p_row), &delta) in rows.zip(row_block.iter()) {
                    for (g, &p) in row.iter_mut().zip(p_row) {
                        *g = p * (*g - delta);
                    }
                }
            },
        );
    })?;
    Tensor::from_vec(values, probability_grad.shape(), &Device::Cpu).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` against the library's over the range softmax uses, and its limits.
    #[test]
    fn fast_exp_matches_library_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -90.0 + 180.0 * i as f32 / 200_000.0;
            let x = x.min(88.0);
            if x < -87.33 {
                assert_eq!(exp_f32(x), 0.0);
                continue;
            }
            let expected = (x as f64).exp();
            let error = ((exp_f32(x) as f64 - expected) / expected).abs();
            worst = worst.max(error);
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// The fused CPU loops against the candle-op fallback (taken for non-contiguous inputs).
    #[test]
    fn fused_rows_match_candle_ops() -> crate::error::Result<()> {
        let scores =
            (crate::nn::trainable::test_support::random(&[2, 3, 40], 1, DType::F32)? * 4.0)?;
        let (p, lse) = softmax_with_logsumexp(&scores)?;
        let row_max = scores.max_keepdim(D::Minus1)?;
        let weights = scores.broadcast_sub(&row_max)?.exp()?;
        let total = weights.sum_keepdim(D::Minus1)?;
        let expected_p = weights.broadcast_div(&total)?;
        let expected_lse = (row_max + total.log()?)?;
        use crate::nn::trainable::test_support::relative_difference;
        assert!(relative_difference(&p, &expected_p)? < 1e-6);
        assert!(relative_difference(&lse, &expected_lse)? < 1e-6);
        let recomputed = probabilities(&scores, &lse)?;
        assert!(relative_difference(&recomputed, &expected_p)? < 1e-6);
        let dp = crate::nn::trainable::test_support::random(&[2, 3, 40], 2, DType::F32)?;
        let delta = crate::nn::trainable::test_support::random(&[2, 3, 1], 3, DType::F32)?;
        let expected = (&p * dp.broadcast_sub(&delta)?)?;
        assert!(relative_difference(&score_gradient(&p, &dp, &delta)?, &expected)? < 1e-6);
        Ok(())
    }
}
