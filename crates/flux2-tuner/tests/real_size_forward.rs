//! A forward pass of the full klein-4B architecture on CPU, from a real-size checkpoint file
//! (sparse, all zeros, bf16: 7.75 GB of address space), with a 2x2 latent grid and 8 text tokens.
//! It needs about 8 GB of memory and a minute, so it is kept out of the default run:
//! `cargo test --release -p flux2-tuner --features real-size-tests --test real_size_forward`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::{write_zero_checkpoint, Checkpoint, StorageDtype};
use flux2_tuner::models::dit::tokens::{image_position_ids, text_position_ids};
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use flux2_tuner::models::ModelVersion;

#[test]
fn klein_4b_forward_runs_at_full_size() {
    let dir = std::env::temp_dir().join(format!("flux2-tuner-klein4b-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flux-2-klein-4b.safetensors");
    let info = ModelVersion::Klein4b.info();
    write_zero_checkpoint(&path, &info.dit.expected_keys(), StorageDtype::BF16).unwrap();

    let start = Instant::now();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let dit = Flux2Dit::load(
        &checkpoint,
        Some(ModelVersion::Klein4b),
        DType::BF16,
        &Device::Cpu,
    )
    .unwrap();
    let loaded = start.elapsed();

    let device = Device::Cpu;
    let image = Tensor::ones((1, 4, 128), DType::F32, &device).unwrap();
    let text = Tensor::ones((1, 8, info.dit.context_in_dim), DType::F32, &device).unwrap();
    let start = Instant::now();
    let output = dit
        .forward(&DitInput {
            image_tokens: &image,
            image_position_ids: &image_position_ids(1, 2, 2, 0, &device).unwrap(),
            text_embeddings: &text,
            text_position_ids: &text_position_ids(1, 8, &device).unwrap(),
            timesteps: &Tensor::new(&[0.5f32], &device).unwrap(),
            guidance: None,
        })
        .unwrap();
    let ran = start.elapsed();
    println!("klein-4B: load {loaded:.1?}, forward {ran:.1?}");
    assert_eq!(output.dims(), &[1, 4, 128]);
    // Zero weights give a zero velocity; anything else means garbage crept in.
    let largest = output
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(largest, 0.0);
    drop(dit);
    std::fs::remove_dir_all(&dir).unwrap();
}
