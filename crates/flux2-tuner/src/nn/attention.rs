//! Scaled dot-product attention without a mask (FLUX.2 joint attention), chunked over queries so the
//! score matrix never exceeds a fixed size.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Largest number of score elements (`batch * heads * query_rows * keys`) computed at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// `softmax(q k^T / sqrt(d)) v`, the softmax in f32.
///
/// # Shapes
/// `q`, `k`, `v`: `[b, heads, l, d]`; returns `[b, l, heads * d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let k_t = k.t()?;
    let rows_per_chunk = (MAX_SCORE_ELEMENTS / (batch * heads * keys).max(1)).clamp(1, length.max(1));
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
