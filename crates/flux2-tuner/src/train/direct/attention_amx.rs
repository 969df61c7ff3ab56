//! [`super::attention`] for bf16 mixed precision on AMX tiles: the same blocks, the same bf16
//! operands (q, k, v arrive rounded; probabilities, score gradients and output gradients are
//! rounded here), but the products run on `nn::amx` instead of f32 `gemm`. K, K^T, V and V^T are
//! packed once per head. Used when AMX is available; the results equal the f32 path's up to the
//! order of the f32 accumulation.

use half::bf16;
use rayon::prelude::*;

use super::attention::{
    exp_in_place, head_gradient_and_delta, head_gradients, keep_row, kept_probabilities,
    probabilities_in_place, probability_store, row_max, score_gradient_in_place, AttentionSaved,
    AttentionShape, BLOCK_ROWS,
};
use super::matrix::to_bf16;
use crate::nn::amx::{self, PackedB};
use crate::nn::fused::round_to_bf16;
use crate::nn::host::{vectorised, zeroed_f32, SharedOutput};

/// `out = a B` (`a` `[rows, k]` bf16) through AMX; `out` `[rows, n]` is overwritten.
fn product(a: &[bf16], rows: usize, k: usize, b: &PackedB, n: usize, out: &mut [f32]) {
    let done = amx::multiply(a, rows, k, b, n, out, |v| v);
    debug_assert!(done, "AMX was checked to be available");
}

/// Per head: `K^T` `[d, L]`, `V` `[L, d]` packed for the forward.
struct ForwardPacks {
    keys_transposed: PackedB,
    values: PackedB,
}

/// Whether this module can run (AMX present and permitted).
pub(super) fn available() -> bool {
    amx::available()
}

/// As [`super::attention::forward`].
pub(super) fn forward(
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
    let head = length * head_dim;
    let scale = shape.scale();
    let blocks = length.div_ceil(BLOCK_ROWS);
    let (q16, k16, v16) = (to_bf16(q), to_bf16(k), to_bf16(v));
    let packs: Vec<ForwardPacks> = (0..pairs)
        .into_par_iter()
        .map(|pair| {
            let (keys, values) = (&k16[pair * head..], &v16[pair * head..]);
            ForwardPacks {
                keys_transposed: PackedB::new(keys, head_dim, length, 1, head_dim),
                values: PackedB::new(values, length, head_dim, head_dim, 1),
            }
        })
        .collect();
    let mut logsumexp = zeroed_f32(pairs * length);
    let lse_target = SharedOutput(logsumexp.as_mut_ptr());
    let (kept_store, kept) = probability_store(shape, keep_probabilities);
    let out_target = SharedOutput(out.as_mut_ptr());
    let out_len = out.len();
    (0..pairs * blocks).into_par_iter().for_each(|task| {
        let (pair, block) = (task / blocks, task % blocks);
        let (sample, head_index) = (pair / shape.heads, pair % shape.heads);
        let first = block * BLOCK_ROWS;
        let rows = (length - first).min(BLOCK_ROWS);
        let mut scores = vec![0f32; rows * length];
        let q_block = &q16[pair * head + first * head_dim..][..rows * head_dim];
        product(
            q_block,
            rows,
            head_dim,
            &packs[pair].keys_transposed,
            length,
            &mut scores,
        );
        // Written once, row by row below (no zero fill first).
        let mut probabilities: Vec<bf16> = Vec::with_capacity(rows * length);
        for (r, (row, p_row)) in scores
            .chunks_exact_mut(length)
            .zip(probabilities.spare_capacity_mut()[..rows * length].chunks_exact_mut(length))
            .enumerate()
        {
            let max = row_max(row);
            let total = exp_in_place(row, max, scale);
            let inverse = 1.0 / total;
            vectorised(
                #[inline(always)]
                || {
                    for (p, value) in p_row.iter_mut().zip(row.iter_mut()) {
                        *value *= inverse;
                        p.write(round_to_bf16(*value));
                    }
                },
            );
            // SAFETY: row `first + r` of pair `pair` belongs to this task only.
            unsafe {
                lse_target.write(pair * length + first + r, max * scale + total.ln());
                keep_row(kept, shape, pair, first + r, row);
            }
        }
        // SAFETY: the loop above wrote all `rows` rows of `length` values.
        unsafe { probabilities.set_len(rows * length) };
        let mut block_out = vec![0f32; rows * head_dim];
        product(
            &probabilities,
            rows,
            length,
            &packs[pair].values,
            head_dim,
            &mut block_out,
        );
        for (r, values) in block_out.chunks_exact(head_dim).enumerate() {
            let at = (sample * length + first + r) * shape.out_stride + head_index * head_dim;
            assert!(at + head_dim <= out_len);
            // SAFETY: these `head_dim` values of row `first + r` belong to this task's head and
            // rows only, inside `out` (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr(),
                    out_target.pointer().add(at),
                    head_dim,
                );
            }
        }
    });
    AttentionSaved {
        logsumexp,
        // SAFETY: the tasks cover every (pair, block of rows) and keep each of their rows.
        probabilities: unsafe { kept_probabilities(kept_store) },
    }
}

