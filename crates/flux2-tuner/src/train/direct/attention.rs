//! Joint attention `softmax(q k^T / sqrt(d)) v` without a mask, and its backward, flash-attention
//! style on host slices: the forward keeps the output and each row's logsumexp; the backward
//! recomputes the probabilities per block of query rows. q, k, v are `[b, heads, L, d]`; the
//! output (and its gradient) is token-major, `[b * L, stride]` with head `h` in columns
//! `h d .. (h + 1) d`, so that it feeds the output projection without a transpose.
//!
//! With `round_products` (bf16 mixed precision) the operands of the four products are bf16
//! values (q, k, v are rounded by the caller; the probabilities, score gradients and output
//! gradients here), multiplied exactly and accumulated in f32, as AMX does.

use rayon::prelude::*;

use super::matrix::{multiply, round_in_place, Matrix};
use crate::nn::host::{
    lane_dot, vectorised, with_f32_scratch, zeroed_f32, zeroed_part, SharedOutput, WriteOnce,
};
use crate::nn::softmax::exp;

/// Query rows per block: one block's scores are `[BLOCK_ROWS, L]`.
/// (128 x 1152 f32 scores at 1152 tokens = 590 KB, inside a 2 MB L2 next to K and V; fewer
/// blocks also mean fewer repackings of K and V by `gemm`.)
pub(super) const BLOCK_ROWS: usize = 128;
/// Query rows per block of the f32 backward: a head's k, v, dk, dv (4 x 295 KB at 1152 tokens of
/// 64) and a block's probabilities and score gradients (2 x 295 KB) then fit a 2 MB L2 together
/// (128 rows did not; paired A/B of the step, 64 rows against 128: 0.95-0.98).
const BACKWARD_BLOCK_ROWS: usize = 64;

#[derive(Clone, Copy)]
pub(super) struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub length: usize,
    pub head_dim: usize,
    /// Row stride of the token-major output and its gradient.
    pub out_stride: usize,
    pub round_products: bool,
}

impl AttentionShape {
    pub(super) fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    pub(super) fn head(&self) -> usize {
        self.length * self.head_dim
    }

    /// Offset of row `token` of head `head` of sample `sample` in the token-major output.
    fn out_offset(&self, sample: usize, head: usize, token: usize) -> usize {
        (sample * self.length + token) * self.out_stride + head * self.head_dim
    }

    fn blocks(&self) -> usize {
        self.length.div_ceil(BLOCK_ROWS)
    }
}

pub(super) fn row_max(row: &[f32]) -> f32 {
    vectorised(
        #[inline(always)]
        || {
            let mut lanes = [f32::NEG_INFINITY; 16];
            let mut chunks = row.chunks_exact(16);
            for chunk in &mut chunks {
                for (lane, &v) in lanes.iter_mut().zip(chunk) {
                    *lane = lane.max(v);
                }
            }
            let tail = chunks
                .remainder()
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            lanes.iter().fold(tail, |m, &v| m.max(v))
        },
    )
}

/// Replaces `row` by `exp((row - max) scale)` and returns its sum (in 16 lane sums, so that the
/// loop vectorises).
pub(super) fn exp_in_place(row: &mut [f32], max: f32, scale: f32) -> f32 {
    vectorised(
        #[inline(always)]
        || {
            let mut lanes = [0f32; 16];
            let mut chunks = row.chunks_exact_mut(16);
            for chunk in &mut chunks {
                for (lane, value) in lanes.iter_mut().zip(chunk.iter_mut()) {
                    *value = exp((*value - max) * scale);
                    *lane += *value;
                }
            }
            let mut total = 0f32;
            for value in chunks.into_remainder() {
                *value = exp((*value - max) * scale);
                total += *value;
            }
            total + lanes.iter().sum::<f32>()
        },
    )
}

