//! Timestep/guidance embedding (BFL `timestep_embedding` and `MLPEmbedder`).

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::models::dit::weights::DitWeights;
use crate::nn::Linear;

/// Width of the sinusoidal embedding.
pub const TIMESTEP_EMBEDDING_DIM: usize = 256;

/// Sinusoidal embedding of `t * 1000`, laid out `[cos, sin]` (cos first), `[b, 256]` in `dtype`.
///
/// Deliberately unlike Musubi/BFL in bf16: they create `t` in bf16 and multiply by 1000 in bf16
/// (spec §8), so 0.9674 becomes 968 and neighbouring sigmas share one embedding; the highest
/// frequency (1 rad per unit) then turns by over half a radian. We always form `1000 t` and the
/// angles in f32 and round only the finished embedding, which keeps the bf16 model within 3e-2 of
/// the f32 reference where the bf16 rounding of `t` alone moves the output by about 40 %.
pub fn timestep_embedding(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let half = TIMESTEP_EMBEDDING_DIM / 2;
    let scaled = (t.to_dtype(DType::F32)? * 1000.0)?;
    let freqs: Vec<f32> = (0..half)
        .map(|j| (-(10000f64.ln()) * j as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = scaled.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(dtype)?)
}

/// `out_layer(silu(in_layer(x)))`.
#[derive(Debug, Clone)]
pub struct MlpEmbedder {
    pub in_layer: Linear,
    pub out_layer: Linear,
}

impl MlpEmbedder {
    pub fn load(weights: &DitWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            in_layer: weights.linear(&format!("{prefix}.in_layer"))?,
            out_layer: weights.linear(&format!("{prefix}.out_layer"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer
            .forward(&candle_nn::ops::silu(&self.in_layer.forward(x)?)?)
    }
}
