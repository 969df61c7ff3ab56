//! The row-wise parts of chunked attention, fused: one pass per row instead of one candle op (and
//! one full-size temporary) per arithmetic step. CPU tensors of f32/f64 take hand-written loops,
//! split over threads by rows; any other tensor takes the equivalent candle operations.

use candle_core::{DType, Device, Storage, Tensor, WithDType, D};

/// A float type the row loops run in.
trait Real: WithDType {
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
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

/// Runs `f(first_row, rows, row_outputs)` over blocks of rows (`values`: rows of `width`;
/// `row_outputs`: one value per row) on several threads.
fn for_row_blocks<T: Real>(
    values: &mut [T],
    row_outputs: &mut [T],
    width: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    let rows = row_outputs.len();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows / MIN_ROWS_PER_THREAD)
        .max(1);
    let rows_per_thread = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let blocks = values
            .chunks_mut(rows_per_thread * width)
            .zip(row_outputs.chunks_mut(rows_per_thread));
        for (index, (block, outputs)) in blocks.enumerate() {
            let f = &f;
            scope.spawn(move || f(index * rows_per_thread, block, outputs));
        }
    });
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
    for_row_blocks(&mut values, &mut logsumexp, width, |_, block, outputs| {
        for (row, output) in block.chunks_mut(width).zip(outputs.iter_mut()) {
            let max = row
                .iter()
                .fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let mut total = T::zero();
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                total += *v;
            }
            let inverse = T::one() / total;
            row.iter_mut().for_each(|v| *v *= inverse);
            *output = max + total.ln();
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
        DType::F32 => row_map::<f32>(scores, logsumexp, None, |s, lse, _| (s - lse).exp()),
        DType::F64 => row_map::<f64>(scores, logsumexp, None, |s, lse, _| (s - lse).exp()),
        _ => None,
    };
    match fast {
        Some(p) => Ok(p),
        None => scores.broadcast_sub(logsumexp)?.exp(),
    }
}

/// `p * (dp - delta)`: the score gradient (without the `1 / sqrt(d)` factor).
pub(crate) fn score_gradient(
    probabilities: &Tensor,
    probability_grad: &Tensor,
    delta: &Tensor,
) -> candle_core::Result<Tensor> {
    let fast = match probabilities.dtype() {
        DType::F32 => row_map::<f32>(probability_grad, delta, Some(probabilities), |dp, d, p| {
            p * (dp - d)
        }),
        DType::F64 => row_map::<f64>(probability_grad, delta, Some(probabilities), |dp, d, p| {
            p * (dp - d)
        }),
        _ => None,
    };
    match fast {
        Some(g) => Ok(g),
        None => probabilities * probability_grad.broadcast_sub(delta)?,
    }
}

/// `f(x, per_row, other)` element-wise, with `per_row` `[.., 1]` broadcast along the rows and
/// `other` (same shape as `x`, zero when absent) read alongside.
fn row_map<T: Real>(
    x: &Tensor,
    per_row: &Tensor,
    other: Option<&Tensor>,
    f: impl Fn(T, T, T) -> T + Sync,
) -> Option<Tensor> {
    let mut values = with_cpu_slice::<T, _>(x, <[T]>::to_vec)?;
    let mut row_values = with_cpu_slice::<T, _>(per_row, <[T]>::to_vec)?;
    let width = x.dim(D::Minus1).ok()?.max(1);
    if row_values.len() * width != values.len() {
        return None;
    }
    let run = |other: &[T], values: &mut [T], row_values: &mut [T]| {
        for_row_blocks(values, row_values, width, |first_row, block, rows| {
            let start = first_row * width;
            let other = other.get(start..start + block.len());
            for (index, (row, &value)) in block.chunks_mut(width).zip(rows.iter()).enumerate() {
                let other = other.map(|o| &o[index * width..(index + 1) * width]);
                for (column, v) in row.iter_mut().enumerate() {
                    let extra = other.map_or(T::zero(), |o| o[column]);
                    *v = f(*v, value, extra);
                }
            }
        });
    };
    match other {
        Some(other) => {
            if other.dims() != x.dims() {
                return None;
            }
            with_cpu_slice::<T, _>(other, |o| run(o, &mut values, &mut row_values))?
        }
        None => run(&[], &mut values, &mut row_values),
    }
    Tensor::from_vec(values, x.shape(), &Device::Cpu).ok()
}
