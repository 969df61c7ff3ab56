//! `y = x W^T` with a frozen weight: a custom op whose backward returns `dX` only, so that no
//! weight-sized gradient is ever computed or stored (a plain `matmul` computes both, rust-stack.md
//! §4.3). The forward is the backend's own matmul (gemm on CPU, cuBLAS on CUDA).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// `x W^T` with `W` frozen (detached: no gradient reaches it or anything it came from).
///
/// # Shapes
/// `x`: `[..., in]`; `weight`: `[out, in]` in `x`'s dtype; returns `[..., out]`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&in_features) || x.dtype() != weight.dtype() {
        return Err(Error::Shape(format!(
            "frozen_linear: x is {:?} {:?}, expected [..., {in_features}] {:?} for weight {:?}",
            dims,
            x.dtype(),
            weight.dtype(),
            weight.dims()
        )));
    }
    let rows = x.elem_count() / in_features.max(1);
    // A contiguous 2-D input is what both GEMM backends accept without copies.
    let x2 = x.reshape((rows, in_features))?.contiguous()?;
    let weight = weight.detach().contiguous()?;
    let y = x2.apply_op2(&weight, FrozenLinearOp)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok(y.reshape(out_dims)?)
}

struct FrozenLinearOp;

/// `[m, k] x [n, k]^T` through the backend's matmul, the weight read transposed in place.
pub(super) fn matmul_transposed<S: BackendStorage>(
    x: &S,
    x_layout: &Layout,
    weight: &S,
    weight_layout: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (rows, in_features) = x_layout.shape().dims2()?;
    let (out_features, _) = weight_layout.shape().dims2()?;
    let weight_t = weight_layout.transpose(0, 1)?;
    let y = x.matmul(
        weight,
        (1, rows, out_features, in_features),
        x_layout,
        &weight_t,
    )?;
    Ok((y, Shape::from((rows, out_features))))
}

impl CustomOp2 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "trainable-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        matmul_transposed(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        matmul_transposed(s1, l1, s2, l2)
    }

    /// `dX = dY W`; nothing for `W`.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        Ok((Some(grad.matmul(&weight.detach())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{check_gradients, random, relative_difference};
    use candle_core::{DType, Var};

    #[test]
    fn forward_matches_matmul() -> Result<()> {
        let x = random(&[2, 5, 12], 1, DType::F32)?;
        let weight = random(&[7, 12], 2, DType::F32)?;
        let expected = x.broadcast_matmul(&weight.t()?)?;
        assert!(relative_difference(&frozen_linear(&x, &weight)?, &expected)? < 1e-6);
        // A strided input (transposed view) is made contiguous first.
        let strided = random(&[5, 2, 12], 3, DType::F32)?.transpose(0, 1)?;
        let expected = strided.broadcast_matmul(&weight.t()?)?;
        assert!(relative_difference(&frozen_linear(&strided, &weight)?, &expected)? < 1e-6);
        let (x16, w16) = (x.to_dtype(DType::BF16)?, weight.to_dtype(DType::BF16)?);
        let expected16 = x16.broadcast_matmul(&w16.t()?)?;
        assert!(relative_difference(&frozen_linear(&x16, &w16)?, &expected16)? < 1e-2);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = random(&[2, 3, 6], 4, DType::F64)?;
        let weight = random(&[5, 6], 5, DType::F64)?;
        let error = check_gradients(&[x], |t| frozen_linear(&t[0], &weight))?;
        assert!(error < 1e-8, "relative error {error}");
        Ok(())
    }

    /// A plain matmul leaves a weight-sized gradient in the store; `frozen_linear` does not.
    #[test]
    fn leaves_no_weight_gradient_where_matmul_does() -> Result<()> {
        let x = Var::from_tensor(&random(&[4, 6], 6, DType::F32)?)?;
        let weight = random(&[5, 6], 7, DType::F32)?;
        let weight_t = weight.t()?;
        let plain = x.matmul(&weight_t)?.sum_all()?.backward()?;
        let frozen = frozen_linear(&x, &weight)?.sum_all()?.backward()?;
        let weight_sized = |store: &candle_core::backprop::GradStore| {
            store
                .get_ids()
                .filter_map(|id| store.get_id(*id))
                .filter(|g| g.elem_count() == weight.elem_count())
                .count()
        };
        assert!(plain.get(&weight_t).is_some());
        assert_eq!(weight_sized(&plain), 1);
        assert!(frozen.get(&weight).is_none());
        assert_eq!(weight_sized(&frozen), 0);
        assert_eq!(
            frozen.get_ids().count(),
            1,
            "only the input's gradient is stored"
        );
        let (a, b) = (plain.get(&x), frozen.get(&x));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("missing input gradient");
        };
        assert!(relative_difference(b, a)? < 1e-6);
        Ok(())
    }
}
