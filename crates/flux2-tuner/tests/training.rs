//! Training-step mechanics on a small random model: block-level gradient checkpointing gives the
//! gradients of the full backward.

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::step::{training_step, StepBatch};
use flux2_tuner::util::rng::SeededRng;

mod common;
use common::{attach_random_lora, attach_seeded_lora, config, max_abs, random, random_dit};

#[test]
fn gradient_checkpointing_gives_the_full_backward_gradients() {
    let dir = std::env::temp_dir().join(format!("flux2-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dit = random_dit(&dir.join("dit.safetensors"), 11);
    let mut rng = SeededRng::new(5);
    let network = attach_random_lora(&mut dit, &mut rng, 0.1);
    let parameters: Vec<_> = network.parameters().into_iter().map(|(p, _)| p).collect();

    let latents = random(&[2, 128, 2, 3], &mut rng);
    let noise = random(&[2, 128, 2, 3], &mut rng);
    let control = random(&[2, 128, 2, 2], &mut rng);
    let text = random(&[2, 5, 24], &mut rng);
    let batch = StepBatch {
        latents: &latents,
        noise: &noise,
        sigmas: &[0.3, 0.8],
        model_timesteps: &[0.301, 0.801],
        text: &text,
        controls: std::slice::from_ref(&control),
        guidance: Some(1.0),
        weights: &[1.0, 2.0],
    };
    let full = training_step(&dit, &batch, &parameters, false).unwrap();
    let checkpointed = training_step(&dit, &batch, &parameters, true).unwrap();
    assert!((full.loss - checkpointed.loss).abs() <= 1e-6 * full.loss.abs());
    let mut worst = 0f32;
    for (a, b) in full.gradients.iter().zip(&checkpointed.gradients) {
        let scale = max_abs(a);
        assert!(scale > 0.0, "a LoRA gradient is zero");
        let error = max_abs(&(a - b).unwrap());
        worst = worst.max(error / scale);
    }
    assert!(worst < 1e-5, "checkpointed gradients differ by {worst}");
}

/// bf16 training (the default mixed precision) gives f32 LoRA gradients close to the f32 run's.
#[test]
fn bf16_training_step_matches_f32() {
    let dir = std::env::temp_dir().join(format!("flux2-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dit.safetensors");
    write_random_dit(&config(), &path, 12, DType::BF16).unwrap();
    let mut rng = SeededRng::new(6);
    let latents = random(&[1, 128, 2, 2], &mut rng);
    let noise = random(&[1, 128, 2, 2], &mut rng);
    let text = random(&[1, 4, 24], &mut rng);
    let mut results = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let mut dit =
            Flux2Dit::load(&Checkpoint::open(&path).unwrap(), None, dtype, &Device::Cpu).unwrap();
        let (_network, parameters) = attach_seeded_lora(&mut dit, NetworkConfig::default());
        for checkpointing in [false, true] {
            let batch = StepBatch {
                latents: &latents,
                noise: &noise,
                sigmas: &[0.5],
                model_timesteps: &[0.501],
                text: &text,
                controls: &[],
                guidance: Some(1.0),
                weights: &[1.0],
            };
            results.push(training_step(&dit, &batch, &parameters, checkpointing).unwrap());
        }
    }
    let reference = &results[0];
    for result in &results[1..] {
        assert!(
            (result.loss - reference.loss).abs() < 0.05 * reference.loss,
            "{} vs {}",
            result.loss,
            reference.loss
        );
        for (a, b) in reference.gradients.iter().zip(&result.gradients) {
            assert_eq!(b.dtype(), DType::F32);
            let scale = max_abs(a);
            let error = max_abs(&(a - b).unwrap());
            assert!(
                error <= 0.1 * scale + 1e-6,
                "bf16 gradient off by {error} of {scale}"
            );
        }
    }
}

/// LoRA dropouts act only in training, change the gradients, and are reproducible from the seed.
#[test]
fn lora_dropouts_are_seeded_and_training_only() {
    let dir = std::env::temp_dir().join(format!("flux2-dropout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dit.safetensors");
    write_random_dit(&config(), &path, 13, DType::F32).unwrap();
    let mut data_rng = SeededRng::new(8);
    let latents = random(&[2, 128, 2, 2], &mut data_rng);
    let noise = random(&[2, 128, 2, 2], &mut data_rng);
    let text = random(&[2, 4, 24], &mut data_rng);
    let run = |dropouts: bool| {
        let mut dit = Flux2Dit::load(
            &Checkpoint::open(&path).unwrap(),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mut config = NetworkConfig::default();
        if dropouts {
            config.dropout = Some(0.3);
            config
                .apply_args(&["rank_dropout=0.3".into(), "module_dropout=0.2".into()])
                .unwrap();
        }
        let network =
            LoraNetwork::new(&dit.config, config, &mut SeededRng::new(1), &Device::Cpu).unwrap();
        let mut up_rng = SeededRng::new(2);
        for module in &network.modules {
            module
                .up
                .set(&(random(module.up.dims(), &mut up_rng) * 0.1).unwrap())
                .unwrap();
        }
        network.attach(&mut dit, 1.0).unwrap();
        let parameters: Vec<_> = network.parameters().into_iter().map(|(p, _)| p).collect();
        let batch = StepBatch {
            latents: &latents,
            noise: &noise,
            sigmas: &[0.4, 0.7],
            model_timesteps: &[0.401, 0.701],
            text: &text,
            controls: &[],
            guidance: Some(1.0),
            weights: &[1.0, 1.0],
        };
        let step = training_step(&dit, &batch, &parameters, false).unwrap();
        // Inference (no gradient mode) never drops anything.
        let inference = dit
            .forward(&flux2_tuner::models::dit::DitInput {
                image_tokens: &latents
                    .flatten_from(2)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                image_position_ids: &flux2_tuner::models::dit::tokens::image_position_ids(
                    2,
                    2,
                    2,
                    0,
                    &Device::Cpu,
                )
                .unwrap(),
                text_embeddings: &text,
                text_position_ids: &flux2_tuner::models::dit::tokens::text_position_ids(
                    2,
                    4,
                    &Device::Cpu,
                )
                .unwrap(),
                timesteps: &Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap(),
                guidance: Some(&Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap()),
            })
            .unwrap();
        (step, inference)
    };
    let (plain, plain_inference) = run(false);
    let (first, first_inference) = run(true);
    let (second, _) = run(true);
    let difference = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
    assert_eq!(
        difference(&plain_inference, &first_inference),
        0.0,
        "dropout acted at inference"
    );
    let changed = plain
        .gradients
        .iter()
        .zip(&first.gradients)
        .any(|(a, b)| difference(a, b) > 1e-6);
    assert!(changed, "dropout changed no gradient");
    for (a, b) in first.gradients.iter().zip(&second.gradients) {
        assert_eq!(difference(a, b), 0.0, "the same seed gave other masks");
    }
}

#[test]
fn gradient_checkpointing_replays_the_lora_dropout_masks() {
    let dir = std::env::temp_dir().join(format!("flux2-ckpt-dropout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dit.safetensors");
    write_random_dit(&config(), &path, 19, DType::F32).unwrap();
    let mut dit = Flux2Dit::load(
        &Checkpoint::open(&path).unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut network_config = NetworkConfig {
        dropout: Some(0.3),
        ..NetworkConfig::default()
    };
    network_config
        .apply_args(&["rank_dropout=0.25".into(), "module_dropout=0.2".into()])
        .unwrap();
    let mut rng = SeededRng::new(6);
    let network = LoraNetwork::new(&dit.config, network_config, &mut rng, &Device::Cpu).unwrap();
    for module in &network.modules {
        let up = (random(module.up.dims(), &mut rng) * 0.1).unwrap();
        module.up.set(&up).unwrap();
    }
    network.attach(&mut dit, 1.0).unwrap();
    let parameters: Vec<_> = network.parameters().into_iter().map(|(p, _)| p).collect();
    let dropout = network.dropout.clone().unwrap();

    let latents = random(&[2, 128, 2, 3], &mut rng);
    let noise = random(&[2, 128, 2, 3], &mut rng);
    let text = random(&[2, 5, 24], &mut rng);
    let batch = StepBatch {
        latents: &latents,
        noise: &noise,
        sigmas: &[0.3, 0.8],
        model_timesteps: &[0.301, 0.801],
        text: &text,
        controls: &[],
        guidance: Some(1.0),
        weights: &[1.0, 2.0],
    };
    let start = dropout.rng_state();
    let full = training_step(&dit, &batch, &parameters, false).unwrap();
    let after_full = dropout.rng_state();
    assert_ne!(after_full, start, "the dropouts drew no mask");
    dropout.set_rng_state(start);
    let checkpointed = training_step(&dit, &batch, &parameters, true).unwrap();
    assert_eq!(
        dropout.rng_state(),
        after_full,
        "the generator state after the checkpointed step differs"
    );

    let relative = (full.loss - checkpointed.loss).abs() / full.loss.abs();
    println!(
        "loss full {} checkpointed {} rel {relative:e}",
        full.loss, checkpointed.loss
    );
    assert!(relative <= 1e-5, "losses differ by {relative:e}");
    let mut worst = 0f32;
    let mut nonzero = 0;
    for (a, b) in full.gradients.iter().zip(&checkpointed.gradients) {
        let scale = max_abs(a);
        let error = max_abs(&(a - b).unwrap());
        if scale > 0.0 {
            nonzero += 1;
            worst = worst.max(error / scale);
        } else {
            // A module skipped by module dropout has no gradient in both.
            assert_eq!(
                error, 0.0,
                "a skipped module got a gradient in one path only"
            );
        }
    }
    println!(
        "{nonzero} of {} gradients non-zero, worst rel {worst:e}",
        parameters.len()
    );
    assert!(nonzero > parameters.len() / 2);
    assert!(worst < 1e-5, "checkpointed gradients differ by {worst}");
}
