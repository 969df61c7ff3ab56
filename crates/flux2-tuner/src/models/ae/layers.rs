//! The AE's primitive layers: convolutions computed in horizontal strips (so that the padded, the
//! nearest-x2 upsampled or the im2col input never exists for a whole megapixel activation at
//! once) — on the CPU by the direct kernel of `direct`, which also takes the preceding GroupNorm +
//! swish and the following residual add —, GroupNorm with optional swish, and the loader that
//! reads them from a checkpoint in the compute dtype.

use candle_core::{DType, Device, Tensor};

use super::direct::{self, Geometry, InputTransform, PackedConvolution};
use super::kernels;
use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// Bytes of convolution input (after any upsampling and padding) handled per strip. Large enough
/// that strips keep many rows (halo overhead of a few percent), small enough to bound memory.
const STRIP_INPUT_BYTES: usize = 16 << 20;

/// Bytes of activation normalised per GroupNorm chunk.
const NORM_CHUNK_BYTES: usize = 64 << 20;

/// A checkpoint plus the device and dtype its tensors are loaded as.
pub struct AeWeights<'a> {
    pub checkpoint: &'a Checkpoint,
    pub device: Device,
    pub dtype: DType,
    pub num_groups: usize,
    pub group_norm_eps: f64,
}

impl AeWeights<'_> {
    /// Loads `key` in the compute dtype.
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.checkpoint.load(key, self.dtype, &self.device)
    }

    /// Loads `key` in f32 (statistics that must keep full precision).
    pub fn tensor_f32(&self, key: &str) -> Result<Tensor> {
        self.checkpoint.load(key, DType::F32, &self.device)
    }
}

/// Zero padding of a convolution input: rows above and below, columns left and right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// The same padding on every side.
    pub fn uniform(size: usize) -> Self {
        Self {
            top: size,
            bottom: size,
            left: size,
            right: size,
        }
    }
}

/// A 2-D convolution with bias (`{prefix}.weight` [out, in, k, k], `{prefix}.bias` [out]).
pub struct Conv2d {
    /// In the dtype the kernel runs in (see `widened`).
    weight: Tensor,
    bias: Tensor,
    /// The weight as a matrix [out, in] when the kernel is 1x1.
    pointwise: Option<Tensor>,
    /// The weights packed for the CPU kernel (`direct`), when the weight lives on the CPU.
    packed: Option<PackedConvolution>,
    /// The activation dtype when it differs from the kernel's: candle's CPU convolution has no
    /// bf16 kernel, so bf16 weights (already rounded) and inputs are widened to f32, multiplied
    /// with f32 accumulation (as GPU bf16 convolutions accumulate), and the output rounded back.
    widened: Option<DType>,
}

