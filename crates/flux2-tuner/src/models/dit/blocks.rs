//! The FLUX.2 DiT blocks, one struct per block of BFL `src/flux2/model.py`: the shared
//! modulations, the double-stream and single-stream blocks and the last layer. Field names are the
//! checkpoint key segments.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::models::dit::weights::DitWeights;
use crate::nn::attention::attention_in_model;
use crate::nn::fused::{self, QkNormRope};
use crate::nn::host::{cat_pair, is_plain_cpu};
use crate::nn::norm::{layer_norm, modulate, rms_norm};
use crate::nn::rope::RopeTables;
use crate::nn::Linear;

const NORM_EPS: f64 = 1e-6;

/// One `(shift, scale, gate)` triple, each `[b, 1, hidden]` in f32.
#[derive(Debug, Clone)]
pub struct ModulationParams {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl ModulationParams {
    /// `x + gate * y`, computed in f32 and rounded to `x`'s dtype.
    pub fn gated_add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if is_plain_cpu(&[x, y, &self.gate]) {
            return fused::gated_add(x, &self.gate, y);
        }
        let dtype = x.dtype();
        let update = y.to_dtype(DType::F32)?.broadcast_mul(&self.gate)?;
        Ok((x.to_dtype(DType::F32)? + update)?.to_dtype(dtype)?)
    }

    /// `(1 + scale) * LayerNorm(x) + shift` in `x`'s dtype.
    pub fn modulate(&self, x: &Tensor) -> Result<Tensor> {
        modulate(x, &self.shift, &self.scale, x.dtype())
    }
}

/// A model-level modulation `lin(silu(vec))`, computed once per forward and shared by all blocks
/// (BFL `Modulation`; FLUX.2 has no per-block modulation weights).
#[derive(Debug, Clone)]
pub struct Modulation {
    pub lin: Linear,
}

impl Modulation {
    pub fn load(weights: &DitWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            lin: weights.linear(&format!("{prefix}.lin"))?,
        })
    }

    /// Splits `lin(silu(vec))` into `(shift, scale, gate)` triples, in f32.
    pub fn forward(&self, vec: &Tensor) -> Result<Vec<ModulationParams>> {
        let out = self
            .lin
            .forward(&candle_nn::ops::silu(vec)?)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let chunks = out.chunk(out.dim(D::Minus1)? / self.lin.in_features(), D::Minus1)?;
        Ok(chunks
            .chunks_exact(3)
            .map(|c| ModulationParams {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

/// Per-head RMSNorm of queries and keys (BFL `QKNorm`).
#[derive(Debug, Clone)]
pub struct QkNorm {
    pub query_norm: Tensor,
    pub key_norm: Tensor,
}

impl QkNorm {
    pub fn load(weights: &DitWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            query_norm: weights.tensor(&format!("{prefix}.query_norm.scale"))?,
            key_norm: weights.tensor(&format!("{prefix}.key_norm.scale"))?,
        })
    }
}

/// Splits the fused projections in columns `column .. column + 3 * heads * d` of `projected`
/// `[b, l, width]` (laid out `(3, heads, d)`) into q, k, v `[b, heads, l, d]`, normalises q and k
/// and applies RoPE with the table rows from `table_offset` on.
fn split_qkv(
    projected: &Tensor,
    column: usize,
    heads: usize,
    norm: &QkNorm,
    rope: &RopeTables,
    table_offset: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let length = projected.dim(1)?;
    if is_plain_cpu(&[
        projected,
        &norm.query_norm,
        &norm.key_norm,
        &rope.cos,
        &rope.sin,
    ]) {
        let parameters = QkNormRope {
            heads,
            query_scale: &norm.query_norm,
            key_scale: &norm.key_norm,
            eps: NORM_EPS,
            cos: &rope.cos,
            sin: &rope.sin,
            table_offset,
        };
        return fused::qk_norm_rope(projected, column, &parameters);
    }
    let width = 3 * heads * norm.query_norm.dim(0)?;
    let qkv = projected.narrow(D::Minus1, column, width)?;
    let rope = &narrow_rope(rope, table_offset, length)?;
    let (batch, length, width) = qkv.dims3()?;
    let head_dim = width / (3 * heads);
    let qkv = qkv
        .reshape((batch, length, 3, heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?;
    let q = rms_norm(&qkv.get(0)?, &norm.query_norm, NORM_EPS)?;
    let k = rms_norm(&qkv.get(1)?, &norm.key_norm, NORM_EPS)?;
    let v = qkv.get(2)?.contiguous()?;
    Ok((rope.apply(&q)?, rope.apply(&k)?, v))
}

/// Attention projections of one stream of a double block (BFL `SelfAttention`).
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub norm: QkNorm,
    pub proj: Linear,
}

impl SelfAttention {
    pub fn load(weights: &DitWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            qkv: weights.linear(&format!("{prefix}.qkv"))?,
            norm: QkNorm::load(weights, &format!("{prefix}.norm"))?,
            proj: weights.linear(&format!("{prefix}.proj"))?,
        })
    }
}

/// `mlp.2(silu(a) * b)` with `a, b = chunk(mlp.0(x), 2)` (the first half is the gate).
#[derive(Debug, Clone)]
pub struct SwiGluMlp {
    /// Checkpoint `*_mlp.0`: `[2 * mlp, hidden]`.
    pub layer_0: Linear,
    /// Checkpoint `*_mlp.2`: `[hidden, mlp]`.
    pub layer_2: Linear,
}

/// `silu(first half) * second half` along the last axis.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let gate = x.narrow(D::Minus1, 0, half)?;
    let value = x.narrow(D::Minus1, half, half)?;
    Ok((candle_nn::ops::silu(&gate)? * value)?)
}

