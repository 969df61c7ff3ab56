//! Memory features of LoRA training (issue 9): fp8 base weights (`--fp8_base --fp8_scaled`) and
//! host-memory activation offload (`--gradient_checkpointing_cpu_offload`), on the tiny golden
//! models. Measured errors are printed (`--nocapture`).
//!
//! A counting allocator measures the host memory held while loading, so the tests of this binary
//! run one at a time (`SERIAL`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::lora::KeyFilter;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::{DitConfig, Flux2Dit};
use flux2_tuner::nn::trainable::ActivationStore;
use flux2_tuner::quant::{is_fp8_target, Fp8Mode};
use flux2_tuner::sample::generate::{load_dit, load_loras, GeneratorConfig, LoraSpec, Silent};
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::optim::{adamw_from_args, Optimizer};
use flux2_tuner::train::step::{training_step, training_step_with, StepBatch, StepGradients};
use flux2_tuner::util::rng::SeededRng;

mod common;
use common::{attach_seeded_lora, random};

/// The system allocator, counting the bytes held and the most held since the last reset.
struct CountingAllocator;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = System.alloc(layout);
        if !pointer.is_null() {
            let held = HELD.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(held, Ordering::SeqCst);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        System.dealloc(pointer, layout);
        HELD.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn golden() -> PathBuf {
    std::env::var_os("FLUX2_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
}

/// A golden DiT loaded in `dtype` (block linears as `fp8`) with a LoRA whose `up` matrices are
/// non-zero (so every gradient path is exercised); the same LoRA for every call.
fn model(variant: &str, dtype: DType, fp8: Fp8Mode) -> (Flux2Dit, LoraNetwork, Vec<Var>) {
    let path = golden().join(variant).join("dit.safetensors");
    let checkpoint = Checkpoint::open(&path).unwrap();
    let mut dit = Flux2Dit::load_with_fp8(&checkpoint, None, dtype, &Device::Cpu, fp8).unwrap();
    let (network, parameters) = attach_seeded_lora(
        &mut dit,
        NetworkConfig {
            dim: 4,
            alpha: 4.0,
            ..NetworkConfig::default()
        },
    );
    (dit, network, parameters)
}

/// Latents, noise and text of a two-sample batch for `config` (2x3 latent patches, 5 text
/// tokens).
struct BatchData {
    latents: Tensor,
    noise: Tensor,
    text: Tensor,
}

impl BatchData {
    fn new(config: &DitConfig) -> Self {
        let mut rng = SeededRng::new(7);
        Self {
            latents: random(&[2, 128, 2, 3], &mut rng),
            noise: random(&[2, 128, 2, 3], &mut rng),
            text: random(&[2, 5, config.context_in_dim], &mut rng),
        }
    }

    fn batch(&self) -> StepBatch<'_> {
        StepBatch {
            latents: &self.latents,
            noise: &self.noise,
            sigmas: &[0.3, 0.7],
            model_timesteps: &[0.3, 0.7],
            text: &self.text,
            controls: &[],
            guidance: Some(1.0),
            weights: &[1.0, 1.0],
        }
    }

    /// Bytes of one block-boundary activation in `dtype`: `[2, 6 image + 5 text tokens, hidden]`.
    fn boundary_bytes(&self, config: &DitConfig, dtype: DType) -> usize {
        2 * (6 + 5) * config.hidden_size * dtype.size_in_bytes()
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

/// `|a - b| / |b|` over all LoRA gradients together (Frobenius norms).
fn gradient_error(a: &StepGradients, b: &StepGradients) -> f64 {
    let (mut difference, mut norm) = (0.0, 0.0);
    for (x, y) in a.gradients.iter().zip(&b.gradients) {
        for (p, q) in values(x).into_iter().zip(values(y)) {
            difference += (p - q) * (p - q);
            norm += q * q;
        }
    }
    (difference / norm).sqrt()
}

fn loss_error(a: &StepGradients, b: &StepGradients) -> f64 {
    ((a.loss - b.loss) / b.loss).abs() as f64
}

fn assert_finite_and_nonzero(result: &StepGradients, what: &str) {
    assert!(result.loss.is_finite(), "{what}: loss {}", result.loss);
    for gradient in &result.gradients {
        let gradient = values(gradient);
        assert!(gradient.iter().all(|v| v.is_finite()), "{what}: gradient");
        assert!(gradient.iter().any(|v| *v != 0.0), "{what}: zero gradient");
    }
}

/// Training-step loss and LoRA gradients with fp8 block linears against bf16 and f32 weights.
/// dev's linears are 64 wide (one scale per 64 inputs, Musubi's layout); klein's are 72 wide
/// (Musubi's fallback: one scale per output row). The fp8 error is the F8E4M3 rounding of the
/// weights (3 mantissa bits, up to 1/16 of a value), a few times bf16's (8 bits).
#[test]
fn fp8_training_step_stays_close_to_bf16_and_f32() {
    let _serial = serial();
    for variant in ["dev", "klein"] {
        let run = |dtype: DType, fp8: Fp8Mode, checkpointing: bool| {
            let (dit, _network, parameters) = model(variant, dtype, fp8);
            let data = BatchData::new(&dit.config);
            training_step(&dit, &data.batch(), &parameters, checkpointing).unwrap()
        };
        let f32_weights = run(DType::F32, Fp8Mode::Off, false);
        let bf16_weights = run(DType::BF16, Fp8Mode::Off, false);
        let fp8 = run(DType::BF16, Fp8Mode::Scaled, false);
        let fp8_f32_compute = run(DType::F32, Fp8Mode::Scaled, false);
        let fp8_checkpointed = run(DType::BF16, Fp8Mode::Scaled, true);
        for (result, what) in [
            (&f32_weights, "f32"),
            (&bf16_weights, "bf16"),
            (&fp8, "fp8"),
            (&fp8_f32_compute, "fp8 f32"),
            (&fp8_checkpointed, "fp8 checkpointed"),
        ] {
            assert_finite_and_nonzero(result, &format!("{variant} {what}"));
        }
        println!(
            "{variant}: loss f32 {:.6} bf16 {:.6} fp8 {:.6}; loss rel err fp8 vs bf16 {:.2e}, fp8 \
             vs f32 {:.2e}, bf16 vs f32 {:.2e}; LoRA grad rel err fp8 vs bf16 {:.2e}, fp8 vs f32 \
             {:.2e}, bf16 vs f32 {:.2e}, fp8 (f32 compute) vs f32 {:.2e}, fp8 checkpointed vs \
             full {:.2e}",
            f32_weights.loss,
            bf16_weights.loss,
            fp8.loss,
            loss_error(&fp8, &bf16_weights),
            loss_error(&fp8, &f32_weights),
            loss_error(&bf16_weights, &f32_weights),
            gradient_error(&fp8, &bf16_weights),
            gradient_error(&fp8, &f32_weights),
            gradient_error(&bf16_weights, &f32_weights),
            gradient_error(&fp8_f32_compute, &f32_weights),
            gradient_error(&fp8_checkpointed, &fp8),
        );
        // Bounds: the weights move by at most 1/16 (relative) each, so the step's outputs and
        // gradients move by a few percent; 0.1 is the bound of the fp8 inference test too.
        assert!(loss_error(&fp8, &f32_weights) < 0.05);
        assert!(gradient_error(&fp8, &f32_weights) < 0.1);
        assert!(gradient_error(&fp8_f32_compute, &f32_weights) < 0.1);
        // fp8 rounding dominates bf16 rounding, but it is a rounding, not a different model.
        assert!(gradient_error(&fp8, &bf16_weights) > gradient_error(&bf16_weights, &f32_weights));
        assert!(gradient_error(&fp8_checkpointed, &fp8) < 1e-4);
    }
}

/// With fp8 base weights (and gradient checkpointing) the LoRA learns: a few AdamW steps on one
/// batch lower its loss.
#[test]
fn fp8_lora_learns() {
    let _serial = serial();
    let (dit, network, parameters) = model("dev", DType::BF16, Fp8Mode::Scaled);
    let data = BatchData::new(&dit.config);
    let mut optimizer = adamw_from_args(network.parameters(), &[]).unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let result = training_step(&dit, &data.batch(), &parameters, true).unwrap();
        assert_finite_and_nonzero(&result, "fp8 loop");
        losses.push(result.loss);
        optimizer.step(&result.gradients, 1e-2).unwrap();
    }
    println!("fp8 LoRA losses over 8 steps: {losses:?}");
    assert!(
        losses[7] < 0.8 * losses[0],
        "the loss did not fall: {losses:?}"
    );
}

/// Block linears (the LoRA targets) are F8E4M3 with one scale per 64 inputs straight after
/// loading, the rest stays in the compute dtype, and the weights are those that quantising the
/// loaded model afterwards gives.
#[test]
fn fp8_load_quantises_the_block_linears() {
    let _serial = serial();
    let checkpoint = Checkpoint::open(&golden().join("dev/dit.safetensors")).unwrap();
    let mut quantised = Flux2Dit::load_with_fp8(
        &checkpoint,
        None,
        DType::BF16,
        &Device::Cpu,
        Fp8Mode::Scaled,
    )
    .unwrap();
    let mut reference = Flux2Dit::load(&checkpoint, None, DType::BF16, &Device::Cpu).unwrap();
    reference.quantize_blocks(Fp8Mode::Scaled).unwrap();
    let mut targets = 0;
    let reference_linears = reference.linears_mut();
    for ((path, linear), (_, expected)) in
        quantised.linears_mut().into_iter().zip(reference_linears)
    {
        if is_fp8_target(&format!("{path}.weight")) {
            targets += 1;
            assert_eq!(linear.weight.dtype(), DType::F8E4M3, "{path}");
            let (out_features, in_features) = linear.weight.dims2().unwrap();
            let scale = linear.weight_scale.as_ref().unwrap();
            assert_eq!(scale.dims(), &[out_features, in_features / 64, 1], "{path}");
            assert_eq!(
                values(&linear.dense_weight(DType::F32).unwrap()),
                values(&expected.dense_weight(DType::F32).unwrap()),
                "{path}"
            );
        } else {
            assert_eq!(linear.weight.dtype(), DType::BF16, "{path}");
            assert!(linear.weight_scale.is_none());
        }
    }
    assert_eq!(targets, 8 * 2 + 2 * 2);
}

/// Quantising while loading keeps host memory near one fp8 copy: the peak stays below the
/// model's bf16 size, which loading first and quantising afterwards must exceed.
#[test]
fn fp8_load_never_holds_the_full_precision_model() {
    let _serial = serial();
    let config = DitConfig {
        in_channels: 128,
        context_in_dim: 64,
        hidden_size: 128,
        num_heads: 2,
        depth: 2,
        depth_single_blocks: 24,
        mlp_hidden_size: 384,
        axes_dim: [16, 16, 16, 16],
        theta: 2000.0,
        guidance_embed: false,
    };
    let dir = std::env::temp_dir().join(format!("flux2-fp8-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dit.safetensors");
    write_random_dit(&config, &path, 3, DType::BF16).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let bf16_bytes: usize = config
        .expected_keys()
        .iter()
        .map(|spec| 2 * spec.shape.iter().product::<usize>())
        .sum();

    let measure = |load: &dyn Fn() -> Flux2Dit| {
        let before = HELD.load(Ordering::SeqCst);
        PEAK.store(before, Ordering::SeqCst);
        let dit = load();
        let peak = PEAK.load(Ordering::SeqCst) - before;
        let held = HELD.load(Ordering::SeqCst) - before;
        drop(dit);
        (peak, held)
    };
    let (fp8_peak, fp8_held) = measure(&|| {
        Flux2Dit::load_with_fp8(
            &checkpoint,
            None,
            DType::BF16,
            &Device::Cpu,
            Fp8Mode::Scaled,
        )
        .unwrap()
    });
    let (later_peak, later_held) = measure(&|| {
        let mut dit = Flux2Dit::load(&checkpoint, None, DType::BF16, &Device::Cpu).unwrap();
        dit.quantize_blocks(Fp8Mode::Scaled).unwrap();
        dit
    });
    println!(
        "bf16 weights {bf16_bytes} B; quantised while loading: peak {fp8_peak} B, held \
         {fp8_held} B; loaded then quantised: peak {later_peak} B, held {later_held} B"
    );
    assert!(fp8_held < later_held + later_held / 100 + 4096);
    assert!(
        fp8_held < bf16_bytes * 3 / 4,
        "fp8 model holds {fp8_held} B"
    );
    assert!(later_peak >= bf16_bytes);
    assert!(
        fp8_peak < bf16_bytes,
        "peak {fp8_peak} B while loading, the bf16 model is {bf16_bytes} B"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--gradient_checkpointing_cpu_offload`: the LoRA gradients are bit for bit those of
/// checkpointing on the device and of the full backward, the block-boundary activations were all held in host memory
/// (none on the device) and released after the step.
#[test]
fn activation_offload_gives_identical_gradients() {
    let _serial = serial();
    for (dtype, fp8) in [(DType::F32, Fp8Mode::Off), (DType::BF16, Fp8Mode::Scaled)] {
        let (dit, _network, parameters) = model("dev", dtype, fp8);
        let data = BatchData::new(&dit.config);
        let full = training_step_with(&dit, &data.batch(), &parameters, false, None).unwrap();
        let on_device = ActivationStore::on_device();
        let checkpointed =
            training_step_with(&dit, &data.batch(), &parameters, true, Some(&on_device)).unwrap();
        let host = ActivationStore::offloading();
        let offloaded =
            training_step_with(&dit, &data.batch(), &parameters, true, Some(&host)).unwrap();

        assert_finite_and_nonzero(&offloaded, "offloaded");
        assert_eq!(offloaded.loss.to_bits(), checkpointed.loss.to_bits());
        for (a, b) in offloaded.gradients.iter().zip(&checkpointed.gradients) {
            assert_eq!(
                values(a),
                values(b),
                "{dtype:?}: offload changed a gradient"
            );
        }
        let against_full = gradient_error(&offloaded, &full);
        println!(
            "{dtype:?} {fp8:?}: offloaded vs checkpointed on device: identical; vs the full \
             backward: rel err {against_full:.2e}, loss {} vs {}; saved bytes host {} device {} \
             (on-device run: {})",
            offloaded.loss,
            full.loss,
            host.peak_host_bytes(),
            host.peak_device_bytes(),
            on_device.peak_device_bytes()
        );
        // Also bit for bit the full backward: the recompute runs the same ops on the same values,
        // and each block's output gradient enters its surrogate loss unchanged.
        assert_eq!(offloaded.loss.to_bits(), full.loss.to_bits());
        for (a, b) in offloaded.gradients.iter().zip(&full.gradients) {
            assert_eq!(
                values(a),
                values(b),
                "{dtype:?}: differs from the full backward"
            );
        }

        let blocks = dit.config.depth + dit.config.depth_single_blocks;
        assert_eq!(host.peak_device_bytes(), 0);
        assert_eq!(host.host_bytes(), 0, "released after the step");
        assert_eq!(on_device.peak_host_bytes(), 0);
        assert_eq!(host.peak_host_bytes(), on_device.peak_device_bytes());
        if dtype == DType::F32 {
            let expected = blocks * data.boundary_bytes(&dit.config, DType::F32);
            assert_eq!(host.peak_host_bytes(), expected);
        }
    }
}

/// generate's `--fp8_scaled`: the block linears are F8E4M3 after loading; a merged LoRA is merged
/// into the full-precision weights first (as Musubi) and the sum quantised.
#[test]
fn generate_loads_fp8_block_linears() {
    let _serial = serial();
    let dev = golden().join("dev");
    let config = |fp8: Fp8Mode, with_lora: bool| GeneratorConfig {
        version: flux2_tuner::models::ModelVersion::Dev,
        dit: dev.join("dit.safetensors"),
        ae: golden().join("ae.safetensors"),
        text_encoder: dev.join("text_encoder/model.safetensors"),
        tokenizer: None,
        device: Device::Cpu,
        dit_dtype: DType::BF16,
        text_encoder_dtype: DType::BF16,
        fp8_text_encoder: false,
        loras: if with_lora {
            vec![LoraSpec {
                path: dev.join("lora.safetensors"),
                multiplier: 1.0,
                filter: KeyFilter::default(),
            }]
        } else {
            Vec::new()
        },
        merge_loras: true,
        no_resize_control: false,
        fp8,
        blocks_to_swap: 0,
    };
    for with_lora in [false, true] {
        let load = |fp8: Fp8Mode| {
            let config = config(fp8, with_lora);
            let checkpoint = Checkpoint::open(&config.dit).unwrap();
            let dit_config =
                flux2_tuner::models::dit::check_dit_checkpoint(&checkpoint, None).unwrap();
            let loras = load_loras(&config, &dit_config).unwrap();
            assert_eq!(loras.len(), usize::from(with_lora));
            load_dit(&config, &loras, &mut Silent).unwrap()
        };
        let mut quantised = load(Fp8Mode::Scaled);
        let mut expected = load(Fp8Mode::Off);
        expected.quantize_blocks(Fp8Mode::Scaled).unwrap();
        let mut targets = 0;
        for ((path, linear), (_, reference)) in quantised
            .linears_mut()
            .into_iter()
            .zip(expected.linears_mut())
        {
            assert!(linear.adapters.is_empty(), "{path}: LoRA not merged");
            if is_fp8_target(&format!("{path}.weight")) {
                targets += 1;
                assert_eq!(linear.weight.dtype(), DType::F8E4M3, "{path}");
            }
            assert_eq!(
                values(&linear.dense_weight(DType::F32).unwrap()),
                values(&reference.dense_weight(DType::F32).unwrap()),
                "{path}"
            );
        }
        assert_eq!(targets, 8 * 2 + 2 * 2);
    }
}
