//! `--scale_weight_norms MAX` (sd-scripts / Musubi `apply_max_norm_regularization`): after each
//! optimiser step, every LoRA module whose update `scale * up @ down` has a Frobenius norm above
//! `MAX` gets both of its matrices multiplied by `sqrt(MAX / norm)`, so the update's norm becomes
//! exactly `MAX`. The norms are reported as Musubi logs them.

use candle_core::DType;

use crate::error::Result;
use crate::train::network::LoraNetwork;

/// What one regularisation pass did (Musubi's `keys_scaled`, `average_key_norm`,
/// `max_key_norm`; the norms are those after scaling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxNormReport {
    pub keys_scaled: usize,
    pub average_key_norm: f64,
    pub max_key_norm: f64,
}

/// Scales down every module of `network` whose update norm exceeds `max_norm`.
pub fn apply_max_norm(network: &LoraNetwork, max_norm: f64) -> Result<MaxNormReport> {
    let mut keys_scaled = 0;
    let mut norms = Vec::with_capacity(network.modules.len());
    for module in &network.modules {
        let up = module.up.as_tensor().to_dtype(DType::F32)?;
        let down = module.down.as_tensor().to_dtype(DType::F32)?;
        let update = (up.matmul(&down)? * module.scale())?;
        let norm = update.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        if norm > max_norm {
            // Half of the factor on each matrix keeps their relative sizes (as sd-scripts).
            let factor = (max_norm / norm).sqrt();
            module.up.set(&(module.up.as_tensor() * factor)?)?;
            module.down.set(&(module.down.as_tensor() * factor)?)?;
            keys_scaled += 1;
            norms.push(max_norm);
        } else {
            norms.push(norm);
        }
    }
    let count = norms.len().max(1) as f64;
    Ok(MaxNormReport {
        keys_scaled,
        average_key_norm: norms.iter().sum::<f64>() / count,
        max_key_norm: norms.iter().copied().fold(0.0, f64::max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::dit::DitConfig;
    use crate::train::network::NetworkConfig;
    use crate::util::rng::SeededRng;
    use candle_core::{Device, Tensor};

    fn update_norm(network: &LoraNetwork, index: usize) -> f64 {
        let module = &network.modules[index];
        let update = (module
            .up
            .as_tensor()
            .matmul(module.down.as_tensor())
            .unwrap()
            * module.scale())
        .unwrap();
        update
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    /// Modules above the limit end exactly at it; the others are untouched; the report counts.
    #[test]
    fn scales_only_modules_above_the_limit() -> Result<()> {
        let config = DitConfig {
            in_channels: 128,
            context_in_dim: 16,
            hidden_size: 16,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 1,
            mlp_hidden_size: 48,
            axes_dim: [2, 2, 2, 2],
            theta: 2000.0,
            guidance_embed: false,
        };
        let device = Device::Cpu;
        let network = LoraNetwork::new(
            &config,
            NetworkConfig {
                dim: 2,
                alpha: 1.0,
                ..NetworkConfig::default()
            },
            &mut SeededRng::new(1),
            &device,
        )?;
        // Give module 0 a large update and module 1 a small one.
        for (index, value) in [(0usize, 3.0f32), (1, 0.001)] {
            let module = &network.modules[index];
            module
                .up
                .set(&Tensor::full(value, module.up.dims(), &device)?)?;
        }
        let before_small = update_norm(&network, 1);
        let before_large = update_norm(&network, 0);
        let limit = before_large / 4.0;
        assert!(before_small < limit);
        let small_down = network.modules[1].down.as_tensor().to_vec2::<f32>()?;
        let report = apply_max_norm(&network, limit)?;
        let after_large = update_norm(&network, 0);
        assert!(
            (after_large - limit).abs() < 1e-5 * limit,
            "{after_large} vs {limit}"
        );
        assert_eq!(update_norm(&network, 1), before_small);
        assert_eq!(
            network.modules[1].down.as_tensor().to_vec2::<f32>()?,
            small_down
        );
        // Every other module starts with up = 0 (norm 0).
        assert_eq!(report.keys_scaled, 1);
        assert_eq!(report.max_key_norm, limit);
        let expected_average = (limit + before_small) / network.modules.len() as f64;
        assert!((report.average_key_norm - expected_average).abs() < 1e-9);
        Ok(())
    }
}
