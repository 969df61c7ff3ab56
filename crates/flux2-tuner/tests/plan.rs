//! The memory planner against hand computations on the real klein-4B and dev tables: weight bytes
//! per dtype, fp8 savings, block swap, LoRA and optimizer sizes, activation terms, and the
//! suggestion logic.

use candle_core::DType;
use flux2_tuner::checkpoint::{write_zero_checkpoint, StorageDtype};
use flux2_tuner::models::ModelVersion;
use flux2_tuner::plan::activations::{double_block_saved, single_block_saved, Tokens};
use flux2_tuner::plan::{
    plan, render, suggest, GenerationJob, ImageSize, Job, MemorySettings, OptimizerKind, Plan,
    PlanModel, TrainingJob, TEXT_TOKENS,
};
use flux2_tuner::quant::Fp8Mode;
use flux2_tuner::train::network::NetworkConfig;

const GIB: u64 = 1 << 30;

fn training(rank: usize, optimizer: OptimizerKind) -> Job {
    Job::Training(TrainingJob {
        batch_size: 1,
        image: ImageSize {
            width: 1024,
            height: 1024,
        },
        control_tokens: 0,
        text_tokens: TEXT_TOKENS,
        network: NetworkConfig {
            dim: rank,
            ..NetworkConfig::default()
        },
        optimizer,
        sample: None,
    })
}

fn gpu(dtype: DType) -> MemorySettings {
    MemorySettings::for_device(dtype, false, true)
}

