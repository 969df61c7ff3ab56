//! Hand-written CPU f32 GroupNorm for the AE: statistics in f64, folded into one scale and shift
//! per (batch, channel), then applied with swish in one pass that writes its output once instead
//! of through a chain of full-size temporaries (on a megapixel activation every temporary is
//! hundreds of MB of freshly faulted pages). The convolutions take the scale and shift directly
//! (see `direct`), so most GroupNorms never write their output at all.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::direct::{apply_transform, InputTransform};
use crate::error::{Error, Result};
use crate::nn::host::{vectorised, with_data};

fn slice(storage: &candle_core::CpuStorage, offset: usize, length: usize) -> Result<&[f32]> {
    let values = storage.as_slice::<f32>()?;
    values
        .get(offset..offset + length)
        .ok_or_else(|| Error::Shape("host kernel input shorter than its shape".into()))
}

/// Calls `f` with the values of a contiguous f32 CPU tensor.
pub fn host_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_data(x, |storage, offset| {
        f(slice(storage, offset, x.elem_count())?)
    })
}

/// The f64 sum of `term(value)` over `values`, compiled for AVX-512 where the CPU has it.
fn lane_sum(values: &[f32], term: impl Fn(f64) -> f64) -> f64 {
    vectorised(
        #[inline(always)]
        || crate::nn::host::lane_sum(values, |v| term(v as f64)),
    )
}

/// GroupNorm of `input` `[b, c, h, w]` (f32) with `groups` groups followed by `x * weight + bias`
/// per channel, as one `(scale, shift)` per (batch, channel): `y = x * scale + shift`. Mean and
/// variance are accumulated in f64.
pub fn group_norm_coefficients(
    input: &[f32],
    (batch, channels, spatial): (usize, usize, usize),
    weight: &[f32],
    bias: &[f32],
    groups: usize,
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    let per_group = channels / groups;
    let block = per_group * spatial;
    let coefficients: Vec<(f32, f32)> = input[..batch * channels * spatial]
        .par_chunks(block)
        .enumerate()
        .flat_map_iter(|(index, source)| {
            let count = source.len() as f64;
            let mean = lane_sum(source, |v| v) / count;
            let variance = lane_sum(source, |v| (v - mean) * (v - mean)) / count;
            let inverse = 1.0 / (variance + eps).sqrt();
            let group = index % groups;
            (0..per_group).map(move |c| {
                let channel = group * per_group + c;
                let scale = weight[channel] as f64 * inverse;
                (scale as f32, (bias[channel] as f64 - mean * scale) as f32)
            })
        })
        .collect();
    coefficients.into_iter().unzip()
}

/// GroupNorm over `[b, c, h, w]` (contiguous f32) with `groups` groups, then `x * weight + bias`
/// per channel and, when `swish`, `x * sigmoid(x)`.
pub fn group_norm(
    x: &Tensor,
    weight: &[f32],
    bias: &[f32],
    groups: usize,
    eps: f64,
    swish: bool,
) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let spatial = height * width;
    let mut out = vec![0f32; batch * channels * spatial];
    host_values(x, |input| {
        let (scale, shift) =
            group_norm_coefficients(input, (batch, channels, spatial), weight, bias, groups, eps);
        let transform = InputTransform {
            scale: &scale,
            shift: &shift,
            swish,
            round_to_bf16: false,
        };
        out.par_chunks_mut(spatial)
            .zip(input.par_chunks(spatial))
            .enumerate()
            .for_each(|(index, (target, source))| {
                target.copy_from_slice(source);
                apply_transform(target, scale[index], shift[index], &transform);
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(
        out,
        (batch, channels, height, width),
        &Device::Cpu,
    )?)
}
