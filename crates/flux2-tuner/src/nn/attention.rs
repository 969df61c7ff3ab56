//! Scaled dot-product attention without a mask (FLUX.2 joint attention).
//!
//! Two ways: for inference on the CPU (no gradient recorded) a fused kernel that walks 32 query rows
//! at a time through scores, softmax and the value product without materialising the score matrix
//! (f32 through the `gemm` crate, bf16 on AMX tiles when the CPU has them); otherwise candle ops,
//! chunked over queries so that the score matrix never exceeds a fixed size.

use candle_core::{CpuStorage, DType, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::amx::{self, PackedB, Tiles, BLOCK_ROWS};
use crate::nn::fused::round_to_bf16;
use crate::nn::host::{
    is_plain_cpu, vectorised, with_bf16_scratch, with_data, with_f32_scratch, SharedOutput,
};
use crate::nn::softmax::{softmax_in_place, softmax_row};

/// Largest number of score elements (`batch * heads * query_rows * keys`) computed at once on the
/// candle path.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// `softmax(q k^T / sqrt(d)) v`, the softmax in f32.
///
/// # Shapes
/// `q`, `k`, `v`: `[b, heads, l, d]`; returns `[b, l, heads * d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    // `--attn_mode flash` with bf16 on CUDA: the fused kernel (records its own backward).
    if crate::nn::flash::applies_to(q) {
        return crate::nn::flash::attention(q, k, v);
    }
    if crate::nn::grad_mode::enabled() {
        return crate::nn::trainable::attention(q, k, v);
    }
    let same_dtype = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    if same_dtype && is_plain_cpu(&[q, k, v]) {
        match q.dtype() {
            DType::F32 => return fused_f32(q, k, v),
            DType::BF16 if amx::available() => return fused_bf16(q, k, v),
            _ => {}
        }
    }
    attention_by_ops(q, k, v)
}

