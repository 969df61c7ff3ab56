//! The flow-matching Euler sampler (BFL/Musubi `denoise`, `denoise_cfg`): `x <- x + (s_next - s) v`
//! from sigma 1 (noise) to 0 (data), with the guidance of each version.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::models::dit::{DitInput, Flux2Dit};

/// How guidance enters each step.
#[derive(Debug, Clone, Copy)]
pub enum Guidance<'a> {
    /// dev: the value is a model input (`guidance_in`), one forward per step.
    Embedded(f32),
    /// klein distilled: no guidance, one forward per step.
    Distilled,
    /// klein-base: `v = v_neg + scale (v_pos - v_neg)`, two forwards per step.
    ClassifierFree {
        scale: f32,
        negative_text: &'a Tensor,
        negative_text_ids: &'a Tensor,
    },
}

/// Everything a sampling run needs besides the model.
///
/// # Shapes
/// - `noise`: `[b, n, 128]` packed initial noise;
/// - `image_ids`: `[b, n, 4]`;
/// - `reference_tokens` / `reference_ids`: `[b, r, 128]` / `[b, r, 4]`, all references packed and
///   concatenated (never noised);
/// - `text` / `text_ids`: `[b, l, context]` / `[b, l, 4]`;
/// - `sigmas`: `steps + 1` values from 1 to 0.
#[derive(Debug, Clone)]
pub struct DenoiseInputs<'a> {
    pub noise: &'a Tensor,
    pub image_ids: &'a Tensor,
    pub reference_tokens: Option<&'a Tensor>,
    pub reference_ids: Option<&'a Tensor>,
    pub text: &'a Tensor,
    pub text_ids: &'a Tensor,
    pub sigmas: &'a [f32],
    pub guidance: Guidance<'a>,
}

/// What the sampler reports after each step.
pub struct StepReport<'a> {
    /// 0-based step index.
    pub step: usize,
    pub steps: usize,
    /// Latents after the step, f32 `[b, n, 128]`.
    pub latents: &'a Tensor,
    /// The velocity used for the step.
    pub velocity: &'a Tensor,
}

/// Runs the Euler sampler and returns the final packed latents (f32). The update is done in f32
/// (Musubi and BFL keep bf16 latents; f32 costs nothing measurable and loses nothing).
pub fn denoise(
    dit: &Flux2Dit,
    inputs: &DenoiseInputs,
    mut on_step: impl FnMut(StepReport) -> Result<()>,
) -> Result<Tensor> {
    let device = inputs.noise.device();
    let (batch, image_tokens, _) = inputs.noise.dims3()?;
    let model_ids = match inputs.reference_ids {
        Some(reference_ids) => Tensor::cat(&[inputs.image_ids, reference_ids], 1)?,
        None => inputs.image_ids.clone(),
    };
    let steps = inputs.sigmas.len().saturating_sub(1);
    let mut latents = inputs.noise.to_dtype(DType::F32)?;
    for step in 0..steps {
        let (sigma, sigma_next) = (inputs.sigmas[step], inputs.sigmas[step + 1]);
        let timesteps = Tensor::full(sigma, batch, device)?;
        let model_tokens = match inputs.reference_tokens {
            Some(reference) => Tensor::cat(&[&latents, &reference.to_dtype(DType::F32)?], 1)?,
            None => latents.clone(),
        };
        let predict =
            |text: &Tensor, text_ids: &Tensor, guidance: Option<&Tensor>| -> Result<Tensor> {
                let output = dit.forward(&DitInput {
                    image_tokens: &model_tokens,
                    image_position_ids: &model_ids,
                    text_embeddings: text,
                    text_position_ids: text_ids,
                    timesteps: &timesteps,
                    guidance,
                })?;
                Ok(output.narrow(1, 0, image_tokens)?)
            };
        let velocity = match inputs.guidance {
            Guidance::Embedded(value) => {
                let guidance = Tensor::full(value, batch, device)?;
                predict(inputs.text, inputs.text_ids, Some(&guidance))?
            }
            Guidance::Distilled => predict(inputs.text, inputs.text_ids, None)?,
            Guidance::ClassifierFree {
                scale,
                negative_text,
                negative_text_ids,
            } => {
                let positive = predict(inputs.text, inputs.text_ids, None)?;
                let negative = predict(negative_text, negative_text_ids, None)?;
                (&negative + ((positive - &negative)? * scale as f64)?)?
            }
        };
        latents = (latents + (&velocity * (sigma_next - sigma) as f64)?)?;
        on_step(StepReport {
            step,
            steps,
            latents: &latents,
            velocity: &velocity,
        })?;
    }
    Ok(latents)
}