impl Conv2d {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        let weight = weights.tensor(&format!("{prefix}.weight"))?;
        let bias = weights.tensor(&format!("{prefix}.bias"))?;
        Self::new(weight, bias)
    }

    /// A convolution from its weight [out, in, k, k] and bias [out], computing in their dtype.
    pub fn new(mut weight: Tensor, mut bias: Tensor) -> Result<Self> {
        let dtype = weight.dtype();
        let widened = if weight.device().is_cpu() && dtype == DType::BF16 {
            weight = weight.to_dtype(DType::F32)?;
            bias = bias.to_dtype(DType::F32)?;
            Some(dtype)
        } else {
            None
        };
        let (out, input, kernel_h, kernel_w) = weight.dims4()?;
        let pointwise = if kernel_h == 1 && kernel_w == 1 {
            Some(weight.reshape((out, input))?)
        } else {
            None
        };
        let packed = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some(PackedConvolution::new(
                &weight.flatten_all()?.to_vec1::<f32>()?,
                &bias.to_vec1::<f32>()?,
                out,
                input,
            ))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            pointwise,
            packed,
            widened,
        })
    }

    /// `x` in the kernel's dtype.
    fn widen(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.weight.dtype())?)
    }

    /// `y` back in the activation dtype.
    fn narrow_output(&self, y: Tensor) -> Result<Tensor> {
        Ok(match self.widened {
            Some(dtype) => y.to_dtype(dtype)?,
            None => y,
        })
    }

    fn kernel_size(&self) -> usize {
        self.weight.dim(2).unwrap_or(1)
    }

    /// A 1x1 convolution as one matrix product over the pixels.
    pub fn forward_pointwise(&self, x: &Tensor) -> Result<Tensor> {
        let Some(matrix) = &self.pointwise else {
            return self.forward(x, 1, Padding::uniform(self.kernel_size() / 2), false);
        };
        let (batch, channels, height, width) = x.dims4()?;
        let out = matrix.dim(0)?;
        let flat = self.widen(&x.reshape((batch, channels, height * width))?)?;
        let y = matrix.broadcast_left(batch)?.matmul(&flat)?;
        let y = y.broadcast_add(&self.bias.reshape((1, out, 1))?)?;
        self.narrow_output(y.reshape((batch, out, height, width))?)
    }

    /// Convolves `x` (nearest-x2 upsampled first when `upsample`), zero-padded by `padding`, with
    /// stride `stride`. Output rows are computed in strips that each read only the input rows
    /// they need, so no full-size padded, upsampled or im2col copy of the input is made.
    pub fn forward(
        &self,
        x: &Tensor,
        stride: usize,
        padding: Padding,
        upsample: bool,
    ) -> Result<Tensor> {
        self.forward_fused(x, None, stride, padding, upsample, None)
    }

    /// [`Conv2d::forward`] of `swish(norm(x))` when `norm` is given, plus `residual` when given.
    /// On the CPU the GroupNorm + swish is applied while the convolution gathers its input and
    /// the residual added as it stores its output, so neither makes a full-size temporary.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        norm: Option<&GroupNorm>,
        stride: usize,
        padding: Padding,
        upsample: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_fused_in_strips(
            x,
            norm,
            stride,
            padding,
            upsample,
            residual,
            STRIP_INPUT_BYTES,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_fused_in_strips(
        &self,
        x: &Tensor,
        norm: Option<&GroupNorm>,
        stride: usize,
        padding: Padding,
        upsample: bool,
        residual: Option<&Tensor>,
        strip_bytes: usize,
    ) -> Result<Tensor> {
        let Some(packed) = self.packed.as_ref().filter(|_| x.device().is_cpu()) else {
            let mut h = match norm {
                Some(norm) => self.forward_in_strips(
                    &norm.forward(x, true)?,
                    stride,
                    padding,
                    upsample,
                    strip_bytes,
                )?,
                None => self.forward_in_strips(x, stride, padding, upsample, strip_bytes)?,
            };
            if let Some(residual) = residual {
                h = (residual + h)?;
            }
            return Ok(h);
        };
        let input = x.to_dtype(DType::F32)?.contiguous()?;
        let (batch, channels, height, width) = input.dims4()?;
        let geometry = Geometry {
            batch,
            channels,
            height,
            width,
            stride,
            padding,
            upsample,
        };
        // The residual is added in f32 only for f32 activations: a bf16 model adds the rounded
        // convolution output to the bf16 residual, as the reference does.
        let fused_residual = match residual {
            Some(residual) if x.dtype() == DType::F32 => Some(residual.contiguous()?),
            _ => None,
        };
        let (values, dims) = kernels::host_values(&input, |source| {
            let coefficients =
                norm.map(|norm| norm.coefficients(source, (batch, channels, height * width)));
            let transform = coefficients.as_ref().map(|(scale, shift)| InputTransform {
                scale,
                shift,
                swish: true,
                round_to_bf16: x.dtype() == DType::BF16,
            });
            let run = |residual: Option<&[f32]>| {
                direct::convolve(
                    source,
                    &geometry,
                    packed,
                    transform.as_ref(),
                    residual,
                    strip_bytes,
                )
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "convolution input {geometry:?} does not fit its {}-channel kernel and residual",
                        packed.out_channels()
                    ))
                    .into()
                })
            };
            match &fused_residual {
                Some(residual) => kernels::host_values(residual, |values| run(Some(values))),
                None => run(None),
            }
        })?;
        let y = self.narrow_output(Tensor::from_vec(values, dims.to_vec(), x.device())?)?;
        Ok(match residual {
            Some(residual) if fused_residual.is_none() => (residual + y)?,
            _ => y,
        })
    }

    /// [`Conv2d::forward`] with candle's convolution (the path off the CPU), with strips of
    /// about `strip_bytes` of input each.
    fn forward_in_strips(
        &self,
        x: &Tensor,
        stride: usize,
        padding: Padding,
        upsample: bool,
        strip_bytes: usize,
    ) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let (out_channels, _, kernel, _) = self.weight.dims4()?;
        let factor = if upsample { 2 } else { 1 };
        let (in_height, in_width) = (height * factor, width * factor);
        let padded_height = in_height + padding.top + padding.bottom;
        let padded_width = in_width + padding.left + padding.right;
        if padded_height < kernel || padded_width < kernel {
            return Err(candle_core::Error::Msg(format!(
                "convolution input {in_height}x{in_width} is smaller than its {kernel}x{kernel} kernel"
            ))
            .into());
        }
        let out_height = (padded_height - kernel) / stride + 1;
        let out_width = (padded_width - kernel) / stride + 1;
        let row_bytes =
            batch * channels * padded_width * self.weight.dtype().size_in_bytes() * stride;
        let rows_per_strip = (strip_bytes / row_bytes.max(1)).clamp(1, out_height);
        let bias = self.bias.reshape((1, out_channels, 1, 1))?;
        let mut output: Option<Tensor> = None;
        let mut row = 0;
        while row < out_height {
            let rows = rows_per_strip.min(out_height - row);
            // Rows of the padded input this strip reads, then the same in unpadded coordinates.
            let first = (row * stride) as isize - padding.top as isize;
            let last = ((row + rows - 1) * stride + kernel) as isize - padding.top as isize;
            let start = first.max(0) as usize;
            let end = (last.min(in_height as isize)).max(start as isize) as usize;
            let above = (start as isize - first) as usize;
            let below = (last - end as isize) as usize;
            let strip = if upsample {
                let source_start = start / 2;
                let source_end = end.div_ceil(2).max(source_start + 1).min(height);
                let source = x.narrow(2, source_start, source_end - source_start)?;
                let doubled = source
                    .contiguous()?
                    .upsample_nearest2d((source_end - source_start) * 2, width * 2)?;
                doubled.narrow(2, start - source_start * 2, end - start)?
            } else {
                x.narrow(2, start, end - start)?
            };
            let strip = self
                .widen(&strip.pad_with_zeros(2, above, below)?.pad_with_zeros(
                    3,
                    padding.left,
                    padding.right,
                )?)?
                .contiguous()?;
            let y = strip
                .conv2d(&self.weight, 0, stride, 1, 1)?
                .broadcast_add(&bias)?;
            let y = self.narrow_output(y)?;
            if row == 0 && rows == out_height {
                return Ok(y);
            }
            let target = match &output {
                Some(target) => target,
                None => output.insert(Tensor::zeros(
                    (batch, out_channels, out_height, out_width),
                    y.dtype(),
                    x.device(),
                )?),
            };
            target.slice_set(&y.contiguous()?, 2, row)?;
            row += rows;
        }
        output.ok_or_else(|| candle_core::Error::Msg("convolution produced no rows".into()).into())
    }
}

