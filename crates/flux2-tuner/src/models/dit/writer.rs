//! Writes random DiT checkpoints of any configuration in the original BFL key format, for tests,
//! benchmarks and `selftest`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::save_safetensors;
use crate::error::Result;
use crate::models::dit::DitConfig;
use crate::util::rng::SeededRng;

/// Writes a DiT with weights drawn from `N(0, 1/in_features)` (norm scales near 1) in `dtype`.
pub fn write_random_dit(config: &DitConfig, path: &Path, seed: u64, dtype: DType) -> Result<()> {
    let mut rng = SeededRng::new(seed);
    let mut tensors = Vec::new();
    for spec in config.expected_keys() {
        let count: usize = spec.shape.iter().product();
        let values: Vec<f32> = if spec.key.ends_with(".scale") {
            (0..count)
                .map(|_| 1.0 + 0.1 * rng.normal() as f32)
                .collect()
        } else {
            let std = 1.0 / (spec.shape[1] as f64).sqrt();
            (0..count).map(|_| (std * rng.normal()) as f32).collect()
        };
        let tensor =
            Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?;
        tensors.push((spec.key, tensor));
    }
    save_safetensors(path, &tensors, None)
}
