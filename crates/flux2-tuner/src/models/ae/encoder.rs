//! The AE encoder (BFL `Encoder`, with `quant_conv` inside it as in the BFL file): `conv_in`, one
//! level per `ch_mult` entry (ResnetBlocks, then a Downsample except after the last), the mid
//! blocks, GroupNorm + swish, `conv_out` and `quant_conv`. Output: the moments [b, 2z, h/8, w/8].

use candle_core::Tensor;

use super::blocks::{AttnBlock, Downsample, ResnetBlock};
use super::config::AeConfig;
use super::layers::{AeWeights, Conv2d, GroupNorm, Padding};
use crate::error::Result;

/// One encoder level (`encoder.down.{i}`).
pub struct DownLevel {
    block: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

/// The mid blocks (`{encoder,decoder}.mid`): ResnetBlock, AttnBlock, ResnetBlock.
pub struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::load(weights, &format!("{prefix}.block_1"))?,
            attn_1: AttnBlock::load(weights, &format!("{prefix}.attn_1"))?,
            block_2: ResnetBlock::load(weights, &format!("{prefix}.block_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownLevel>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Conv2d,
}

impl Encoder {
    pub fn load(weights: &AeWeights, config: &AeConfig) -> Result<Self> {
        let levels = config.ch_mult.len();
        let down = (0..levels)
            .map(|level| {
                Ok(DownLevel {
                    block: (0..config.num_res_blocks)
                        .map(|b| {
                            ResnetBlock::load(weights, &format!("encoder.down.{level}.block.{b}"))
                        })
                        .collect::<Result<_>>()?,
                    downsample: if level + 1 != levels {
                        Some(Downsample::load(
                            weights,
                            &format!("encoder.down.{level}.downsample"),
                        )?)
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_in: Conv2d::load(weights, "encoder.conv_in")?,
            down,
            mid: MidBlock::load(weights, "encoder.mid")?,
            norm_out: GroupNorm::load(weights, "encoder.norm_out")?,
            conv_out: Conv2d::load(weights, "encoder.conv_out")?,
            quant_conv: Conv2d::load(weights, "encoder.quant_conv")?,
        })
    }

    /// Image [b, 3, H, W] in the compute dtype to moments [b, 2z, H/8, W/8].
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let same = Padding::uniform(1);
        let mut h = self.conv_in.forward(image, 1, same, false)?;
        for level in &self.down {
            for block in &level.block {
                h = block.forward(&h)?;
            }
            if let Some(downsample) = &level.downsample {
                h = downsample.forward(&h)?;
            }
        }
        h = self.mid.forward(&h)?;
        h = self
            .conv_out
            .forward_fused(&h, Some(&self.norm_out), 1, same, false, None)?;
        self.quant_conv.forward_pointwise(&h)
    }
}
