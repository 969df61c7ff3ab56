//! fp8 DiT weights (`--fp8_scaled`, `--fp8`) against the f32 reference on the golden cases: the
//! block linears stored as F8E4M3 (Musubi's targets) and dequantised on use.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use flux2_tuner::quant::Fp8Mode;

fn golden() -> PathBuf {
    std::env::var_os("FLUX2_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
}

fn relative_error(variant: &str, mode: Fp8Mode, dtype: DType) -> f32 {
    let dir = golden();
    let checkpoint = Checkpoint::open(&dir.join(variant).join("dit.safetensors")).unwrap();
    let mut dit = Flux2Dit::load(&checkpoint, None, dtype, &Device::Cpu).unwrap();
    let quantised = dit.quantize_blocks(mode).unwrap();
    assert_eq!(
        quantised,
        8 * dit.config.depth + 2 * dit.config.depth_single_blocks
    );
    let case = Checkpoint::open(&dir.join(variant).join("cases/dit_forward.safetensors")).unwrap();
    let get = |key: &str| {
        let (_, entry) = case.entry(key).unwrap();
        case.load(key, entry.dtype.candle().unwrap(), &Device::Cpu)
            .unwrap()
    };
    let guidance = case.entry("guidance").map(|_| get("guidance"));
    let output = dit
        .forward(&DitInput {
            image_tokens: &get("x"),
            image_position_ids: &get("x_ids"),
            text_embeddings: &get("ctx"),
            text_position_ids: &get("ctx_ids"),
            timesteps: &get("timesteps"),
            guidance: guidance.as_ref(),
        })
        .unwrap();
    let expected = get("output");
    let difference = (output - &expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale: f32 = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    difference / scale
}

/// F8E4M3 keeps 3 mantissa bits (relative step 1/8, rounding error up to 1/16 of a value): the
/// output error stays a few percent (measured 1.2e-2 to 2.2e-2, printed with `--nocapture`), and
/// scaled storage is no worse than the plain cast. The bound 0.1 leaves room for other seeds.
#[test]
fn fp8_weights_stay_close_to_the_reference() {
    for variant in ["dev", "klein"] {
        let scaled = relative_error(variant, Fp8Mode::Scaled, DType::F32);
        let plain = relative_error(variant, Fp8Mode::Plain, DType::F32);
        let scaled_bf16 = relative_error(variant, Fp8Mode::Scaled, DType::BF16);
        println!("{variant}: fp8_scaled {scaled:.3e}, fp8 {plain:.3e}, fp8_scaled with bf16 compute {scaled_bf16:.3e}");
        assert!(
            scaled < 0.1 && plain < 0.1 && scaled_bf16 < 0.1,
            "{variant}: {scaled} {plain} {scaled_bf16}"
        );
        assert!(
            scaled <= plain * 1.5,
            "{variant}: scaled {scaled} vs plain {plain}"
        );
    }
}
