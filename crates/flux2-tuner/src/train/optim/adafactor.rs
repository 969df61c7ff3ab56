//! transformers.optimization.Adafactor: factored second moments (row and column averages) for
//! matrices, update clipping by RMS, optional first moment, and with `relative_step` a learning
//! rate of its own, `min(1e-2, 1/sqrt(step))` (or `1e-6·step` with `warmup_init`) scaled by the
//! parameter's RMS when `scale_parameter`. With `relative_step` the scheduled learning rate is
//! ignored and [`Optimizer::own_learning_rate`] reports what `AdafactorSchedule` would log: the
//! rate used for the first parameter in the last step.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::train::optim::arguments::OptimizerArguments;
use crate::train::optim::python_literal::PythonValue;
use crate::train::optim::state::{counter, scalar, StateReader};
use crate::train::optim::Optimizer;

/// The second moment of one parameter.
enum SecondMoment {
    /// Row and column averages of a matrix (all dims but the last, all but the second-last).
    Factored {
        row: Tensor,
        column: Tensor,
    },
    Full(Tensor),
}

/// The state of one parameter.
struct ParameterState {
    first: Option<Tensor>,
    second: SecondMoment,
}

/// transformers.optimization.Adafactor.
pub struct Adafactor {
    parameters: Vec<(Var, f64)>,
    states: Vec<ParameterState>,
    step: usize,
    eps: [f64; 2],
    clip_threshold: f64,
    decay_rate: f64,
    beta1: Option<f64>,
    weight_decay: f64,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    /// `AdafactorSchedule`'s value before the first step (Musubi's `--learning_rate`).
    initial_lr: f64,
    /// The rate used for the first parameter in the last step.
    last_lr: Option<f64>,
    description: String,
}

fn invalid(key: &str, message: &str) -> Error {
    Error::InvalidArgument {
        name: format!("--optimizer_args {key}"),
        message: message.into(),
    }
}

impl Adafactor {
    /// `--optimizer_type adafactor` as Musubi builds it: `relative_step` defaults to True (then
    /// `--learning_rate` only serves as the schedule's initial value), and `warmup_init=True`
    /// forces `relative_step=True`.
    pub fn musubi(
        parameters: Vec<(Var, f64)>,
        arguments: &mut OptimizerArguments,
        learning_rate: f64,
    ) -> Result<Self> {
        if !arguments.contains("relative_step") {
            arguments.insert("relative_step", PythonValue::Bool(true));
        }
        let mut probe = arguments.clone();
        if probe.flag("warmup_init", false)? && !probe.flag("relative_step", true)? {
            arguments.insert("relative_step", PythonValue::Bool(true));
        }
        Self::from_arguments(parameters, arguments, learning_rate, true)
    }

    /// transformers' constructor with Musubi passing `--learning_rate` as `lr`: without
    /// `relative_step=False` it fails as transformers does (`musubi_rule` false), or uses the
    /// rate as `initial_lr` (`musubi_rule` true, after [`Adafactor::musubi`]).
    pub fn from_arguments(
        parameters: Vec<(Var, f64)>,
        arguments: &mut OptimizerArguments,
        learning_rate: f64,
        musubi_rule: bool,
    ) -> Result<Self> {
        let eps = arguments.floats("eps", [1e-30, 1e-3])?;
        let clip_threshold = arguments.float("clip_threshold", 1.0)?;
        let decay_rate = arguments.float("decay_rate", -0.8)?;
        let beta1 = arguments.optional_float("beta1", None)?;
        let weight_decay = arguments.float("weight_decay", 0.0)?;
        let scale_parameter = arguments.flag("scale_parameter", true)?;
        let relative_step = arguments.flag("relative_step", true)?;
        let warmup_init = arguments.flag("warmup_init", false)?;
        arguments.finish("transformers.optimization.Adafactor")?;
        if relative_step && !musubi_rule {
            return Err(invalid(
                "relative_step",
                "transformers' Adafactor cannot combine a manual lr with relative_step=True \
                 (Musubi passes --learning_rate as lr on this path); pass relative_step=False \
                 or use --optimizer_type adafactor",
            ));
        }
        if warmup_init && !relative_step {
            return Err(invalid(
                "warmup_init",
                "warmup_init=True requires relative_step=True",
            ));
        }
        let states = parameters
            .iter()
            .map(|(parameter, _)| {
                let dims = parameter.dims();
                let device = parameter.device();
                let second = if dims.len() >= 2 {
                    let rows = &dims[..dims.len() - 1];
                    let mut columns = dims[..dims.len() - 2].to_vec();
                    columns.push(dims[dims.len() - 1]);
                    SecondMoment::Factored {
                        row: Tensor::zeros(rows, DType::F32, device)?,
                        column: Tensor::zeros(columns, DType::F32, device)?,
                    }
                } else {
                    SecondMoment::Full(Tensor::zeros(dims, DType::F32, device)?)
                };
                let first = match beta1 {
                    Some(_) => Some(Tensor::zeros(dims, DType::F32, device)?),
                    None => None,
                };
                Ok(ParameterState { first, second })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            parameters,
            states,
            step: 0,
            eps,
            clip_threshold,
            decay_rate,
            beta1,
            weight_decay,
            scale_parameter,
            relative_step,
            warmup_init,
            initial_lr: learning_rate,
            last_lr: None,
            description: arguments.describe("transformers.optimization.Adafactor"),
        })
    }

