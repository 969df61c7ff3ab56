//! Helpers for the op tests: seeded random tensors, relative differences and a central-difference
//! gradient check.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::util::rng::SeededRng;

/// Standard-normal values of `shape` from `seed`, on the CPU.
pub(crate) fn random(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let count = shape.iter().product();
    let values = SeededRng::new(seed).normal_vec(count);
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// `|a - b| / |b|` (Frobenius norms, in f64).
pub(crate) fn relative_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let difference = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(difference / norm.max(f64::MIN_POSITIVE))
}

/// Checks the gradients of `loss = sum(f(inputs) * w)` (a fixed random `w`) with respect to every
/// input against central differences `(loss(x + h) - loss(x - h)) / 2h`, element by element.
/// Returns the largest relative error `|analytic - numeric| / |numeric|` over the inputs.
pub(crate) fn check_gradients(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<f64> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tracked)?;
    let weights = random(out.dims(), 0x5eed, out.dtype())?;
    let grads = (&out * &weights)?.sum_all()?.backward()?;
    let loss = |values: &[Tensor]| -> Result<f64> {
        Ok((f(values)? * &weights)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let step = if inputs[0].dtype() == DType::F64 {
        1e-5
    } else {
        1e-2
    };
    let mut worst = 0f64;
    for (index, var) in vars.iter().enumerate() {
        let analytic: Vec<f64> = match grads.get(var) {
            Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
            None => vec![0.0; var.elem_count()],
        };
        let base: Vec<f64> = inputs[index]
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let mut numeric = Vec::with_capacity(base.len());
        for element in 0..base.len() {
            let shifted = |delta: f64| -> Result<f64> {
                let mut values = base.clone();
                values[element] += delta;
                let mut trial = inputs.to_vec();
                trial[index] = Tensor::from_vec(values, inputs[index].dims(), &Device::Cpu)?
                    .to_dtype(inputs[index].dtype())?;
                loss(&trial)
            };
            numeric.push((shifted(step)? - shifted(-step)?) / (2.0 * step));
        }
        let difference: f64 = analytic
            .iter()
            .zip(&numeric)
            .map(|(a, n)| (a - n) * (a - n))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = numeric.iter().map(|n| n * n).sum::<f64>().sqrt();
        assert!(
            norm > 1e-8,
            "input {index}: the numeric gradient is zero, the test proves nothing"
        );
        worst = worst.max(difference / norm);
    }
    Ok(worst)
}
