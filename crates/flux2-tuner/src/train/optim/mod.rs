//! Optimisers for the LoRA parameters (`--optimizer_type`, `--optimizer_args`;
//! training-and-data.md §5.1). Each keeps its state as named tensors so that a saved training
//! state restores it exactly, and describes itself as Musubi's `ss_optimizer` does.

mod adafactor;
mod adamw;
mod adamw8bit;
mod arguments;
mod blockwise;
mod factory;
mod lion;
mod prodigy;
mod python_literal;
mod state;

use candle_core::{DType, Tensor};

use crate::error::Result;

pub use adafactor::Adafactor;
pub use adamw::{adamw_from_args, AdamW};
pub use adamw8bit::AdamW8bit;
pub use arguments::OptimizerArguments;
pub use blockwise::{dynamic_map, QuantizationMap, QuantizedState, BLOCK_SIZE};
pub use factory::{build_optimizer, AVAILABLE_OPTIMIZERS};
pub use lion::{Lion, LionFlavour};
pub use prodigy::Prodigy;
pub use python_literal::{parse_python_literal, python_float_repr, PythonValue};

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
    /// `Some` when the optimiser picks its own learning rate and ignores the scheduled one
    /// (Adafactor with `relative_step`): the rate its last step used, which the trainer logs.
    /// Musubi then forces the `adafactor` schedule, which takes no warmup.
    fn own_learning_rate(&self) -> Option<f64> {
        None
    }
    /// Prodigy's distance estimate `d`; the trainer logs `d·lr` as `lr/d*lr/unet`.
    fn distance_estimate(&self) -> Option<f64> {
        None
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
