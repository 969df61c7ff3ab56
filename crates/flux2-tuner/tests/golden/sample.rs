//! Sampling cases (`sample`, `sample_distilled`, `sample_base_cfg`): the fixture's initial noise and
//! conditioning go through our schedule and Euler sampler; every step's latents are compared.

use candle_core::{DType, Tensor};
use flux2_tuner::models::dit::tokens::pack_latents;
use flux2_tuner::sample::schedule::flux2_schedule;
use flux2_tuner::sample::{denoise, DenoiseInputs, Guidance};
use serde_json::Value;

use crate::dit::{load_dit, LoraMode};
use crate::fixtures::{relative_error, FixtureSet, Result};

/// Loads `{file, key}` conditioning named by a case.
fn conditioning(set: &FixtureSet, source: &Value) -> Result<Tensor> {
    let file = source["file"]
        .as_str()
        .ok_or("conditioning source has no file")?;
    let key = source["key"]
        .as_str()
        .ok_or("conditioning source has no key")?;
    set.tensors(file)?.f32(key)
}

/// The outcome of a sampling case: relative error of all per-step latents, and the final latents
/// (unpacked `[1, 128, h, w]`) for decoding.
pub struct SampleResult {
    pub latents_error: f64,
    pub final_latents: Tensor,
}

pub fn run(set: &FixtureSet, variant: &Value, case: &Value, dtype: DType) -> Result<SampleResult> {
    let dit = load_dit(set, variant, case, dtype, LoraMode::Merged)?;
    let tensors = set.tensors(case["file"].as_str().ok_or("case has no file")?)?;
    let noise = tensors.f32("initial_noise")?;
    let (_, _, height, width) = noise.dims4()?;
    let steps = case["steps"].as_u64().ok_or("case has no steps")? as usize;
    let sigmas = flux2_schedule(steps, height * width);
    let text = conditioning(set, &case["ctx_source"])?;
    let text_ids = tensors.get("ctx_ids")?;
    let negative = match case.get("negative_ctx_source") {
        Some(source) if !source.is_null() => Some(conditioning(set, source)?),
        _ => None,
    };
    let scale = case["guidance_scale"]
        .as_f64()
        .ok_or("case has no guidance_scale")? as f32;
    let guidance = match (&negative, case["cfg"].as_bool().unwrap_or(false)) {
        (Some(negative), true) => Guidance::ClassifierFree {
            scale,
            negative_text: negative,
            negative_text_ids: &text_ids,
        },
        (None, true) => return Err("CFG case without a negative conditioning".into()),
        (_, false) if dit.config.guidance_embed => Guidance::Embedded(scale),
        (_, false) => Guidance::Distilled,
    };
    let packed = pack_latents(&noise)?;
    let image_ids = tensors.get("x_ids")?;
    let mut per_step = Vec::new();
    let final_tokens = denoise(
        &dit,
        &DenoiseInputs {
            noise: &packed,
            image_ids: &image_ids,
            reference_tokens: None,
            reference_ids: None,
            text: &text,
            text_ids: &text_ids,
            sigmas: &sigmas,
            guidance,
        },
        |report| {
            per_step.push(report.latents.clone());
            Ok(())
        },
    )?;
    // latents_per_step[0] is the initial noise; the rest follow each step.
    let expected = tensors.f32("latents_per_step")?.narrow(0, 1, steps)?;
    let actual = Tensor::stack(&per_step, 0)?;
    Ok(SampleResult {
        latents_error: relative_error(&actual, &expected)?,
        final_latents: flux2_tuner::models::dit::tokens::unpack_tokens(
            &final_tokens,
            height,
            width,
        )?,
    })
}

/// Decodes the final latents with the fixture set's AE (f32) and compares with `decoded`.
pub fn decoded_error(set: &FixtureSet, case: &Value, result: &SampleResult) -> Result<f64> {
    let file = set.manifest["ae"]["file"]
        .as_str()
        .ok_or("manifest has no ae.file")?;
    let checkpoint = flux2_tuner::checkpoint::Checkpoint::open(&set.dir.join(file))?;
    let ae = flux2_tuner::models::ae::AutoEncoder::load(
        &checkpoint,
        DType::F32,
        &crate::fixtures::device(),
    )?;
    let decoded = ae.decode(&result.final_latents)?;
    let tensors = set.tensors(case["file"].as_str().ok_or("case has no file")?)?;
    relative_error(&decoded, &tensors.f32("decoded")?)
}
