//! Optimisers for the LoRA parameters. Each keeps its state as named tensors so that a saved
//! training state restores it exactly.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// What every optimiser offers the training loop.
pub trait Optimizer {
    /// Updates every parameter from its gradient at learning rate `lr` (times the parameter's
    /// own factor, for LoRA+).
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()>;
    /// The state as named tensors (for `--save_state`).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores a state written by [`Optimizer::state`].
    fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()>;
    /// A description for the `ss_optimizer` metadata.
    fn describe(&self) -> String;
}

/// torch.optim.AdamW (decoupled weight decay, bias-corrected moments).
pub struct AdamW {
    parameters: Vec<(Var, f64)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Parses Musubi's `--optimizer_args` (`key=value`, Python literals) for AdamW.
pub fn adamw_from_args(parameters: Vec<(Var, f64)>, args: &[String]) -> Result<AdamW> {
    let mut optimizer = AdamW::new(parameters)?;
    for arg in args {
        let (key, value) = arg.split_once('=').ok_or_else(|| Error::InvalidArgument {
            name: "--optimizer_args".into(),
            message: format!("`{arg}` is not key=value"),
        })?;
        let number = |text: &str| -> Result<f64> {
            text.trim().parse().map_err(|_| Error::InvalidArgument {
                name: format!("--optimizer_args {key}"),
                message: format!("`{text}` is not a number"),
            })
        };
        match key.trim() {
            "weight_decay" => optimizer.weight_decay = number(value)?,
            "eps" => optimizer.eps = number(value)?,
            "betas" => {
                let inner = value
                    .trim()
                    .trim_start_matches(['(', '['])
                    .trim_end_matches([')', ']']);
                let parts: Vec<&str> = inner.split(',').collect();
                if parts.len() != 2 {
                    return Err(Error::InvalidArgument {
                        name: "--optimizer_args betas".into(),
                        message: format!("`{value}` is not a pair such as (0.9,0.999)"),
                    });
                }
                optimizer.beta1 = number(parts[0])?;
                optimizer.beta2 = number(parts[1])?;
            }
            other => {
                return Err(Error::InvalidArgument {
                    name: "--optimizer_args".into(),
                    message: format!(
                        "AdamW has no option `{other}` (known: weight_decay, eps, betas)"
                    ),
                })
            }
        }
    }
    Ok(optimizer)
}

impl AdamW {
    /// torch defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn new(parameters: Vec<(Var, f64)>) -> Result<Self> {
        let first = parameters
            .iter()
            .map(|(p, _)| Tensor::zeros_like(p.as_tensor()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            parameters,
            first,
            second,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let correction1 = 1.0 - self.beta1.powi(self.step as i32);
        let correction2 = 1.0 - self.beta2.powi(self.step as i32);
        for (i, ((parameter, factor), gradient)) in
            self.parameters.iter().zip(gradients).enumerate()
        {
            let lr = lr * factor;
            let gradient = gradient.to_dtype(DType::F32)?;
            self.first[i] = ((&self.first[i] * self.beta1)? + (&gradient * (1.0 - self.beta1))?)?;
            self.second[i] =
                ((&self.second[i] * self.beta2)? + (gradient.sqr()? * (1.0 - self.beta2))?)?;
            let denominator = ((&self.second[i] / correction2)?.sqrt()? + self.eps)?;
            let update = ((&self.first[i] / correction1)? / denominator)?;
            let decayed = (parameter.as_tensor() * (1.0 - lr * self.weight_decay))?;
            parameter.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![(
            "step".to_string(),
            Tensor::new(self.step as i64, &candle_core::Device::Cpu)?,
        )];
        for i in 0..self.parameters.len() {
            tensors.push((format!("exp_avg.{i}"), self.first[i].clone()));
            tensors.push((format!("exp_avg_sq.{i}"), self.second[i].clone()));
        }
        Ok(tensors)
    }

    fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            tensors
                .get(key)
                .cloned()
                .ok_or_else(|| Error::InvalidArgument {
                    name: "--resume".into(),
                    message: format!(
                        "the optimizer state has no `{key}` (saved by another optimizer?)"
                    ),
                })
        };
        self.step = get("step")?.to_dtype(DType::I64)?.to_scalar::<i64>()? as usize;
        for i in 0..self.parameters.len() {
            let device = self.parameters[i].0.device().clone();
            self.first[i] = get(&format!("exp_avg.{i}"))?.to_device(&device)?;
            self.second[i] = get(&format!("exp_avg_sq.{i}"))?.to_device(&device)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "torch.optim.adamw.AdamW(betas=({}, {}),eps={},weight_decay={})",
            self.beta1, self.beta2, self.eps, self.weight_decay
        )
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm` (torch
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(gradients: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in gradients.iter() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for g in gradients.iter_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps on one scalar against torch's update written out by hand.
    #[test]
    fn adamw_matches_the_torch_update() {
        let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![(p.clone(), 1.0)]).unwrap();
        let (lr, wd, b1, b2, eps) = (0.1f64, 0.01, 0.9, 0.999, 1e-8);
        let mut expected = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25)] {
            opt.step(&[Tensor::new(&[g as f32], &Device::Cpu).unwrap()], lr)
                .unwrap();
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let update = (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
            expected = expected * (1.0 - lr * wd) - lr * update;
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
