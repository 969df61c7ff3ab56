//! Normalisations used by the DiT: LayerNorm without affine parameters and RMSNorm, both computed
//! in f32 whatever the activation dtype (as Musubi under autocast).

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::nn::fused;
use crate::nn::host::is_plain_cpu;

/// LayerNorm over the last axis without weight or bias, in f32. Returns f32.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    if crate::nn::grad_mode::enabled() {
        let zeros = Tensor::zeros(
            (x.dim(0)?, 1, x.dim(candle_core::D::Minus1)?),
            DType::F32,
            x.device(),
        )?;
        return crate::nn::trainable::modulated_layer_norm(&x, &zeros, &zeros, eps);
    }
    let width = x.dim(candle_core::D::Minus1)?;
    let ones = Tensor::ones(width, DType::F32, x.device())?;
    let zeros = Tensor::zeros(width, DType::F32, x.device())?;
    Ok(candle_nn::ops::layer_norm(
        &x.contiguous()?,
        &ones,
        &zeros,
        eps as f32,
    )?)
}

/// RMSNorm over the last axis: normalise in f32, round to `x`'s dtype, then multiply by `scale`
/// (the order of BFL's `RMSNorm`).
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::nn::grad_mode::enabled() {
        return crate::nn::trainable::rms_norm(x, scale, eps);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let width = x32.dim(candle_core::D::Minus1)?;
    let ones = Tensor::ones(width, DType::F32, x.device())?;
    let normalised = candle_nn::ops::rms_norm(&x32, &ones, eps as f32)?.to_dtype(dtype)?;
    Ok(normalised.broadcast_mul(&scale.to_dtype(dtype)?)?)
}

/// `(1 + scale) * LayerNorm(x) + shift`, in f32, returned in `dtype`.
///
/// # Shapes
/// `x`: `[b, l, c]`; `shift`, `scale`: `[b, 1, c]` (f32).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, dtype: DType) -> Result<Tensor> {
    if crate::nn::grad_mode::enabled() {
        let x32 = x.to_dtype(DType::F32)?;
        return Ok(
            crate::nn::trainable::modulated_layer_norm(&x32, shift, scale, 1e-6)?
                .to_dtype(dtype)?,
        );
    }
    if x.dtype() == dtype && is_plain_cpu(&[x, shift, scale]) {
        return fused::modulate(x, shift, scale, 1e-6);
    }
    let normalised = layer_norm(x, 1e-6)?;
    let scaled = normalised.broadcast_mul(&(scale + 1.0)?)?;
    Ok(scaled.broadcast_add(shift)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_has_zero_mean_unit_variance() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 6.0]], &Device::Cpu)?;
        let y: Vec<f32> = layer_norm(&x, 1e-6)?.flatten_all()?.to_vec1()?;
        let mean = y.iter().sum::<f32>() / 4.0;
        let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{y:?}");
        Ok(())
    }

    #[test]
    fn rms_norm_matches_its_formula() -> Result<()> {
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
        let scale = Tensor::new(&[2f32, 0.5], &Device::Cpu)?;
        let y: Vec<f32> = rms_norm(&x, &scale, 0.0)?.flatten_all()?.to_vec1()?;
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 2.0 * 3.0 / rms).abs() < 1e-6 && (y[1] - 0.5 * 4.0 / rms).abs() < 1e-6);
        Ok(())
    }
}