/// What the forward keeps for the backward.
pub(super) struct AttentionSaved {
    /// `[b, heads, L]`, of the scaled scores.
    pub logsumexp: Vec<f32>,
    /// `[b, heads, L, L]` when kept (short sequences, see `StepContext::keep_probabilities`);
    /// otherwise the backward recomputes them from q, k and the logsumexp.
    pub probabilities: Option<Vec<f32>>,
}

impl AttentionSaved {
    /// Query rows `first .. first + rows` of pair `pair`, when kept.
    pub(super) fn block(
        &self,
        pair: usize,
        first: usize,
        rows: usize,
        length: usize,
    ) -> Option<&[f32]> {
        let start = (pair * length + first) * length;
        self.probabilities
            .as_ref()
            .map(|p| &p[start..start + rows * length])
    }
}

/// Writes the output into `out` (columns `0 .. heads d` of each row); on AMX tiles for bf16
/// products when available.
pub(super) fn forward(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    keep_probabilities: bool,
) -> AttentionSaved {
    if shape.round_products && super::attention_amx::available() {
        return super::attention_amx::forward(shape, q, k, v, out, keep_probabilities);
    }
    forward_f32(shape, q, k, v, out, keep_probabilities)
}

/// The gradients of [`forward`] (see [`backward_f32`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    saved: &AttentionSaved,
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if shape.round_products && super::attention_amx::available() {
        return super::attention_amx::backward(shape, q, k, v, out, saved, d_out);
    }
    backward_f32(shape, q, k, v, out, saved, d_out)
}

/// A `[b, heads, L, L]` buffer for the probabilities when they are kept, and a pointer that the
/// forward's tasks write their disjoint rows through (every row, with [`keep_row`]; then
/// [`kept_probabilities`] hands the buffer over).
pub(super) fn probability_store(
    shape: AttentionShape,
    keep: bool,
) -> (Option<WriteOnce<f32>>, SharedOutput<f32>) {
    let mut store =
        keep.then(|| WriteOnce::new(shape.batch * shape.heads * shape.length * shape.length));
    let pointer = store
        .as_mut()
        .map_or(SharedOutput(std::ptr::null_mut()), WriteOnce::target);
    (store, pointer)
}

/// The store of [`probability_store`] once the forward has kept every row.
///
/// # Safety
/// [`keep_row`] was called for every (pair, row) of `shape` with the store's pointer.
pub(super) unsafe fn kept_probabilities(store: Option<WriteOnce<f32>>) -> Option<Vec<f32>> {
    // SAFETY: every row of every pair was written (the caller's guarantee).
    store.map(|store| unsafe { store.assume_written() })
}

/// Copies one normalised probability row into the store (no-op without one).
///
/// # Safety
/// `target` comes from [`probability_store`] for `shape`, and no other task writes this row.
#[inline(always)]
pub(super) unsafe fn keep_row(
    target: SharedOutput<f32>,
    shape: AttentionShape,
    pair: usize,
    row: usize,
    values: &[f32],
) {
    if target.pointer().is_null() {
        return;
    }
    let start = (pair * shape.length + row) * shape.length;
    // SAFETY: in bounds of the `[b, heads, L, L]` store, written by this task only (caller).
    unsafe {
        std::ptr::copy_nonoverlapping(values.as_ptr(), target.pointer().add(start), shape.length)
    };
}

