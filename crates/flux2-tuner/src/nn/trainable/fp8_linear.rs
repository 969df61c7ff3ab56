//! `y = x W^T` with a frozen F8E4M3 weight stored with Musubi's block-wise scales
//! (`--fp8_base --fp8_scaled` training; Musubi's patched Linear computes
//! `F.linear(x, Wq.to(dtype) * scale)`). As [`frozen_linear`](super::frozen_linear), the backward
//! returns `dX` only. Unlike `frozen_linear` on a dequantised copy, the graph keeps the F8E4M3
//! values and scales (the model's own tensors), not a full-precision copy of every layer's weight
//! until the backward: `dX = dY W` dequantises the weight again.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::frozen_linear::matmul_transposed;
use super::storage::{tensor_from, DeviceStorage};
use crate::error::{Error, Result};

/// `x dequantise(values, scale)^T`, nothing flowing to `values` or `scale`.
///
/// # Shapes
/// `x`: `[..., in]` (bf16, f32 or f64); `values`: `[out, in]` F8E4M3; `scale`: `[out, blocks, 1]`
/// with `in` a multiple of `blocks` (`quant::quantize`'s layout); returns `[..., out]` in `x`'s
/// dtype.
pub fn fp8_frozen_linear(x: &Tensor, values: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = values.dims2()?;
    let dims = x.dims().to_vec();
    let scale_fits =
        matches!(scale.dims(), [o, b, 1] if *o == out_features && *b > 0 && in_features % *b == 0);
    if dims.last() != Some(&in_features) || values.dtype() != DType::F8E4M3 || !scale_fits {
        return Err(Error::Shape(format!(
            "fp8_frozen_linear: x is {dims:?}, values {:?} {:?}, scale {:?}; expected \
             [..., {in_features}], F8E4M3 [out, in] and [out, blocks, 1] with in a multiple of blocks",
            values.dims(),
            values.dtype(),
            scale.dims()
        )));
    }
    let rows = x.elem_count() / in_features.max(1);
    let x2 = x.reshape((rows, in_features))?.contiguous()?;
    let y = x2.apply_op3(&values.detach(), &scale.detach(), Fp8FrozenLinearOp)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok(y.reshape(out_dims)?)
}

/// The `[out, in]` weight `values * scale` (per block of `in / blocks` inputs) in `dtype`: the
/// same operations as `quant::Fp8Weight::dequantize`, so training and inference see the same
/// weight.
fn dequantize(values: &Tensor, scale: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (out_features, in_features) = values.dims2()?;
    let blocks = scale.dim(1)?;
    values
        .to_dtype(DType::F32)?
        .reshape((out_features, blocks, in_features / blocks))?
        .broadcast_mul(&scale.to_dtype(DType::F32)?)?
        .reshape((out_features, in_features))?
        .to_dtype(dtype)
}

struct Fp8FrozenLinearOp;

fn forward<S: DeviceStorage>(
    x: &S,
    x_layout: &Layout,
    values: &S,
    values_layout: &Layout,
    scale: &S,
    scale_layout: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let weight = dequantize(
        &tensor_from(values, values_layout, DType::F32)?,
        &tensor_from(scale, scale_layout, DType::F32)?,
        x.dtype(),
    )?;
    let (storage, layout) = weight.storage_and_layout();
    let weight_storage = S::find(&storage).ok_or_else(|| {
        candle_core::Error::Msg("fp8_frozen_linear: weight on another backend".into())
    })?;
    matmul_transposed(x, x_layout, weight_storage, layout)
}

impl CustomOp3 for Fp8FrozenLinearOp {
    fn name(&self) -> &'static str {
        "trainable-fp8-frozen-linear"
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
        forward(s1, l1, s2, l2, s3, l3)
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
        forward(s1, l1, s2, l2, s3, l3)
    }

    /// `dX = dY dequantise(values, scale)`; nothing for the weight.
    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        scale: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let weight = dequantize(&values.detach(), &scale.detach(), grad.dtype())?;
        Ok((Some(grad.matmul(&weight)?), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::frozen_linear;
    use crate::nn::trainable::test_support::{check_gradients, random};
    use crate::quant::{quantize, Fp8Mode};
    use candle_core::Var;

    /// Forward and input gradient equal (bit for bit) `frozen_linear` on the weight that
    /// `quant::Fp8Weight::dequantize` returns; no gradient reaches the values or the scales.
    #[test]
    fn matches_frozen_linear_on_the_dequantised_weight() -> Result<()> {
        let weight = random(&[10, 128], 1, DType::F32)?;
        let quantized = quantize(&weight, Fp8Mode::Scaled)?;
        let Some(scale) = quantized.scale.clone() else {
            panic!("scaled quantisation without a scale");
        };
        assert_eq!(scale.dims(), &[10, 2, 1]);
        for dtype in [DType::F32, DType::BF16] {
            let dense = quantized.dequantize(dtype)?;
            let x = Var::from_tensor(&random(&[2, 3, 128], 2, dtype)?)?;
            let ours = fp8_frozen_linear(&x, &quantized.values, &scale)?;
            let reference = frozen_linear(&x, &dense)?;
            let upstream = random(&[2, 3, 10], 3, dtype)?;
            let ours_grads = (&ours * &upstream)?.sum_all()?.backward()?;
            let reference_grads = (&reference * &upstream)?.sum_all()?.backward()?;
            let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
                let difference = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?;
                Ok(difference.abs()?.max_all()?.to_scalar::<f64>()? == 0.0)
            };
            assert!(same(&ours, &reference)?, "{dtype:?} forward differs");
            let (Some(a), Some(b)) = (ours_grads.get(&x), reference_grads.get(&x)) else {
                panic!("missing input gradient");
            };
            assert!(same(a, b)?, "{dtype:?} input gradient differs");
            assert!(ours_grads.get(&quantized.values).is_none());
            assert!(ours_grads.get(&scale).is_none());
            // Activations have gradients, nothing has the weight's or the scales' size.
            for id in ours_grads.get_ids() {
                let count = ours_grads.get_id(*id).map_or(0, Tensor::elem_count);
                assert!(count != 10 * 128 && count != 20, "a weight-sized gradient");
            }
        }
        Ok(())
    }

    /// The input gradient against central differences (f64 input, per-row scales: `in` = 72 is
    /// not a multiple of 64).
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let quantized = quantize(&random(&[5, 72], 4, DType::F64)?, Fp8Mode::Scaled)?;
        let Some(scale) = quantized.scale else {
            panic!("scaled quantisation without a scale");
        };
        assert_eq!(scale.dims(), &[5, 1, 1]);
        let x = random(&[2, 3, 72], 5, DType::F64)?;
        let error = check_gradients(&[x], |t| {
            fp8_frozen_linear(&t[0], &quantized.values, &scale)
        })?;
        assert!(error < 1e-8, "relative error {error}");
        Ok(())
    }

    #[test]
    fn rejects_a_scale_that_does_not_fit() -> Result<()> {
        let quantized = quantize(&random(&[4, 128], 6, DType::F32)?, Fp8Mode::Scaled)?;
        let x = random(&[3, 128], 7, DType::F32)?;
        let wrong = Tensor::ones((4, 3, 1), DType::F32, &candle_core::Device::Cpu)?;
        let error = fp8_frozen_linear(&x, &quantized.values, &wrong).unwrap_err();
        assert!(error.to_string().contains("scale [4, 3, 1]"), "{error}");
        Ok(())
    }
}
