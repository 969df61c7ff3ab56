//! SwiGLU `silu(a) * b` with `a, b` the two halves of the last axis (BFL `SiLUActivation`, the
//! FLUX.2 MLP). Composed from candle ops, whose backward (including `silu`'s) reaches the input.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// `silu(x[..., :h]) * x[..., h:]` with `h` half the last axis.
///
/// # Shapes
/// `x`: `[..., 2h]`; returns `[..., h]`.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if width % 2 != 0 {
        return Err(Error::Shape(format!(
            "swiglu: last axis of {:?} is odd, expected gate and value halves",
            x.dims()
        )));
    }
    let gate = x.narrow(D::Minus1, 0, width / 2)?;
    let value = x.narrow(D::Minus1, width / 2, width / 2)?;
    Ok((gate.silu()? * value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{check_gradients, random};
    use candle_core::{DType, Device};

    #[test]
    fn forward_matches_formula() -> Result<()> {
        let x = Tensor::new(&[[1f32, -2.0, 3.0, 0.5]], &Device::Cpu)?;
        let y: Vec<f32> = swiglu(&x)?.flatten_all()?.to_vec1()?;
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert!((y[0] - silu(1.0) * 3.0).abs() < 1e-6 && (y[1] - silu(-2.0) * 0.5).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = random(&[2, 3, 8], 1, DType::F64)?;
        let error = check_gradients(&[x], |t| swiglu(&t[0]))?;
        assert!(error < 1e-7, "relative error {error}");
        Ok(())
    }
}
