//! `y = x W^T` for f32 activations and a frozen bf16 weight: the CPU half of bf16 mixed-precision
//! training.
//!
//! Why f32 activations: candle's CPU bf16 element-wise kernels (and with them every gradient
//! accumulation of its backward, a bf16 add per graph edge) run several times slower than f32, so
//! a graph of bf16 activations spent most of a training step adding gradients. With the
//! activations in f32, only the matrix products see bf16: both operands are rounded to bf16 (as
//! PyTorch's autocast does) and multiplied on AMX tiles with f32 accumulation; the result stays
//! f32 (autocast would round it). Forward and backward (`dX = dY W`) both take this path; the
//! weight gets no gradient. Without AMX the weight is widened and candle's f32 matmul is used.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use super::bf16_products::rounded;
use crate::error::{Error, Result};
use crate::nn::amx::{self, PackedB};

/// `x W^T` with `x` `[rows, in]` f32 and `W` `[out, in]` bf16 (frozen), both contiguous CPU
/// tensors; returns f32 `[rows, out]`.
pub fn bf16_weight_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (rows, in_features) = x.dims2()?;
    let (_, weight_in) = weight.dims2()?;
    if in_features != weight_in || x.dtype() != DType::F32 || weight.dtype() != DType::BF16 {
        return Err(Error::Shape(format!(
            "bf16_weight_linear: x {:?} {:?} and weight {:?} {:?}; expected f32 [rows, in] and bf16 [out, in]",
            x.dims(),
            x.dtype(),
            weight.dims(),
            weight.dtype()
        )));
    }
    if rows == 0 {
        return Ok(Tensor::zeros((0, weight.dim(0)?), DType::F32, x.device())?);
    }
    let weight = weight.detach().contiguous()?;
    Ok(x.contiguous()?.apply_op2(&weight, ForwardOp)?)
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(values) if layout.is_contiguous() => Ok(&values[layout.start_offset()..]),
        _ => candle_core::bail!("bf16_weight_linear: expected a contiguous f32 operand"),
    }
}

fn bf16_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [bf16]> {
    match storage {
        CpuStorage::BF16(values) if layout.is_contiguous() => Ok(&values[layout.start_offset()..]),
        _ => candle_core::bail!("bf16_weight_linear: expected a contiguous bf16 weight"),
    }
}

/// `A B` for `A` `[rows, k]` f32 (rounded to bf16) and `B` packed `[k, n]`; `None` without AMX.
fn amx_product(a: &[f32], rows: usize, k: usize, b: &PackedB, n: usize) -> Option<Vec<f32>> {
    if !amx::available() {
        return None;
    }
    let a = rounded(&a[..rows * k]);
    let mut out = vec![0f32; rows * n];
    amx::multiply(&a, rows, k, b, n, &mut out, |v| v).then_some(out)
}

/// Without AMX: both operands rounded to bf16 as on the AMX path, widened to f32, and candle's
/// matmul (`transposed`: `x W^T`, else `x W`).
fn widened_product(
    a: &[f32],
    rows: usize,
    weight: &[bf16],
    out_features: usize,
    in_features: usize,
    transposed: bool,
) -> candle_core::Result<Vec<f32>> {
    let device = candle_core::Device::Cpu;
    let weight: Vec<f32> = weight[..out_features * in_features]
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let weight = Tensor::from_vec(weight, (out_features, in_features), &device)?;
    let (k, weight) = if transposed {
        (in_features, weight.t()?)
    } else {
        (out_features, weight)
    };
    let a: Vec<f32> = rounded(&a[..rows * k]).iter().map(|v| v.to_f32()).collect();
    let a = Tensor::from_vec(a, (rows, k), &device)?;
    a.matmul(&weight)?.flatten_all()?.to_vec1::<f32>()
}

struct ForwardOp;

impl CustomOp2 for ForwardOp {
    fn name(&self) -> &'static str {
        "trainable-bf16-weight-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_features) = l1.shape().dims2()?;
        let (out_features, _) = l2.shape().dims2()?;
        let (x, weight) = (f32_slice(s1, l1)?, bf16_slice(s2, l2)?);
        // W^T as the right operand: element (i, o) = W[o, i].
        let y = match amx::available() {
            true => {
                let packed = PackedB::new(weight, in_features, out_features, 1, in_features);
                amx_product(x, rows, in_features, &packed, out_features)
            }
            false => None,
        };
        let y = match y {
            Some(y) => y,
            None => widened_product(x, rows, weight, out_features, in_features, true)?,
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, out_features))))
    }

    /// `dX = dY W` on the same path; nothing for `W`.
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
        let grad = grad.contiguous()?;
        Ok((Some(grad.apply_op2_no_bwd(weight, &InputGradientOp)?), None))
    }
}

/// `dY W` for `dY` `[rows, out]` f32 and `W` `[out, in]` bf16.
struct InputGradientOp;

impl CustomOp2 for InputGradientOp {
    fn name(&self) -> &'static str {
        "trainable-bf16-weight-linear-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out_features) = l1.shape().dims2()?;
        let (_, in_features) = l2.shape().dims2()?;
        let (grad, weight) = (f32_slice(s1, l1)?, bf16_slice(s2, l2)?);
        // W as the right operand `[out, in]`: element (o, i) = W[o * in + i].
        let dx = match amx::available() {
            true => {
                let packed = PackedB::new(weight, out_features, in_features, in_features, 1);
                amx_product(grad, rows, out_features, &packed, in_features)
            }
            false => None,
        };
        let dx = match dx {
            Some(dx) => dx,
            None => widened_product(grad, rows, weight, out_features, in_features, false)?,
        };
        Ok((CpuStorage::F32(dx), Shape::from((rows, in_features))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{random, relative_difference};
    use candle_core::Var;

    /// Forward and input gradient against f32 products of the bf16-rounded operands.
    #[test]
    fn matches_f32_products_of_rounded_operands() -> Result<()> {
        let x = Var::from_tensor(&random(&[70, 96], 1, DType::F32)?)?;
        let weight = random(&[45, 96], 2, DType::F32)?.to_dtype(DType::BF16)?;
        let weight32 = weight.to_dtype(DType::F32)?;
        let x_rounded = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let y = bf16_weight_linear(&x, &weight)?;
        let expected = x_rounded.matmul(&weight32.t()?)?;
        let forward_error = relative_difference(&y, &expected)?;
        assert!(forward_error < 1e-5, "forward {forward_error}");

        let upstream = random(&[70, 45], 3, DType::F32)?;
        let store = (y * &upstream)?.sum_all()?.backward()?;
        let dx = store.get(&x).expect("input gradient");
        let upstream_rounded = upstream.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let expected_dx = upstream_rounded.matmul(&weight32)?;
        let backward_error = relative_difference(dx, &expected_dx)?;
        assert!(backward_error < 1e-5, "backward {backward_error}");
        assert!(
            store.get(&weight).is_none(),
            "the frozen weight got a gradient"
        );
        Ok(())
    }
}
