//! Hand-written CPU f32 kernels for the AE's two hot spots, each writing its output once instead
//! of through a chain of full-size temporaries (on a megapixel activation every temporary is
//! hundreds of MB of freshly faulted pages):
//! * a stride-1 convolution as one accumulating GEMM per kernel tap over the flattened padded
//!   input (no im2col copy);
//! * GroupNorm (statistics in f64) fused with the affine transform and swish.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::host::with_data;

fn slice(storage: &candle_core::CpuStorage, offset: usize, length: usize) -> Result<&[f32]> {
    let values = storage.as_slice::<f32>()?;
    values
        .get(offset..offset + length)
        .ok_or_else(|| Error::Shape("host kernel input shorter than its shape".into()))
}

/// Stride-1 convolution of a padded strip `[b, c, rows + k - 1, width + k - 1]` (contiguous
/// f32) with `taps[ky * k + kx]` = weight[:, :, ky, kx] as contiguous `[out, c]` matrices, plus
/// `bias` `[out]`. The input of tap (ky, kx) for all outputs is the contiguous run of the flattened
/// strip starting at `ky * padded_width + kx`; outputs are computed on the padded width and the
/// `k - 1` extra columns of each row dropped when adding the bias.
pub fn shifted_convolution(
    strip: &Tensor,
    taps: &[Tensor],
    bias: &Tensor,
    kernel: usize,
) -> Result<Tensor> {
    let (batch, channels, padded_rows, padded_width) = strip.dims4()?;
    let out_channels = bias.dim(0)?;
    let rows = padded_rows + 1 - kernel;
    let width = padded_width + 1 - kernel;
    let plane = padded_rows * padded_width;
    let length = rows * padded_width - (kernel - 1);
    let threads = rayon::current_num_threads();
    let mut full = vec![0f32; batch * out_channels * rows * padded_width];
    with_data(strip, |input, input_offset| {
        let input = slice(input, input_offset, batch * channels * plane)?;
        for (t, tap) in taps.iter().enumerate() {
            let (ky, kx) = (t / kernel, t % kernel);
            with_data(tap, |weights, weight_offset| {
                let weights = slice(weights, weight_offset, out_channels * channels)?;
                for b in 0..batch {
                    let source = &input[b * channels * plane + ky * padded_width + kx..];
                    let target = &mut full[b * out_channels * rows * padded_width..];
                    // SAFETY: lhs [out, c] row-major; rhs [c, length] with row stride `plane`,
                    // whose last element `(c - 1) * plane + length - 1 + ky * pw + kx` lies inside
                    // this batch's input; dst [out, length] with row stride `rows * pw`.
                    unsafe {
                        gemm::gemm(
                            out_channels,
                            length,
                            channels,
                            target.as_mut_ptr(),
                            1,
                            (rows * padded_width) as isize,
                            t > 0,
                            weights.as_ptr(),
                            1,
                            channels as isize,
                            source.as_ptr(),
                            1,
                            plane as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            if threads > 1 {
                                gemm::Parallelism::Rayon(threads)
                            } else {
                                gemm::Parallelism::None
                            },
                        );
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    })?;
    let biases = bias.to_vec1::<f32>()?;
    let mut out = vec![0f32; batch * out_channels * rows * width];
    out.par_chunks_mut(rows * width)
        .zip(full.par_chunks(rows * padded_width))
        .enumerate()
        .for_each(|(index, (target, source))| {
            let bias = biases[index % out_channels];
            for (target_row, source_row) in target
                .chunks_exact_mut(width)
                .zip(source.chunks(padded_width))
            {
                for (t, s) in target_row.iter_mut().zip(source_row) {
                    *t = s + bias;
                }
            }
        });
    Ok(Tensor::from_vec(
        out,
        (batch, out_channels, rows, width),
        &Device::Cpu,
    )?)
}

/// GroupNorm over `[b, c, h, w]` (contiguous f32) with `groups` groups, then `x * weight + bias`
/// per channel and, when `swish`, `x * sigmoid(x)`. Mean and variance are accumulated in f64.
pub fn group_norm(
    x: &Tensor,
    weight: &[f32],
    bias: &[f32],
    groups: usize,
    eps: f64,
    swish: bool,
) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let per_group = channels / groups;
    let spatial = height * width;
    let block = per_group * spatial;
    let mut out = vec![0f32; batch * channels * spatial];
    with_data(x, |storage, offset| {
        let input = slice(storage, offset, batch * channels * spatial)?;
        out.par_chunks_mut(block)
            .zip(input.par_chunks(block))
            .enumerate()
            .for_each(|(index, (target, source))| {
                let count = source.len() as f64;
                let mean = source.iter().map(|&v| v as f64).sum::<f64>() / count;
                let variance = source
                    .iter()
                    .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                    .sum::<f64>()
                    / count;
                let inverse = 1.0 / (variance + eps).sqrt();
                let group = index % groups;
                for (c, (target, source)) in target
                    .chunks_exact_mut(spatial)
                    .zip(source.chunks_exact(spatial))
                    .enumerate()
                {
                    let channel = group * per_group + c;
                    let scale = (weight[channel] as f64 * inverse) as f32;
                    let shift =
                        (bias[channel] as f64 - mean * weight[channel] as f64 * inverse) as f32;
                    if swish {
                        for (t, &s) in target.iter_mut().zip(source) {
                            let y = s * scale + shift;
                            *t = y / (1.0 + (-y).exp());
                        }
                    } else {
                        for (t, &s) in target.iter_mut().zip(source) {
                            *t = s * scale + shift;
                        }
                    }
                }
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(
        out,
        (batch, channels, height, width),
        &Device::Cpu,
    )?)
}
