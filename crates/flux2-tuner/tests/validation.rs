//! Validation loss (`train::validation`) on a small random DiT and hand-written caches: it equals
//! the training forward's loss at the same timesteps and noise, repeats exactly, and follows the
//! attached LoRA.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flux2_tuner::data::cache::{
    latent_cache_path, text_cache_path, write_latent_cache, write_text_cache,
};
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::train::data::load_batch;
use flux2_tuner::train::network::{with_detached_adapters, LoraNetwork, NetworkConfig};
use flux2_tuner::train::step::{evaluation_loss, training_forward, StepBatch};
use flux2_tuner::train::timesteps::{TimestepConfig, TimestepSampling, WeightingScheme};
use flux2_tuner::train::validation::{model_timestep, ValidationOptions, Validator};
use flux2_tuner::util::rng::SeededRng;

mod common;
use common::{attach_random_lora, random, random_dit};

const ARCHITECTURE: &str = "f2k4b";

/// Three cached 32x32 items (latents `[128, 2, 2]`, text `[512, 24]`) in batches of two, and
/// their dataset TOML.
fn write_dataset(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let mut rng = SeededRng::new(21);
    for index in 0..3 {
        let stem = format!("held{index}");
        let latent = random(&[128, 2, 2], &mut rng);
        write_latent_cache(
            &latent_cache_path(&cache, &stem, (32, 32), ARCHITECTURE),
            &latent,
            &[],
            None,
            ARCHITECTURE,
            (32, 32),
        )
        .unwrap();
        let text = random(&[512, 24], &mut rng);
        write_text_cache(
            &text_cache_path(&cache, &stem, ARCHITECTURE),
            &text,
            ARCHITECTURE,
            &stem,
        )
        .unwrap();
    }
    let toml = dir.join("validation.toml");
    std::fs::write(
        &toml,
        format!(
            "[general]\nresolution = [32, 32]\nbatch_size = 2\n\n[[datasets]]\n\
             image_directory = \"{}\"\ncache_directory = \"{}\"\n",
            images.display(),
            cache.display()
        ),
    )
    .unwrap();
    toml
}

/// The loss computed directly: `training_forward` on every batch at every timestep with the
/// validator's noise, averaged per item.
fn direct_loss(validator: &Validator, dit: &Flux2Dit, timesteps: &TimestepConfig) -> f64 {
    let mut total = 0.0;
    let mut items = 0;
    for batch_items in &validator.batches {
        let batch = load_batch(batch_items, &Device::Cpu).unwrap();
        let size = batch_items.len();
        let noise = validator.batch_noise(items, &batch.latents).unwrap();
        items += size;
        for t in &validator.options.timesteps {
            let sigma = t / 1000.0;
            let output = training_forward(
                dit,
                &StepBatch {
                    latents: &batch.latents,
                    noise: &noise,
                    sigmas: &vec![sigma; size],
                    model_timesteps: &vec![model_timestep(timesteps.sampling, sigma); size],
                    text: &batch.text,
                    controls: &batch.controls,
                    guidance: Some(1.0),
                    weights: &vec![timesteps.weighting_scheme.loss_weight(sigma); size],
                },
            )
            .unwrap();
            total += f64::from(output.loss.to_scalar::<f32>().unwrap()) * size as f64;
        }
    }
    total / (items * validator.options.timesteps.len()) as f64
}

