//! The direct backward (`train::direct`, hand-written block forward and backward on the CPU)
//! against candle's autograd (`training_step_by_autograd`): the same loss and LoRA gradients on
//! the golden models (dev: guidance embedding; klein), a batch of two with a reference image
//! (edit training), a loss mask, f32 and bf16 weights, with and without gradient checkpointing.
//! Measured differences are printed (`--nocapture`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::train::direct;
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::step::{
    training_step_by_autograd, training_step_masked, StepBatch, StepGradients,
};
use flux2_tuner::util::rng::SeededRng;

mod common;
use common::{attach_seeded_lora, random};

fn golden() -> PathBuf {
    std::env::var_os("FLUX2_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
}

/// A golden DiT in `dtype` with a rank-4 LoRA whose `up` matrices are non-zero, so every
/// gradient path carries signal.
fn model(
    variant: &str,
    dtype: DType,
    network_config: NetworkConfig,
) -> (Flux2Dit, LoraNetwork, Vec<Var>) {
    let path = golden().join(variant).join("dit.safetensors");
    let checkpoint = Checkpoint::open(&path).unwrap();
    let mut dit = Flux2Dit::load(&checkpoint, None, dtype, &Device::Cpu).unwrap();
    let (network, parameters) = attach_seeded_lora(&mut dit, network_config);
    (dit, network, parameters)
}

fn rank_4() -> NetworkConfig {
    NetworkConfig {
        dim: 4,
        alpha: 2.0,
        ..NetworkConfig::default()
    }
}

/// Two samples of 3x4 latent patches, a 2x2 reference image each, 5 text tokens, a loss mask.
struct BatchData {
    latents: Tensor,
    noise: Tensor,
    text: Tensor,
    controls: Vec<Tensor>,
    mask: Tensor,
}

impl BatchData {
    fn new(dit: &Flux2Dit) -> Self {
        let mut rng = SeededRng::new(7);
        let mask_values: Vec<f32> = (0..2 * 3 * 4).map(|i| (i % 5) as f32 / 4.0).collect();
        Self {
            latents: random(&[2, 128, 3, 4], &mut rng),
            noise: random(&[2, 128, 3, 4], &mut rng),
            text: random(&[2, 5, dit.config.context_in_dim], &mut rng),
            controls: vec![random(&[2, 128, 2, 2], &mut rng)],
            mask: Tensor::from_vec(mask_values, (2, 1, 3, 4), &Device::Cpu).unwrap(),
        }
    }

    fn batch(&self) -> StepBatch<'_> {
        StepBatch {
            latents: &self.latents,
            noise: &self.noise,
            sigmas: &[0.3, 0.8],
            model_timesteps: &[0.3, 0.8],
            text: &self.text,
            controls: &self.controls,
            guidance: Some(2.5),
            weights: &[1.0, 0.5],
        }
    }
}

