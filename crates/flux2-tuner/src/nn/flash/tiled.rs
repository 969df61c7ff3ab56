//! CPU mirror of the fused CUDA attention kernel (`flash_attention.cu`): the same tiles, the same
//! online softmax, the same order of updates and the same bf16 rounding of the probabilities and
//! score gradients before the tensor-core products. It proves the algorithm against the composed
//! attention on the CPU (where nvcc-built code cannot run) and is the op's CPU path.
//!
//! Layout: `q`, `out`, `grad_out` are `[batch * heads, queries, head_dim]`, `k`, `v`
//! `[batch * heads, keys, head_dim]`, all contiguous f32; `logsumexp`, `delta` are
//! `[batch * heads, queries]`.

use rayon::prelude::*;

use crate::nn::fused::round_to_bf16;

/// Query rows per forward tile (one CUDA thread block; `FORWARD_BLOCK_Q` in the kernel).
pub const FORWARD_BLOCK_Q: usize = 64;
/// Key rows per forward step (`FORWARD_BLOCK_K` in the kernel).
pub const FORWARD_BLOCK_K: usize = 64;
/// Query rows per backward step (`BACKWARD_BLOCK_Q` in the kernel).
pub const BACKWARD_BLOCK_Q: usize = 32;
/// Key rows per backward tile (one CUDA thread block; `BACKWARD_BLOCK_K` in the kernel).
pub const BACKWARD_BLOCK_K: usize = 32;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledShape {
    pub batch_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

impl TiledShape {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// How the matrix products see their second operand, as the kernel's bf16 tensor cores do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// Probabilities and score gradients rounded to bf16 before their products (the kernel).
    Bf16,
    /// Everything in f32 (to compare the algorithm itself with the composed attention tightly).
    F32,
}

impl Products {
    fn round(self, value: f32) -> f32 {
        match self {
            Products::Bf16 => round_to_bf16(value).to_f32(),
            Products::F32 => value,
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Output `[bh, queries, d]` and logsumexp `[bh, queries]` (natural log, of the scaled scores).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: TiledShape,
    products: Products,
) -> (Vec<f32>, Vec<f32>) {
    let TiledShape {
        queries,
        keys,
        head_dim: d,
        ..
    } = shape;
    let scale = shape.scale();
    let mut out = vec![0.0f32; shape.batch_heads * queries * d];
    let mut logsumexp = vec![0.0f32; shape.batch_heads * queries];
    out.par_chunks_mut(queries * d)
        .zip(logsumexp.par_chunks_mut(queries))
        .enumerate()
        .for_each(|(bh, (out, logsumexp))| {
            let q = &q[bh * queries * d..(bh + 1) * queries * d];
            let k = &k[bh * keys * d..(bh + 1) * keys * d];
            let v = &v[bh * keys * d..(bh + 1) * keys * d];
            // One thread block of the kernel: a tile of query rows.
            for q_start in (0..queries).step_by(FORWARD_BLOCK_Q) {
                let rows = FORWARD_BLOCK_Q.min(queries - q_start);
                let mut row_max = vec![f32::NEG_INFINITY; rows];
                let mut row_sum = vec![0.0f32; rows];
                let mut accumulator = vec![0.0f32; rows * d];
                let mut scores = vec![0.0f32; FORWARD_BLOCK_K];
                for k_start in (0..keys).step_by(FORWARD_BLOCK_K) {
                    let columns = FORWARD_BLOCK_K.min(keys - k_start);
                    for r in 0..rows {
                        let q_row = &q[(q_start + r) * d..(q_start + r + 1) * d];
                        for (c, score) in scores.iter_mut().enumerate().take(columns) {
                            let k_row = &k[(k_start + c) * d..(k_start + c + 1) * d];
                            *score = dot(q_row, k_row) * scale;
                        }
                        let block_max = scores[..columns]
                            .iter()
                            .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                        let new_max = row_max[r].max(block_max);
                        // exp(-inf) = 0 on the first tile, as in the kernel.
                        let correction = (row_max[r] - new_max).exp();
                        let acc = &mut accumulator[r * d..(r + 1) * d];
                        acc.iter_mut().for_each(|a| *a *= correction);
                        let mut block_sum = 0.0f32;
                        for (c, &score) in scores.iter().enumerate().take(columns) {
                            let p = (score - new_max).exp();
                            // The sum uses the f32 value, the product the rounded one (kernel).
                            block_sum += p;
                            let p = products.round(p);
                            let v_row = &v[(k_start + c) * d..(k_start + c + 1) * d];
                            acc.iter_mut().zip(v_row).for_each(|(a, &x)| *a += p * x);
                        }
                        row_sum[r] = row_sum[r] * correction + block_sum;
                        row_max[r] = new_max;
                    }
                }
                for r in 0..rows {
                    let inverse = 1.0 / row_sum[r];
                    let row = q_start + r;
                    out[row * d..(row + 1) * d]
                        .iter_mut()
                        .zip(&accumulator[r * d..(r + 1) * d])
                        .for_each(|(o, &a)| *o = a * inverse);
                    logsumexp[row] = row_max[r] + row_sum[r].ln();
                }
            }
        });
    (out, logsumexp)
}

/// `rowsum(grad_out * out)`, `[bh, queries]` (the backward's `delta`).
pub fn delta(out: &[f32], grad_out: &[f32], head_dim: usize) -> Vec<f32> {
    out.chunks(head_dim)
        .zip(grad_out.chunks(head_dim))
        .map(|(o, g)| dot(o, g))
        .collect()
}

/// Gradients `(dq, dk, dv)` in the shapes of `q`, `k`, `v`. Each key tile (one CUDA thread block)
/// walks every query tile: `P = exp(q k^T s - lse)`, `dV += P^T dO`, `dP = dO V^T`,
/// `dS = P (dP - delta)`, `dK += dS^T Q s`, `dQ += dS K s` (the kernel adds dQ atomically).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    grad_out: &[f32],
    logsumexp: &[f32],
    delta: &[f32],
    shape: TiledShape,
    products: Products,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let TiledShape {
        queries,
        keys,
        head_dim: d,
        ..
    } = shape;
    let scale = shape.scale();
    let mut q_grad = vec![0.0f32; q.len()];
    let mut k_grad = vec![0.0f32; k.len()];
    let mut v_grad = vec![0.0f32; v.len()];
    q_grad
        .par_chunks_mut(queries * d)
        .zip(k_grad.par_chunks_mut(keys * d))
        .zip(v_grad.par_chunks_mut(keys * d))
        .enumerate()
        .for_each(|(bh, ((q_grad, k_grad), v_grad))| {
            let q = &q[bh * queries * d..(bh + 1) * queries * d];
            let grad_out = &grad_out[bh * queries * d..(bh + 1) * queries * d];
            let k = &k[bh * keys * d..(bh + 1) * keys * d];
            let v = &v[bh * keys * d..(bh + 1) * keys * d];
            let logsumexp = &logsumexp[bh * queries..(bh + 1) * queries];
            let delta = &delta[bh * queries..(bh + 1) * queries];
            let mut probabilities = vec![0.0f32; BACKWARD_BLOCK_Q * BACKWARD_BLOCK_K];
            let mut score_grad = vec![0.0f32; BACKWARD_BLOCK_Q * BACKWARD_BLOCK_K];
            for k_start in (0..keys).step_by(BACKWARD_BLOCK_K) {
                let columns = BACKWARD_BLOCK_K.min(keys - k_start);
                for q_start in (0..queries).step_by(BACKWARD_BLOCK_Q) {
                    let rows = BACKWARD_BLOCK_Q.min(queries - q_start);
                    for r in 0..rows {
                        let row = q_start + r;
                        let q_row = &q[row * d..(row + 1) * d];
                        let g_row = &grad_out[row * d..(row + 1) * d];
                        for c in 0..columns {
                            let key = k_start + c;
                            let score = dot(q_row, &k[key * d..(key + 1) * d]) * scale;
                            let p = (score - logsumexp[row]).exp();
                            let p_grad = dot(g_row, &v[key * d..(key + 1) * d]);
                            probabilities[r * BACKWARD_BLOCK_K + c] = products.round(p);
                            score_grad[r * BACKWARD_BLOCK_K + c] =
                                products.round(p * (p_grad - delta[row]));
                        }
                    }
                    for c in 0..columns {
                        let key = k_start + c;
                        for r in 0..rows {
                            let row = q_start + r;
                            let p = probabilities[r * BACKWARD_BLOCK_K + c];
                            let ds = score_grad[r * BACKWARD_BLOCK_K + c];
                            let g_row = &grad_out[row * d..(row + 1) * d];
                            let q_row = &q[row * d..(row + 1) * d];
                            let v_grad_row = &mut v_grad[key * d..(key + 1) * d];
                            v_grad_row
                                .iter_mut()
                                .zip(g_row)
                                .for_each(|(a, &g)| *a += p * g);
                            let k_grad_row = &mut k_grad[key * d..(key + 1) * d];
                            k_grad_row
                                .iter_mut()
                                .zip(q_row)
                                .for_each(|(a, &x)| *a += ds * x);
                        }
                    }
                    for r in 0..rows {
                        let row = q_start + r;
                        let q_grad_row = &mut q_grad[row * d..(row + 1) * d];
                        for c in 0..columns {
                            let key = k_start + c;
                            let ds = score_grad[r * BACKWARD_BLOCK_K + c] * scale;
                            q_grad_row
                                .iter_mut()
                                .zip(&k[key * d..(key + 1) * d])
                                .for_each(|(a, &x)| *a += ds * x);
                        }
                    }
                }
                // The scale of dK is applied once per key tile, when the kernel writes it.
                k_grad[k_start * d..(k_start + columns) * d]
                    .iter_mut()
                    .for_each(|a| *a *= scale);
            }
        });
    (q_grad, k_grad, v_grad)
}
