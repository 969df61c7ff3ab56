//! bitsandbytes.optim.AdamW8bit: AdamW whose two moments are stored as block-wise dynamically
//! quantised 8-bit codes (blocks of 256, signed map for the first moment, unsigned for the
//! second). Each step decodes the moments, updates them and the parameter in f32 (the update
//! uses the fresh f32 moments) and re-encodes them. Parameters with fewer than `min_8bit_size`
//! (4096) elements keep f32 moments, as bitsandbytes does. The update is that of its CPU and
//! pure-PyTorch kernels: decay first, then `p -= lr/c1 · m / (sqrt(v)/sqrt(c2) + eps)`.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::train::optim::arguments::OptimizerArguments;
use crate::train::optim::blockwise::{block_count, dynamic_map, QuantizationMap, QuantizedState};
use crate::train::optim::state::{counter, StateReader};
use crate::train::optim::Optimizer;

/// The moments of one parameter.
enum Moments {
    Quantized {
        first: QuantizedState,
        second: QuantizedState,
    },
    Full {
        first: Tensor,
        second: Tensor,
    },
}

/// bitsandbytes.optim.AdamW8bit.
pub struct AdamW8bit {
    parameters: Vec<(Var, f64)>,
    moments: Vec<Moments>,
    signed_map: QuantizationMap,
    unsigned_map: QuantizationMap,
    step: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    description: String,
}

impl AdamW8bit {
    /// bitsandbytes defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01, 8-bit states
    /// from 4096 elements on.
    pub fn from_arguments(
        parameters: Vec<(Var, f64)>,
        arguments: &mut OptimizerArguments,
        class_path: &str,
    ) -> Result<Self> {
        let [beta1, beta2] = arguments.floats("betas", [0.9, 0.999])?;
        let eps = arguments.float("eps", 1e-8)?;
        let weight_decay = arguments.float("weight_decay", 1e-2)?;
        let min_8bit_size = arguments.count("min_8bit_size", 4096)?;
        // Paging only moves the states between GPU and host memory.
        arguments.flag("is_paged", false)?;
        if arguments.flag("amsgrad", false)? {
            return Err(unsupported(
                "amsgrad",
                "AdamW8bit does not support amsgrad=True",
            ));
        }
        if arguments.count("optim_bits", 32)? != 32 {
            return Err(unsupported(
                "optim_bits",
                "AdamW8bit only accepts optim_bits=32 (its states are always 8-bit)",
            ));
        }
        arguments.finish("bitsandbytes.optim.AdamW8bit")?;
        let device = parameters
            .first()
            .map(|(p, _)| p.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let moments = parameters
            .iter()
            .map(|(parameter, _)| {
                let shape = parameter.dims();
                Ok(if parameter.elem_count() < min_8bit_size {
                    let zeros = Tensor::zeros(shape, DType::F32, parameter.device())?;
                    Moments::Full {
                        first: zeros.clone(),
                        second: zeros,
                    }
                } else {
                    Moments::Quantized {
                        first: QuantizedState::zeros(shape, parameter.device())?,
                        second: QuantizedState::zeros(shape, parameter.device())?,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            parameters,
            moments,
            signed_map: QuantizationMap::new(&dynamic_map(true), &device)?,
            unsigned_map: QuantizationMap::new(&dynamic_map(false), &device)?,
            step: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
            description: arguments.describe(class_path),
        })
    }
}

fn unsupported(key: &str, message: &str) -> Error {
    Error::InvalidArgument {
        name: format!("--optimizer_args {key}"),
        message: message.into(),
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let correction1 = 1.0 - self.beta1.powi(self.step as i32);
        let correction2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        for (i, ((parameter, factor), gradient)) in
            self.parameters.iter().zip(gradients).enumerate()
        {
            let lr = lr * factor;
            let gradient = gradient.to_dtype(DType::F32)?;
            let (first, second) = match &self.moments[i] {
                Moments::Quantized { first, second } => (
                    first.dequantize(&self.signed_map)?,
                    second.dequantize(&self.unsigned_map)?,
                ),
                Moments::Full { first, second } => (first.clone(), second.clone()),
            };
            let first = ((first * self.beta1)? + (&gradient * (1.0 - self.beta1))?)?;
            let second = ((second * self.beta2)? + (gradient.sqr()? * (1.0 - self.beta2))?)?;
            let mut value = parameter.as_tensor().clone();
            if self.weight_decay > 0.0 {
                value = value.affine(1.0 - lr * self.weight_decay, 0.0)?;
            }
            let denominator = second.sqrt()?.affine(1.0 / correction2_sqrt, self.eps)?;
            let update = (&first / denominator)?.affine(lr / correction1, 0.0)?;
            parameter.set(&(value - update)?)?;
            self.moments[i] = match &self.moments[i] {
                Moments::Quantized { .. } => Moments::Quantized {
                    first: QuantizedState::quantize(&first, &self.signed_map)?,
                    second: QuantizedState::quantize(&second, &self.unsigned_map)?,
                },
                Moments::Full { .. } => Moments::Full { first, second },
            };
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![("step".to_string(), counter(self.step)?)];
        for (i, moments) in self.moments.iter().enumerate() {
            match moments {
                Moments::Quantized { first, second } => {
                    tensors.push((format!("state1.{i}"), first.codes.clone()));
                    tensors.push((format!("absmax1.{i}"), first.absmax.clone()));
                    tensors.push((format!("state2.{i}"), second.codes.clone()));
                    tensors.push((format!("absmax2.{i}"), second.absmax.clone()));
                }
                Moments::Full { first, second } => {
                    tensors.push((format!("exp_avg.{i}"), first.clone()));
                    tensors.push((format!("exp_avg_sq.{i}"), second.clone()));
                }
            }
        }
        Ok(tensors)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut reader = StateReader::new(tensors, "AdamW8bit");
        self.step = reader.counter("step")?;
        for (i, (parameter, _)) in self.parameters.iter().enumerate() {
            let (shape, device) = (parameter.dims(), parameter.device());
            let blocks = [block_count(parameter.elem_count())];
            self.moments[i] = match &self.moments[i] {
                Moments::Quantized { .. } => Moments::Quantized {
                    first: QuantizedState {
                        codes: reader.tensor(&format!("state1.{i}"), shape, DType::U8, device)?,
                        absmax: reader.tensor(
                            &format!("absmax1.{i}"),
                            &blocks,
                            DType::F32,
                            device,
                        )?,
                    },
                    second: QuantizedState {
                        codes: reader.tensor(&format!("state2.{i}"), shape, DType::U8, device)?,
                        absmax: reader.tensor(
                            &format!("absmax2.{i}"),
                            &blocks,
                            DType::F32,
                            device,
                        )?,
                    },
                },
                Moments::Full { .. } => Moments::Full {
                    first: reader.tensor(&format!("exp_avg.{i}"), shape, DType::F32, device)?,
                    second: reader.tensor(&format!("exp_avg_sq.{i}"), shape, DType::F32, device)?,
                },
            };
        }
        reader.finish()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
