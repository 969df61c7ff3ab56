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
        // The GroupNorm + swish of each convolution's input and the residual are fused into it.
        let h = self
            .conv1
            .forward_fused(x, Some(&self.norm1), 1, same, false, None)?;
        let residual = match &self.nin_shortcut {
            Some(shortcut) => shortcut.forward_pointwise(x)?,
            None => x.clone(),
        };
        self.conv2
            .forward_fused(&h, Some(&self.norm2), 1, same, false, Some(&residual))
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
        self.forward_in_chunks(x, QUERY_CHUNK)
    }

    /// [`AttnBlock::forward`] with `chunk` query rows at a time.
    fn forward_in_chunks(&self, x: &Tensor, chunk: usize) -> Result<Tensor> {
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
        let mut pieces = Vec::with_capacity(tokens.div_ceil(chunk));
        let mut start = 0;
        while start < tokens {
            let length = chunk.min(tokens - start);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;
    use candle_core::Device;

    /// Chunked attention equals single-head attention written out in full.
    #[test]
    fn attention_chunks_match_the_full_product() {
        let mut rng = SeededRng::new(5);
        let mut random = |shape: &[usize]| {
            Tensor::from_vec(rng.normal_vec(shape.iter().product()), shape, &Device::Cpu).unwrap()
        };
        let channels = 4;
        let x = random(&[1, channels, 3, 5]);
        let mut conv = || {
            let weight = (random(&[channels, channels, 1, 1]) * 0.5).unwrap();
            Conv2d::new(weight, random(&[channels])).unwrap()
        };
        let (q, k, v, proj_out) = (conv(), conv(), conv(), conv());
        let norm_weight = random(&[channels]);
        let norm_bias = random(&[channels]);
        let norm = GroupNorm::new(norm_weight, norm_bias, 2, 1e-6).unwrap();
        let block = AttnBlock {
            norm,
            q,
            k,
            v,
            proj_out,
        };
        // The same computation without chunks: softmax(q^T k / sqrt(c)) over all 15 keys.
        let h = block.norm.forward(&x, false).unwrap();
        let flat = |t: Tensor| t.reshape((channels, 15)).unwrap();
        let qm = flat(block.q.forward_pointwise(&h).unwrap());
        let km = flat(block.k.forward_pointwise(&h).unwrap());
        let vm = flat(block.v.forward_pointwise(&h).unwrap());
        let scores = (qm.t().unwrap().matmul(&km).unwrap() * 0.5).unwrap();
        let probabilities = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let attended = vm
            .matmul(&probabilities.t().unwrap())
            .unwrap()
            .reshape((1, channels, 3, 5))
            .unwrap();
        let expected = (&x + block.proj_out.forward_pointwise(&attended).unwrap()).unwrap();
        for chunk in [1, 4, 15, 1024] {
            let y = block.forward_in_chunks(&x, chunk).unwrap();
            let difference: f32 = (y - &expected)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(difference < 1e-5, "chunk {chunk}: {difference}");
        }
    }
}