/// The bytes of the line whose name starts with `prefix` in the first phase.
fn line(plan: &Plan, prefix: &str) -> u64 {
    plan.phases[0]
        .items
        .iter()
        .find(|i| i.name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line `{prefix}` in {:?}", plan.phases[0].items))
        .bytes
}

/// Block linears of a real FLUX.2 (MLP ratio 3): per double block two streams of
/// qkv 3h² + proj h² + mlp.0 6h² + mlp.2 3h² = 26h²; per single block linear1 9h² + linear2 4h²
/// = 13h².
fn block_linear_elements(version: ModelVersion) -> u64 {
    let dit = version.info().dit;
    let h = dit.hidden_size as u64;
    (26 * dit.depth as u64 + 13 * dit.depth_single_blocks as u64) * h * h
}

#[test]
fn weight_bytes_are_the_key_table_times_the_dtype_size() {
    for (version, parameters) in [
        (ModelVersion::Klein4b, 3_875_544_576u64),
        (ModelVersion::Dev, 32_223_281_152),
    ] {
        let model = PlanModel::of_version(version);
        let from_table: u64 = model
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(from_table, parameters);
        let job = training(16, OptimizerKind::AdamW);
        let bf16 = plan(&model, &gpu(DType::BF16), &job).unwrap();
        assert_eq!(line(&bf16, "DiT weights"), 2 * parameters);
        let f32 = plan(&model, &gpu(DType::F32), &job).unwrap();
        assert_eq!(line(&f32, "DiT weights"), 4 * parameters);

        // fp8: the block linears become one byte per value plus an f32 scale per 64 inputs.
        let fp8 = plan(
            &model,
            &MemorySettings {
                fp8: Fp8Mode::Scaled,
                ..gpu(DType::BF16)
            },
            &job,
        )
        .unwrap();
        let linears = block_linear_elements(version);
        assert_eq!(line(&fp8, "DiT weights"), 2 * (parameters - linears));
        assert_eq!(line(&fp8, "DiT block linears"), linears + 4 * linears / 64);
    }
}

#[test]
fn block_swap_keeps_the_swapped_blocks_off_the_device() {
    // dev, 29 blocks: 6 double + 44 single (spec §6.2); fp8 scaled blocks.
    let model = PlanModel::of_version(ModelVersion::Dev);
    let h = 6144u64;
    let head_dim = 128u64;
    let settings = MemorySettings {
        fp8: Fp8Mode::Scaled,
        blocks_to_swap: 29,
        gradient_checkpointing: true,
        ..gpu(DType::BF16)
    };
    let planned = plan(&model, &settings, &training(16, OptimizerKind::AdamW)).unwrap();
    // A block's fp8 linears plus its bf16 norm scales (query and key per stream).
    let fp8 = |elements: u64| elements + 4 * elements / 64;
    let double = fp8(26 * h * h) + 2 * 4 * head_dim;
    let single = fp8(13 * h * h) + 2 * 2 * head_dim;
    assert_eq!(planned.host_bytes, 6 * double + 44 * single);
    assert_eq!(line(&planned, "block swap"), 2 * double);
    assert_eq!(
        line(&planned, "DiT block linears"),
        fp8(block_linear_elements(ModelVersion::Dev)) - 6 * fp8(26 * h * h) - 44 * fp8(13 * h * h)
    );
    // More than the documented maximum is Musubi's assertion error.
    let refused = plan(
        &model,
        &MemorySettings {
            blocks_to_swap: 30,
            ..settings
        },
        &training(16, OptimizerKind::AdamW),
    );
    assert!(refused
        .unwrap_err()
        .to_string()
        .contains("--blocks_to_swap"));
}

#[test]
fn lora_gradient_and_optimizer_sizes() {
    // klein-4B: LoRA on every block linear. rank x (in + out): per double block two streams of
    // qkv 4h + proj 2h + mlp.0 7h + mlp.2 4h = 17h, per single block linear1 10h + linear2 5h.
    let model = PlanModel::of_version(ModelVersion::Klein4b);
    let h = 3072u64;
    let rank = 16u64;
    let parameters = rank * (5 * 2 * 17 * h + 20 * 15 * h);
    for (optimizer, states) in [
        (OptimizerKind::AdamW, 8 * parameters),
        (OptimizerKind::Lion, 4 * parameters),
        (OptimizerKind::Prodigy, 16 * parameters),
    ] {
        let planned = plan(&model, &gpu(DType::BF16), &training(16, optimizer)).unwrap();
        assert_eq!(line(&planned, "LoRA parameters"), 4 * parameters);
        assert_eq!(line(&planned, "LoRA gradients"), 4 * parameters);
        assert_eq!(line(&planned, "optimizer states"), states);
    }
    // Adafactor: a row and a column vector per LoRA matrix; 80 modules.
    let planned = plan(
        &model,
        &gpu(DType::BF16),
        &training(16, OptimizerKind::Adafactor),
    )
    .unwrap();
    let factored = 4 * (2 * 80 * rank + 5 * 2 * 17 * h + 20 * 15 * h);
    assert_eq!(line(&planned, "optimizer states"), factored);
    assert!(planned.phases[0]
        .items
        .iter()
        .any(|i| i.name.contains("80 modules")));
}

#[test]
fn activation_terms_follow_the_op_count() {
    // Single block, f32 activations, LoRA rank r on both linears, per token (module docs):
    // modulate 4h, linear1 16(3h+2m) + 4r, q/k/v copy 12h, norms/rope 20h, attention 8h + 4heads,
    // swiglu 8m, concat 4(h+m), linear2 16h + 4r, gated add 8h.
    let config = ModelVersion::Klein4b.info().dit;
    let (h, m, heads, r) = (3072u64, 9216u64, 24u64, 16usize);
    let tokens = Tokens {
        batch: 2,
        image: 4096,
        text: 512,
    };
    let rank = |_: &str| Some(r);
    let per_token = 4 * h
        + 16 * (3 * h + 2 * m)
        + 4 * r as u64
        + 12 * h
        + 20 * h
        + 8 * h
        + 4 * heads
        + 8 * m
        + 4 * (h + m)
        + 16 * h
        + 4 * r as u64
        + 8 * h;
    assert_eq!(
        single_block_saved(&config, tokens, DType::F32, 0, &rank),
        2 * 4608 * per_token
    );
    // Without LoRA targets only the frozen products remain of the linears.
    let none = |_: &str| None;
    let frozen = per_token - 12 * (3 * h + 2 * m) - 12 * h - 8 * r as u64;
    assert_eq!(
        single_block_saved(&config, tokens, DType::F32, 0, &none),
        2 * 4608 * frozen
    );
    // bf16 doubles the casts: the double block's text stream is the same per token as its image
    // stream, so the total is linear in the joint length.
    let both = double_block_saved(&config, tokens, DType::BF16, 0, &rank);
    let image_only =
        double_block_saved(&config, Tokens { text: 0, ..tokens }, DType::BF16, 0, &rank);
    assert_eq!(both * 4096, image_only * 4608);
}

#[test]
fn checkpointing_keeps_block_inputs_and_offload_moves_them_to_the_host() {
    let model = PlanModel::of_version(ModelVersion::Klein4b);
    let job = training(16, OptimizerKind::AdamW);
    let checkpointed = MemorySettings {
        gradient_checkpointing: true,
        ..gpu(DType::BF16)
    };
    let planned = plan(&model, &checkpointed, &job).unwrap();
    let block_input = 4608 * 3072 * 2;
    assert_eq!(line(&planned, "block inputs kept"), 25 * block_input);
    let offloaded = plan(
        &model,
        &MemorySettings {
            cpu_offload: true,
            ..checkpointed.clone()
        },
        &job,
    )
    .unwrap();
    assert_eq!(
        line(&offloaded, "block inputs in host memory"),
        2 * block_input
    );
    assert_eq!(offloaded.host_bytes, 25 * block_input);
    let full = plan(&model, &gpu(DType::BF16), &job).unwrap();
    assert!(
        full.peak() > 3 * planned.peak(),
        "{} {}",
        full.peak(),
        planned.peak()
    );
}

#[test]
fn suggestions_follow_musubi_order() {
    // dev LoRA training at 1024x1024 on 24 GB needs checkpointing, fp8 and block swap.
    let dev = PlanModel::of_version(ModelVersion::Dev);
    let job = training(16, OptimizerKind::AdamW);
    let start = gpu(DType::BF16);
    let found = suggest(&dev, &start, &job, 24 * GIB).unwrap();
    assert!(found.fits);
    assert_eq!(found.flags[0], "--gradient_checkpointing");
    assert_eq!(found.flags[1], "--fp8_base --fp8_scaled");
    assert!(found.flags[2].starts_with("--blocks_to_swap"));
    assert!(found.plan.peak() <= 24 * GIB);
    // The swap count is the smallest that fits: one fewer does not.
    let swap = found.settings.blocks_to_swap;
    assert!(swap > 0);
    let fewer = plan(
        &dev,
        &MemorySettings {
            blocks_to_swap: swap - 1,
            ..found.settings.clone()
        },
        &job,
    )
    .unwrap();
    assert!(!fewer.fits(24 * GIB));

    // klein-4B with checkpointing fits 24 GB as is: the first candidate, nothing added.
    let klein = PlanModel::of_version(ModelVersion::Klein4b);
    let checkpointed = MemorySettings {
        gradient_checkpointing: true,
        ..start.clone()
    };
    let as_is = suggest(&klein, &checkpointed, &job, 24 * GIB).unwrap();
    assert!(as_is.fits && as_is.flags.is_empty());

    // dev generation on 24 GB cannot fit: the Mistral text encoder alone is larger.
    let generation = Job::Generation(GenerationJob {
        image: ImageSize {
            width: 1024,
            height: 1024,
        },
        control_tokens: 0,
        text_tokens: TEXT_TOKENS,
        unmerged_lora_bytes: 0,
        uses_ae: true,
    });
    let none = suggest(&dev, &MemorySettings::default(), &generation, 24 * GIB).unwrap();
    assert!(!none.fits);
    let text = render(
        &plan(&dev, &MemorySettings::default(), &generation).unwrap(),
        Some(24 * GIB),
        Some(&none),
    );
    assert!(
        text.contains("suggestion: none fits") && text.contains("text encoder"),
        "{text}"
    );
}

#[test]
fn the_header_of_a_checkpoint_gives_the_same_plan_as_the_table() {
    let dir = std::env::temp_dir().join(format!("flux2-plan-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("klein.safetensors");
    let specs = ModelVersion::Klein4b.info().dit.expected_keys();
    write_zero_checkpoint(&path, &specs, StorageDtype::BF16).unwrap();
    let from_header = PlanModel::from_checkpoint(&path, ModelVersion::Klein4b).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let job = training(16, OptimizerKind::AdamW);
    let settings = gpu(DType::BF16);
    assert_eq!(
        plan(&from_header, &settings, &job).unwrap().peak(),
        plan(
            &PlanModel::of_version(ModelVersion::Klein4b),
            &settings,
            &job
        )
        .unwrap()
        .peak()
    );
}