/// GroupNorm with affine weight and bias (`{prefix}.weight`, `{prefix}.bias`).
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    /// The same values in host memory, for the CPU kernel.
    host_weight: Vec<f32>,
    host_bias: Vec<f32>,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(weights: &AeWeights, prefix: &str) -> Result<Self> {
        let weight = weights.tensor_f32(&format!("{prefix}.weight"))?;
        let bias = weights.tensor_f32(&format!("{prefix}.bias"))?;
        Self::new(weight, bias, weights.num_groups, weights.group_norm_eps)
    }

    /// A GroupNorm from its f32 weight and bias [c].
    pub fn new(weight: Tensor, bias: Tensor, num_groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            host_weight: weight.to_device(&candle_core::Device::Cpu)?.to_vec1()?,
            host_bias: bias.to_device(&candle_core::Device::Cpu)?.to_vec1()?,
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// One `(scale, shift)` per (batch, channel) of `input` (f32 values of `(batch, channels,
    /// pixels)`) such that `input * scale + shift` is this GroupNorm's output.
    pub fn coefficients(
        &self,
        input: &[f32],
        shape: (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        kernels::group_norm_coefficients(
            input,
            shape,
            &self.host_weight,
            &self.host_bias,
            self.num_groups,
            self.eps,
        )
    }

    /// Normalises `x` [b, c, h, w] per group (statistics in f32), then applies the affine
    /// transform and, when `swish`, `x * sigmoid(x)`. Works a few groups at a time so that the
    /// f32 temporaries stay small; the result has the dtype of `x`.
    pub fn forward(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
        if x.device().is_cpu() {
            let input = x.to_dtype(DType::F32)?.contiguous()?;
            let y = kernels::group_norm(
                &input,
                &self.host_weight,
                &self.host_bias,
                self.num_groups,
                self.eps,
                swish,
            )?;
            return Ok(y.to_dtype(x.dtype())?);
        }
        let (batch, channels, height, width) = x.dims4()?;
        let per_group = channels / self.num_groups;
        let group_bytes = batch * per_group * height * width * 4;
        let groups_per_chunk = (NORM_CHUNK_BYTES / group_bytes.max(1)).clamp(1, self.num_groups);
        let mut output: Option<Tensor> = None;
        let mut group = 0;
        while group < self.num_groups {
            let groups = groups_per_chunk.min(self.num_groups - group);
            let chunk_channels = groups * per_group;
            let first_channel = group * per_group;
            let chunk = x
                .narrow(1, first_channel, chunk_channels)?
                .to_dtype(DType::F32)?
                .reshape((batch, groups, per_group * height * width))?;
            let mean = chunk.mean_keepdim(2)?;
            let centered = chunk.broadcast_sub(&mean)?;
            let variance = centered.sqr()?.mean_keepdim(2)?;
            let normalised = centered
                .broadcast_div(&(variance + self.eps)?.sqrt()?)?
                .reshape((batch, chunk_channels, height, width))?;
            let weight = self
                .weight
                .narrow(0, first_channel, chunk_channels)?
                .reshape((1, chunk_channels, 1, 1))?;
            let bias = self
                .bias
                .narrow(0, first_channel, chunk_channels)?
                .reshape((1, chunk_channels, 1, 1))?;
            let mut y = normalised.broadcast_mul(&weight)?.broadcast_add(&bias)?;
            if swish {
                y = y.silu()?;
            }
            let y = y.to_dtype(x.dtype())?;
            if groups == self.num_groups {
                return Ok(y);
            }
            let target = match &output {
                Some(target) => target,
                None => output.insert(Tensor::zeros(x.dims(), x.dtype(), x.device())?),
            };
            target.slice_set(&y, 1, first_channel)?;
            group += groups;
        }
        output
            .ok_or_else(|| candle_core::Error::Msg("group norm produced no channels".into()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    fn random(rng: &mut SeededRng, shape: &[usize]) -> Tensor {
        let count = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(count), shape, &Device::Cpu).unwrap()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Strips of one, two and all rows, with and without the fused upsample, stride 1 and 2,
    /// agree with candle's direct convolution of the fully padded (and upsampled) input.
    #[test]
    fn strips_match_a_whole_convolution() {
        let mut rng = SeededRng::new(3);
        let x = random(&mut rng, &[2, 5, 7, 6]);
        let conv = Conv2d::new(random(&mut rng, &[4, 5, 3, 3]), random(&mut rng, &[4])).unwrap();
        let bias = conv.bias.reshape((1, 4, 1, 1)).unwrap();
        let downsample = Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        let cases = [
            (1, Padding::uniform(1), false),
            (1, Padding::uniform(1), true),
            (2, downsample, false),
        ];
        for (stride, padding, upsample) in cases {
            let input = if upsample {
                x.upsample_nearest2d(14, 12).unwrap()
            } else {
                x.clone()
            };
            let padded = input
                .pad_with_zeros(2, padding.top, padding.bottom)
                .unwrap()
                .pad_with_zeros(3, padding.left, padding.right)
                .unwrap();
            let expected = padded
                .conv2d(&conv.weight, 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let padded_width = input.dim(3).unwrap() + padding.left + padding.right;
            let row_bytes = 2 * 5 * padded_width * 4 * stride;
            for rows in [1, 2, 1000] {
                let y = conv
                    .forward_in_strips(&x, stride, padding, upsample, rows * row_bytes)
                    .unwrap();
                let difference = max_difference(&y, &expected);
                assert!(
                    difference < 1e-5,
                    "stride {stride} upsample {upsample} rows {rows}: {difference}"
                );
                let y = conv
                    .forward_fused_in_strips(
                        &x,
                        None,
                        stride,
                        padding,
                        upsample,
                        None,
                        rows * row_bytes,
                    )
                    .unwrap();
                let difference = max_difference(&y, &expected);
                assert!(
                    difference < 1e-5,
                    "direct: stride {stride} upsample {upsample} rows {rows}: {difference}"
                );
            }
        }
    }

    /// The fused CPU GroupNorm (+ swish) agrees with the formula computed with plain tensor ops.
    #[test]
    fn group_norm_matches_the_formula() {
        let mut rng = SeededRng::new(4);
        let x = (random(&mut rng, &[2, 8, 5, 3]) * 3.0)
            .unwrap()
            .affine(1.0, 2.0)
            .unwrap();
        let weight = random(&mut rng, &[8]);
        let bias = random(&mut rng, &[8]);
        let norm = GroupNorm {
            host_weight: weight.to_vec1().unwrap(),
            host_bias: bias.to_vec1().unwrap(),
            weight: weight.clone(),
            bias: bias.clone(),
            num_groups: 4,
            eps: 1e-6,
        };
        let grouped = x.reshape((2, 4, 30)).unwrap();
        let mean = grouped.mean_keepdim(2).unwrap();
        let centered = grouped.broadcast_sub(&mean).unwrap();
        let variance = centered.sqr().unwrap().mean_keepdim(2).unwrap();
        let normalised = centered
            .broadcast_div(&(variance + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((2, 8, 5, 3))
            .unwrap()
            .broadcast_mul(&weight.reshape((1, 8, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&bias.reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let plain = norm.forward(&x, false).unwrap();
        assert!(max_difference(&plain, &normalised) < 1e-5);
        let swish = norm.forward(&x, true).unwrap();
        assert!(max_difference(&swish, &normalised.silu().unwrap()) < 1e-5);
    }
}
