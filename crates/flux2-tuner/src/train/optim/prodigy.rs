//! prodigyopt.Prodigy (1.1): Adam whose step size is scaled by an estimate `d` of the distance
//! to the solution, grown from `d0` by comparing the gradients' projection on `p0 − p` with the
//! accumulated `s`. All parameters share `d` (one group; a second rate of 0 is allowed, as in
//! prodigyopt). The trainer logs `d·lr`.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::train::optim::arguments::OptimizerArguments;
use crate::train::optim::state::{counter, scalar, StateReader};
use crate::train::optim::Optimizer;

/// The state of one parameter.
struct ParameterState {
    /// Weighted sum of the gradients, flat.
    s: Tensor,
    /// The parameter's value before the first step, flat.
    p0: Tensor,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Tensor,
}

/// prodigyopt.Prodigy.
pub struct Prodigy {
    parameters: Vec<(Var, f64)>,
    states: Vec<ParameterState>,
    beta1: f64,
    beta2: f64,
    beta3: f64,
    eps: f64,
    weight_decay: f64,
    decouple: bool,
    use_bias_correction: bool,
    safeguard_warmup: bool,
    d0: f64,
    d_coef: f64,
    growth_rate: f64,
    d: f64,
    d_max: f64,
    d_numerator: f64,
    k: usize,
    description: String,
}

fn invalid(key: &str, message: String) -> Error {
    Error::InvalidArgument {
        name: format!("--optimizer_args {key}"),
        message,
    }
}

