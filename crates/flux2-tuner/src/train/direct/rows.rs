//! Row-wise forward and backward kernels of the direct backward, on f32 `[rows, channels]`
//! slices of one stream (`rows = batch * tokens`; per-sample vectors are indexed by
//! `row / rows_per_sample`): the adaLN modulation `(1 + scale) * LayerNorm(x) + shift`, the gated
//! residual `x + gate * y` and SwiGLU `silu(a) * b`.

use rayon::prelude::*;

use crate::nn::host::{lane_sum, lane_sum_pairs, vectorised, written_in_parts, SharedOutput};

/// Rows per parallel task: enough work per task to amortise the pool's overhead.
pub(super) const ROWS_PER_TASK: usize = 16;

/// A new `[rows, width]` matrix made by `write(first_row, block)` for each block of
/// [`ROWS_PER_TASK`] whole rows, in parallel; each block is zeroed in cache just before (see
/// `written_in_parts`), so `write` may leave columns alone.
pub(super) fn written_rows(
    rows: usize,
    width: usize,
    write: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    written_in_parts(rows * width, width * ROWS_PER_TASK, 0.0, |task, block| {
        write(task * ROWS_PER_TASK, block)
    })
}

/// A new `[length / channels, channels]` matrix whose rows `f(row, out_row)` writes, in parallel
/// blocks of rows, compiled for the CPU's vector width.
fn rows_from(length: usize, channels: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    written_rows(length / channels.max(1), channels, |first_row, out_rows| {
        vectorised(
            #[inline(always)]
            || {
                for (index, out_row) in out_rows.chunks_exact_mut(channels).enumerate() {
                    f(first_row + index, out_row);
                }
            },
        )
    })
}

/// Layer-norm statistics of one row: mean and `1 / sqrt(variance + eps)`.
#[derive(Clone, Copy, Default)]
pub(super) struct RowStatistics {
    pub mean: f32,
    pub inverse_deviation: f32,
}

/// `out = (1 + scale) * LayerNorm(x) + shift` (no affine weights, `eps`), and each row's
/// statistics for the backward. `shift`, `scale`: `[batch, channels]`.
pub(super) fn modulate_forward(
    x: &[f32],
    channels: usize,
    rows_per_sample: usize,
    shift: &[f32],
    scale: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<RowStatistics>) {
    let rows = x.len() / channels;
    let mut statistics = vec![RowStatistics::default(); rows];
    let statistics_target = SharedOutput(statistics.as_mut_ptr());
    let out = rows_from(
        x.len(),
        channels,
        #[inline(always)]
        |row, out_row| {
            let input = &x[row * channels..(row + 1) * channels];
            let sample = row / rows_per_sample;
            let shift = &shift[sample * channels..(sample + 1) * channels];
            let scale = &scale[sample * channels..(sample + 1) * channels];
            let mean = lane_sum(input, |v| v) / channels as f32;
            let variance = lane_sum(input, |v| (v - mean) * (v - mean)) / channels as f32;
            let inverse_deviation = 1.0 / (variance + eps).sqrt();
            for c in 0..channels {
                let normalised = (input[c] - mean) * inverse_deviation;
                out_row[c] = normalised * (1.0 + scale[c]) + shift[c];
            }
            // SAFETY: `row < rows`, and each row is written by one task only.
            unsafe {
                statistics_target.write(
                    row,
                    RowStatistics {
                        mean,
                        inverse_deviation,
                    },
                )
            };
        },
    );
    (out, statistics)
}

