//! Loading the DiT for generation with block swap: on the host first, LoRAs applied there, then
//! everything but the swapped blocks' Linear weights moved to the device.

use candle_core::Device;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::lora::LoraFile;
use crate::models::dit::Flux2Dit;
use crate::offload::placement::{enable_block_swap, split_for_checkpoint};
use crate::sample::generate::{load_loras, GenerateObserver, GeneratorConfig};

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
    let mut dit = Flux2Dit::load(
        checkpoint,
        Some(config.version),
        config.dit_dtype,
        &Device::Cpu,
    )?;
    let host_loras;
    let loras = if config.device.is_cpu() {
        loras
    } else {
        let host_config = GeneratorConfig {
            device: Device::Cpu,
            ..config.clone()
        };
        host_loras = load_loras(&host_config, &dit.config)?;
        &host_loras[..]
    };
    for (file, multiplier) in loras {
        observer.phase(&format!(
            "applying LoRA {} x {multiplier}",
            file.path.display()
        ));
        file.apply(dit.linears_mut(), *multiplier, config.merge_loras)?;
    }
    observer.phase(&format!(
        "block swap: {} double + {} single blocks in host memory",
        split.double, split.single
    ));
    enable_block_swap(&mut dit, split, &config.device)?;
    Ok(dit)
}
