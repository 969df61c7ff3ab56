//! One training step's forward and loss (training-and-data.md §3): noise the latents, run the DiT
//! with gradient recording on, compare with the flow-matching target.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::Result;
use crate::models::dit::tokens::{
    image_position_ids, pack_latents, reference_time_coordinate, text_position_ids, unpack_tokens,
};
use crate::models::dit::{DitInput, Flux2Dit};
use crate::nn::grad_mode::GradGuard;
use crate::nn::trainable::{checkpointed_in, ActivationStore};
use crate::train::direct;
use crate::train::dropout_replay::DropoutReplay;
use crate::train::masked_loss::apply_loss_mask;

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

/// The DiT input of a batch plus what the loss needs.
struct PreparedBatch {
    tokens: Tensor,
    ids: Tensor,
    text_ids: Tensor,
    timesteps: Tensor,
    guidance: Option<Tensor>,
    target: Tensor,
    weights: Tensor,
    height: usize,
    width: usize,
    /// `[b, 1, h, w]` loss mask (`--masked_loss`, see `masked_loss`).
    mask: Option<Tensor>,
}

impl PreparedBatch {
    fn input<'a>(&'a self, text: &'a Tensor) -> DitInput<'a> {
        DitInput {
            image_tokens: &self.tokens,
            image_position_ids: &self.ids,
            text_embeddings: text,
            text_position_ids: &self.text_ids,
            timesteps: &self.timesteps,
            guidance: self.guidance.as_ref(),
        }
    }

    /// `mean(weight * (prediction - target)^2)` from the DiT output tokens; returns the loss and
    /// the unpacked prediction.
    fn loss(&self, output: &Tensor) -> Result<(Tensor, Tensor)> {
        let tokens = output.narrow(1, 0, self.height * self.width)?;
        let prediction = unpack_tokens(&tokens, self.height, self.width)?;
        let squared = (&prediction - &self.target)?.sqr()?;
        let squared = apply_loss_mask(&squared, self.mask.as_ref())?;
        let loss = squared.broadcast_mul(&self.weights)?.mean_all()?;
        Ok((loss, prediction))
    }
}

/// Noises the latents (`x_t = (1 - t) x0 + t noise`) and builds the DiT input: packed noisy
/// tokens followed by the clean control tokens (t = 10, 20, ...), text ids, timesteps, guidance.
fn prepare_batch(dit: &Flux2Dit, batch: &StepBatch) -> Result<PreparedBatch> {
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
    let timesteps: Vec<f32> = batch.model_timesteps.iter().map(|t| *t as f32).collect();
    let guidance = match batch.guidance {
        Some(g) if dit.config.guidance_embed => Some(Tensor::full(g as f32, batch_size, device)?),
        _ => None,
    };
    Ok(PreparedBatch {
        tokens: Tensor::cat(&tokens, 1)?,
        ids: Tensor::cat(&ids, 1)?,
        text_ids: text_position_ids(batch_size, batch.text.dim(1)?, device)?,
        timesteps: Tensor::from_vec(timesteps, batch_size, device)?,
        guidance,
        target: (noise - latents)?,
        weights: per_sample(batch.weights, batch.latents)?,
        height,
        width,
        mask: None,
    })
}

/// Noises the batch, runs the DiT with gradient recording on (into the LoRA `Var`s attached to
/// it) and returns `mean(weight * (prediction - (noise - latents))^2)` over all elements.
pub fn training_forward(dit: &Flux2Dit, batch: &StepBatch) -> Result<StepOutput> {
    training_forward_masked(dit, batch, None)
}

/// [`training_forward`] with the squared error weighted by a `[b, 1, h, w]` loss mask
/// (`--masked_loss`).
pub fn training_forward_masked(
    dit: &Flux2Dit,
    batch: &StepBatch,
    mask: Option<&Tensor>,
) -> Result<StepOutput> {
    let _grad = GradGuard::enable();
    let mut prepared = prepare_batch(dit, batch)?;
    prepared.mask = mask.cloned();
    let output = dit.forward(&prepared.input(batch.text))?;
    let (loss, prediction) = prepared.loss(&output)?;
    Ok(StepOutput { loss, prediction })
}

/// The scalar loss of [`training_forward`] without recording gradients (validation,
/// `validation.rs`): the inference kernels, LoRA dropouts off, so no generator is drawn from, and
/// the LoRA tensors detached while it runs, so candle records no graph (the loss tracks no op).
pub fn evaluation_loss(dit: &mut Flux2Dit, batch: &StepBatch) -> Result<Tensor> {
    crate::train::network::with_detached_adapters(dit, |dit| {
        let prepared = prepare_batch(dit, batch)?;
        let output = dit.forward(&prepared.input(batch.text))?;
        let (loss, _) = prepared.loss(&output)?;
        Ok(loss)
    })
}

