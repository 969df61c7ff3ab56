//! Block swap (`--blocks_to_swap`) on the tiny golden models, through the CPU's simulated device
//! (every upload is a real copy into fresh storage): forward outputs, losses and LoRA gradients are
//! bit-identical to the unswapped model; uploads come in forward order for the forward and in
//! reverse order for the backward, one block ahead; at most two swapped blocks are resident.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use flux2_tuner::offload::{enable_block_swap, BlockId, SwapEvent, SwapSplit};
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::step::{training_step, StepBatch, StepGradients};
use flux2_tuner::util::rng::SeededRng;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

/// The golden DiT of `variant` with the golden LoRA attached as trainable adapters, optionally
/// swapping `split` (placed by `enable_block_swap` before the LoRA is attached, as the trainer
/// does).
fn load(variant: &str, dtype: DType, split: Option<SwapSplit>) -> (Flux2Dit, LoraNetwork) {
    let dir = golden().join(variant);
    let mut dit = Flux2Dit::load(
        &Checkpoint::open(&dir.join("dit.safetensors")).unwrap(),
        None,
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    if let Some(split) = split {
        enable_block_swap(&mut dit, split, &Device::Cpu).unwrap();
    }
    let lora_path = dir.join("lora.safetensors");
    let lora = Checkpoint::open(&lora_path).unwrap();
    let rank = lora
        .keys()
        .find(|k| k.ends_with(".lora_down.weight"))
        .map(|k| lora.shape(k).unwrap()[0])
        .unwrap();
    let config = NetworkConfig {
        dim: rank,
        ..NetworkConfig::default()
    };
    let mut network =
        LoraNetwork::new(&dit.config, config, &mut SeededRng::new(0), &Device::Cpu).unwrap();
    network.load_weights(&lora_path).unwrap();
    network.attach(&mut dit, 1.0).unwrap();
    (dit, network)
}

struct Case {
    tensors: Checkpoint,
}

impl Case {
    fn open(variant: &str) -> Self {
        let path = golden().join(variant).join("cases/train_step.safetensors");
        Self {
            tensors: Checkpoint::open(&path).unwrap(),
        }
    }

    fn get(&self, key: &str) -> Tensor {
        self.tensors.load(key, DType::F32, &Device::Cpu).unwrap()
    }

    fn values(&self, key: &str) -> Vec<f64> {
        self.get(key)
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }
}

fn forward(dit: &Flux2Dit, case: &Case) -> Vec<f32> {
    let tokens =
        flux2_tuner::models::dit::tokens::pack_latents(&case.get("noisy_model_input")).unwrap();
    let image_ids = case
        .tensors
        .load("x_ids", DType::I64, &Device::Cpu)
        .unwrap();
    let text_ids = case
        .tensors
        .load("ctx_ids", DType::I64, &Device::Cpu)
        .unwrap();
    let guidance = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
    let output = dit
        .forward(&DitInput {
            image_tokens: &tokens,
            image_position_ids: &image_ids,
            text_embeddings: &case.get("ctx"),
            text_position_ids: &text_ids,
            timesteps: &case.get("dit_timesteps"),
            guidance: dit.config.guidance_embed.then_some(&guidance),
        })
        .unwrap();
    output.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn step(dit: &Flux2Dit, network: &LoraNetwork, case: &Case, checkpointing: bool) -> StepGradients {
    let parameters: Vec<_> = network.parameters().into_iter().map(|(p, _)| p).collect();
    let sigmas = case.values("sigmas");
    let timesteps = case.values("dit_timesteps");
    training_step(
        dit,
        &StepBatch {
            latents: &case.get("latents"),
            noise: &case.get("noise"),
            sigmas: &sigmas,
            model_timesteps: &timesteps,
            text: &case.get("ctx"),
            controls: &[],
            guidance: Some(1.0),
            weights: &[1.0, 2.0],
        },
        &parameters,
        checkpointing,
    )
    .unwrap()
}

fn flat(gradients: &StepGradients) -> Vec<Vec<f32>> {
    gradients
        .gradients
        .iter()
        .map(|g| {
            g.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Splits to test on a model with `doubles` + `singles` blocks: one of each, only singles, and
/// every block (the mechanism has no `n − 2` limit; that is Musubi's rule for `N`).
fn splits(doubles: usize, singles: usize) -> Vec<SwapSplit> {
    vec![
        SwapSplit {
            double: 1,
            single: 1,
        },
        SwapSplit {
            double: 0,
            single: singles - 1,
        },
        SwapSplit {
            double: doubles,
            single: singles,
        },
    ]
}

fn uploads(dit: &Flux2Dit) -> Vec<BlockId> {
    dit.block_swap.as_ref().unwrap().ledger().uploads()
}

#[test]
fn forward_is_bit_identical_and_uploads_in_order() {
    for variant in ["dev", "klein"] {
        let case = Case::open(variant);
        for dtype in [DType::F32, DType::BF16] {
            let (reference, _) = load(variant, dtype, None);
            let expected = forward(&reference, &case);
            let (doubles, singles) = (reference.double_blocks.len(), reference.single_blocks.len());
            for split in splits(doubles, singles) {
                let (swapped, _) = load(variant, dtype, Some(split));
                let swap = swapped.block_swap.clone().unwrap();
                // The swapped weights are separate storage: identical values, different tensors.
                let order = swap.forward_order().to_vec();
                assert_eq!(order.len(), split.double + split.single);
                for _ in 0..2 {
                    assert_eq!(
                        forward(&swapped, &case),
                        expected,
                        "{variant} {dtype:?} {split:?}"
                    );
                }
                // Two forwards: ascending, one ahead, wrapping to the first for the next one.
                let mut expected_uploads = order.clone();
                expected_uploads.extend(&order);
                expected_uploads.push(order[0]);
                assert_eq!(uploads(&swapped), expected_uploads, "{variant} {split:?}");
                let ledger = swap.ledger();
                assert_eq!(ledger.peak_resident(), 2);
                // Each upload after the first starts before the block in use is released.
                let events = ledger.events();
                for (i, id) in order.iter().enumerate().skip(1) {
                    let upload = events.iter().position(|e| *e == SwapEvent::Upload(*id));
                    let release = events
                        .iter()
                        .position(|e| *e == SwapEvent::Release(order[i - 1]));
                    assert!(upload < release, "{variant} {split:?}: {events:?}");
                }
            }
        }
    }
}

#[test]
fn gradients_are_bit_identical_with_and_without_checkpointing() {
    for variant in ["dev", "klein"] {
        let case = Case::open(variant);
        let (reference, reference_network) = load(variant, DType::F32, None);
        let (doubles, singles) = (reference.double_blocks.len(), reference.single_blocks.len());
        let full = step(&reference, &reference_network, &case, false);
        let blockwise = step(&reference, &reference_network, &case, true);
        for checkpointing in [true, false] {
            for split in splits(doubles, singles) {
                let (swapped, network) = load(variant, DType::F32, Some(split));
                let swap = swapped.block_swap.clone().unwrap();
                let actual = step(&swapped, &network, &case, checkpointing);
                let label = format!("{variant} checkpointing={checkpointing} {split:?}");
                // Without checkpointing the swapped model also runs the step block-wise (the
                // backward needs the weights again, in reverse), so both equal the unswapped
                // block-wise step bit for bit.
                assert_eq!(actual.loss, blockwise.loss, "{label}");
                assert_eq!(flat(&actual), flat(&blockwise), "{label}");
                // And the full-graph step up to summation order.
                assert!((actual.loss - full.loss).abs() <= 1e-6 * full.loss.abs());
                for (a, b) in flat(&actual).iter().zip(flat(&full)) {
                    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                    let worst = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(worst <= 1e-5 * scale, "{label}: {worst} vs {scale}");
                }
                // Forward ascending, backward descending, each prefetched while the previous
                // one computes, and the first one again for the next step.
                let order = swap.forward_order().to_vec();
                let mut expected_uploads = order.clone();
                expected_uploads.extend(order.iter().rev());
                expected_uploads.push(order[0]);
                assert_eq!(uploads(&swapped), expected_uploads, "{label}");
                assert!(swap.ledger().peak_resident() <= 2, "{label}");
            }
        }
    }
}
