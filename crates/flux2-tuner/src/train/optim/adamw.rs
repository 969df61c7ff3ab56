//! torch.optim.AdamW (single-tensor path): decoupled weight decay, bias-corrected moments,
//! optional AMSGrad.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::Result;
use crate::train::optim::arguments::OptimizerArguments;
use crate::train::optim::state::{counter, StateReader};
use crate::train::optim::Optimizer;

/// torch.optim.AdamW.
pub struct AdamW {
    parameters: Vec<(Var, f64)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// AMSGrad's running maximum of the second moment (empty without AMSGrad).
    second_max: Vec<Tensor>,
    step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    description: String,
}

/// Builds AdamW from Musubi's `--optimizer_args` (`betas`, `eps`, `weight_decay`, `amsgrad`).
pub fn adamw_from_args(parameters: Vec<(Var, f64)>, args: &[String]) -> Result<AdamW> {
    let mut arguments = OptimizerArguments::parse(args)?;
    adamw_from_arguments(parameters, &mut arguments, "torch.optim.adamw.AdamW")
}

pub(crate) fn adamw_from_arguments(
    parameters: Vec<(Var, f64)>,
    arguments: &mut OptimizerArguments,
    class_path: &str,
) -> Result<AdamW> {
    let mut optimizer = AdamW::new(parameters)?;
    [optimizer.beta1, optimizer.beta2] = arguments.floats("betas", [0.9, 0.999])?;
    optimizer.eps = arguments.float("eps", 1e-8)?;
    optimizer.weight_decay = arguments.float("weight_decay", 0.01)?;
    optimizer.amsgrad = arguments.flag("amsgrad", false)?;
    arguments.finish("torch.optim.AdamW")?;
    if optimizer.amsgrad {
        optimizer.second_max = optimizer.second.clone();
    }
    optimizer.description = arguments.describe(class_path);
    Ok(optimizer)
}

impl AdamW {
    /// torch defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn new(parameters: Vec<(Var, f64)>) -> Result<Self> {
        let first = parameters
            .iter()
            .map(|(p, _)| Tensor::zeros(p.dims(), DType::F32, p.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            parameters,
            first,
            second,
            second_max: Vec::new(),
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            description: "torch.optim.adamw.AdamW".into(),
        })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let correction1 = 1.0 - self.beta1.powi(self.step as i32);
        let correction2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        for (i, ((parameter, factor), gradient)) in
            self.parameters.iter().zip(gradients).enumerate()
        {
            let lr = lr * factor;
            let gradient = gradient.to_dtype(DType::F32)?;
            let decayed = parameter
                .as_tensor()
                .affine(1.0 - lr * self.weight_decay, 0.0)?;
            // torch: exp_avg.lerp_(grad, 1 - beta1).
            self.first[i] =
                (&self.first[i] + ((&gradient - &self.first[i])? * (1.0 - self.beta1))?)?;
            self.second[i] =
                ((&self.second[i] * self.beta2)? + (gradient.sqr()? * (1.0 - self.beta2))?)?;
            let second = if self.amsgrad {
                self.second_max[i] = self.second_max[i].maximum(&self.second[i])?;
                &self.second_max[i]
            } else {
                &self.second[i]
            };
            let denominator = second.sqrt()?.affine(1.0 / correction2_sqrt, self.eps)?;
            let update = (&self.first[i] / denominator)?.affine(lr / correction1, 0.0)?;
            parameter.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![("step".to_string(), counter(self.step)?)];
        for i in 0..self.parameters.len() {
            tensors.push((format!("exp_avg.{i}"), self.first[i].clone()));
            tensors.push((format!("exp_avg_sq.{i}"), self.second[i].clone()));
            if self.amsgrad {
                tensors.push((format!("max_exp_avg_sq.{i}"), self.second_max[i].clone()));
            }
        }
        Ok(tensors)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut reader = StateReader::new(tensors, "AdamW");
        self.step = reader.counter("step")?;
        for (i, (parameter, _)) in self.parameters.iter().enumerate() {
            let (shape, device) = (parameter.dims(), parameter.device());
            self.first[i] = reader.tensor(&format!("exp_avg.{i}"), shape, DType::F32, device)?;
            self.second[i] =
                reader.tensor(&format!("exp_avg_sq.{i}"), shape, DType::F32, device)?;
            if self.amsgrad {
                self.second_max[i] =
                    reader.tensor(&format!("max_exp_avg_sq.{i}"), shape, DType::F32, device)?;
            }
        }
        reader.finish()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