/// As [`super::attention::backward`].
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
    let AttentionShape {
        length, head_dim, ..
    } = shape;
    let head = length * head_dim;
    let scale = shape.scale();
    head_gradients(shape, |pair, dq_head, dk_head, dv_head| {
        let range = pair * head..(pair + 1) * head;
        let (q16, k16, v16) = (
            to_bf16(&q[range.clone()]),
            to_bf16(&k[range.clone()]),
            to_bf16(&v[range]),
        );
        let keys_transposed = PackedB::new(&k16, head_dim, length, 1, head_dim);
        let keys = PackedB::new(&k16, length, head_dim, head_dim, 1);
        let values_transposed = PackedB::new(&v16, head_dim, length, 1, head_dim);
        // This head's output gradient, gathered `[L, d]`, and rowsum(dO * O).
        let (d_head, delta) = head_gradient_and_delta(shape, pair, out, d_out);
        let d16 = to_bf16(&d_head);
        let mut probability_buffer = vec![
            0f32;
            if saved.probabilities.is_some() {
                0
            } else {
                BLOCK_ROWS * length
            }
        ];
        let mut score_grad = vec![0f32; BLOCK_ROWS * length];
        // dV^T and dK^T `[d, L]`, transposed into the head's gradients at the end.
        let mut dv_transposed = vec![0f32; head_dim * length];
        let mut dk_transposed = vec![0f32; head_dim * length];
        let mut part_transposed = vec![0f32; head_dim * length];
        let mut query_part = vec![0f32; BLOCK_ROWS * head_dim];
        for block in 0..length.div_ceil(BLOCK_ROWS) {
            let first = block * BLOCK_ROWS;
            let rows = (length - first).min(BLOCK_ROWS);
            let score_grad = &mut score_grad[..rows * length];
            let q_block = &q16[first * head_dim..(first + rows) * head_dim];
            let d_block = &d16[first * head_dim..(first + rows) * head_dim];
            let probabilities: &[f32] = match saved.block(pair, first, rows, length) {
                Some(kept) => kept,
                None => {
                    let buffer = &mut probability_buffer[..rows * length];
                    product(q_block, rows, head_dim, &keys_transposed, length, buffer);
                    let lse = &saved.logsumexp[pair * length + first..][..rows];
                    probabilities_in_place(buffer, length, lse, scale);
                    buffer
                }
            };
            // dV^T += dO^T P: P is the packed operand as it is laid out (`[rows, L]`), so
            // only the small `dO` block is transposed.
            let p16 = to_bf16(probabilities);
            let p_packed = PackedB::new(&p16, rows, length, length, 1);
            let d_transposed = transposed_small(d_block, rows, head_dim);
            product(
                &d_transposed,
                head_dim,
                rows,
                &p_packed,
                length,
                &mut part_transposed,
            );
            add_scaled(&mut dv_transposed, &part_transposed, 1.0);
            // dS = P (dO V^T - delta)
            product(
                d_block,
                rows,
                head_dim,
                &values_transposed,
                length,
                score_grad,
            );
            score_gradient_in_place(
                score_grad,
                probabilities,
                length,
                &delta[first..first + rows],
            );
            // dQ = s dS K
            let score_grad16 = to_bf16(score_grad);
            let query_part = &mut query_part[..rows * head_dim];
            product(&score_grad16, rows, length, &keys, head_dim, query_part);
            let dq_block = &mut dq_head[first * head_dim..(first + rows) * head_dim];
            vectorised(
                #[inline(always)]
                || {
                    dq_block
                        .iter_mut()
                        .zip(query_part.iter())
                        .for_each(|(a, b)| *a = b * scale)
                },
            );
            // dK^T += s Q^T dS, as dV.
            let score_grad_packed = PackedB::new(&score_grad16, rows, length, length, 1);
            let q_transposed = transposed_small(q_block, rows, head_dim);
            product(
                &q_transposed,
                head_dim,
                rows,
                &score_grad_packed,
                length,
                &mut part_transposed,
            );
            add_scaled(&mut dk_transposed, &part_transposed, scale);
        }
        add_transposed(dv_head, &dv_transposed, head_dim, length);
        add_transposed(dk_head, &dk_transposed, head_dim, length);
    })
}

