//! The attention inputs of one stream and their backward: the fused projections `[rows, width]`
//! (columns laid out `(3, heads, d)` from `column` on) split into q, k, v; q and k RMS-normalised
//! per head with their scales, then rotated by RoPE on interleaved pairs (as `nn::fused::
//! qk_norm_rope`, in f32 without roundings). Outputs go into the joint `[b, heads, L, d]` buffers
//! at this stream's token offset (text first, then image).

use rayon::prelude::*;

use crate::nn::host::{lane_dot, lane_sum, vectorised};

/// The layout and frozen inputs shared by forward and backward.
pub(super) struct QkNormRope<'a> {
    pub heads: usize,
    pub head_dim: usize,
    /// Tokens of this stream per sample.
    pub length: usize,
    /// Tokens of the joint sequence per sample.
    pub joint_length: usize,
    /// This stream's first token in the joint sequence (and in the RoPE tables).
    pub token_offset: usize,
    /// Row width of the projections and the first q column.
    pub width: usize,
    pub column: usize,
    pub query_scale: &'a [f32],
    pub key_scale: &'a [f32],
    pub eps: f32,
    /// RoPE tables `[table_batch, joint_length, d / 2]`.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub table_batch: usize,
}

impl QkNormRope<'_> {
    fn input_offset(&self, sample: usize, token: usize, which: usize, head: usize) -> usize {
        (sample * self.length + token) * self.width
            + self.column
            + (which * self.heads + head) * self.head_dim
    }

    fn table_offset(&self, sample: usize, token: usize) -> usize {
        let table_sample = if self.table_batch == 1 { 0 } else { sample };
        (table_sample * self.joint_length + self.token_offset + token) * (self.head_dim / 2)
    }

    /// Writes this stream's rows of the joint `q`, `k`, `v` (`[b, heads, joint_length, d]`).
    pub fn forward(&self, projected: &[f32], q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
        let slab = self.joint_length * self.head_dim;
        let (head_dim, half) = (self.head_dim, self.head_dim / 2);
        q.par_chunks_mut(slab)
            .zip(k.par_chunks_mut(slab))
            .zip(v.par_chunks_mut(slab))
            .enumerate()
            .for_each(|(pair, ((q_slab, k_slab), v_slab))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (sample, head) = (pair / self.heads, pair % self.heads);
                        let mut normalised = vec![0f32; head_dim];
                        for token in 0..self.length {
                            let out = (self.token_offset + token) * head_dim;
                            let table = self.table_offset(sample, token);
                            let (cos, sin) = (
                                &self.cos[table..table + half],
                                &self.sin[table..table + half],
                            );
                            let part = |which: usize| {
                                &projected[self.input_offset(sample, token, which, head)..]
                                    [..head_dim]
                            };
                            for (which, scale, slab) in [
                                (0, self.query_scale, &mut *q_slab),
                                (1, self.key_scale, &mut *k_slab),
                            ] {
                                let input = part(which);
                                let inverse = inverse_rms(input, self.eps);
                                for ((n, x), s) in normalised.iter_mut().zip(input).zip(scale) {
                                    *n = x * inverse * s;
                                }
                                let rotated = &mut slab[out..out + head_dim];
                                for (j, (c, s)) in cos.iter().zip(sin).enumerate() {
                                    let (a, b) = (normalised[2 * j], normalised[2 * j + 1]);
                                    rotated[2 * j] = a * c - b * s;
                                    rotated[2 * j + 1] = a * s + b * c;
                                }
                            }
                            v_slab[out..out + head_dim].copy_from_slice(part(2));
                        }
                    },
                )
            });
    }

    /// The gradient of this stream's projections from the joint `dq`, `dk`, `dv`, for the rows
    /// from `first_row` on that `d_rows` holds (whole rows of `width`; only their q, k, v columns
    /// are written). With `m = n * scale` and the rotation `R`: `dm = R^T d`,
    /// `dn = dm * scale`, `dx = r (dn - n mean(dn n))`.
    pub fn backward_rows(
        &self,
        projected: &[f32],
        dq: &[f32],
        dk: &[f32],
        dv: &[f32],
        first_row: usize,
        d_rows: &mut [f32],
    ) {
        let (head_dim, half) = (self.head_dim, self.head_dim / 2);
        vectorised(
            #[inline(always)]
            || {
                let mut d_normalised = vec![0f32; head_dim];
                for (index, d_row) in d_rows.chunks_exact_mut(self.width).enumerate() {
                    let row = first_row + index;
                    let (sample, token) = (row / self.length, row % self.length);
                    let table = self.table_offset(sample, token);
                    let (cos, sin) = (
                        &self.cos[table..table + half],
                        &self.sin[table..table + half],
                    );
                    for head in 0..self.heads {
                        let joint = ((sample * self.heads + head) * self.joint_length
                            + self.token_offset
                            + token)
                            * head_dim;
                        for (which, scale, d_joint) in
                            [(0, self.query_scale, dq), (1, self.key_scale, dk)]
                        {
                            let d = &d_joint[joint..joint + head_dim];
                            for (j, (c, s)) in cos.iter().zip(sin).enumerate() {
                                let (da, db) = (d[2 * j], d[2 * j + 1]);
                                d_normalised[2 * j] = (da * c + db * s) * scale[2 * j];
                                d_normalised[2 * j + 1] = (db * c - da * s) * scale[2 * j + 1];
                            }
                            let start = self.input_offset(sample, token, which, head);
                            let input = &projected[start..start + head_dim];
                            let inverse = inverse_rms(input, self.eps);
                            let dot = lane_dot(&d_normalised, input) * inverse / head_dim as f32;
                            let local = start - row * self.width;
                            let out = &mut d_row[local..local + head_dim];
                            for ((o, g), x) in out.iter_mut().zip(&d_normalised).zip(input) {
                                *o = inverse * (g - x * inverse * dot);
                            }
                        }
                        let local = self.input_offset(sample, token, 2, head) - row * self.width;
                        d_row[local..local + head_dim]
                            .copy_from_slice(&dv[joint..joint + head_dim]);
                    }
                }
            },
        )
    }
}

