//! Loading the DiT for generation with block swap: on the host first, LoRAs applied and fp8
//! quantisation done there (the rule of the unswapped path), then everything but the swapped
//! blocks' Linear weights (and fp8 scales) moved to the device.

use candle_core::Device;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::lora::LoraFile;
use crate::models::dit::Flux2Dit;
use crate::offload::placement::{enable_block_swap, split_for_checkpoint};
use crate::sample::generate::{load_dit_with_loras, load_loras, GenerateObserver, GeneratorConfig};

/// [`crate::sample::generate::load_dit`] for `config.blocks_to_swap > 0`. `loras` were read for
/// `config.device`; on another device they are read again on the host, because merging happens
/// where the weights are.
pub fn load_swapped_dit(
    config: &GeneratorConfig,
    checkpoint: &Checkpoint,
    loras: &[(LoraFile, f64)],
    observer: &mut dyn GenerateObserver,
) -> Result<Flux2Dit> {
    let split = split_for_checkpoint(checkpoint, config.blocks_to_swap)?;
    // The LoRAs are needed before the model exists (they are applied while loading), so the
    // host copies are read from the checkpoint's own config.
    let host_loras;
    let loras = if config.device.is_cpu() {
        loras
    } else {
        let host_config = GeneratorConfig {
            device: Device::Cpu,
            ..config.clone()
        };
        let dit_config =
            crate::models::dit::check_dit_checkpoint(checkpoint, Some(config.version))?;
        host_loras = load_loras(&host_config, &dit_config)?;
        &host_loras[..]
    };
    // Same fp8 rule as the unswapped path, applied on the host before the split.
    let mut dit = load_dit_with_loras(config, checkpoint, &Device::Cpu, loras, observer)?;
    observer.phase(&format!(
        "block swap: {} double + {} single blocks in host memory",
        split.double, split.single
    ));
    enable_block_swap(&mut dit, split, &config.device)?;
    Ok(dit)
}