/// A finished step: the loss value and the gradient of each parameter (zeros where none).
pub struct StepGradients {
    pub loss: f32,
    pub gradients: Vec<Tensor>,
}

fn gradients_of(store: &GradStore, parameters: &[Var]) -> Result<Vec<Option<Tensor>>> {
    Ok(parameters
        .iter()
        .map(|p| store.get(p.as_tensor()).cloned())
        .collect())
}

fn accumulate(total: &mut [Option<Tensor>], part: Vec<Option<Tensor>>) -> Result<()> {
    for (slot, gradient) in total.iter_mut().zip(part) {
        if let Some(gradient) = gradient {
            *slot = Some(match slot.take() {
                Some(sum) => (sum + gradient)?,
                None => gradient,
            });
        }
    }
    Ok(())
}

/// Forward and backward of one batch; with `checkpointing`, block by block (gradient
/// checkpointing: only block inputs are kept, each block is recomputed in the backward). Both
/// give the same gradients (tested).
pub fn training_step(
    dit: &Flux2Dit,
    batch: &StepBatch,
    parameters: &[Var],
    checkpointing: bool,
) -> Result<StepGradients> {
    training_step_with(dit, batch, parameters, checkpointing, None)
}

/// [`training_step`] whose checkpointed block inputs are kept in `store` (in host memory for
/// `--gradient_checkpointing_cpu_offload`); a store implies checkpointing. Its counters then tell
/// how many bytes were saved on each side. Without a store they stay on the device.
pub fn training_step_with(
    dit: &Flux2Dit,
    batch: &StepBatch,
    parameters: &[Var],
    checkpointing: bool,
    store: Option<&ActivationStore>,
) -> Result<StepGradients> {
    training_step_masked(dit, batch, None, parameters, checkpointing, store)
}

/// [`training_step_with`] with the squared error weighted by a `[b, 1, h, w]` loss mask
/// (`--masked_loss`); the weighting is part of the autograd graph in both backward paths.
pub fn training_step_masked(
    dit: &Flux2Dit,
    batch: &StepBatch,
    mask: Option<&Tensor>,
    parameters: &[Var],
    checkpointing: bool,
    store: Option<&ActivationStore>,
) -> Result<StepGradients> {
    let path = if direct::applies(dit) {
        BackwardPath::Direct
    } else {
        BackwardPath::Autograd
    };
    step_on_path(path, dit, batch, mask, parameters, checkpointing, store)
}

/// [`training_step_masked`] through candle's autograd even where the direct backward
/// (`train::direct`) applies: the reference the direct backward is tested against.
pub fn training_step_by_autograd(
    dit: &Flux2Dit,
    batch: &StepBatch,
    mask: Option<&Tensor>,
    parameters: &[Var],
    checkpointing: bool,
    store: Option<&ActivationStore>,
) -> Result<StepGradients> {
    step_on_path(
        BackwardPath::Autograd,
        dit,
        batch,
        mask,
        parameters,
        checkpointing,
        store,
    )
}

/// How a step computes its gradients.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BackwardPath {
    /// Hand-written block backward (`train::direct`).
    Direct,
    /// candle's `Tensor::backward`, whole graph or block by block.
    Autograd,
}