#[inline(always)]
fn inverse_rms(values: &[f32], eps: f32) -> f32 {
    let mean_square = lane_sum(values, |v| v * v) / values.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    fn random(count: usize, seed: u64) -> Vec<f32> {
        let mut rng = SeededRng::new(seed);
        (0..count).map(|_| rng.normal() as f32).collect()
    }

    /// Against finite differences of `sum(wq q + wk k + wv v)` for a stream in the middle of the
    /// joint sequence (offset 2 of 7 tokens), batch 2, 2 heads of 4, projections from column 3.
    #[test]
    fn gradient_matches_finite_differences() {
        let (batch, heads, head_dim, length, joint_length, offset) = (2, 2, 4, 3, 7, 2);
        let (column, width) = (3, 3 + 3 * heads * head_dim + 2);
        let query_scale = random(head_dim, 1);
        let key_scale = random(head_dim, 2);
        let angles = random(joint_length * head_dim / 2, 3);
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let layout = QkNormRope {
            heads,
            head_dim,
            length,
            joint_length,
            token_offset: offset,
            width,
            column,
            query_scale: &query_scale,
            key_scale: &key_scale,
            eps: 1e-6,
            cos: &cos,
            sin: &sin,
            table_batch: 1,
        };
        let joint = batch * heads * joint_length * head_dim;
        let weights = [random(joint, 4), random(joint, 5), random(joint, 6)];
        let projected = random(batch * length * width, 7);
        let objective = |projected: &[f32]| -> f64 {
            let (mut q, mut k, mut v) = (vec![0f32; joint], vec![0f32; joint], vec![0f32; joint]);
            layout.forward(projected, &mut q, &mut k, &mut v);
            [q, k, v]
                .iter()
                .zip(&weights)
                .flat_map(|(a, w)| a.iter().zip(w).map(|(a, w)| *a as f64 * *w as f64))
                .sum()
        };
        let mut d_projected = vec![9f32; projected.len()];
        layout.backward_rows(
            &projected,
            &weights[0],
            &weights[1],
            &weights[2],
            0,
            &mut d_projected,
        );
        let step = 1e-2f32;
        for row in 0..batch * length {
            for c in 0..width {
                let index = row * width + c;
                if c < column || c >= column + 3 * heads * head_dim {
                    assert_eq!(d_projected[index], 9.0, "column {c} is not an input");
                    continue;
                }
                let mut shifted = projected.clone();
                shifted[index] += step;
                let up = objective(&shifted);
                shifted[index] -= 2.0 * step;
                let expected = (up - objective(&shifted)) / (2.0 * step as f64);
                let got = d_projected[index] as f64;
                assert!(
                    (got - expected).abs() < 2e-2 * (1.0 + expected.abs()),
                    "row {row} column {c}: {got} vs {expected}"
                );
            }
        }
    }
}