fn values(tensor: &Tensor) -> Vec<f64> {
    tensor
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every parameter got a non-zero gradient.
fn assert_all_nonzero(result: &StepGradients) {
    for gradient in &result.gradients {
        assert!(
            values(gradient).iter().any(|v| *v != 0.0),
            "a parameter got no gradient"
        );
    }
}

/// Largest relative difference of one parameter's gradient (Frobenius norms) over all
/// parameters, and the loss' relative difference.
fn errors(a: &StepGradients, b: &StepGradients) -> (f64, f64) {
    let mut worst: f64 = 0.0;
    for (x, y) in a.gradients.iter().zip(&b.gradients) {
        let (mut difference, mut norm) = (0.0, 0.0);
        for (p, q) in values(x).into_iter().zip(values(y)) {
            difference += (p - q) * (p - q);
            norm += q * q;
        }
        if norm == 0.0 {
            // A module skipped by module dropout: no gradient on either side.
            assert_eq!(difference, 0.0, "one side has a gradient the other lacks");
            continue;
        }
        worst = worst.max((difference / norm).sqrt());
    }
    (((a.loss - b.loss) / b.loss).abs() as f64, worst)
}

#[test]
fn direct_backward_matches_autograd() {
    for variant in ["dev", "klein"] {
        for mask_on in [false, true] {
            // f32 autograd: the reference of every comparison.
            let (dit, _network, parameters) = model(variant, DType::F32, rank_4());
            let data = BatchData::new(&dit);
            let mask = mask_on.then_some(&data.mask);
            let exact =
                training_step_by_autograd(&dit, &data.batch(), mask, &parameters, false, None)
                    .unwrap();
            let mut bf16_errors = Vec::new();
            for dtype in [DType::F32, DType::BF16] {
                let (dit, _network, parameters) = model(variant, dtype, rank_4());
                assert!(direct::applies(&dit), "the direct backward must run here");
                let reference =
                    training_step_by_autograd(&dit, &data.batch(), mask, &parameters, false, None)
                        .unwrap();
                let direct =
                    training_step_masked(&dit, &data.batch(), mask, &parameters, false, None)
                        .unwrap();
                let checkpointed =
                    training_step_masked(&dit, &data.batch(), mask, &parameters, true, None)
                        .unwrap();
                assert_all_nonzero(&direct);
                let (loss_error, gradient_error) = errors(&direct, &reference);
                let (direct_loss_vs_f32, direct_vs_f32) = errors(&direct, &exact);
                let (autograd_loss_vs_f32, autograd_vs_f32) = errors(&reference, &exact);
                println!(
                    "{variant} {dtype:?} mask {mask_on}: direct vs autograd: loss rel {loss_error:.2e}, worst LoRA gradient rel {gradient_error:.2e}; \
                     against f32 autograd: direct loss {direct_loss_vs_f32:.2e} gradients {direct_vs_f32:.2e}, autograd loss {autograd_loss_vs_f32:.2e} gradients {autograd_vs_f32:.2e}"
                );
                if dtype == DType::F32 {
                    // Only the summation order differs.
                    assert!(loss_error < 1e-5, "loss: {loss_error}");
                    assert!(gradient_error < 1e-5, "gradients: {gradient_error}");
                } else {
                    bf16_errors.push((
                        direct_vs_f32,
                        autograd_vs_f32,
                        direct_loss_vs_f32,
                        autograd_loss_vs_f32,
                    ));
                }
                // Checkpointing recomputes the same tapes: identical results.
                assert_eq!(checkpointed.loss, direct.loss);
                for (a, b) in checkpointed.gradients.iter().zip(&direct.gradients) {
                    assert_eq!(values(a), values(b));
                }
            }
            // bf16 mixed precision: both paths round the same operands to bf16 (the autograd
            // path also rounds its scaled queries), so the direct path is as close to exact f32
            // as the autograd path is.
            for (direct_error, autograd_error, direct_loss, autograd_loss) in bf16_errors {
                assert!(
                    direct_error < 1.5 * autograd_error + 1e-4,
                    "bf16 gradients {direct_error} vs {autograd_error}"
                );
                assert!(
                    direct_loss < 1.5 * autograd_loss + 1e-5,
                    "bf16 loss {direct_loss} vs {autograd_loss}"
                );
            }
        }
    }
}

/// LoRA dropout (network, rank and module) draws the same masks from the same generator as the
/// autograd path, also when checkpointing recomputes the blocks, and leaves the generator where
/// the autograd path leaves it.
#[test]
fn dropout_matches_autograd() {
    for variant in ["dev", "klein"] {
        let config = NetworkConfig {
            dropout: Some(0.3),
            rank_dropout: Some(0.25),
            module_dropout: Some(0.2),
            ..rank_4()
        };
        let (dit, network, parameters) = model(variant, DType::F32, config);
        assert!(direct::applies(&dit));
        let dropout = network.dropout.clone().expect("dropout is configured");
        let start = dropout.rng_state();
        let data = BatchData::new(&dit);
        let run = |direct_path: bool, checkpointing: bool| {
            dropout.set_rng_state(start);
            let result = if direct_path {
                training_step_masked(&dit, &data.batch(), None, &parameters, checkpointing, None)
            } else {
                training_step_by_autograd(
                    &dit,
                    &data.batch(),
                    None,
                    &parameters,
                    checkpointing,
                    None,
                )
            }
            .unwrap();
            (result, dropout.rng_state())
        };
        let (reference, reference_state) = run(false, false);
        let (without_dropout_loss, _) = {
            let (plain, _network, plain_parameters) = model(variant, DType::F32, rank_4());
            let plain =
                training_step_masked(&plain, &data.batch(), None, &plain_parameters, false, None)
                    .unwrap();
            (plain.loss, ())
        };
        // The masks change the loss: the test has teeth.
        assert!((reference.loss - without_dropout_loss).abs() > 1e-4 * without_dropout_loss.abs());
        for checkpointing in [false, true] {
            let (direct, state) = run(true, checkpointing);
            let (loss_error, gradient_error) = errors(&direct, &reference);
            println!(
                "{variant} dropout, checkpointing {checkpointing}: loss rel {loss_error:.2e}, worst LoRA gradient rel {gradient_error:.2e}"
            );
            assert!(
                loss_error < 1e-5 && gradient_error < 1e-5,
                "{loss_error} {gradient_error}"
            );
            assert_eq!(state, reference_state);
        }
    }
}