impl SwiGluMlp {
    pub fn load(weights: &DitWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            layer_0: weights.linear(&format!("{prefix}.0"))?,
            layer_2: weights.linear(&format!("{prefix}.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self.layer_0.forward(x)?;
        let activated = if is_plain_cpu(&[&hidden]) {
            fused::swiglu(&hidden, 0, hidden.dim(D::Minus1)?)?
        } else {
            swiglu(&hidden)?
        };
        self.layer_2.forward(&activated)
    }
}

/// A double-stream block: separate weights for image and text tokens, joint attention over
/// `[txt; img]` (BFL `DoubleStreamBlock`).
#[derive(Debug, Clone)]
pub struct DoubleStreamBlock {
    pub img_attn: SelfAttention,
    pub img_mlp: SwiGluMlp,
    pub txt_attn: SelfAttention,
    pub txt_mlp: SwiGluMlp,
    pub num_heads: usize,
}

impl DoubleStreamBlock {
    pub fn load(weights: &DitWeights, prefix: &str, num_heads: usize) -> Result<Self> {
        Ok(Self {
            img_attn: SelfAttention::load(weights, &format!("{prefix}.img_attn"))?,
            img_mlp: SwiGluMlp::load(weights, &format!("{prefix}.img_mlp"))?,
            txt_attn: SelfAttention::load(weights, &format!("{prefix}.txt_attn"))?,
            txt_mlp: SwiGluMlp::load(weights, &format!("{prefix}.txt_mlp"))?,
            num_heads,
        })
    }

    /// The block's Linear layers in a fixed order (image stream, then text stream).
    pub fn linears(&self) -> [&Linear; 8] {
        [
            &self.img_attn.qkv,
            &self.img_attn.proj,
            &self.img_mlp.layer_0,
            &self.img_mlp.layer_2,
            &self.txt_attn.qkv,
            &self.txt_attn.proj,
            &self.txt_mlp.layer_0,
            &self.txt_mlp.layer_2,
        ]
    }

    /// # Shapes
    /// `img`: `[b, n, hidden]`, `txt`: `[b, l, hidden]`; `rope` covers `[txt; img]`.
    /// `img_mod` / `txt_mod` are the two triples of the shared double-stream modulations.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        img_mod: &[ModulationParams],
        txt_mod: &[ModulationParams],
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor)> {
        let txt_len = txt.dim(1)?;
        let img_qkv = self.img_attn.qkv.forward(&img_mod[0].modulate(img)?)?;
        let txt_qkv = self.txt_attn.qkv.forward(&txt_mod[0].modulate(txt)?)?;
        let heads = self.num_heads;
        // RoPE needs each token's own table: text rows come first in the joint table.
        let (img_q, img_k, img_v) =
            split_qkv(&img_qkv, 0, heads, &self.img_attn.norm, rope, txt_len)?;
        let (txt_q, txt_k, txt_v) = split_qkv(&txt_qkv, 0, heads, &self.txt_attn.norm, rope, 0)?;
        let q = cat_pair(&txt_q, &img_q, 2)?;
        let k = cat_pair(&txt_k, &img_k, 2)?;
        let v = cat_pair(&txt_v, &img_v, 2)?;
        let joint = attention_in_model(&q, &k, &v, self.img_attn.norm.query_norm.dtype())?;
        let txt_attn = joint.narrow(1, 0, txt_len)?;
        let img_attn = joint.narrow(1, txt_len, img.dim(1)?)?;

        let img = img_mod[0].gated_add(img, &self.img_attn.proj.forward(&img_attn)?)?;
        let img =
            img_mod[1].gated_add(&img, &self.img_mlp.forward(&img_mod[1].modulate(&img)?)?)?;
        let txt = txt_mod[0].gated_add(txt, &self.txt_attn.proj.forward(&txt_attn)?)?;
        let txt =
            txt_mod[1].gated_add(&txt, &self.txt_mlp.forward(&txt_mod[1].modulate(&txt)?)?)?;
        Ok((img, txt))
    }
}

fn narrow_rope(rope: &RopeTables, start: usize, length: usize) -> Result<RopeTables> {
    Ok(RopeTables {
        cos: rope.cos.narrow(1, start, length)?.contiguous()?,
        sin: rope.sin.narrow(1, start, length)?.contiguous()?,
    })
}

/// A single-stream block over the joint sequence with fused projections (BFL `SingleStreamBlock`):
/// `linear1` gives `[q | k | v | mlp_in]`, `linear2` takes `[attention | swiglu(mlp_in)]`.
#[derive(Debug, Clone)]
pub struct SingleStreamBlock {
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm: QkNorm,
    pub num_heads: usize,
    pub hidden_size: usize,
}

impl SingleStreamBlock {
    pub fn load(
        weights: &DitWeights,
        prefix: &str,
        num_heads: usize,
        hidden_size: usize,
    ) -> Result<Self> {
        Ok(Self {
            linear1: weights.linear(&format!("{prefix}.linear1"))?,
            linear2: weights.linear(&format!("{prefix}.linear2"))?,
            norm: QkNorm::load(weights, &format!("{prefix}.norm"))?,
            num_heads,
            hidden_size,
        })
    }