impl Prodigy {
    /// prodigyopt defaults: betas (0.9, 0.999), beta3 sqrt(beta2), eps 1e-8, no weight decay
    /// (decoupled when set), d0 1e-6, d_coef 1, unbounded growth.
    pub fn from_arguments(
        parameters: Vec<(Var, f64)>,
        arguments: &mut OptimizerArguments,
    ) -> Result<Self> {
        let [beta1, beta2] = arguments.floats("betas", [0.9, 0.999])?;
        let beta3 = arguments.optional_float("beta3", None)?;
        let eps = arguments.float("eps", 1e-8)?;
        let weight_decay = arguments.float("weight_decay", 0.0)?;
        let decouple = arguments.flag("decouple", true)?;
        let use_bias_correction = arguments.flag("use_bias_correction", false)?;
        let safeguard_warmup = arguments.flag("safeguard_warmup", false)?;
        let d0 = arguments.float("d0", 1e-6)?;
        let d_coef = arguments.float("d_coef", 1.0)?;
        let growth_rate = arguments.float("growth_rate", f64::INFINITY)?;
        // Single process: FSDP changes nothing here.
        arguments.flag("fsdp_in_use", false)?;
        if arguments.count("slice_p", 1)? != 1 {
            return Err(invalid("slice_p", "only slice_p=1 is implemented".into()));
        }
        arguments.finish("prodigyopt.Prodigy")?;
        if d0 <= 0.0 {
            return Err(invalid("d0", format!("must be > 0, found {d0}")));
        }
        if eps <= 0.0 {
            return Err(invalid("eps", format!("must be > 0, found {eps}")));
        }
        for (index, beta) in [beta1, beta2].iter().enumerate() {
            if !(0.0..1.0).contains(beta) {
                return Err(invalid(
                    "betas",
                    format!("beta at index {index} must be in [0, 1), found {beta}"),
                ));
            }
        }
        let highest = parameters.iter().map(|(_, f)| *f).fold(0.0, f64::max);
        if parameters
            .iter()
            .any(|(_, factor)| *factor != highest && *factor != 0.0)
        {
            return Err(Error::InvalidArgument {
                name: "--optimizer_type Prodigy".into(),
                message: "Prodigy takes one learning rate for all parameters (other groups may \
                          only have 0), so loraplus_lr_ratio cannot be used with it"
                    .into(),
            });
        }
        let states = parameters
            .iter()
            .map(|(parameter, _)| {
                let value = parameter.as_tensor();
                let zeros = Tensor::zeros(value.dims(), DType::F32, value.device())?;
                Ok(ParameterState {
                    s: zeros.flatten_all()?,
                    p0: value.to_dtype(DType::F32)?.flatten_all()?.copy()?,
                    exp_avg: (beta1 > 0.0).then(|| zeros.clone()),
                    exp_avg_sq: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            parameters,
            states,
            beta1,
            beta2,
            beta3: beta3.unwrap_or(beta2.sqrt()),
            eps,
            weight_decay,
            decouple,
            use_bias_correction,
            safeguard_warmup,
            d0,
            d_coef,
            growth_rate,
            d: d0,
            d_max: d0,
            d_numerator: 0.0,
            k: 0,
            description: arguments.describe("prodigyopt.prodigy.Prodigy"),
        })
    }
}

impl Optimizer for Prodigy {
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()> {
        let highest = self.parameters.iter().map(|(_, f)| *f).fold(0.0, f64::max);
        let lr = lr * highest;
        let (beta1, beta2, beta3) = (self.beta1, self.beta2, self.beta3);
        let bias_correction = if self.use_bias_correction {
            let k = self.k as i32;
            (1.0 - beta2.powi(k + 1)).sqrt() / (1.0 - beta1.powi(k + 1))
        } else {
            1.0
        };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let d_numerator = self.d_numerator * beta3;
        let mut delta_numerator = 0.0;
        let mut d_denom = 0.0;
        let mut gradients_used = Vec::with_capacity(gradients.len());
        for (i, ((parameter, factor), gradient)) in
            self.parameters.iter().zip(gradients).enumerate()
        {
            let value = parameter.as_tensor();
            let mut gradient = gradient.to_dtype(DType::F32)?;
            if self.weight_decay != 0.0 && !self.decouple {
                gradient = (gradient + value.affine(self.weight_decay, 0.0)?)?;
            }
            let state = &mut self.states[i];
            if *factor * lr > 0.0 {
                let flat = gradient.flatten_all()?;
                let distance = (&state.p0 - value.flatten_all()?)?;
                let dot = (&flat * distance)?.sum_all()?.to_scalar::<f32>()? as f64;
                delta_numerator += (d / self.d0) * dlr * dot;
                if let Some(exp_avg) = &mut state.exp_avg {
                    *exp_avg = ((&*exp_avg * beta1)? + (&gradient * (d * (1.0 - beta1)))?)?;
                }
                state.exp_avg_sq =
                    ((&state.exp_avg_sq * beta2)? + (gradient.sqr()? * (d * d * (1.0 - beta2)))?)?;
                let weight = if self.safeguard_warmup {
                    (d / self.d0) * d
                } else {
                    (d / self.d0) * dlr
                };
                state.s = ((&state.s * beta3)? + (flat * weight)?)?;
                d_denom += state.s.abs()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            gradients_used.push(gradient);
        }
        // prodigyopt returns before updating anything when every s is zero.
        if d_denom == 0.0 {
            return Ok(());
        }
        let mut d_new = d;
        let mut d_max = self.d_max;
        let global_numerator = d_numerator + delta_numerator;
        if lr > 0.0 {
            let d_hat = self.d_coef * global_numerator / d_denom;
            if d == self.d0 {
                d_new = d.max(d_hat);
            }
            d_max = d_max.max(d_hat);
            d_new = d_max.min(d_new * self.growth_rate);
        }
        self.d_numerator = global_numerator;
        self.d = d_new;
        self.d_max = d_max;
        for (i, ((parameter, _), gradient)) in
            self.parameters.iter().zip(&gradients_used).enumerate()
        {
            let state = &self.states[i];
            let denominator = state.exp_avg_sq.sqrt()?.affine(1.0, d_new * self.eps)?;
            let mut value = parameter.as_tensor().clone();
            if self.weight_decay != 0.0 && self.decouple {
                value = value.affine(1.0 - self.weight_decay * dlr, 0.0)?;
            }
            let update = match &state.exp_avg {
                Some(exp_avg) => (exp_avg / denominator)?.affine(dlr, 0.0)?,
                None => (gradient / denominator)?.affine(dlr * d_new, 0.0)?,
            };
            parameter.set(&(value - update)?)?;
        }
        self.k += 1;
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![
            ("k".to_string(), counter(self.k)?),
            ("d".to_string(), scalar(self.d)?),
            ("d_max".to_string(), scalar(self.d_max)?),
            ("d_numerator".to_string(), scalar(self.d_numerator)?),
        ];
        for (i, state) in self.states.iter().enumerate() {
            tensors.push((format!("s.{i}"), state.s.clone()));
            tensors.push((format!("p0.{i}"), state.p0.clone()));
            if let Some(exp_avg) = &state.exp_avg {
                tensors.push((format!("exp_avg.{i}"), exp_avg.clone()));
            }
            tensors.push((format!("exp_avg_sq.{i}"), state.exp_avg_sq.clone()));
        }
        Ok(tensors)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut reader = StateReader::new(tensors, "Prodigy");
        self.k = reader.counter("k")?;
        self.d = reader.scalar("d")?;
        self.d_max = reader.scalar("d_max")?;
        self.d_numerator = reader.scalar("d_numerator")?;
        for (i, (parameter, _)) in self.parameters.iter().enumerate() {
            let (shape, device) = (parameter.dims(), parameter.device());
            let flat = [parameter.elem_count()];
            let state = &mut self.states[i];
            state.s = reader.tensor(&format!("s.{i}"), &flat, DType::F32, device)?;
            state.p0 = reader.tensor(&format!("p0.{i}"), &flat, DType::F32, device)?;
            if let Some(exp_avg) = &mut state.exp_avg {
                *exp_avg = reader.tensor(&format!("exp_avg.{i}"), shape, DType::F32, device)?;
            }
            state.exp_avg_sq =
                reader.tensor(&format!("exp_avg_sq.{i}"), shape, DType::F32, device)?;
        }
        reader.finish()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn distance_estimate(&self) -> Option<f64> {
        Some(self.d)
    }
}
