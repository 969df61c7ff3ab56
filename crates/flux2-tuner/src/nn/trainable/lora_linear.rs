//! A frozen base linear with one trainable LoRA pair, the training counterpart of
//! `nn::Linear` + `LoraAdapter` (Musubi `LoRAModule.forward`: `base(x) + up(down(x)) * alpha / rank`).
//! The base goes through [`frozen_linear`], so the backward never computes the base weight's
//! gradient; `lora_down`/`lora_up` are f32 `Var`s cast to the activation dtype, whose backward
//! (`to_dtype`) brings their gradients back in f32.

use candle_core::{Tensor, Var};

use super::frozen_linear::frozen_linear;
use crate::error::{Error, Result};

/// `y = x W^T + scale * (x down^T) up^T` with `W` frozen.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `[out, in]`, frozen, in the activation dtype.
    pub weight: Tensor,
    /// `[rank, in]`, f32 master weights.
    pub lora_down: Var,
    /// `[out, rank]`, f32 master weights.
    pub lora_up: Var,
    /// `multiplier * alpha / rank`.
    pub scale: f64,
}

impl LoraLinear {
    /// Checks that the shapes chain (`weight [out, in]`, `lora_down [rank, in]`,
    /// `lora_up [out, rank]`); `scale` is `alpha / rank`.
    pub fn new(weight: Tensor, lora_down: Var, lora_up: Var, alpha: f64) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let (rank, down_in) = lora_down.dims2()?;
        let (up_out, up_rank) = lora_up.dims2()?;
        if down_in != in_features || up_out != out_features || up_rank != rank || rank == 0 {
            return Err(Error::Shape(format!(
                "LoraLinear: lora_down {:?} and lora_up {:?} do not fit weight {:?} \
                 (expected [rank, {in_features}] and [{out_features}, rank], rank > 0)",
                lora_down.dims(),
                lora_up.dims(),
                weight.dims()
            )));
        }
        Ok(Self {
            weight,
            lora_down,
            lora_up,
            scale: alpha / rank as f64,
        })
    }

    /// The trainable parameters.
    pub fn vars(&self) -> [&Var; 2] {
        [&self.lora_down, &self.lora_up]
    }

    /// # Shapes
    /// `x`: `[..., in]` in the weight's dtype; returns `[..., out]` in that dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = frozen_linear(x, &self.weight)?;
        let dtype = x.dtype();
        let down = self.lora_down.as_tensor().to_dtype(dtype)?;
        let up = self.lora_up.as_tensor().to_dtype(dtype)?;
        let update = x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?;
        Ok((base + (update * self.scale)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{check_gradients, random, relative_difference};
    use crate::nn::{Linear, LoraAdapter};
    use candle_core::DType;

    fn layer(dtype: DType) -> Result<LoraLinear> {
        let weight = random(&[6, 5], 1, dtype)?;
        let down = Var::from_tensor(&random(&[3, 5], 2, DType::F32)?)?;
        let up = Var::from_tensor(&random(&[6, 3], 3, DType::F32)?)?;
        LoraLinear::new(weight, down, up, 1.5)
    }

    #[test]
    fn forward_matches_inference_linear_with_adapter() -> Result<()> {
        let lora = layer(DType::F32)?;
        let mut linear = Linear::new(lora.weight.clone());
        linear.adapters.push(LoraAdapter {
            down: lora.lora_down.as_tensor().clone(),
            up: lora.lora_up.as_tensor().clone(),
            scale: 0.5,
            dropout: None,
        });
        let x = random(&[2, 4, 5], 4, DType::F32)?;
        assert!(relative_difference(&lora.forward(&x)?, &linear.forward(&x)?)? < 1e-6);
        Ok(())
    }

    /// Gradients for `lora_down`, `lora_up` and `x` against central differences (f64 throughout).
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let weight = random(&[6, 5], 5, DType::F64)?;
        let inputs = [
            random(&[2, 4, 5], 6, DType::F64)?,
            random(&[3, 5], 7, DType::F64)?,
            random(&[6, 3], 8, DType::F64)?,
        ];
        let error = check_gradients(&inputs, |t| {
            let lora = LoraLinear::new(
                weight.clone(),
                Var::from_tensor(&t[1])?,
                Var::from_tensor(&t[2])?,
                1.5,
            )?;
            // `Var::from_tensor` keeps a tensor that already is a variable, so gradients flow.
            lora.forward(&t[0])
        })?;
        assert!(error < 1e-8, "relative error {error}");
        Ok(())
    }

    /// bf16 activations: the LoRA matmuls run in bf16, the gradients land on the f32 masters and
    /// the frozen base weight gets none.
    #[test]
    fn bf16_compute_gives_f32_master_gradients() -> Result<()> {
        let lora = layer(DType::BF16)?;
        let x = random(&[2, 4, 5], 9, DType::BF16)?;
        let grads = lora
            .forward(&x)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .backward()?;
        for var in lora.vars() {
            let grad = grads
                .get(var)
                .ok_or_else(|| Error::Shape("missing LoRA gradient".into()))?;
            assert_eq!(grad.dtype(), DType::F32);
        }
        assert!(grads.get(&lora.weight).is_none());
        // d(sum y)/d up[o, r] = scale * sum_rows (x down^T)[row, r], the same for every o.
        let hidden = x
            .to_dtype(DType::F32)?
            .broadcast_matmul(&lora.lora_down.as_tensor().t()?)?;
        let expected = (hidden.sum((0, 1))? * lora.scale)?
            .unsqueeze(0)?
            .broadcast_as((6, 3))?;
        let up_grad = grads
            .get(&lora.lora_up)
            .ok_or_else(|| Error::Shape("missing".into()))?;
        assert!(relative_difference(up_grad, &expected)? < 2e-2);
        Ok(())
    }

    #[test]
    fn rejects_mismatched_pair() -> Result<()> {
        let weight = random(&[6, 5], 1, DType::F32)?;
        let down = Var::from_tensor(&random(&[3, 4], 2, DType::F32)?)?;
        let up = Var::from_tensor(&random(&[6, 3], 3, DType::F32)?)?;
        let error = LoraLinear::new(weight, down, up, 1.0).unwrap_err();
        assert!(error.to_string().contains("lora_down [3, 4]"), "{error}");
        Ok(())
    }
}