fn step_on_path(
    path: BackwardPath,
    dit: &Flux2Dit,
    batch: &StepBatch,
    mask: Option<&Tensor>,
    parameters: &[Var],
    checkpointing: bool,
    store: Option<&ActivationStore>,
) -> Result<StepGradients> {
    let on_device = ActivationStore::on_device();
    let checkpointing = checkpointing || store.is_some();
    let store = store.unwrap_or(&on_device);
    let mut totals: Vec<Option<Tensor>> = vec![None; parameters.len()];
    // Block swap needs each swapped block's weights again, in reverse order, for the backward:
    // the block-wise path recomputes every block there (as with checkpointing).
    let loss = if path == BackwardPath::Direct {
        direct_backward(
            dit,
            batch,
            mask,
            parameters,
            checkpointing,
            store,
            &mut totals,
        )?
    } else if checkpointing || dit.block_swap.is_some() {
        checkpointed_backward(dit, batch, mask, parameters, store, &mut totals)?
    } else {
        let output = training_forward_masked(dit, batch, mask)?;
        let store = output.loss.backward()?;
        accumulate(&mut totals, gradients_of(&store, parameters)?)?;
        output.loss.to_scalar::<f32>()?
    };
    let gradients = totals
        .into_iter()
        .zip(parameters)
        .map(|(g, p)| match g {
            Some(g) => Ok(g),
            None => Ok(Tensor::zeros_like(p.as_tensor())?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StepGradients { loss, gradients })
}

/// The step through the direct backward (`train::direct`): embeddings and modulations computed
/// once without a graph, the blocks by hand, the final layer and the loss on candle ops.
#[allow(clippy::too_many_arguments)]
fn direct_backward(
    dit: &Flux2Dit,
    batch: &StepBatch,
    mask: Option<&Tensor>,
    parameters: &[Var],
    checkpointing: bool,
    store: &ActivationStore,
    totals: &mut [Option<Tensor>],
) -> Result<f32> {
    let _grad = GradGuard::enable();
    let mut prepared_batch = prepare_batch(dit, batch)?;
    prepared_batch.mask = mask.cloned();
    let prepared = dit.prepare(&prepared_batch.input(batch.text))?;
    let text_length = batch.text.dim(1)?;
    let (loss, gradients) =
        direct::forward_backward(dit, &prepared, parameters, checkpointing, store, |joint| {
            let output = dit.finish(joint, text_length, &prepared.vec)?;
            Ok(prepared_batch.loss(&output)?.0)
        })?;
    accumulate(totals, gradients)?;
    Ok(loss)
}

/// Block-level gradient checkpointing (rust-stack.md §4.4): the embeddings and modulations carry
/// no LoRA and are computed once without a graph; each block keeps only its inputs; after the
/// loss the blocks are recomputed in reverse order, one graph at a time.
fn checkpointed_backward(
    dit: &Flux2Dit,
    batch: &StepBatch,
    mask: Option<&Tensor>,
    parameters: &[Var],
    store: &ActivationStore,
    totals: &mut [Option<Tensor>],
) -> Result<f32> {
    let _grad = GradGuard::enable();
    let mut prepared_batch = prepare_batch(dit, batch)?;
    prepared_batch.mask = mask.cloned();
    let prepared = dit.prepare(&prepared_batch.input(batch.text))?;
    let (img_mod, txt_mod, single_mod, rope) = (
        &prepared.img_mod,
        &prepared.txt_mod,
        &prepared.single_mod[0],
        &prepared.rope,
    );

    // LoRA dropout: each block's recompute must draw the masks of its forward (see
    // `DropoutReplay`).
    let mut replay = DropoutReplay::new(dit);
    let mut double_checkpoints = Vec::with_capacity(dit.double_blocks.len());
    let (mut img, mut txt) = (prepared.img.detach(), prepared.txt.detach());
    for index in 0..dit.double_blocks.len() {
        replay.record();
        let (outputs, checkpoint) =
            checkpointed_in(store, &[img, txt], move |inputs: &[Tensor]| {
                let block = dit.double_block(index)?;
                let (img, txt) = block.forward(&inputs[0], &inputs[1], img_mod, txt_mod, rope)?;
                Ok(vec![img, txt])
            })?;
        img = outputs[0].clone();
        txt = outputs[1].clone();
        double_checkpoints.push(checkpoint);
    }
    let text_length = txt.dim(1)?;
    let mut joint = Tensor::cat(&[&txt, &img], 1)?;
    let mut single_checkpoints = Vec::with_capacity(dit.single_blocks.len());
    for index in 0..dit.single_blocks.len() {
        replay.record();
        let (outputs, checkpoint) =
            checkpointed_in(store, &[joint], move |inputs: &[Tensor]| {
                Ok(vec![dit
                    .single_block(index)?
                    .forward(&inputs[0], single_mod, rope)?])
            })?;
        joint = outputs[0].clone();
        single_checkpoints.push(checkpoint);
    }

    let joint_var = Var::from_tensor(&joint)?;
    let output = dit.finish(joint_var.as_tensor(), text_length, &prepared.vec)?;
    let (loss, _) = prepared_batch.loss(&output)?;
    let after_forward = replay.state();
    let store = loss.backward()?;
    accumulate(totals, gradients_of(&store, parameters)?)?;
    let mut joint_grad = store.get(joint_var.as_tensor()).cloned();

    for checkpoint in single_checkpoints.iter().rev() {
        replay.replay_last();
        let gradients = checkpoint.backward(&[joint_grad])?;
        accumulate(totals, gradients_of(&gradients.store, parameters)?)?;
        joint_grad = gradients.inputs.into_iter().next().flatten();
    }
    let (mut txt_grad, mut img_grad) = match &joint_grad {
        Some(g) => (
            Some(g.narrow(1, 0, text_length)?),
            Some(g.narrow(1, text_length, g.dim(1)? - text_length)?),
        ),
        None => (None, None),
    };
    for checkpoint in double_checkpoints.iter().rev() {
        replay.replay_last();
        let gradients = checkpoint.backward(&[img_grad, txt_grad])?;
        accumulate(totals, gradients_of(&gradients.store, parameters)?)?;
        let mut inputs = gradients.inputs.into_iter();
        img_grad = inputs.next().flatten();
        txt_grad = inputs.next().flatten();
    }
    replay.restore(after_forward);
    Ok(loss.to_scalar::<f32>()?)
}