/// Adds the gradient of [`modulate_forward`] with respect to `x` to `dx`:
/// with `n = (x - mean) r` and `g = dy (1 + scale)`, `dx += r (g - mean(g) - n mean(g n))`.
pub(super) fn modulate_backward(
    dy: &[f32],
    x: &[f32],
    statistics: &[RowStatistics],
    channels: usize,
    rows_per_sample: usize,
    scale: &[f32],
    dx: &mut [f32],
) {
    dx.par_chunks_mut(channels * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, dx_rows)| {
            vectorised(
                #[inline(always)]
                || {
                    let mut scaled = vec![0f32; channels];
                    for (index, dx_row) in dx_rows.chunks_exact_mut(channels).enumerate() {
                        let row = task * ROWS_PER_TASK + index;
                        let range = row * channels..(row + 1) * channels;
                        let (input, gradient) = (&x[range.clone()], &dy[range]);
                        let sample = row / rows_per_sample;
                        let scale = &scale[sample * channels..(sample + 1) * channels];
                        let RowStatistics {
                            mean,
                            inverse_deviation,
                        } = statistics[row];
                        for c in 0..channels {
                            scaled[c] = gradient[c] * (1.0 + scale[c]);
                        }
                        let sum = lane_sum(&scaled, |g| g);
                        let dot = lane_sum_pairs(&scaled, input, |g, x| g * (x - mean))
                            * inverse_deviation;
                        let (mean_g, mean_gn) = (sum / channels as f32, dot / channels as f32);
                        for c in 0..channels {
                            let normalised = (input[c] - mean) * inverse_deviation;
                            dx_row[c] +=
                                inverse_deviation * (scaled[c] - mean_g - normalised * mean_gn);
                        }
                    }
                },
            )
        });
}

/// `x + gate * y` (`gate`: `[batch, channels]`).
pub(super) fn gated_add(
    x: &[f32],
    gate: &[f32],
    y: &[f32],
    channels: usize,
    rows_per_sample: usize,
) -> Vec<f32> {
    rows_from(
        x.len(),
        channels,
        #[inline(always)]
        |row, out_row| {
            let sample = row / rows_per_sample;
            let gate = &gate[sample * channels..(sample + 1) * channels];
            let range = row * channels..(row + 1) * channels;
            let (a, b) = (&x[range.clone()], &y[range]);
            for c in 0..channels {
                out_row[c] = a[c] + gate[c] * b[c];
            }
        },
    )
}

/// `gate * d_out`: the gradient of [`gated_add`] with respect to `y`.
pub(super) fn gated(
    d_out: &[f32],
    gate: &[f32],
    channels: usize,
    rows_per_sample: usize,
) -> Vec<f32> {
    rows_from(
        d_out.len(),
        channels,
        #[inline(always)]
        |row, out_row| {
            let sample = row / rows_per_sample;
            let gate = &gate[sample * channels..(sample + 1) * channels];
            let d = &d_out[row * channels..(row + 1) * channels];
            for c in 0..channels {
                out_row[c] = gate[c] * d[c];
            }
        },
    )
}

/// Where a SwiGLU input sits in a wider matrix: `a` in columns `column .. column + width`, `b` in
/// the next `width` columns, rows `stride` apart.
#[derive(Clone, Copy)]
pub(super) struct SwigluColumns {
    pub column: usize,
    pub width: usize,
    pub stride: usize,
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + crate::nn::softmax::exp(-v))
}

/// `silu(a) * b` into the rows from `first_row` on that `out_rows` holds (row stride
/// `out_stride`, from column `out_column`); other columns are left alone.
pub(super) fn swiglu_forward_rows(
    input: &[f32],
    columns: SwigluColumns,
    out_stride: usize,
    out_column: usize,
    first_row: usize,
    out_rows: &mut [f32],
) {
    let width = columns.width;
    vectorised(
        #[inline(always)]
        || {
            for (index, out_row) in out_rows.chunks_mut(out_stride).enumerate() {
                let row = first_row + index;
                let start = row * columns.stride + columns.column;
                let a = &input[start..start + width];
                let b = &input[start + width..start + 2 * width];
                let out_row = &mut out_row[out_column..out_column + width];
                for j in 0..width {
                    out_row[j] = a[j] * sigmoid(a[j]) * b[j];
                }
            }
        },
    )
}