    /// The block's Linear layers.
    pub fn linears(&self) -> [&Linear; 2] {
        [&self.linear1, &self.linear2]
    }

    /// # Shapes
    /// `x`: `[b, l, hidden]` (text then image tokens); returns the same shape.
    pub fn forward(
        &self,
        x: &Tensor,
        modulation: &ModulationParams,
        rope: &RopeTables,
    ) -> Result<Tensor> {
        let projected = self.linear1.forward(&modulation.modulate(x)?)?;
        let qkv_width = 3 * self.hidden_size;
        let mlp_width = projected.dim(D::Minus1)? - qkv_width;
        let (q, k, v) = split_qkv(&projected, 0, self.num_heads, &self.norm, rope, 0)?;
        let attended = attention_in_model(&q, &k, &v, self.norm.query_norm.dtype())?;
        let activated = if is_plain_cpu(&[&projected]) {
            fused::swiglu(&projected, qkv_width, mlp_width)?
        } else {
            swiglu(&projected.narrow(D::Minus1, qkv_width, mlp_width)?)?
        };
        let joined = cat_pair(&attended, &activated, attended.rank() - 1)?;
        modulation.gated_add(x, &self.linear2.forward(&joined)?)
    }
}

/// Final projection to latent channels (BFL `LastLayer`); the modulation is `(shift, scale)` in
/// that order (diffusers stores it swapped).
#[derive(Debug, Clone)]
pub struct LastLayer {
    /// Checkpoint `final_layer.adaLN_modulation.1`.
    pub ada_ln_modulation: Linear,
    pub linear: Linear,
}

impl LastLayer {
    pub fn load(weights: &DitWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            ada_ln_modulation: weights.linear(&format!("{prefix}.adaLN_modulation.1"))?,
            linear: weights.linear(&format!("{prefix}.linear"))?,
        })
    }

    /// Returns f32 `[b, n, out_channels]`.
    pub fn forward(&self, x: &Tensor, vec: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let params = self
            .ada_ln_modulation
            .forward(&candle_nn::ops::silu(vec)?)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let chunks = params.chunk(2, D::Minus1)?;
        let normalised = layer_norm(x, NORM_EPS)?;
        let modulated = normalised
            .broadcast_mul(&(&chunks[1] + 1.0)?)?
            .broadcast_add(&chunks[0])?
            .to_dtype(dtype)?;
        Ok(self.linear.forward(&modulated)?.to_dtype(DType::F32)?)
    }
}