/// [`forward`] with f32 `gemm` products (of bf16-rounded operands with `round_products`):
/// writes the output into `out` (columns `0 .. heads d` of each row).
pub(super) fn forward_f32(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    keep_probabilities: bool,
) -> AttentionSaved {
    let AttentionShape {
        length, head_dim, ..
    } = shape;
    let pairs = shape.batch * shape.heads;
    let scale = shape.scale();
    assert!(out.len() >= (shape.batch * length - 1) * shape.out_stride + shape.heads * head_dim);
    let mut logsumexp = zeroed_f32(pairs * length);
    let target = SharedOutput(out.as_mut_ptr());
    let out_len = out.len();
    // Tasks are (pair, block); their logsumexp rows are disjoint, as are their output rows.
    let lse_target = SharedOutput(logsumexp.as_mut_ptr());
    let (probabilities, kept) = probability_store(shape, keep_probabilities);
    (0..pairs * shape.blocks())
        .into_par_iter()
        .for_each(|task| {
            let (pair, block) = (task / shape.blocks(), task % shape.blocks());
            let (sample, head) = (pair / shape.heads, pair % shape.heads);
            let first = block * BLOCK_ROWS;
            let rows = (length - first).min(BLOCK_ROWS);
            let head_range = pair * shape.head()..(pair + 1) * shape.head();
            let (q_head, k_head, v_head) = (
                &q[head_range.clone()],
                &k[head_range.clone()],
                &v[head_range],
            );
            // The task's scores live in this thread's scratch: written by the product before any
            // read, so neither allocated nor zeroed per task (432 such 590 KB blocks a step of the
            // mid-size benchmark).
            with_f32_scratch(rows * length, |scores| {
                multiply(
                    scores,
                    length,
                    Matrix::rows(&q_head[first * head_dim..], rows, head_dim),
                    Matrix::rows(k_head, length, head_dim).t(),
                    1.0,
                    false,
                );
                for (r, row) in scores.chunks_exact_mut(length).enumerate() {
                    let max = row_max(row);
                    let total = exp_in_place(row, max, scale);
                    let inverse = 1.0 / total;
                    vectorised(
                        #[inline(always)]
                        || row.iter_mut().for_each(|value| *value *= inverse),
                    );
                    // SAFETY: row `first + r` of pair `pair` belongs to this task only.
                    unsafe {
                        lse_target.write(pair * length + first + r, max * scale + total.ln());
                        keep_row(kept, shape, pair, first + r, row);
                    }
                }
                if shape.round_products {
                    round_in_place(scores);
                }
                let start = shape.out_offset(sample, head, first);
                let span = (rows - 1) * shape.out_stride + head_dim;
                assert!(start + span <= out_len);
                // SAFETY: this task owns rows `first .. first + rows` of head `head` of this sample: the
                // `head_dim` columns of each, `out_stride` apart; no other task writes them, and the
                // slice stays inside `out` (checked above). Columns between the rows are not written.
                let out_rows =
                    unsafe { std::slice::from_raw_parts_mut(target.pointer().add(start), span) };
                multiply(
                    out_rows,
                    shape.out_stride,
                    Matrix::rows(scores, rows, length),
                    Matrix::rows(v_head, length, head_dim),
                    1.0,
                    false,
                );
            });
        });
    AttentionSaved {
        logsumexp,
        // SAFETY: the tasks cover every (pair, block of rows) and keep each of their rows.
        probabilities: unsafe { kept_probabilities(probabilities) },
    }
}

/// One head's output gradient gathered to `[L, d]`, and `delta = rowsum(dO * O)` per query row.
pub(super) fn head_gradient_and_delta(
    shape: AttentionShape,
    pair: usize,
    out: &[f32],
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (sample, head) = (pair / shape.heads, pair % shape.heads);
    let head_dim = shape.head_dim;
    let mut d_head = vec![0f32; shape.head()];
    let mut delta = vec![0f32; shape.length];
    vectorised(
        #[inline(always)]
        || {
            for token in 0..shape.length {
                let at = shape.out_offset(sample, head, token);
                let (d, o) = (&d_out[at..at + head_dim], &out[at..at + head_dim]);
                d_head[token * head_dim..(token + 1) * head_dim].copy_from_slice(d);
                delta[token] = lane_dot(d, o);
            }
        },
    );
    (d_head, delta)
}

/// Turns raw scores `[rows, L]` into the probabilities `exp(s * scale - lse)`.
pub(super) fn probabilities_in_place(
    scores: &mut [f32],
    length: usize,
    logsumexp: &[f32],
    scale: f32,
) {
    vectorised(
        #[inline(always)]
        || {
            for (row, &l) in scores.chunks_exact_mut(length).zip(logsumexp) {
                for value in row.iter_mut() {
                    *value = exp(*value * scale - l);
                }
            }
        },
    );
}