    /// `Adafactor._get_lr`.
    fn learning_rate(&self, group_lr: f64, rms: f64) -> f64 {
        let mut step_size = group_lr;
        if self.relative_step {
            let step = self.step as f64;
            let minimum = if self.warmup_init { 1e-6 * step } else { 1e-2 };
            step_size = minimum.min(1.0 / step.sqrt());
        }
        let scale = if self.scale_parameter {
            self.eps[1].max(rms)
        } else {
            1.0
        };
        scale * step_size
    }
}

/// `norm(t) / sqrt(numel)` in f32.
fn root_mean_square(tensor: &Tensor) -> Result<f64> {
    let sum = tensor.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((sum.sqrt() / (tensor.elem_count() as f32).sqrt()) as f64)
}

impl Optimizer for Adafactor {
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let beta2 = 1.0 - (self.step as f64).powf(self.decay_rate);
        for (i, ((parameter, factor), gradient)) in
            self.parameters.iter().zip(gradients).enumerate()
        {
            let gradient = gradient.to_dtype(DType::F32)?;
            let value = parameter.as_tensor();
            let step_lr = self.learning_rate(lr * factor, root_mean_square(value)?);
            if i == 0 {
                self.last_lr = Some(step_lr);
            }
            let squared = gradient.sqr()?.affine(1.0, self.eps[0])?;
            let state = &mut self.states[i];
            let mut update = match &mut state.second {
                SecondMoment::Factored { row, column } => {
                    *row = ((&*row * beta2)? + (squared.mean(D::Minus1)? * (1.0 - beta2))?)?;
                    *column = ((&*column * beta2)? + (squared.mean(D::Minus2)? * (1.0 - beta2))?)?;
                    let row_factor = row
                        .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                        .sqrt()?
                        .recip()?
                        .unsqueeze(D::Minus1)?;
                    let column_factor = column.sqrt()?.recip()?.unsqueeze(D::Minus2)?;
                    (row_factor.broadcast_mul(&column_factor)? * &gradient)?
                }
                SecondMoment::Full(second) => {
                    *second = ((&*second * beta2)? + (squared * (1.0 - beta2))?)?;
                    (second.sqrt()?.recip()? * &gradient)?
                }
            };
            let clip = (root_mean_square(&update)? / self.clip_threshold).max(1.0);
            update = update.affine(step_lr / clip, 0.0)?;
            if let (Some(first), Some(beta1)) = (&mut state.first, self.beta1) {
                *first = ((&*first * beta1)? + (update * (1.0 - beta1))?)?;
                update = first.clone();
            }
            let mut value = value.clone();
            if self.weight_decay != 0.0 {
                value = value.affine(1.0 - self.weight_decay * step_lr, 0.0)?;
            }
            parameter.set(&(value - update)?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![("step".to_string(), counter(self.step)?)];
        if let Some(lr) = self.last_lr {
            tensors.push(("last_lr".to_string(), scalar(lr)?));
        }
        for (i, state) in self.states.iter().enumerate() {
            if let Some(first) = &state.first {
                tensors.push((format!("exp_avg.{i}"), first.clone()));
            }
            match &state.second {
                SecondMoment::Factored { row, column } => {
                    tensors.push((format!("exp_avg_sq_row.{i}"), row.clone()));
                    tensors.push((format!("exp_avg_sq_col.{i}"), column.clone()));
                }
                SecondMoment::Full(second) => {
                    tensors.push((format!("exp_avg_sq.{i}"), second.clone()));
                }
            }
        }
        Ok(tensors)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut reader = StateReader::new(tensors, "Adafactor");
        self.step = reader.counter("step")?;
        self.last_lr = if self.step > 0 {
            Some(reader.scalar("last_lr")?)
        } else {
            None
        };
        for (i, (parameter, _)) in self.parameters.iter().enumerate() {
            let device = parameter.device();
            let state = &mut self.states[i];
            if let Some(first) = &mut state.first {
                *first = reader.tensor(
                    &format!("exp_avg.{i}"),
                    parameter.dims(),
                    DType::F32,
                    device,
                )?;
            }
            match &mut state.second {
                SecondMoment::Factored { row, column } => {
                    let (row_shape, column_shape) = (row.dims().to_vec(), column.dims().to_vec());
                    *row = reader.tensor(
                        &format!("exp_avg_sq_row.{i}"),
                        &row_shape,
                        DType::F32,
                        device,
                    )?;
                    *column = reader.tensor(
                        &format!("exp_avg_sq_col.{i}"),
                        &column_shape,
                        DType::F32,
                        device,
                    )?;
                }
                SecondMoment::Full(second) => {
                    *second = reader.tensor(
                        &format!("exp_avg_sq.{i}"),
                        parameter.dims(),
                        DType::F32,
                        device,
                    )?;
                }
            }
        }
        reader.finish()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn own_learning_rate(&self) -> Option<f64> {
        self.relative_step
            .then_some(self.last_lr.unwrap_or(self.initial_lr))
    }
}
