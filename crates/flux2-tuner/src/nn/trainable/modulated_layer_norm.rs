//! adaLN modulation `(1 + scale) * LayerNorm(x) + shift`, LayerNorm over the last axis without
//! affine parameters, computed in f32 (BFL `DoubleStreamBlock`/`SingleStreamBlock` pre-norms,
//! `nn::norm::modulate`), recording its own backward for `x`, `shift` and `scale`.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::storage::{compute_dtype, storage_from, sum_to_shape, tensor_from, DeviceStorage};
use crate::error::{Error, Result};

/// `(1 + scale) * LayerNorm(x) + shift`, returned in `x`'s dtype.
///
/// # Shapes
/// `x`: `[b, l, c]`; `shift`, `scale`: broadcastable to `x`, usually `[b, 1, c]` (any float dtype).
pub fn modulated_layer_norm(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    for (name, parameter) in [("shift", shift), ("scale", scale)] {
        if parameter.broadcast_as(x.shape()).is_err() {
            return Err(Error::Shape(format!(
                "modulated_layer_norm: {name} has shape {:?}, expected one broadcastable to x {:?}",
                parameter.dims(),
                x.dims()
            )));
        }
    }
    Ok(x.apply_op3(shift, scale, ModulatedLayerNormOp { eps })?)
}

struct ModulatedLayerNormOp {
    eps: f64,
}

/// LayerNorm without affine parameters in `x`'s dtype (f32 or f64).
fn normalise(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F64 {
        // candle-nn's kernel accumulates in f32; keep f64 exact for the gradient tests.
        let (centred, inverse_std) = centred_and_inverse_std(x, eps)?;
        centred.broadcast_mul(&inverse_std)
    } else {
        let width = x.dim(D::Minus1)?;
        let ones = Tensor::ones(width, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(width, x.dtype(), x.device())?;
        candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps as f32)
    }
}

/// `x - mean(x)` and `(var(x) + eps)^-1/2` over the last axis.
fn centred_and_inverse_std(x: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let inverse_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((centred, inverse_std))
}

impl ModulatedLayerNormOp {
    fn forward_on<S: DeviceStorage>(
        &self,
        x: (&S, &Layout),
        shift: (&S, &Layout),
        scale: (&S, &Layout),
    ) -> candle_core::Result<(S, Shape)> {
        let dtype = x.0.dtype();
        let compute = compute_dtype(dtype);
        let input = tensor_from(x.0, x.1, compute)?;
        let shift = tensor_from(shift.0, shift.1, compute)?;
        let scale = tensor_from(scale.0, scale.1, compute)?;
        let out = normalise(&input, self.eps)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        storage_from(&out, dtype)
    }
}

impl CustomOp3 for ModulatedLayerNormOp {
    fn name(&self) -> &'static str {
        "trainable-modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward_on((s1, l1), (s2, l2), (s3, l3))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.forward_on((s1, l1), (s2, l2), (s3, l3))
    }

    /// With `n = LayerNorm(x)`, `r = (var(x) + eps)^-1/2` and `g' = g (1 + scale)`:
    /// `dshift = sum g`, `dscale = sum g n` (over the broadcast axes) and
    /// `dx = r (g' - mean(g') - n mean(g' n))`. Untracked arguments get no gradient computed.
    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let compute = compute_dtype(x.dtype());
        let grad = grad.to_dtype(compute)?;
        let input = x.detach().to_dtype(compute)?;
        let (centred, inverse_std) = centred_and_inverse_std(&input, self.eps)?;
        let normalised = centred.broadcast_mul(&inverse_std)?;
        let shift_grad = if shift.track_op() {
            Some(sum_to_shape(&grad, shift.shape())?.to_dtype(shift.dtype())?)
        } else {
            None
        };
        let scale_grad = if scale.track_op() {
            let product = (&grad * &normalised)?;
            Some(sum_to_shape(&product, scale.shape())?.to_dtype(scale.dtype())?)
        } else {
            None
        };
        let x_grad = if x.track_op() {
            let one_plus_scale = (scale.detach().to_dtype(compute)? + 1.0)?;
            let grad = grad.broadcast_mul(&one_plus_scale)?;
            let mean = grad.mean_keepdim(D::Minus1)?;
            let projection = (&grad * &normalised)?.mean_keepdim(D::Minus1)?;
            let centred_grad = grad
                .broadcast_sub(&mean)?
                .sub(&normalised.broadcast_mul(&projection)?)?;
            Some(
                centred_grad
                    .broadcast_mul(&inverse_std)?
                    .to_dtype(x.dtype())?,
            )
        } else {
            None
        };
        Ok((x_grad, shift_grad, scale_grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{check_gradients, random, relative_difference};

    /// The composed reference: the formula with candle's differentiable ops, in f32.
    fn reference(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let (centred, inverse_std) = centred_and_inverse_std(&x32, eps)?;
        let normalised = centred.broadcast_mul(&inverse_std)?;
        let out = normalised
            .broadcast_mul(&(scale.to_dtype(DType::F32)? + 1.0)?)?
            .broadcast_add(&shift.to_dtype(DType::F32)?)?;
        Ok(out.to_dtype(x.dtype())?)
    }

    #[test]
    fn forward_matches_reference_and_existing_modulate() -> Result<()> {
        let x = random(&[2, 7, 32], 1, DType::F32)?;
        let shift = random(&[2, 1, 32], 2, DType::F32)?;
        let scale = random(&[2, 1, 32], 3, DType::F32)?;
        let ours = modulated_layer_norm(&x, &shift, &scale, 1e-6)?;
        assert!(relative_difference(&ours, &reference(&x, &shift, &scale, 1e-6)?)? < 1e-6);
        let existing = crate::nn::norm::modulate(&x, &shift, &scale, DType::F32)?;
        assert!(relative_difference(&ours, &existing)? < 1e-6);
        let x16 = x.to_dtype(DType::BF16)?;
        let ours16 = modulated_layer_norm(&x16, &shift, &scale, 1e-6)?;
        assert_eq!(ours16.dtype(), DType::BF16);
        let existing16 = crate::nn::norm::modulate(&x16, &shift, &scale, DType::BF16)?;
        assert!(relative_difference(&ours16, &existing16)? < 1e-2);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let x = random(&[2, 3, 6], 4, DType::F64)?;
        let shift = random(&[2, 1, 6], 5, DType::F64)?;
        let scale = random(&[2, 1, 6], 6, DType::F64)?;
        let error = check_gradients(&[x, shift, scale], |t| {
            modulated_layer_norm(&t[0], &t[1], &t[2], 1e-6)
        })?;
        assert!(error < 1e-7, "relative error {error}");
        Ok(())
    }

    #[test]
    fn rejects_parameters_that_do_not_broadcast() -> Result<()> {
        let x = random(&[2, 3, 6], 7, DType::F32)?;
        let shift = random(&[2, 1, 5], 8, DType::F32)?;
        let error = modulated_layer_norm(&x, &shift, &shift, 1e-6).unwrap_err();
        assert!(
            error.to_string().contains("shift has shape [2, 1, 5]"),
            "{error}"
        );
        Ok(())
    }
}
