//! The direct backward: the LoRA training step's blocks on the CPU with a hand-written forward
//! and backward per block, instead of candle's autograd.
//!
//! Why: candle's `Tensor::backward` adds every gradient into a zero-filled buffer per graph edge
//! and copies non-contiguous operands before each product; on the CPU that cost as much as the
//! matrix products themselves (BENCHMARKS.md, "LoRA training step"). Here each block's forward
//! keeps exactly what its backward needs (a tape of host vectors), and the backward writes each
//! gradient once, with strided `gemm` products and fused row kernels. The embeddings, the shared
//! modulations and the final layer with the loss (which carry no LoRA) still run on candle ops;
//! the gradient enters the blocks from a `Var` on the last block's output, as in the block-wise
//! checkpointed path of `train::step`.
//!
//! The same maths as the autograd path (tested against it in `tests/direct_backward.rs`), in f32
//! activations; bf16 models use bf16 operands in every product (bf16 mixed precision, as
//! `nn::trainable::bf16_weight_linear` and `bf16_products`). Gradient checkpointing keeps only
//! each block's inputs (through the `ActivationStore`, so CPU offload counts as before) and
//! recomputes the block's tape in the backward. Block swap works unchanged: blocks are fetched
//! through `Flux2Dit::double_block` / `single_block` in forward and backward order.
//!
//! LoRA dropout draws its masks from the network's generator in the autograd path's order; with
//! checkpointing each recomputed block replays its forward's draws (`DropoutReplay`).
//!
//! It applies on the CPU (see [`applies`]); elsewhere the autograd path runs.
//! `FLUX2_AUTOGRAD_BACKWARD=1` forces the autograd path (for comparisons).

mod attention;
mod attention_amx;
mod context;
mod double_block;
mod linear;
mod matrix;
mod qk_norm_rope;
mod rows;
mod single_block;

use crate::nn::host::zeroed_f32;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::models::dit::model::Prepared;
use crate::models::dit::Flux2Dit;
use crate::nn::trainable::{ActivationStore, Stored};
use crate::train::dropout_replay::DropoutReplay;
use context::{values, StepContext};
use double_block::DoubleTape;
use linear::Gradients;
use single_block::SingleTape;

/// Whether the direct backward runs this model's step: CPU weights in f32 or bf16.
pub fn applies(dit: &Flux2Dit) -> bool {
    if std::env::var_os("FLUX2_AUTOGRAD_BACKWARD").is_some() {
        return false;
    }
    dit.img_in.weight.device().is_cpu() && matches!(dit.dtype, DType::F32 | DType::BF16)
}

/// A block's tape, or only its stored inputs under gradient checkpointing.
enum Kept<T> {
    Tape(T),
    Inputs(Vec<Stored>),
}

fn store_rows(store: &ActivationStore, rows: &[f32], hidden: usize) -> Result<Stored> {
    let tensor = Tensor::from_vec(
        rows.to_vec(),
        (rows.len() / hidden.max(1), hidden),
        &Device::Cpu,
    )?;
    store.save(&tensor)
}

fn restore_rows(store: &ActivationStore, stored: &Stored) -> Result<Vec<f32>> {
    values(&store.restore(stored, &Device::Cpu)?)
}