#[test]
fn validation_loss_is_the_training_loss_at_fixed_timesteps_and_noise() {
    let dir = std::env::temp_dir().join(format!("flux2-validation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let toml = write_dataset(&dir);
    let mut dit = random_dit(&dir.join("dit.safetensors"), 31);
    let network = LoraNetwork::new(
        &dit.config,
        NetworkConfig::default(),
        &mut SeededRng::new(3),
        &Device::Cpu,
    )
    .unwrap();
    network.attach(&mut dit, 1.0).unwrap();

    let validator = Validator::new(
        &ValidationOptions {
            dataset_config: toml.clone(),
            every_n_steps: Some(1),
            every_n_epochs: None,
            timesteps: vec![250.0, 750.0],
            seed: 4,
            max_steps: None,
        },
        ARCHITECTURE,
    )
    .unwrap();
    assert_eq!(validator.items(), 3);
    assert_eq!(
        validator.batches.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 1]
    );

    for (sampling, weighting) in [
        (TimestepSampling::Sigma, WeightingScheme::None),
        (TimestepSampling::Flux2Shift, WeightingScheme::SigmaSqrt),
    ] {
        let timesteps = TimestepConfig {
            sampling,
            weighting_scheme: weighting,
            ..TimestepConfig::default()
        };
        // An untrained LoRA (zero up matrices).
        let first = validator
            .evaluate(&mut dit, &timesteps, 1.0, &Device::Cpu)
            .unwrap();
        let second = validator
            .evaluate(&mut dit, &timesteps, 1.0, &Device::Cpu)
            .unwrap();
        assert_eq!(first, second, "two evaluations differ");
        let direct = direct_loss(&validator, &dit, &timesteps);
        let relative = (first - direct).abs() / direct.abs();
        println!("untrained {sampling:?}: validation {first} direct {direct} rel {relative:e}");
        assert!(relative < 1e-5, "{first} vs {direct} ({relative:e})");
    }

    // A LoRA with non-zero up matrices changes the validation loss, which again equals the
    // direct loss: the validation runs through the attached LoRA.
    let timesteps = TimestepConfig::default();
    let untrained = validator
        .evaluate(&mut dit, &timesteps, 1.0, &Device::Cpu)
        .unwrap();
    let mut rng = SeededRng::new(17);
    for module in &network.modules {
        module
            .up
            .set(&(random(module.up.dims(), &mut rng) * 0.2).unwrap())
            .unwrap();
    }
    let trained = validator
        .evaluate(&mut dit, &timesteps, 1.0, &Device::Cpu)
        .unwrap();
    let direct = direct_loss(&validator, &dit, &timesteps);
    let relative = (trained - direct).abs() / direct.abs();
    println!(
        "with LoRA: validation {trained} (untrained {untrained}) direct {direct} rel {relative:e}"
    );
    assert!((trained - untrained).abs() > 1e-4 * untrained);
    assert!(relative < 1e-5, "{trained} vs {direct} ({relative:e})");

    // --max_validation_steps 1 keeps the first batch only.
    let first_batch = Validator::new(
        &ValidationOptions {
            dataset_config: toml,
            every_n_steps: None,
            every_n_epochs: None,
            timesteps: vec![500.0],
            seed: 4,
            max_steps: Some(1),
        },
        ARCHITECTURE,
    )
    .unwrap();
    assert_eq!(first_batch.items(), 2);
}

#[test]
fn an_empty_validation_set_and_bad_timesteps_are_refused() {
    let dir = std::env::temp_dir().join(format!("flux2-validation-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let toml = dir.join("empty.toml");
    std::fs::write(
        &toml,
        format!(
            "[[datasets]]\nimage_directory = \"{}\"\nresolution = [32, 32]\n",
            dir.join("images").display()
        ),
    )
    .unwrap();
    let options = ValidationOptions {
        dataset_config: toml.clone(),
        every_n_steps: None,
        every_n_epochs: None,
        timesteps: vec![500.0],
        seed: 1,
        max_steps: None,
    };
    let message = Validator::new(&options, ARCHITECTURE)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("--validation_dataset_config"), "{message}");
    assert!(message.contains("empty.toml"), "{message}");
    assert!(message.contains("cache-text-encoder-outputs"), "{message}");
    let bad = ValidationOptions {
        timesteps: vec![1500.0],
        ..options
    };
    let message = Validator::new(&bad, ARCHITECTURE)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("1500"), "{message}");
}

/// The loss as validation computed it before the LoRA tensors were detached: the inference
/// forward straight through the attached `Var`s (the graph is recorded), no controls.
fn attached_loss(dit: &Flux2Dit, batch: &StepBatch) -> Tensor {
    use flux2_tuner::models::dit::tokens::{
        image_position_ids, pack_latents, text_position_ids, unpack_tokens,
    };
    let (size, _, height, width) = batch.latents.dims4().unwrap();
    let per_sample = |values: &[f64]| {
        let values: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        Tensor::from_vec(values, (size, 1, 1, 1), &Device::Cpu).unwrap()
    };
    let sigma = per_sample(batch.sigmas);
    let noisy = (batch
        .latents
        .broadcast_mul(&(1.0 - &sigma).unwrap())
        .unwrap()
        + batch.noise.broadcast_mul(&sigma).unwrap())
    .unwrap();
    let timesteps: Vec<f32> = batch.model_timesteps.iter().map(|t| *t as f32).collect();
    let output = dit
        .forward(&flux2_tuner::models::dit::DitInput {
            image_tokens: &pack_latents(&noisy).unwrap(),
            image_position_ids: &image_position_ids(size, height, width, 0, &Device::Cpu).unwrap(),
            text_embeddings: batch.text,
            text_position_ids: &text_position_ids(size, batch.text.dim(1).unwrap(), &Device::Cpu)
                .unwrap(),
            timesteps: &Tensor::from_vec(timesteps, size, &Device::Cpu).unwrap(),
            guidance: Some(&Tensor::full(1f32, size, &Device::Cpu).unwrap()),
        })
        .unwrap();
    let tokens = output.narrow(1, 0, height * width).unwrap();
    let prediction = unpack_tokens(&tokens, height, width).unwrap();
    let target = (batch.noise - batch.latents).unwrap();
    (prediction - target)
        .unwrap()
        .sqr()
        .unwrap()
        .broadcast_mul(&per_sample(batch.weights))
        .unwrap()
        .mean_all()
        .unwrap()
}

#[test]
fn validation_records_no_graph_through_the_lora() {
    let dir = std::env::temp_dir().join(format!("flux2-validation-graph-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dit = random_dit(&dir.join("dit.safetensors"), 37);
    let mut rng = SeededRng::new(9);
    let network = attach_random_lora(&mut dit, &mut rng, 0.2);
    let latents = random(&[2, 128, 2, 2], &mut rng);
    let noise = random(&[2, 128, 2, 2], &mut rng);
    let text = random(&[2, 6, 24], &mut rng);
    let batch = StepBatch {
        latents: &latents,
        noise: &noise,
        sigmas: &[0.25, 0.75],
        model_timesteps: &[0.25, 0.75],
        text: &text,
        controls: &[],
        guidance: Some(1.0),
        weights: &[1.0, 0.5],
    };

    // A LoRA-carrying layer records a graph through the attached `Var`s, not through the
    // detached views. (On the CPU the fused inference kernels cut the graph before the loss; on
    // other devices it would reach the loss and keep every activation alive.)
    let x = random(&[2, 4, 32], &mut rng);
    let mlp_tracks = |dit: &Flux2Dit| dit.double_blocks[0].img_mlp.forward(&x).unwrap().track_op();
    assert!(mlp_tracks(&dit), "the attached LoRA records no graph");
    assert!(!with_detached_adapters(&mut dit, |dit| mlp_tracks(dit)));
    assert!(mlp_tracks(&dit), "the adapters were not restored");

    let attached = attached_loss(&dit, &batch);
    let loss = evaluation_loss(&mut dit, &batch).unwrap();
    assert!(!loss.track_op(), "the validation loss tracks an op");
    let (attached, loss) = (
        attached.to_scalar::<f32>().unwrap(),
        loss.to_scalar::<f32>().unwrap(),
    );
    println!("validation loss {loss} attached {attached}");
    assert_eq!(loss.to_bits(), attached.to_bits(), "{loss} vs {attached}");

    // The adapters are the network's `Var`s again afterwards: training still reaches them.
    assert!(mlp_tracks(&dit));
    let trained = training_forward(&dit, &batch).unwrap();
    let gradients = trained.loss.backward().unwrap();
    assert!(network
        .modules
        .iter()
        .all(|module| gradients.get(module.up.as_tensor()).is_some()));
}
