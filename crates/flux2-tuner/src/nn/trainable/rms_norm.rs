//! RMSNorm over the last axis with a frozen scale (BFL `RMSNorm`, used as QK-norm): normalise in
//! f32, round to the input dtype, multiply by the scale. Mirrors `nn::norm::rms_norm`, but records
//! its own backward (candle-nn's fused `rms_norm` drops the gradient).

use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use super::storage::{compute_dtype, storage_from, tensor_from, DeviceStorage};
use crate::error::Result;

/// `round_to_dtype(x / sqrt(mean(x^2) + eps)) * scale`, gradient with respect to `x` only.
///
/// # Shapes
/// `x`: `[..., c]`; `scale`: `[c]`. Returns `x`'s shape and dtype. `scale` is frozen: it is
/// detached, so no gradient reaches it or anything it was computed from.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNormOp {
        scale: scale.detach(),
        eps,
    };
    Ok(x.apply_op1(op)?)
}

struct RmsNormOp {
    scale: Tensor,
    eps: f64,
}

/// `x * (mean(x^2) + eps)^-1/2` in `x`'s dtype (f32 or f64).
fn normalise(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F64 {
        // candle-nn's kernel accumulates in f32; keep f64 exact for the gradient tests.
        let inverse_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inverse_rms)
    } else {
        let ones = Tensor::ones(x.dim(D::Minus1)?, x.dtype(), x.device())?;
        candle_nn::ops::rms_norm(&x.contiguous()?, &ones, eps as f32)
    }
}

impl RmsNormOp {
    fn forward_on<S: DeviceStorage>(
        &self,
        storage: &S,
        layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let dtype = storage.dtype();
        let x = tensor_from(storage, layout, compute_dtype(dtype))?;
        let normalised = normalise(&x, self.eps)?.to_dtype(dtype)?;
        let out = normalised.broadcast_mul(&self.scale.to_dtype(dtype)?)?;
        storage_from(&out, dtype)
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "trainable-rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward_on(storage, layout)
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.forward_on(storage, layout)
    }

    /// With `r = (mean(x^2) + eps)^-1/2`, `n = x r` and `g' = g * scale`:
    /// `dx = r (g' - n mean(g' n))`. The rounding to the input dtype is passed straight through.
    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let input_dtype = x.dtype();
        let dtype = compute_dtype(input_dtype);
        let x = x.detach().to_dtype(dtype)?;
        let grad = grad
            .to_dtype(dtype)?
            .broadcast_mul(&self.scale.to_dtype(dtype)?)?;
        let inverse_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normalised = x.broadcast_mul(&inverse_rms)?;
        let projection = (&grad * &normalised)?.mean_keepdim(D::Minus1)?;
        let centred = (grad - normalised.broadcast_mul(&projection)?)?;
        let dx = centred.broadcast_mul(&inverse_rms)?;
        // The gradient of an input has the input's dtype (the shadowed `x` is f32).
        Ok(Some(dx.to_dtype(input_dtype)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{check_gradients, random, relative_difference};
    use candle_core::Device;

    /// The composed reference: the formula with candle's differentiable ops.
    fn reference(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let inverse_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let normalised = x32.broadcast_mul(&inverse_rms)?.to_dtype(dtype)?;
        Ok(normalised.broadcast_mul(&scale.to_dtype(dtype)?)?)
    }

    #[test]
    fn forward_matches_reference_and_existing_norm() -> Result<()> {
        let x = random(&[2, 3, 5, 16], 1, DType::F32)?;
        let scale = random(&[16], 2, DType::F32)?;
        let ours = rms_norm(&x, &scale, 1e-6)?;
        assert!(relative_difference(&ours, &reference(&x, &scale, 1e-6)?)? < 1e-6);
        let existing = crate::nn::norm::rms_norm(&x, &scale, 1e-6)?;
        assert!(relative_difference(&ours, &existing)? < 1e-6);
        // bf16: normalise in f32, round, multiply in bf16, exactly as the reference.
        let x16 = x.to_dtype(DType::BF16)?;
        let ours16 = rms_norm(&x16, &scale, 1e-6)?;
        assert_eq!(ours16.dtype(), DType::BF16);
        assert!(relative_difference(&ours16, &reference(&x16, &scale, 1e-6)?)? < 1e-2);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = random(&[2, 3, 8], 3, DType::F64)?;
        let scale = random(&[8], 4, DType::F64)?;
        let error = check_gradients(&[x], |inputs| rms_norm(&inputs[0], &scale, 1e-6))?;
        assert!(error < 1e-7, "relative error {error}");
        Ok(())
    }

    #[test]
    fn frozen_scale_gets_no_gradient() -> Result<()> {
        let x = candle_core::Var::from_tensor(&random(&[3, 4], 5, DType::F32)?)?;
        let scale = candle_core::Var::from_tensor(&random(&[4], 6, DType::F32)?)?;
        let grads = rms_norm(&x, &scale, 1e-6)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&scale).is_none());
        assert_eq!(x.device().location(), Device::Cpu.location());
        Ok(())
    }
}