/// `values` `[rows, columns]` transposed into `[columns, rows]` (small blocks: a `dO` or `q`
/// block of one head).
fn transposed_small(values: &[bf16], rows: usize, columns: usize) -> Vec<bf16> {
    let mut out = crate::nn::fused::zeroed_bf16(rows * columns);
    for (r, row) in values.chunks_exact(columns).take(rows).enumerate() {
        for (c, &value) in row.iter().enumerate() {
            out[c * rows + r] = value;
        }
    }
    out
}

/// `target += scale * part`.
fn add_scaled(target: &mut [f32], part: &[f32], scale: f32) {
    vectorised(
        #[inline(always)]
        || {
            target
                .iter_mut()
                .zip(part)
                .for_each(|(t, p)| *t += p * scale)
        },
    );
}

/// `target[l, c] += transposed[c, l]` for `target` `[length, width]`, in 16 x 16 tiles.
fn add_transposed(target: &mut [f32], transposed: &[f32], width: usize, length: usize) {
    const TILE: usize = 16;
    for l0 in (0..length).step_by(TILE) {
        for c0 in (0..width).step_by(TILE) {
            for c in c0..(c0 + TILE).min(width) {
                let row = &transposed[c * length..];
                for l in l0..(l0 + TILE).min(length) {
                    target[l * width + c] += row[l];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::direct::attention;
    use crate::util::rng::SeededRng;

    fn random(count: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = SeededRng::new(seed);
        (0..count)
            .map(|_| round_to_bf16(rng.normal() as f32 * scale).to_f32())
            .collect()
    }

    fn relative(a: &[f32], b: &[f32]) -> f64 {
        let difference: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (difference / norm).sqrt()
    }

    /// Against the f32 path with the same bf16 operands: only the accumulation order differs.
    #[test]
    fn matches_the_rounded_f32_path() {
        if !available() {
            return;
        }
        let shape = AttentionShape {
            batch: 2,
            heads: 2,
            length: BLOCK_ROWS + 37,
            head_dim: 16,
            out_stride: 2 * 16 + 5,
            round_products: true,
        };
        let size = shape.batch * shape.heads * shape.length * shape.head_dim;
        let (q, k, v) = (
            random(size, 1, 1.5),
            random(size, 2, 1.5),
            random(size, 3, 1.0),
        );
        let rows = shape.batch * shape.length * shape.out_stride;
        let d_out = random(rows, 4, 1.0);
        let (mut out_amx, mut out_f32) = (vec![0f32; rows], vec![0f32; rows]);
        let lse_amx = forward(shape, &q, &k, &v, &mut out_amx, false).logsumexp;
        let saved = attention::forward_f32(shape, &q, &k, &v, &mut out_f32, false);
        let lse_f32 = saved.logsumexp.clone();
        assert!(relative(&out_amx, &out_f32) < 1e-5);
        assert!(relative(&lse_amx, &lse_f32) < 1e-6);
        let amx = backward(shape, &q, &k, &v, &out_f32, &saved, &d_out);
        let f32 = attention::backward_f32(shape, &q, &k, &v, &out_f32, &saved, &d_out);
        for (a, b) in [(&amx.0, &f32.0), (&amx.1, &f32.1), (&amx.2, &f32.2)] {
            let error = relative(a, b);
            assert!(error < 1e-5, "{error}");
        }
        // The probabilities kept by the forward instead of recomputed: they come from the
        // forward's score tiles, whose f32 sums run in another order than the f32 path's.
        let mut out_kept = vec![0f32; rows];
        let kept = forward(shape, &q, &k, &v, &mut out_kept, true);
        let from_kept = backward(shape, &q, &k, &v, &out_f32, &kept, &d_out);
        for (a, b) in [
            (&from_kept.0, &f32.0),
            (&from_kept.1, &f32.1),
            (&from_kept.2, &f32.2),
        ] {
            let error = relative(a, b);
            assert!(error < 1e-4, "kept probabilities: {error}");
        }
    }
}
