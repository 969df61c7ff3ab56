//! The AE decoder (BFL `Decoder`, with `post_quant_conv` inside it as in the BFL file):
//! `post_quant_conv`, `conv_in`, the mid blocks, the levels deepest first (ResnetBlocks, then an
//! Upsample except after level 0), GroupNorm + swish and `conv_out`.

use candle_core::Tensor;

use super::blocks::{ResnetBlock, Upsample};
use super::config::AeConfig;
use super::encoder::MidBlock;
use super::layers::{AeWeights, Conv2d, GroupNorm, Padding};
use crate::error::Result;

/// One decoder level (`decoder.up.{i}`).
pub struct UpLevel {
    block: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

pub struct Decoder {
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid: MidBlock,
    /// Indexed as in the file: `up[0]` is the shallowest level and runs last.
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn load(weights: &AeWeights, config: &AeConfig) -> Result<Self> {
        let up = (0..config.ch_mult.len())
            .map(|level| {
                Ok(UpLevel {
                    block: (0..=config.num_res_blocks)
                        .map(|b| {
                            ResnetBlock::load(weights, &format!("decoder.up.{level}.block.{b}"))
                        })
                        .collect::<Result<_>>()?,
                    upsample: if level != 0 {
                        Some(Upsample::load(
                            weights,
                            &format!("decoder.up.{level}.upsample"),
                        )?)
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            post_quant_conv: Conv2d::load(weights, "decoder.post_quant_conv")?,
            conv_in: Conv2d::load(weights, "decoder.conv_in")?,
            mid: MidBlock::load(weights, "decoder.mid")?,
            up,
            norm_out: GroupNorm::load(weights, "decoder.norm_out")?,
            conv_out: Conv2d::load(weights, "decoder.conv_out")?,
        })
    }

    /// Latents [b, z, h, w] in the compute dtype to an image [b, 3, 8h, 8w] (unclamped).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let same = Padding::uniform(1);
        let h = self.post_quant_conv.forward_pointwise(z)?;
        let h = self.conv_in.forward(&h, 1, same, false)?;
        let mut h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            for block in &level.block {
                h = block.forward(&h)?;
            }
            if let Some(upsample) = &level.upsample {
                h = upsample.forward(&h)?;
            }
        }
        self.conv_out
            .forward_fused(&h, Some(&self.norm_out), 1, same, false, None)
    }
}