/// Turns `dP` `[rows, L]` into the score gradient `P (dP - delta)` (without the scale).
pub(super) fn score_gradient_in_place(
    probability_grad: &mut [f32],
    probabilities: &[f32],
    length: usize,
    delta: &[f32],
) {
    vectorised(
        #[inline(always)]
        || {
            let rows = probability_grad
                .chunks_exact_mut(length)
                .zip(probabilities.chunks_exact(length));
            for ((g_row, p_row), &d) in rows.zip(delta) {
                for (g, &p) in g_row.iter_mut().zip(p_row) {
                    *g = p * (*g - d);
                }
            }
        },
    );
}

/// Allocates `dq`, `dk`, `dv` (`[b, heads, L, d]`) and calls `f(pair, dq, dk, dv)` with each
/// (sample, head) pair's slabs, the pairs in parallel.
pub(super) fn head_gradients(
    shape: AttentionShape,
    f: impl Fn(usize, &mut [f32], &mut [f32], &mut [f32]) + Sync,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let head = shape.head();
    let size = shape.batch * shape.heads * head;
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
    );
    // Each task zeroes its pair's slabs while they are in its cache, instead of a fill pass over
    // the three buffers first.
    dq.spare_capacity_mut()[..size]
        .par_chunks_mut(head)
        .zip(dk.spare_capacity_mut()[..size].par_chunks_mut(head))
        .zip(dv.spare_capacity_mut()[..size].par_chunks_mut(head))
        .enumerate()
        .for_each(|(pair, ((dq_head, dk_head), dv_head))| {
            f(
                pair,
                zeroed_part(dq_head, 0.0),
                zeroed_part(dk_head, 0.0),
                zeroed_part(dv_head, 0.0),
            )
        });
    // SAFETY: the slabs cover all `size` slots of each buffer, each zeroed above.
    unsafe {
        dq.set_len(size);
        dk.set_len(size);
        dv.set_len(size);
    }
    (dq, dk, dv)
}

