//! Helpers shared by the training tests: the small random DiT, seeded random tensors and a LoRA
//! with non-zero `up` matrices attached to it.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::{DitConfig, Flux2Dit};
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::util::rng::SeededRng;

/// A small DiT: hidden 32, 2 heads, 2 double and 2 single blocks, text width 24.
pub fn config() -> DitConfig {
    DitConfig {
        in_channels: 128,
        context_in_dim: 24,
        hidden_size: 32,
        num_heads: 2,
        depth: 2,
        depth_single_blocks: 2,
        mlp_hidden_size: 96,
        axes_dim: [4, 4, 4, 4],
        theta: 2000.0,
        guidance_embed: true,
    }
}

/// Standard-normal values of `shape` from `rng`, on the CPU.
pub fn random(shape: &[usize], rng: &mut SeededRng) -> Tensor {
    let count = shape.iter().product();
    Tensor::from_vec(rng.normal_vec(count), shape, &Device::Cpu).unwrap()
}

/// Writes the small random DiT of `seed` (f32) to `path` and loads it in f32 on the CPU.
pub fn random_dit(path: &Path, seed: u64) -> Flux2Dit {
    write_random_dit(&config(), path, seed, DType::F32).unwrap();
    Flux2Dit::load(
        &Checkpoint::open(path).unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// A default LoRA drawn from `rng`, its `up` matrices then set to `scale` times normal values
/// from `rng` (so that every gradient path is exercised), attached to `dit` at multiplier 1.
pub fn attach_random_lora(dit: &mut Flux2Dit, rng: &mut SeededRng, scale: f64) -> LoraNetwork {
    let network =
        LoraNetwork::new(&dit.config, NetworkConfig::default(), rng, &Device::Cpu).unwrap();
    for module in &network.modules {
        module
            .up
            .set(&(random(module.up.dims(), rng) * scale).unwrap())
            .unwrap();
    }
    network.attach(dit, 1.0).unwrap();
    network
}

/// The largest absolute value of a tensor.
pub fn max_abs(tensor: &Tensor) -> f32 {
    tensor
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A LoRA of `config` drawn with seed 1, its `up` matrices set to 0.1 times normal values of
/// seed 2 (so that every gradient path carries signal), attached to `dit` at multiplier 1.
/// Returns the network and its parameters in `LoraNetwork::parameters` order.
pub fn attach_seeded_lora(dit: &mut Flux2Dit, config: NetworkConfig) -> (LoraNetwork, Vec<Var>) {
    let network =
        LoraNetwork::new(&dit.config, config, &mut SeededRng::new(1), &Device::Cpu).unwrap();
    let mut up_rng = SeededRng::new(2);
    for module in &network.modules {
        module
            .up
            .set(&(random(module.up.dims(), &mut up_rng) * 0.1).unwrap())
            .unwrap();
    }
    network.attach(dit, 1.0).unwrap();
    let parameters = network.parameters().into_iter().map(|(p, _)| p).collect();
    (network, parameters)
}
