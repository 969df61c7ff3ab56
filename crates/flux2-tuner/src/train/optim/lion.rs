//! Lion (lion_pytorch.Lion and bitsandbytes.optim.Lion, whose 32-bit update is the same):
//! decoupled weight decay, then `p -= lr · sign(β1·m + (1−β1)·g)`, then `m = β2·m + (1−β2)·g`.
//! lion_pytorch's `decoupled_weight_decay=True` divides the decay by the initial learning rate.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::train::optim::arguments::OptimizerArguments;
use crate::train::optim::state::{counter, StateReader};
use crate::train::optim::Optimizer;

/// Which library's Lion was asked for (their options differ, the update does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LionFlavour {
    LionPytorch,
    Bitsandbytes,
}

/// Lion.
pub struct Lion {
    parameters: Vec<(Var, f64)>,
    momentum: Vec<Tensor>,
    step: usize,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    description: String,
}

impl Lion {
    /// Defaults of both libraries: betas (0.9, 0.99), no weight decay. `learning_rate` is the
    /// constructor's lr (for lion_pytorch's decoupled decay).
    pub fn from_arguments(
        parameters: Vec<(Var, f64)>,
        arguments: &mut OptimizerArguments,
        flavour: LionFlavour,
        learning_rate: f64,
    ) -> Result<Self> {
        let [beta1, beta2] = arguments.floats("betas", [0.9, 0.99])?;
        let mut weight_decay = arguments.float("weight_decay", 0.0)?;
        let class_path = match flavour {
            LionFlavour::LionPytorch => {
                // The Triton kernel computes the same update.
                arguments.flag("use_triton", false)?;
                if arguments.flag("decoupled_weight_decay", false)? {
                    weight_decay /= learning_rate;
                }
                arguments.finish("lion_pytorch.Lion")?;
                "lion_pytorch.lion_pytorch.Lion"
            }
            LionFlavour::Bitsandbytes => {
                if arguments.count("optim_bits", 32)? != 32 {
                    return Err(Error::InvalidArgument {
                        name: "--optimizer_args optim_bits".into(),
                        message: "only 32-bit Lion states are implemented (optim_bits=32)".into(),
                    });
                }
                if arguments.float("percentile_clipping", 100.0)? != 100.0 {
                    return Err(Error::InvalidArgument {
                        name: "--optimizer_args percentile_clipping".into(),
                        message: "percentile clipping is not implemented (use 100)".into(),
                    });
                }
                // Only used by 8-bit states, or memory placement.
                arguments.count("min_8bit_size", 4096)?;
                arguments.flag("block_wise", true)?;
                arguments.flag("is_paged", false)?;
                arguments.finish("bitsandbytes.optim.Lion")?;
                "bitsandbytes.optim.lion.Lion"
            }
        };
        let momentum = parameters
            .iter()
            .map(|(p, _)| Tensor::zeros(p.dims(), DType::F32, p.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            parameters,
            momentum,
            step: 0,
            beta1,
            beta2,
            weight_decay,
            description: arguments.describe(class_path),
        })
    }
}

impl Optimizer for Lion {
    fn step(&mut self, gradients: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        for (i, ((parameter, factor), gradient)) in
            self.parameters.iter().zip(gradients).enumerate()
        {
            let lr = lr * factor;
            let gradient = gradient.to_dtype(DType::F32)?;
            let decayed = parameter
                .as_tensor()
                .affine(1.0 - lr * self.weight_decay, 0.0)?;
            let direction =
                ((&self.momentum[i] * self.beta1)? + (&gradient * (1.0 - self.beta1))?)?.sign()?;
            parameter.set(&(decayed - direction.affine(lr, 0.0)?)?)?;
            self.momentum[i] =
                ((&self.momentum[i] * self.beta2)? + (gradient * (1.0 - self.beta2))?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![("step".to_string(), counter(self.step)?)];
        for (i, momentum) in self.momentum.iter().enumerate() {
            tensors.push((format!("lion_exp_avg.{i}"), momentum.clone()));
        }
        Ok(tensors)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut reader = StateReader::new(tensors, "Lion");
        self.step = reader.counter("step")?;
        for (i, (parameter, _)) in self.parameters.iter().enumerate() {
            self.momentum[i] = reader.tensor(
                &format!("lion_exp_avg.{i}"),
                parameter.dims(),
                DType::F32,
                parameter.device(),
            )?;
        }
        reader.finish()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