/// The gradients `(dq, dk, dv)`, each `[b, heads, L, d]`, from the output gradient `d_out`
/// (token-major, `out_stride`) and the forward's output `out` (same layout) and logsumexp.
/// Per block of query rows, with `P = exp(s q k^T - lse)` and `delta = rowsum(dO * O)`:
/// `dV += P^T dO`, `dS = P (dO V^T - delta)`, `dQ = s dS K`, `dK += s dS^T Q`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_f32(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    saved: &AttentionSaved,
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        length, head_dim, ..
    } = shape;
    let scale = shape.scale();
    head_gradients(shape, |pair, dq_head, dk_head, dv_head| {
        let head_range = pair * shape.head()..(pair + 1) * shape.head();
        let (q_head, k_head, v_head) = (
            &q[head_range.clone()],
            &k[head_range.clone()],
            &v[head_range],
        );
        // This head's output gradient, gathered `[L, d]`, and rowsum(dO * O).
        let (mut d_head, delta) = head_gradient_and_delta(shape, pair, out, d_out);
        if shape.round_products {
            round_in_place(&mut d_head);
        }
        let mut probability_buffer = vec![
            0f32;
            if saved.probabilities.is_some() {
                0
            } else {
                BACKWARD_BLOCK_ROWS * length
            }
        ];
        let mut rounded = vec![
            0f32;
            if shape.round_products {
                BACKWARD_BLOCK_ROWS * length
            } else {
                0
            }
        ];
        let mut score_grad = vec![0f32; BACKWARD_BLOCK_ROWS * length];
        for block in 0..length.div_ceil(BACKWARD_BLOCK_ROWS) {
            let first = block * BACKWARD_BLOCK_ROWS;
            let rows = (length - first).min(BACKWARD_BLOCK_ROWS);
            let score_grad = &mut score_grad[..rows * length];
            let q_block = Matrix::rows(&q_head[first * head_dim..], rows, head_dim);
            let d_block = Matrix::rows(&d_head[first * head_dim..], rows, head_dim);
            let probabilities: &[f32] = match saved.block(pair, first, rows, length) {
                Some(kept) => kept,
                None => {
                    let buffer = &mut probability_buffer[..rows * length];
                    multiply(
                        buffer,
                        length,
                        q_block,
                        Matrix::rows(k_head, length, head_dim).t(),
                        1.0,
                        false,
                    );
                    let lse = &saved.logsumexp[pair * length + first..][..rows];
                    probabilities_in_place(buffer, length, lse, scale);
                    buffer
                }
            };
            let p_for_products: &[f32] = if shape.round_products {
                let rounded = &mut rounded[..rows * length];
                rounded.copy_from_slice(probabilities);
                round_in_place(rounded);
                rounded
            } else {
                probabilities
            };
            multiply(
                dv_head,
                head_dim,
                Matrix::rows(p_for_products, rows, length).t(),
                d_block,
                1.0,
                true,
            );
            multiply(
                score_grad,
                length,
                d_block,
                Matrix::rows(v_head, length, head_dim).t(),
                1.0,
                false,
            );
            score_gradient_in_place(
                score_grad,
                probabilities,
                length,
                &delta[first..first + rows],
            );
            if shape.round_products {
                round_in_place(score_grad);
            }
            let dq_block = &mut dq_head[first * head_dim..(first + rows) * head_dim];
            multiply(
                dq_block,
                head_dim,
                Matrix::rows(score_grad, rows, length),
                Matrix::rows(k_head, length, head_dim),
                scale,
                false,
            );
            multiply(
                dk_head,
                head_dim,
                Matrix::rows(score_grad, rows, length).t(),
                q_block,
                scale,
                true,
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    fn random(count: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = SeededRng::new(seed);
        (0..count).map(|_| rng.normal() as f32 * scale).collect()
    }

    /// Attention of one head in f64, `[L, d]` in and out.
    fn naive_head(q: &[f32], k: &[f32], v: &[f32], length: usize, d: usize) -> Vec<f64> {
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f64; length * d];
        for i in 0..length {
            let scores: Vec<f64> = (0..length)
                .map(|j| {
                    (0..d)
                        .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..d {
                out[i * d + c] = (0..length)
                    .map(|j| weights[j] / total * v[j * d + c] as f64)
                    .sum();
            }
        }
        out
    }

    fn shape(length: usize) -> AttentionShape {
        AttentionShape {
            batch: 2,
            heads: 2,
            length,
            head_dim: 8,
            out_stride: 2 * 8 + 3,
            round_products: false,
        }
    }

    /// Gathers head `h` of sample `b` from the token-major layout.
    fn gather(shape: AttentionShape, out: &[f32], b: usize, h: usize) -> Vec<f32> {
        (0..shape.length)
            .flat_map(|t| out[shape.out_offset(b, h, t)..][..shape.head_dim].to_vec())
            .collect()
    }

    /// Each head of `out` (token-major) is the f64 attention of its q, k, v, within `tolerance`
    /// of the expected value.
    fn assert_naive_attention(
        shape: AttentionShape,
        [q, k, v]: [&[f32]; 3],
        out: &[f32],
        tolerance: impl Fn(f64) -> f64,
    ) {
        for pair in 0..shape.batch * shape.heads {
            let range = pair * shape.head()..(pair + 1) * shape.head();
            let want = naive_head(
                &q[range.clone()],
                &k[range.clone()],
                &v[range],
                shape.length,
                shape.head_dim,
            );
            let got = gather(shape, out, pair / shape.heads, pair % shape.heads);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < tolerance(*w), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn forward_matches_naive_attention() {
        // One full block of query rows and a partial one.
        let shape = shape(BLOCK_ROWS + 22);
        let size = shape.batch * shape.heads * shape.head();
        let (q, k, v) = (
            random(size, 1, 1.5),
            random(size, 2, 1.5),
            random(size, 3, 1.0),
        );
        let mut out = vec![5f32; shape.batch * shape.length * shape.out_stride];
        let saved = forward(shape, &q, &k, &v, &mut out, true);
        assert_naive_attention(shape, [&q, &k, &v], &out, |_| 1e-5);
        // Kept probabilities are rows of a softmax.
        let probabilities = saved.probabilities.expect("kept");
        for row in probabilities.chunks(shape.length) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // The padding columns of each output row are untouched.
        assert!(out
            .chunks(shape.out_stride)
            .all(|row| row[16..].iter().all(|&v| v == 5.0)));
    }

    /// bf16 products without AMX (`forward_f32` with `round_products`) on long rows (128 x 2100
    /// scores, over 1 MB, rounded by the pool inside the task's scratch): the attention of the
    /// rounded inputs.
    #[test]
    fn rounded_products_on_long_rows_match_naive_attention() {
        let shape = AttentionShape {
            round_products: true,
            ..shape(2100)
        };
        let size = shape.batch * shape.heads * shape.head();
        let rounded = |seed: u64, scale: f32| {
            let mut values = random(size, seed, scale);
            round_in_place(&mut values);
            values
        };
        let (q, k, v) = (rounded(11, 1.0), rounded(12, 1.0), rounded(13, 1.0));
        let mut out = vec![0f32; shape.batch * shape.length * shape.out_stride];
        forward_f32(shape, &q, &k, &v, &mut out, false);
        // The probabilities are rounded to bf16 for the value product.
        assert_naive_attention(shape, [&q, &k, &v], &out, |want| 1e-2 * (1.0 + want.abs()));
    }

    #[test]
    fn gradients_match_finite_differences() {
        let shape = shape(BLOCK_ROWS + 13);
        let size = shape.batch * shape.heads * shape.head();
        let inputs = [
            random(size, 4, 1.5),
            random(size, 5, 1.5),
            random(size, 6, 1.0),
        ];
        let weights = random(shape.batch * shape.length * shape.out_stride, 7, 1.0);
        let objective = |inputs: &[Vec<f32>]| -> f64 {
            let mut out = vec![0f32; weights.len()];
            forward(shape, &inputs[0], &inputs[1], &inputs[2], &mut out, false);
            (0..shape.batch * shape.length)
                .flat_map(|row| (0..16).map(move |c| row * shape.out_stride + c))
                .map(|i| out[i] as f64 * weights[i] as f64)
                .sum()
        };
        let mut out = vec![0f32; weights.len()];
        let saved = forward(shape, &inputs[0], &inputs[1], &inputs[2], &mut out, false);
        let grads = backward(
            shape, &inputs[0], &inputs[1], &inputs[2], &out, &saved, &weights,
        );
        // With the probabilities kept instead of recomputed: the same gradients.
        let mut out_kept = vec![0f32; weights.len()];
        let kept = forward(
            shape,
            &inputs[0],
            &inputs[1],
            &inputs[2],
            &mut out_kept,
            true,
        );
        assert_eq!(out_kept, out);
        assert!(kept.probabilities.is_some() && saved.probabilities.is_none());
        let from_kept = backward(
            shape, &inputs[0], &inputs[1], &inputs[2], &out, &kept, &weights,
        );
        for (a, b) in [
            (&from_kept.0, &grads.0),
            (&from_kept.1, &grads.1),
            (&from_kept.2, &grads.2),
        ] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        let grads = [grads.0, grads.1, grads.2];
        let step = 1e-2f32;
        for (which, grad) in grads.iter().enumerate() {
            for index in [0, 9, 133, 1071, 2 * shape.head() + 1030, size - 1] {
                let mut shifted = inputs.clone();
                shifted[which][index] += step;
                let up = objective(&shifted);
                shifted[which][index] -= 2.0 * step;
                let expected = (up - objective(&shifted)) / (2.0 * step as f64);
                let got = grad[index] as f64;
                assert!(
                    (got - expected).abs() < 1e-2 * (1.0 + expected.abs()),
                    "input {which} index {index}: {got} vs {expected}"
                );
            }
        }
    }
}
