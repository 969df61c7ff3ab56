//! Rotary position embedding on interleaved pairs `(x[2i], x[2i+1])` with precomputed cos/sin
//! tables (the convention of `nn::rope::RopeTables::apply`), recording its own backward: the
//! transpose of a rotation is the rotation by the opposite angle.

use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::storage::{compute_dtype, storage_from, tensor_from, DeviceStorage};
use crate::error::{Error, Result};

/// Rotates `x` by the angles whose cosines and sines are `cos` and `sin`; computed in f32,
/// returned in `x`'s dtype. The tables are frozen (detached).
///
/// # Shapes
/// `x`: `[b, heads, l, d]`; `cos`, `sin`: `[b, l, d / 2]` (or `[l, d / 2]`).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, length, head_dim) = x.dims4()?;
    let expected_last = head_dim / 2;
    for (name, table) in [("cos", cos), ("sin", sin)] {
        let dims = table.dims();
        let fits = dims.len() >= 2
            && dims[dims.len() - 1] == expected_last
            && dims[dims.len() - 2] == length;
        if !fits || head_dim % 2 != 0 {
            return Err(Error::Shape(format!(
                "apply_rope: {name} table has shape {dims:?}, expected [.., {length}, {expected_last}] for x {:?}",
                x.dims()
            )));
        }
    }
    let compute = compute_dtype(x.dtype());
    let op = RopeOp {
        cos: cos.detach().to_dtype(compute)?.contiguous()?,
        sin: sin.detach().to_dtype(compute)?.contiguous()?,
    };
    Ok(x.apply_op1(op)?)
}

struct RopeOp {
    cos: Tensor,
    sin: Tensor,
}

/// Rotation of `x` (contiguous, compute dtype) and the result in `dtype`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
}

impl RopeOp {
    fn forward_on<S: DeviceStorage>(
        &self,
        storage: &S,
        layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let dtype = storage.dtype();
        let x = tensor_from(storage, layout, self.cos.dtype())?;
        storage_from(&rotate(&x, &self.cos, &self.sin)?, dtype)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "trainable-rope"
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

    /// `dx = R(-angle) g`: the same rotation with `sin` negated.
    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.to_dtype(self.cos.dtype())?;
        let dx = rotate(&grad, &self.cos, &self.sin.neg()?)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::rope::RopeTables;
    use crate::nn::trainable::test_support::{check_gradients, random, relative_difference};
    use candle_core::{DType, Device};

    fn tables(batch: usize, length: usize) -> Result<RopeTables> {
        let ids: Vec<i64> = (0..batch * length * 4)
            .map(|i| (i * 7 % 13) as i64)
            .collect();
        let ids = Tensor::from_vec(ids, (batch, length, 4), &Device::Cpu)?;
        RopeTables::new(&ids, &[2, 2, 2, 4], 2000.0)
    }

    /// The composed reference: pairs as a trailing axis of 2, rotated with differentiable ops.
    fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        let pairs = x.to_dtype(DType::F32)?.reshape((b, h, l, d / 2, 2))?;
        let even = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let odd = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let cos = cos.unsqueeze(1)?;
        let sin = sin.unsqueeze(1)?;
        let rotated_even = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
        let rotated_odd = (even.broadcast_mul(&sin)? + odd.broadcast_mul(&cos)?)?;
        let out = Tensor::stack(&[rotated_even, rotated_odd], 4)?.reshape((b, h, l, d))?;
        Ok(out.to_dtype(x.dtype())?)
    }

    #[test]
    fn forward_matches_reference_and_existing_rope() -> Result<()> {
        let tables = tables(2, 5)?;
        let x = random(&[2, 3, 5, 10], 1, DType::F32)?;
        let ours = apply_rope(&x, &tables.cos, &tables.sin)?;
        assert!(relative_difference(&ours, &reference(&x, &tables.cos, &tables.sin)?)? < 1e-6);
        assert!(relative_difference(&ours, &tables.apply(&x)?)? < 1e-7);
        // Strided input (a transposed view) goes through the same path.
        let strided = random(&[2, 5, 3, 10], 2, DType::F32)?.transpose(1, 2)?;
        let ours = apply_rope(&strided, &tables.cos, &tables.sin)?;
        assert!(relative_difference(&ours, &tables.apply(&strided)?)? < 1e-7);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let tables = tables(1, 4)?;
        let cos = tables.cos.to_dtype(DType::F64)?;
        let sin = tables.sin.to_dtype(DType::F64)?;
        let x = random(&[1, 2, 4, 10], 3, DType::F64)?;
        let error = check_gradients(&[x], |t| apply_rope(&t[0], &cos, &sin))?;
        assert!(error < 1e-8, "relative error {error}");
        Ok(())
    }

    #[test]
    fn rejects_mismatched_tables() -> Result<()> {
        let tables = tables(1, 4)?;
        let x = random(&[1, 2, 5, 10], 4, DType::F32)?;
        let error = apply_rope(&x, &tables.cos, &tables.sin).unwrap_err();
        assert!(
            error.to_string().contains("cos table has shape [1, 4, 5]"),
            "{error}"
        );
        Ok(())
    }
}
