//! F8E4M3 weights with Musubi's block-wise scale (`--fp8_scaled`, M-fp8
//! `optimize_state_dict_with_fp8`): one scale per output row and block of 64 input values,
//! `scale = max|W_block| / 448` (clamped to at least 1e-8), `Wq = clamp(W / scale, -448, 448)`
//! stored as F8E4M3 and dequantised as `Wq * scale` on use. Plain `--fp8` casts without a scale.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Input values per scale block.
pub const BLOCK_SIZE: usize = 64;
/// Largest finite F8E4M3 value.
pub const FP8_MAX: f64 = 448.0;

/// How the DiT's block linears are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fp8Mode {
    /// The compute dtype (bf16 or f32).
    #[default]
    Off,
    /// Plain cast to F8E4M3 (`--fp8`).
    Plain,
    /// Block-wise scaled F8E4M3 (`--fp8_scaled`).
    Scaled,
}

/// A quantised weight: F8E4M3 values and, when scaled, f32 scales `[out, in / 64, 1]` (or
/// `[out, 1, 1]` for widths that are not multiples of 64).
#[derive(Debug, Clone)]
pub struct Fp8Weight {
    pub values: Tensor,
    pub scale: Option<Tensor>,
}

/// Quantises `[out, in]` `weight` block-wise (scaled) or by a plain cast.
pub fn quantize(weight: &Tensor, mode: Fp8Mode) -> Result<Fp8Weight> {
    let (out_features, in_features) = weight.dims2()?;
    let weight = weight.to_dtype(DType::F32)?;
    match mode {
        Fp8Mode::Off => Err(Error::InvalidArgument {
            name: "fp8".into(),
            message: "quantize called with fp8 off".into(),
        }),
        Fp8Mode::Plain => Ok(Fp8Weight {
            values: weight.clamp(-FP8_MAX, FP8_MAX)?.to_dtype(DType::F8E4M3)?,
            scale: None,
        }),
        Fp8Mode::Scaled => {
            // Musubi falls back to one scale per output row when the width is not a multiple of
            // the block (never the case for the real models; it is for small test models).
            let block = if in_features % BLOCK_SIZE == 0 {
                BLOCK_SIZE
            } else {
                in_features
            };
            let blocks = weight.reshape((out_features, in_features / block, block))?;
            let scale = (blocks.abs()?.max_keepdim(D::Minus1)? / FP8_MAX)?.clamp(1e-8, f64::MAX)?;
            let values = blocks
                .broadcast_div(&scale)?
                .clamp(-FP8_MAX, FP8_MAX)?
                .reshape((out_features, in_features))?
                .to_dtype(DType::F8E4M3)?;
            Ok(Fp8Weight {
                values,
                scale: Some(scale),
            })
        }
    }
}

impl Fp8Weight {
    /// The dequantised `[out, in]` weight in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let values = self.values.to_dtype(DType::F32)?;
        let weight = match &self.scale {
            Some(scale) => {
                let (out_features, in_features) = values.dims2()?;
                let blocks = scale.dim(1)?;
                values
                    .reshape((out_features, blocks, in_features / blocks))?
                    .broadcast_mul(scale)?
                    .reshape((out_features, in_features))?
            }
            None => values,
        };
        Ok(weight.to_dtype(dtype)?)
    }
}

/// Musubi's fp8 targets: block linears (`double_blocks`/`single_blocks`, `.weight`), never norms,
/// embedders, the global modulations or the final layer.
pub fn is_fp8_target(key: &str) -> bool {
    (key.contains("double_blocks") || key.contains("single_blocks"))
        && key.ends_with(".weight")
        && !["norm", "pe_embedder", "time_in", "_modulation"]
            .iter()
            .any(|excluded| key.contains(excluded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Block-wise scaling keeps every block's relative error at F8E4M3's resolution (3 mantissa
    /// bits: half a step is 1/16 of the value, at most 6.25 %) even when blocks differ in size by
    /// 1e6, where a plain cast flushes the small block to zero.
    #[test]
    fn scaled_fp8_keeps_small_blocks() -> Result<()> {
        let device = Device::Cpu;
        let mut rng = crate::util::rng::SeededRng::new(9);
        let mut normals = |std: f32| -> Result<Tensor> {
            let values: Vec<f32> = rng
                .normal_vec(4 * 64)
                .into_iter()
                .map(|v| v * std)
                .collect();
            Ok(Tensor::from_vec(values, (4, 64), &device)?)
        };
        let large = normals(100.0)?;
        // Below half of F8E4M3's smallest subnormal (2^-9): a plain cast flushes it to zero.
        let small = normals(1e-4)?;
        let weight = Tensor::cat(&[&large, &small], 1)?;
        let scaled = quantize(&weight, Fp8Mode::Scaled)?.dequantize(DType::F32)?;
        for (start, block) in [(0, &large), (64, &small)] {
            let restored = scaled.narrow(1, start, 64)?;
            let error = (&restored - block)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = block.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                error <= size / 16.0 + 1e-12,
                "block at {start}: {error} of {size}"
            );
        }
        let plain = quantize(&weight, Fp8Mode::Plain)?.dequantize(DType::F32)?;
        let small_plain = plain
            .narrow(1, 64, 64)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(small_plain, 0.0, "plain cast kept {small_plain}");
        Ok(())
    }

    #[test]
    fn targets_match_musubi() {
        assert!(is_fp8_target("double_blocks.0.img_attn.qkv.weight"));
        assert!(is_fp8_target("single_blocks.3.linear2.weight"));
        assert!(!is_fp8_target(
            "double_blocks.0.img_attn.norm.query_norm.scale"
        ));
        assert!(!is_fp8_target("double_stream_modulation_img.lin.weight"));
        assert!(!is_fp8_target("final_layer.linear.weight"));
        assert!(!is_fp8_target("img_in.weight"));
    }
}