/// Checks that `k` and `v` are `[b, heads, keys, d]` for `q` `[b, heads, l, d]` and that all three
/// share one dtype; `kernel` names the caller in the error.
pub fn check_qkv(kernel: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (batch, heads, _, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    for (name, tensor) in [("k", k), ("v", v)] {
        if tensor.dims() != [batch, heads, keys, head_dim] {
            return Err(Error::Shape(format!(
                "{kernel}: {name} has shape {:?}, expected [{batch}, {heads}, {keys}, {head_dim}] for q {:?}",
                tensor.dims(),
                q.dims()
            )));
        }
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(Error::Shape(format!(
            "{kernel}: q, k, v have dtypes {:?}, {:?}, {:?}, expected one dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    Ok(())
}

/// As [`attention`] inside a model whose weights are `weight_dtype`: while training a bf16 model on
/// the CPU the activations are f32 (`Flux2Dit::activation_dtype`), and the attention's products
/// then round their operands to bf16 as the model's own matmuls do.
pub fn attention_in_model(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    weight_dtype: DType,
) -> Result<Tensor> {
    let mixed = weight_dtype == DType::BF16 && q.dtype() == DType::F32 && q.device().is_cpu();
    if mixed && crate::nn::grad_mode::enabled() {
        return crate::nn::trainable::attention_with_bf16_products(q, k, v);
    }
    attention(q, k, v)
}

/// The candle-op path (records gradients; any device and dtype).
fn attention_by_ops(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let k_t = k.t()?;
    let rows_per_chunk =
        (MAX_SCORE_ELEMENTS / (batch * heads * keys).max(1)).clamp(1, length.max(1));
    let mut outputs = Vec::new();
    let mut start = 0;
    while start < length {
        let rows = rows_per_chunk.min(length - start);
        let q_chunk = q.narrow(2, start, rows)?;
        let scores = (q_chunk.matmul(&k_t)?.to_dtype(DType::F32)? * scale)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outputs.push(probabilities.matmul(v)?);
        start += rows;
    }
    let out = if outputs.len() == 1 {
        outputs.remove(0)
    } else {
        Tensor::cat(&outputs, 2)?
    };
    Ok(out
        .transpose(1, 2)?
        .reshape((batch, length, heads * head_dim))?)
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

impl Shapes {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (batch, heads, queries, head_dim) = q.dims4()?;
        let keys = k.dim(2)?;
        if k.dims() != [batch, heads, keys, head_dim] || v.dims() != k.dims() {
            return Err(Error::Shape(format!(
                "attention: q {:?}, k {:?} and v {:?} do not agree",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        Ok(Self {
            batch,
            heads,
            queries,
            keys,
            head_dim,
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn query_blocks(&self) -> usize {
        self.queries.div_ceil(BLOCK_ROWS)
    }

    /// Index in the `[b, l, heads * d]` output of element `j` of query `row` of head `bh`.
    fn output_index(&self, bh: usize, row: usize, j: usize) -> usize {
        let (batch, head) = (bh / self.heads, bh % self.heads);
        ((batch * self.queries + row) * self.heads + head) * self.head_dim + j
    }
}

fn bf16_data(storage: &CpuStorage) -> Result<&[bf16]> {
    match storage {
        CpuStorage::BF16(values) => Ok(values),
        _ => Err(Error::Shape("attention: expected bf16 data".into())),
    }
}

fn f32_data(storage: &CpuStorage) -> Result<&[f32]> {
    match storage {
        CpuStorage::F32(values) => Ok(values),
        _ => Err(Error::Shape("attention: expected f32 data".into())),
    }
}

/// Calls `f` with the contiguous data of q, k and v.
fn with_qkv<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&CpuStorage, &CpuStorage, &CpuStorage) -> Result<R>,
) -> Result<R> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    with_data(&q, |qs, qo| {
        with_data(&k, |ks, ko| {
            with_data(&v, |vs, vo| {
                // Offsets are zero for freshly made contiguous tensors; anything else is a bug here.
                if qo != 0 || ko != 0 || vo != 0 {
                    return Err(Error::Shape("attention: offset tensor views".into()));
                }
                f(qs, ks, vs)
            })
        })
    })
}

/// bf16 attention on AMX tiles: scores in f32, softmax in f32 rounded once to bf16 (as the op
/// path), the value product accumulated in f32 and rounded once.
fn fused_bf16(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let shapes = Shapes::of(q, k, v)?;
    let Shapes {
        keys,
        head_dim,
        queries,
        ..
    } = shapes;
    let pairs = shapes.batch * shapes.heads;
    let mut out = vec![bf16::ZERO; pairs * queries * head_dim];
    let target = SharedOutput(out.as_mut_ptr());
    with_qkv(q, k, v, |qs, ks, vs| {
        let (qs, ks, vs) = (bf16_data(qs)?, bf16_data(ks)?, bf16_data(vs)?);
        let head = keys * head_dim;
        // Per head: K^T `[d, keys]` and V `[keys, d]` in tile layout.
        let packed: Vec<(PackedB, PackedB)> = (0..pairs)
            .into_par_iter()
            .map(|bh| {
                let (k_head, v_head) = (&ks[bh * head..], &vs[bh * head..]);
                (
                    PackedB::new(k_head, head_dim, keys, 1, head_dim),
                    PackedB::new(v_head, keys, head_dim, head_dim, 1),
                )
            })
            .collect();
        let scale = shapes.scale();
        (0..pairs * shapes.query_blocks())
            .into_par_iter()
            .for_each(|task| {
                vectorised(|| {
                    let (bh, block) = (task / shapes.query_blocks(), task % shapes.query_blocks());
                    let (packed_k, packed_v) = &packed[bh];
                    let Some(tiles) = Tiles::configure() else {
                        return;
                    };
                    let first = block * BLOCK_ROWS;
                    let rows = (queries - first).min(BLOCK_ROWS);
                    let q_rows = &qs[(bh * queries + first) * head_dim..];
                    let depth = packed_k.padded_depth();
                    let padded;
                    let (a, lda) = if rows == BLOCK_ROWS && depth == head_dim {
                        (q_rows, head_dim)
                    } else {
                        padded = amx::padded_block(q_rows, rows, head_dim, head_dim, depth);
                        (padded.as_slice(), depth)
                    };
                    let width = packed_k.padded_columns();
                    let probability_width = packed_v.padded_depth();
                    let out_width = packed_v.padded_columns();
                    let scratch = BLOCK_ROWS * (width + out_width);
                    with_f32_scratch(scratch, |buffer| {
                        let (scores, values) = buffer.split_at_mut(BLOCK_ROWS * width);
                        tiles.multiply_row_block(a, lda, packed_k, scores, width);
                        let probabilities = BLOCK_ROWS * probability_width;
                        with_bf16_scratch(probabilities, |probabilities| {
                            // Padding (columns past the keys, rows past the queries) must be zero.
                            for (r, row) in probabilities
                                .chunks_exact_mut(probability_width)
                                .enumerate()
                            {
                                if r < rows {
                                    let scores = &mut scores[r * width..r * width + keys];
                                    softmax_row(scores, scale, &mut row[..keys]);
                                    row[keys..].fill(bf16::ZERO);
                                } else {
                                    row.fill(bf16::ZERO);
                                }
                            }
                            tiles.multiply_row_block(
                                probabilities,
                                probability_width,
                                packed_v,
                                values,
                                out_width,
                            );
                        });
                        for r in 0..rows {
                            for j in 0..head_dim {
                                // SAFETY: each (bh, row, j) belongs to exactly one task; the index
                                // is in bounds.
                                unsafe {
                                    target.write(
                                        shapes.output_index(bh, first + r, j),
                                        round_to_bf16(values[r * out_width + j]),
                                    )
                                };
                            }
                        }
                    });
                })
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(
        out,
        (shapes.batch, queries, shapes.heads * head_dim),
        q.device(),
    )?)
}

/// f32 attention: per head and block of query rows, `q k^T`, softmax and `p v` with the `gemm`
/// crate (single-threaded inside, the blocks run in parallel), written straight into the
/// `[b, l, heads * d]` output.
fn fused_f32(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let shapes = Shapes::of(q, k, v)?;
    let Shapes {
        keys,
        head_dim,
        queries,
        ..
    } = shapes;
    let pairs = shapes.batch * shapes.heads;
    let mut out = vec![0f32; pairs * queries * head_dim];
    let target = SharedOutput(out.as_mut_ptr());
    with_qkv(q, k, v, |qs, ks, vs| {
        let (qs, ks, vs) = (f32_data(qs)?, f32_data(ks)?, f32_data(vs)?);
        let head = keys * head_dim;
        let scale = shapes.scale();
        let row_stride = shapes.heads * head_dim;
        (0..pairs * shapes.query_blocks())
            .into_par_iter()
            .for_each(|task| {
                vectorised(|| {
                    let (bh, block) = (task / shapes.query_blocks(), task % shapes.query_blocks());
                    let first = block * BLOCK_ROWS;
                    let rows = (queries - first).min(BLOCK_ROWS);
                    let q_rows = &qs[(bh * queries + first) * head_dim..];
                    let (k_head, v_head) = (
                        &ks[bh * head..bh * head + head],
                        &vs[bh * head..bh * head + head],
                    );
                    with_f32_scratch(rows * keys, |scores| {
                        // SAFETY: all pointers and strides describe the slices above: q rows `[rows, d]`,
                        // K^T as `[d, keys]` (column stride d), scores `[rows, keys]`.
                        unsafe {
                            gemm::gemm(
                                rows,
                                keys,
                                head_dim,
                                scores.as_mut_ptr(),
                                1,
                                keys as isize,
                                false,
                                q_rows.as_ptr(),
                                1,
                                head_dim as isize,
                                k_head.as_ptr(),
                                head_dim as isize,
                                1,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for row in scores.chunks_exact_mut(keys) {
                            softmax_in_place(row, scale);
                        }
                        let probabilities = scores;
                        let destination = shapes.output_index(bh, first, 0);
                        // SAFETY: p `[rows, keys]`, V `[keys, d]`; the destination rows `first..first + rows`
                        // of this head (row stride heads * d) are written by this task only.
                        unsafe {
                            gemm::gemm(
                                rows,
                                head_dim,
                                keys,
                                target.pointer().add(destination),
                                1,
                                row_stride as isize,
                                false,
                                probabilities.as_ptr(),
                                1,
                                keys as isize,
                                v_head.as_ptr(),
                                1,
                                head_dim as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    });
                })
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(
        out,
        (shapes.batch, queries, shapes.heads * head_dim),
        q.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
        let mut rng = crate::util::rng::SeededRng::new(seed);
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..count).map(|_| rng.normal() as f32).collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?)
    }

    /// Odd sizes (a partial query block, keys not a multiple of 32, head dim 24) against the op path.
    #[test]
    fn fused_kernels_match_the_op_path() -> Result<()> {
        let q = random((2, 3, 45, 24), 1)?;
        let k = random((2, 3, 37, 24), 2)?;
        let v = random((2, 3, 37, 24), 3)?;
        let reference = attention_by_ops(&q, &k, &v)?;
        let fused = attention(&q, &k, &v)?;
        assert_eq!(fused.dims(), &[2, 45, 72]);
        assert!(max_difference(&fused, &reference)? < 1e-5);
        let (qb, kb, vb) = (
            q.to_dtype(DType::BF16)?,
            k.to_dtype(DType::BF16)?,
            v.to_dtype(DType::BF16)?,
        );
        let fused = attention(&qb, &kb, &vb)?;
        assert_eq!(fused.dtype(), DType::BF16);
        // bf16 output: within a few bf16 ulps of the f32 result (|values| < 3).
        assert!(max_difference(&fused, &reference)? < 3e-2);
        Ok(())
    }
}