/// The gradient of [`swiglu_forward_rows`] for the rows from `first_row` on that `d_rows` holds
/// (whole rows of `columns.stride`, the layout of `input`; only their SwiGLU columns are
/// written): `da = d b sigmoid(a) (1 + a (1 - sigmoid(a)))` and `db = d silu(a)`. `d_out` has
/// row stride `d_stride` from column `d_column`.
pub(super) fn swiglu_backward_rows(
    input: &[f32],
    columns: SwigluColumns,
    d_out: &[f32],
    d_stride: usize,
    d_column: usize,
    first_row: usize,
    d_rows: &mut [f32],
) {
    let width = columns.width;
    vectorised(
        #[inline(always)]
        || {
            for (index, d_row) in d_rows.chunks_mut(columns.stride).enumerate() {
                let row = first_row + index;
                let start = row * columns.stride + columns.column;
                let a = &input[start..start + width];
                let b = &input[start + width..start + 2 * width];
                let d = &d_out[row * d_stride + d_column..][..width];
                let (d_a, d_b) =
                    d_row[columns.column..columns.column + 2 * width].split_at_mut(width);
                for j in 0..width {
                    let s = sigmoid(a[j]);
                    d_a[j] = d[j] * b[j] * s * (1.0 + a[j] * (1.0 - s));
                    d_b[j] = d[j] * a[j] * s;
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    fn random(count: usize, seed: u64) -> Vec<f32> {
        let mut rng = SeededRng::new(seed);
        (0..count).map(|_| rng.normal() as f32).collect()
    }

    /// Central finite difference of `sum(weights * f(x))` with respect to `x[index]`, in f64 from
    /// an f32 function (step large enough for f32).
    fn numeric(f: &dyn Fn(&[f32]) -> Vec<f32>, x: &[f32], weights: &[f32], index: usize) -> f64 {
        let step = 1e-2f32;
        let value = |delta: f32| {
            let mut shifted = x.to_vec();
            shifted[index] += delta;
            f(&shifted)
                .iter()
                .zip(weights)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        (value(step) - value(-step)) / (2.0 * step as f64)
    }

    #[test]
    fn modulate_gradient_matches_finite_differences() {
        let (batch, rows_per_sample, channels) = (2, 3, 20);
        let x = random(batch * rows_per_sample * channels, 1);
        let shift = random(batch * channels, 2);
        let scale = random(batch * channels, 3);
        let weights = random(x.len(), 4);
        let f = |x: &[f32]| modulate_forward(x, channels, rows_per_sample, &shift, &scale, 1e-6).0;
        let (_, statistics) = modulate_forward(&x, channels, rows_per_sample, &shift, &scale, 1e-6);
        let mut dx = vec![0.5f32; x.len()];
        modulate_backward(
            &weights,
            &x,
            &statistics,
            channels,
            rows_per_sample,
            &scale,
            &mut dx,
        );
        for index in [0, 7, 33, 61, x.len() - 1] {
            let expected = numeric(&f, &x, &weights, index);
            let got = dx[index] as f64 - 0.5;
            assert!(
                (got - expected).abs() < 2e-2 * (1.0 + expected.abs()),
                "{got} vs {expected}"
            );
        }
    }

    #[test]
    fn swiglu_gradient_matches_finite_differences() {
        let (rows, width, stride, column) = (5, 6, 17, 3);
        let input = random(rows * stride, 5);
        let columns = SwigluColumns {
            column,
            width,
            stride,
        };
        let weights = random(rows * width, 6);
        let f = |input: &[f32]| {
            let mut out = vec![0f32; rows * width];
            swiglu_forward_rows(input, columns, width, 0, 0, &mut out);
            out
        };
        let mut d_input = vec![7f32; input.len()];
        swiglu_backward_rows(&input, columns, &weights, width, 0, 0, &mut d_input);
        for row in 0..rows {
            for c in 0..stride {
                let index = row * stride + c;
                if c < column || c >= column + 2 * width {
                    // Columns outside the SwiGLU input are not written.
                    assert_eq!(d_input[index], 7.0);
                    continue;
                }
                let expected = numeric(&f, &input, &weights, index);
                let got = d_input[index] as f64;
                assert!(
                    (got - expected).abs() < 1e-2 * (1.0 + expected.abs()),
                    "{got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn gated_add_and_its_gradient() {
        let (channels, rows_per_sample) = (4, 2);
        let x = random(16, 7);
        let y = random(16, 8);
        let gate = random(8, 9);
        let out = gated_add(&x, &gate, &y, channels, rows_per_sample);
        let d = gated(&y, &gate, channels, rows_per_sample);
        for row in 0..4 {
            for c in 0..channels {
                let i = row * channels + c;
                let g = gate[(row / rows_per_sample) * channels + c];
                assert_eq!(out[i], x[i] + g * y[i]);
                assert_eq!(d[i], g * y[i]);
            }
        }
    }
}