/// The step's loss and each parameter's gradient (`None` where the parameter got none): the
/// blocks run on `prepared` (from `Flux2Dit::prepare` with gradient mode on), then `tail` maps the
/// last block's joint output `[b, L, hidden]` to the scalar loss with candle ops.
pub fn forward_backward(
    dit: &Flux2Dit,
    prepared: &Prepared,
    parameters: &[Var],
    checkpointing: bool,
    store: &ActivationStore,
    tail: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(f32, Vec<Option<Tensor>>)> {
    let round_products = dit.dtype == DType::BF16;
    let blocks = dit.double_blocks.len() + dit.single_blocks.len();
    let kept_blocks = if checkpointing { 1 } else { blocks };
    let context = StepContext::new(prepared, dit.config.num_heads, round_products, kept_blocks)?;
    let hidden = context.hidden;
    let mut gradients = Gradients::new(parameters);
    let (mut img, mut txt) = (values(&prepared.img)?, values(&prepared.txt)?);

    // With checkpointing, each block's recompute draws the dropout masks of its forward.
    let mut replay = DropoutReplay::new(dit);
    let mut doubles: Vec<Kept<DoubleTape>> = Vec::with_capacity(dit.double_blocks.len());
    for index in 0..dit.double_blocks.len() {
        replay.record();
        let block = dit.double_block(index)?;
        let kept_inputs = if checkpointing {
            Some(vec![
                store_rows(store, &img, hidden)?,
                store_rows(store, &txt, hidden)?,
            ])
        } else {
            None
        };
        let (img_out, txt_out, tape) =
            double_block::forward(&block, &context, &gradients, img, txt)?;
        doubles.push(match kept_inputs {
            Some(inputs) => Kept::Inputs(inputs),
            None => Kept::Tape(tape),
        });
        (img, txt) = (img_out, txt_out);
    }
    let mut joint = zeroed_f32(context.joint_rows() * hidden);
    context.scatter(context.text, &txt, &mut joint, hidden);
    context.scatter(context.image, &img, &mut joint, hidden);
    drop((img, txt));

    let mut singles: Vec<Kept<SingleTape>> = Vec::with_capacity(dit.single_blocks.len());
    for index in 0..dit.single_blocks.len() {
        replay.record();
        let block = dit.single_block(index)?;
        let kept_inputs = if checkpointing {
            Some(vec![store_rows(store, &joint, hidden)?])
        } else {
            None
        };
        let (out, tape) = single_block::forward(&block, &context, &gradients, joint)?;
        singles.push(match kept_inputs {
            Some(inputs) => Kept::Inputs(inputs),
            None => Kept::Tape(tape),
        });
        joint = out;
    }

    let shape = (context.batch, context.joint_length(), hidden);
    let joint_var = Var::from_tensor(&Tensor::from_vec(joint, shape, &Device::Cpu)?)?;
    let after_forward = replay.state();
    let loss = tail(joint_var.as_tensor())?;
    let loss_value = loss.to_scalar::<f32>()?;
    let tail_gradients = loss.backward()?;
    let mut d_joint = match tail_gradients.get(joint_var.as_tensor()) {
        Some(gradient) => values(gradient)?,
        None => zeroed_f32(context.joint_rows() * hidden),
    };

    for (index, kept) in singles.into_iter().enumerate().rev() {
        replay.replay_last();
        let block = dit.single_block(index)?;
        let tape = match kept {
            Kept::Tape(tape) => tape,
            Kept::Inputs(inputs) => {
                let x = restore_rows(store, &inputs[0])?;
                single_block::forward(&block, &context, &gradients, x)?.1
            }
        };
        d_joint = single_block::backward(&block, &context, &tape, &mut gradients, &d_joint)?;
    }
    let mut d_img = context.gather(context.image, &d_joint, hidden);
    let mut d_txt = context.gather(context.text, &d_joint, hidden);
    drop(d_joint);
    for (index, kept) in doubles.into_iter().enumerate().rev() {
        replay.replay_last();
        let block = dit.double_block(index)?;
        let tape = match kept {
            Kept::Tape(tape) => tape,
            Kept::Inputs(inputs) => {
                let img = restore_rows(store, &inputs[0])?;
                let txt = restore_rows(store, &inputs[1])?;
                double_block::forward(&block, &context, &gradients, img, txt)?.2
            }
        };
        let needs_inputs = index > 0;
        if let Some((img, txt)) = double_block::backward(
            &block,
            &context,
            &tape,
            &mut gradients,
            &d_img,
            &d_txt,
            needs_inputs,
        )? {
            (d_img, d_txt) = (img, txt);
        }
    }

    replay.restore(after_forward);
    let gradients = gradients
        .into_values()
        .into_iter()
        .zip(parameters)
        .map(|(values, parameter)| {
            values
                .map(|values| Tensor::from_vec(values, parameter.shape(), &Device::Cpu))
                .transpose()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((loss_value, gradients))
}
