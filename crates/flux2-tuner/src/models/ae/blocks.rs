//! The AE building blocks of BFL's `flux2/autoencoder.py` (LDM layout): ResnetBlock, AttnBlock,
//! Downsample and Upsample, with field names matching the checkpoint key segments.

use candle_core::{DType, Tensor, D};

use super::layers::{AeWeights, Conv2d, GroupNorm, Padding};
use crate::error::Result;

/// Query rows of the mid-block attention computed at once: bounds the score matrix to
/// `QUERY_CHUNK x tokens` (a 1024x1024 image has 16384 mid-block tokens).
const QUERY_CHUNK: usize = 1024;

/// `x + conv2(swish(norm2(conv1(swish(norm1(x))))))`, the residual through `nin_shortcut` when
/// the channel count changes.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        let shortcut = format!("{prefix}.nin_shortcut.weight");
        Ok(Self {
            norm1: GroupNorm::load(weights, &format!("{prefix}.norm1"))?,
            conv1: Conv2d::load(weights, &format!("{prefix}.conv1"))?,
            norm2: GroupNorm::load(weights, &format!("{prefix}.norm2"))?,
            conv2: Conv2d::load(weights, &format!("{prefix}.conv2"))?,
            nin_shortcut: if weights.checkpoint.entry(&shortcut).is_some() {
                Some(Conv2d::load(weights, &format!("{prefix}.nin_shortcut"))?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let same = Padding::uniform(1);
        let h = self.norm1.forward(x, true)?;
        let h = self.conv1.forward(&h, 1, same, false)?;
        let h = self.norm2.forward(&h, true)?;
        let h = self.conv2.forward(&h, 1, same, false)?;
        let residual = match &self.nin_shortcut {
            Some(shortcut) => shortcut.forward_pointwise(x)?,
            None => x.clone(),
        };
        Ok((residual + h)?)
    }
}

/// Single-head self-attention over the pixels with 1x1-conv projections, plus the residual.
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(weights, &format!("{prefix}.norm"))?,
            q: Conv2d::load(weights, &format!("{prefix}.q"))?,
            k: Conv2d::load(weights, &format!("{prefix}.k"))?,
            v: Conv2d::load(weights, &format!("{prefix}.v"))?,
            proj_out: Conv2d::load(weights, &format!("{prefix}.proj_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let tokens = height * width;
        let h = self.norm.forward(x, false)?;
        // q as [b, tokens, c], k as [b, c, tokens], v as [b, c, tokens].
        let q = self
            .q
            .forward_pointwise(&h)?
            .reshape((batch, channels, tokens))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k
            .forward_pointwise(&h)?
            .reshape((batch, channels, tokens))?;
        let v = self
            .v
            .forward_pointwise(&h)?
            .reshape((batch, channels, tokens))?;
        drop(h);
        let scale = 1.0 / (channels as f64).sqrt();
        let mut pieces = Vec::with_capacity(tokens.div_ceil(QUERY_CHUNK));
        let mut start = 0;
        while start < tokens {
            let length = QUERY_CHUNK.min(tokens - start);
            let scores = (q.narrow(1, start, length)?.matmul(&k)? * scale)?;
            // Softmax in f32 whatever the compute dtype.
            let probabilities = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())?;
            // [b, c, tokens] x [b, tokens, length] -> [b, c, length]
            pieces.push(v.matmul(&probabilities.transpose(1, 2)?)?);
            start += length;
        }
        let attended =
            Tensor::cat(&pieces, D::Minus1)?.reshape((batch, channels, height, width))?;
        Ok((x + self.proj_out.forward_pointwise(&attended)?)?)
    }
}

/// Zero-pad right and bottom by one, then a 3x3 convolution with stride 2.
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(weights, &format!("{prefix}.conv"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padding = Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        self.conv.forward(x, 2, padding, false)
    }
}

/// Nearest-neighbour x2, then a 3x3 convolution (fused, strip by strip).
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(weights, &format!("{prefix}.conv"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x, 1, Padding::uniform(1), true)
    }
}
