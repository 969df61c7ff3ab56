//! DiT cases: `dit_forward`, `dit_forward_ref` and `lora_forward`, in f32 and bf16.

use candle_core::{DType, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::lora::{linear_shapes, KeyFilter, LoraFile};
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use serde_json::Value;

use crate::fixtures::{relative_error, CaseTensors, FixtureSet, Result};

/// How a case's LoRA is applied.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    Merged,
    Unmerged,
}

/// Loads the variant's DiT in `dtype`, with the case's LoRA applied when it names one.
pub fn load_dit(
    set: &FixtureSet,
    variant: &Value,
    case: &Value,
    dtype: DType,
    mode: LoraMode,
) -> Result<Flux2Dit> {
    let file = variant["dit"]["file"]
        .as_str()
        .ok_or("variant has no dit.file")?;
    let checkpoint = Checkpoint::open(&set.dir.join(file))?;
    let mut dit = Flux2Dit::load(&checkpoint, None, dtype, &crate::fixtures::device())?;
    if let Some(lora_file) = case.get("lora_file").and_then(Value::as_str) {
        let multiplier = case["multiplier"]
            .as_f64()
            .ok_or("lora case has no multiplier")?;
        let shapes = linear_shapes(&dit.linears_mut());
        let lora = LoraFile::load(
            &set.dir.join(lora_file),
            &shapes,
            &KeyFilter::default(),
            &crate::fixtures::device(),
        )?;
        lora.apply(dit.linears_mut(), multiplier, mode == LoraMode::Merged)?;
    }
    Ok(dit)
}

/// Runs the DiT on a case's inputs (`x` plus `ref_tokens` when present) and returns the output
/// for the `x` tokens only.
pub fn forward_case(dit: &Flux2Dit, tensors: &CaseTensors) -> Result<Tensor> {
    let mut tokens = tensors.f32("x")?;
    let mut ids = tensors.get("x_ids")?;
    let image_tokens = tokens.dim(1)?;
    if tensors.has("ref_tokens") {
        tokens = Tensor::cat(&[&tokens, &tensors.f32("ref_tokens")?], 1)?;
        ids = Tensor::cat(&[&ids, &tensors.get("ref_ids")?], 1)?;
    }
    let guidance = if tensors.has("guidance") {
        Some(tensors.f32("guidance")?)
    } else {
        None
    };
    let text = tensors.f32("ctx")?;
    let text_ids = tensors.get("ctx_ids")?;
    let timesteps = tensors.f32("timesteps")?;
    let output = dit.forward(&DitInput {
        image_tokens: &tokens,
        image_position_ids: &ids,
        text_embeddings: &text,
        text_position_ids: &text_ids,
        timesteps: &timesteps,
        guidance: guidance.as_ref(),
    })?;
    Ok(output.narrow(1, 0, image_tokens)?)
}

/// Relative error of one forward case in `dtype`.
pub fn run(
    set: &FixtureSet,
    variant: &Value,
    case: &Value,
    dtype: DType,
    mode: LoraMode,
) -> Result<f64> {
    let dit = load_dit(set, variant, case, dtype, mode)?;
    let tensors = set.tensors(case["file"].as_str().ok_or("case has no file")?)?;
    let output = forward_case(&dit, &tensors)?;
    relative_error(&output, &tensors.f32("output")?)
}
