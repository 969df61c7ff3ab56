//! The pieces of the language models' self-attention that differ from the DiT's: rotate-half RoPE
//! over `position_ids = arange(L)` (transformers `rotate_half`, frequencies in f32 as transformers
//! computes them), and the causal + padding mask with torch SDPA's treatment of fully masked query
//! rows (their output is zero).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Largest number of score elements (`rows * heads * queries * keys`) computed at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// Cos and sin tables `[l, head_dim / 2]` in f32 for positions `0..l`.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    /// `inv_freq_j = 1 / theta^(2j / d)` and `angle = position * inv_freq_j`, both in f32 (as
    /// transformers' default RoPE); cos and sin of the f32 angle.
    pub fn new(length: usize, head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inverse_frequencies: Vec<f32> = (0..half)
            .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(length * half);
        let mut sin = Vec::with_capacity(length * half);
        for position in 0..length {
            for &frequency in &inverse_frequencies {
                let angle = position as f32 * frequency;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (length, half), device)?,
            sin: Tensor::from_vec(sin, (length, half), device)?,
        })
    }

    /// Rotates `x` `[b, heads, l, head_dim]` (halves `[x1 | x2]` -> `[x1 c - x2 s | x2 c + x1 s]`)
    /// in f32 and returns it in `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        Ok(candle_nn::rotary_emb::rope(&x32, &self.cos, &self.sin)?.to_dtype(dtype)?)
    }
}

/// The attention mask of a padded batch, as an additive bias plus the rows that see any key.
#[derive(Debug, Clone)]
pub struct CausalPaddingMask {
    /// `[b, 1, l, l]` f32: 0 where query `i` may see key `j` (`j <= i` and key `j` is a real
    /// token), a large negative number elsewhere.
    bias: Tensor,
    /// `[b, 1, l, 1]` f32: 1 for query rows that see at least one key, 0 for fully masked rows.
    visible_rows: Tensor,
}

/// Added to masked scores; finite so that a fully masked row gives no NaN before it is zeroed.
const MASKED: f32 = -1e30;

impl CausalPaddingMask {
    /// From per-sequence masks (1 = real token, 0 = pad), all of the same length.
    pub fn new(attention_mask: &[Vec<u8>], device: &Device) -> Result<Self> {
        let batch = attention_mask.len();
        let length = attention_mask.first().map_or(0, Vec::len);
        if attention_mask.iter().any(|row| row.len() != length) {
            return Err(Error::Shape("attention-mask rows differ in length".into()));
        }
        let mut bias = vec![MASKED; batch * length * length];
        let mut visible = vec![0f32; batch * length];
        for (b, row) in attention_mask.iter().enumerate() {
            for query in 0..length {
                let offset = (b * length + query) * length;
                for key in 0..=query {
                    if row[key] != 0 {
                        bias[offset + key] = 0.0;
                        visible[b * length + query] = 1.0;
                    }
                }
            }
        }
        Ok(Self {
            bias: Tensor::from_vec(bias, (batch, 1, length, length), device)?,
            visible_rows: Tensor::from_vec(visible, (batch, 1, length, 1), device)?,
        })
    }
}

/// Masked grouped-query attention `softmax(q k^T / sqrt(d) + bias) v`, softmax in f32; rows that
/// see no key give zero (torch SDPA). Key/value heads are shared by `heads / kv_heads` queries.
///
/// # Shapes
/// `q`: `[b, heads, l, d]`; `k`, `v`: `[b, kv_heads, l, d]`; returns `[b, l, heads * d]`.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &CausalPaddingMask,
) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads.max(1);
    let expand = |t: &Tensor| -> Result<Tensor> {
        if group == 1 {
            return Ok(t.contiguous()?);
        }
        Ok(t.unsqueeze(2)?
            .expand((batch, kv_heads, group, length, head_dim))?
            .reshape((batch, heads, length, head_dim))?)
    };
    let k = expand(k)?;
    let v = expand(v)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let rows_per_chunk =
        (MAX_SCORE_ELEMENTS / (heads * length * length).max(1)).clamp(1, batch.max(1));
    let mut outputs = Vec::new();
    let mut start = 0;
    while start < batch {
        let rows = rows_per_chunk.min(batch - start);
        let q_chunk = q.narrow(0, start, rows)?.contiguous()?;
        let k_chunk = k.narrow(0, start, rows)?;
        let v_chunk = v.narrow(0, start, rows)?.contiguous()?;
        let scores = (q_chunk
            .matmul(&k_chunk.t()?.contiguous()?)?
            .to_dtype(DType::F32)?
            * scale)?;
        let scores = scores.broadcast_add(&mask.bias.narrow(0, start, rows)?)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?
            .broadcast_mul(&mask.visible_rows.narrow(0, start, rows)?)?
            .to_dtype(v_chunk.dtype())?;
        outputs.push(probabilities.matmul(&v_chunk)?);
        start += rows;
    }
    let out = if outputs.len() == 1 {
        outputs.remove(0)
    } else {
        Tensor::cat(&outputs, 0)?
    };
    Ok(out
        .transpose(1, 2)?
        .reshape((batch, length, heads * head_dim))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Position 1 rotates the first frequency pair `(x[0], x[d/2])` by exactly 1 radian.
    #[test]
    fn rotate_half_pairs_the_two_halves() -> Result<()> {
        let device = Device::Cpu;
        let tables = RotaryTables::new(2, 4, 10_000.0, &device)?;
        let x =
            Tensor::new(&[[1f32, 0., 0., 0.], [1., 0., 0., 0.]], &device)?.reshape((1, 1, 2, 4))?;
        let y: Vec<f32> = tables.apply(&x)?.flatten_all()?.to_vec1()?;
        assert_eq!(&y[..4], &[1., 0., 0., 0.]);
        assert!(
            (y[4] - 1f32.cos()).abs() < 1e-7 && (y[6] - 1f32.sin()).abs() < 1e-7,
            "{y:?}"
        );
        Ok(())
    }

    /// Left padding: the pad query row sees nothing and gives zero; the real rows average the
    /// values they may see (equal scores with q = 0).
    #[test]
    fn fully_masked_rows_give_zero_and_pads_are_never_keys() -> Result<()> {
        let device = Device::Cpu;
        let mask = CausalPaddingMask::new(&[vec![0, 1, 1]], &device)?;
        let q = Tensor::zeros((1, 1, 3, 2), DType::F32, &device)?;
        let v =
            Tensor::new(&[[100f32, 100.], [2., 4.], [4., 8.]], &device)?.reshape((1, 1, 3, 2))?;
        let out: Vec<f32> = masked_attention(&q, &q, &v, &mask)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(out, vec![0., 0., 2., 4., 3., 6.]);
        Ok(())
    }

    /// Right padding: the pad row attends to the real tokens before it; with two query heads per
    /// key/value head both heads read the shared values.
    #[test]
    fn right_pad_rows_attend_to_real_tokens_with_shared_kv_heads() -> Result<()> {
        let device = Device::Cpu;
        let mask = CausalPaddingMask::new(&[vec![1, 1, 0]], &device)?;
        let q = Tensor::zeros((1, 2, 3, 1), DType::F32, &device)?;
        let k = Tensor::zeros((1, 1, 3, 1), DType::F32, &device)?;
        let v = Tensor::new(&[2f32, 4., 1000.], &device)?.reshape((1, 1, 3, 1))?;
        let out: Vec<f32> = masked_attention(&q, &k, &v, &mask)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(out, vec![2., 2., 3., 3., 3., 3.]);
        Ok(())
    }
}
