//! Writes random AE checkpoints of any configuration in the original BFL key format (for tests
//! and benchmarks).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::AeConfig;
use crate::checkpoint::save_safetensors;
use crate::error::Result;
use crate::util::rng::SeededRng;

/// Writes an AE with conv weights drawn from `N(0, 1/fan_in)`, small biases, norm scales near 1
/// and positive running variances, stored as `dtype`.
pub fn write_random_ae(config: &AeConfig, path: &Path, seed: u64, dtype: DType) -> Result<()> {
    let mut rng = SeededRng::new(seed);
    let mut tensors = Vec::new();
    for spec in config.expected_keys() {
        let count: usize = spec.shape.iter().product();
        let key = spec.key.as_str();
        let values: Vec<f32> = if key == "bn.running_var" {
            (0..count)
                .map(|_| 0.5 + rng.normal().abs() as f32)
                .collect()
        } else if spec.shape.len() == 4 {
            let fan_in: usize = spec.shape[1..].iter().product();
            let std = 1.0 / (fan_in as f64).sqrt();
            (0..count).map(|_| (std * rng.normal()) as f32).collect()
        } else if key.ends_with(".weight") {
            (0..count)
                .map(|_| 1.0 + 0.1 * rng.normal() as f32)
                .collect()
        } else {
            (0..count).map(|_| 0.05 * rng.normal() as f32).collect()
        };
        let tensor =
            Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?;
        tensors.push((spec.key, tensor));
    }
    save_safetensors(path, &tensors, None)
}
