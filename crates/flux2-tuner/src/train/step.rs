//! One training step's forward and loss (training-and-data.md §3): noise the latents, run the DiT
//! with gradient recording on, compare with the flow-matching target.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::models::dit::tokens::{
    image_position_ids, pack_latents, reference_time_coordinate, text_position_ids, unpack_tokens,
};
use crate::models::dit::{DitInput, Flux2Dit};
use crate::nn::grad_mode::GradGuard;

/// One batch of a step.
///
/// # Shapes
/// `latents`, `noise`: `[b, 128, h, w]`; `text`: `[b, l, context]`; each control `[b, 128, hi, wi]`.
#[derive(Debug, Clone)]
pub struct StepBatch<'a> {
    pub latents: &'a Tensor,
    pub noise: &'a Tensor,
    /// Noise level per sample.
    pub sigmas: &'a [f64],
    /// What the DiT is given as timestep per sample (see `timesteps`).
    pub model_timesteps: &'a [f64],
    pub text: &'a Tensor,
    /// Clean reference latents (edit training), never noised.
    pub controls: &'a [Tensor],
    /// Guidance input for guidance-embedded models (Musubi: always 1.0).
    pub guidance: Option<f64>,
    /// Per-sample loss weights (weighting scheme).
    pub weights: &'a [f64],
}

/// The result of a step's forward.
pub struct StepOutput {
    /// Scalar f32 loss.
    pub loss: Tensor,
    /// `[b, 128, h, w]` velocity prediction.
    pub prediction: Tensor,
}

fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let values: Vec<f32> = values.iter().map(|v| *v as f32).collect();
    Ok(Tensor::from_vec(
        values,
        (like.dim(0)?, 1, 1, 1),
        like.device(),
    )?)
}

/// Noises the batch, runs the DiT (gradients recorded into the LoRA `Var`s attached to it) and
/// returns `mean(weight * (prediction - (noise - latents))^2)` over all elements.
pub fn training_forward(dit: &Flux2Dit, batch: &StepBatch) -> Result<StepOutput> {
    let _grad = GradGuard::enable();
    let latents = batch.latents.to_dtype(DType::F32)?;
    let noise = batch.noise.to_dtype(DType::F32)?;
    let device = latents.device();
    let (batch_size, _, height, width) = latents.dims4()?;
    let sigma = per_sample(batch.sigmas, &latents)?;
    let noisy = (latents.broadcast_mul(&(1.0 - &sigma)?)? + noise.broadcast_mul(&sigma)?)?;

    let mut tokens = vec![pack_latents(&noisy)?];
    let mut ids = vec![image_position_ids(batch_size, height, width, 0, device)?];
    for (index, control) in batch.controls.iter().enumerate() {
        let (_, _, control_height, control_width) = control.dims4()?;
        tokens.push(pack_latents(&control.to_dtype(DType::F32)?)?);
        ids.push(image_position_ids(
            batch_size,
            control_height,
            control_width,
            reference_time_coordinate(index),
            device,
        )?);
    }
    let tokens = Tensor::cat(&tokens, 1)?;
    let ids = Tensor::cat(&ids, 1)?;
    let text_ids = text_position_ids(batch_size, batch.text.dim(1)?, device)?;
    let timesteps: Vec<f32> = batch.model_timesteps.iter().map(|t| *t as f32).collect();
    let timesteps = Tensor::from_vec(timesteps, batch_size, device)?;
    let guidance = match batch.guidance {
        Some(g) if dit.config.guidance_embed => Some(Tensor::full(g as f32, batch_size, device)?),
        _ => None,
    };
    let output = dit.forward(&DitInput {
        image_tokens: &tokens,
        image_position_ids: &ids,
        text_embeddings: batch.text,
        text_position_ids: &text_ids,
        timesteps: &timesteps,
        guidance: guidance.as_ref(),
    })?;
    let prediction = unpack_tokens(&output.narrow(1, 0, height * width)?, height, width)?;
    let target = (noise - latents)?;
    let squared = (&prediction - target)?.sqr()?;
    let weighted = squared.broadcast_mul(&per_sample(batch.weights, &squared)?)?;
    Ok(StepOutput {
        loss: weighted.mean_all()?,
        prediction,
    })
}
