//! Block-level gradient checkpointing (rust-stack.md §4.4; PyTorch `torch.utils.checkpoint`,
//! which Musubi's `--gradient_checkpointing` enables per block). The forward runs a block on
//! detached inputs and keeps only those inputs; the backward makes them `Var`s, recomputes the
//! block, backpropagates the surrogate `sum(out * grad_out)` and hands back the input gradients
//! and the block's `GradStore` (its `Var`s' gradients). Each block's graph lives only while that
//! block is processed.
//!
//! Use: in the forward, for each block `let (outs, ckpt) = checkpointed(&ins, |t| block(t))?`,
//! feeding `outs` to the next block and pushing `ckpt`; after the loss, walk the checkpoints in
//! reverse, passing each the gradients of its outputs (from the loss, or from the next block's
//! `CheckpointGradients::inputs`) and merging each `store` into the total.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::activation_store::{ActivationStore, Stored};
use crate::error::{Error, Result};

/// A block's saved inputs and the function that recomputes its outputs from them.
pub struct Checkpoint<F> {
    /// On the device, or in host memory when saved through an offloading [`ActivationStore`].
    inputs: Vec<Stored>,
    forward: F,
}

/// What [`Checkpoint::backward`] returns.
pub struct CheckpointGradients {
    /// Gradient of each input (`None` where the outputs do not depend on it).
    pub inputs: Vec<Option<Tensor>>,
    /// The recomputed block's gradients: its `Var`s (LoRA weights) and any frozen leaf that a
    /// plain matmul put there (none when the block uses `frozen_linear`).
    pub store: GradStore,
}

/// Runs `forward` on detached `inputs` and returns its detached outputs (so no graph is kept)
/// together with the [`Checkpoint`] that can recompute it. Constants (RoPE tables, modulation
/// that needs no gradient) are best captured by the closure rather than passed as inputs.
pub fn checkpointed<F>(inputs: &[Tensor], forward: F) -> Result<(Vec<Tensor>, Checkpoint<F>)>
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>>,
{
    let inputs: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    let outputs = forward(&inputs)?.iter().map(Tensor::detach).collect();
    let inputs = inputs.iter().map(Stored::untracked).collect();
    Ok((outputs, Checkpoint { inputs, forward }))
}

/// [`checkpointed`] keeping the saved inputs in `store` (on the device, or in host memory with
/// `--gradient_checkpointing_cpu_offload`), which counts their bytes.
pub fn checkpointed_in<F>(
    store: &ActivationStore,
    inputs: &[Tensor],
    forward: F,
) -> Result<(Vec<Tensor>, Checkpoint<F>)>
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>>,
{
    let inputs: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    let outputs = forward(&inputs)?.iter().map(Tensor::detach).collect();
    let inputs = inputs
        .iter()
        .map(|input| store.save(input))
        .collect::<Result<_>>()?;
    Ok((outputs, Checkpoint { inputs, forward }))
}

impl<F> Checkpoint<F>
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>>,
{
    /// Recomputes the block and backpropagates `output_grads` (one per output; `None` for an
    /// output that does not reach the loss).
    pub fn backward(&self, output_grads: &[Option<Tensor>]) -> Result<CheckpointGradients> {
        let vars = self
            .inputs
            .iter()
            .map(|stored| Ok(Var::from_tensor(&stored.restore()?)?))
            .collect::<Result<Vec<_>>>()?;
        let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let outputs = (self.forward)(&tracked)?;
        if outputs.len() != output_grads.len() {
            return Err(Error::Shape(format!(
                "checkpoint: the block returned {} outputs but {} output gradients were given",
                outputs.len(),
                output_grads.len()
            )));
        }
        let mut surrogate: Option<Tensor> = None;
        for (output, grad) in outputs.iter().zip(output_grads) {
            let Some(grad) = grad else { continue };
            if grad.dims() != output.dims() {
                return Err(Error::Shape(format!(
                    "checkpoint: output gradient has shape {:?}, expected the output's {:?}",
                    grad.dims(),
                    output.dims()
                )));
            }
            let term = (output * grad.detach().to_dtype(output.dtype())?)?
                .to_dtype(candle_core::DType::F32)?
                .sum_all()?;
            surrogate = Some(match surrogate {
                Some(total) => (total + term)?,
                None => term,
            });
        }
        let Some(surrogate) = surrogate else {
            return Ok(CheckpointGradients {
                inputs: vec![None; vars.len()],
                store: GradStore::default(),
            });
        };
        let mut store = surrogate.backward()?;
        let inputs = vars.iter().map(|var| store.remove(var)).collect();
        Ok(CheckpointGradients { inputs, store })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::rope::RopeTables;
    use crate::nn::trainable::test_support::{random, relative_difference};
    use crate::nn::trainable::{
        apply_rope, attention, modulated_layer_norm, rms_norm, swiglu, LoraLinear,
    };
    use candle_core::{DType, Device};

    const WIDTH: usize = 16;
    const HEADS: usize = 2;

    /// A small transformer block built from the trainable ops: modulated pre-norm, LoRA QKV,
    /// QK-norm, RoPE, attention, LoRA output projection, then a SwiGLU MLP.
    struct Block {
        qkv: LoraLinear,
        proj: LoraLinear,
        mlp_in: LoraLinear,
        mlp_out: LoraLinear,
        query_norm: Tensor,
        key_norm: Tensor,
    }

    fn lora(out: usize, input: usize, seed: u64) -> Result<LoraLinear> {
        let weight = (random(&[out, input], seed, DType::F32)? * 0.2)?;
        let down = Var::from_tensor(&(random(&[4, input], seed + 1, DType::F32)? * 0.2)?)?;
        let up = Var::from_tensor(&(random(&[out, 4], seed + 2, DType::F32)? * 0.2)?)?;
        LoraLinear::new(weight, down, up, 4.0)
    }

    impl Block {
        fn new(seed: u64) -> Result<Self> {
            Ok(Self {
                qkv: lora(3 * WIDTH, WIDTH, seed)?,
                proj: lora(WIDTH, WIDTH, seed + 10)?,
                mlp_in: lora(4 * WIDTH, WIDTH, seed + 20)?,
                mlp_out: lora(WIDTH, 2 * WIDTH, seed + 30)?,
                query_norm: (random(&[WIDTH / HEADS], seed + 40, DType::F32)?.affine(0.1, 1.0))?,
                key_norm: (random(&[WIDTH / HEADS], seed + 41, DType::F32)?.affine(0.1, 1.0))?,
            })
        }

        fn vars(&self) -> Vec<&Var> {
            [&self.qkv, &self.proj, &self.mlp_in, &self.mlp_out]
                .into_iter()
                .flat_map(|l| l.vars())
                .collect()
        }

        /// `x [b, l, c]`, modulation `[b, 1, c]` each; returns `[b, l, c]`.
        fn forward(
            &self,
            x: &Tensor,
            shift: &Tensor,
            scale: &Tensor,
            rope: &RopeTables,
        ) -> Result<Tensor> {
            let (b, l, c) = x.dims3()?;
            let head_dim = c / HEADS;
            let normed = modulated_layer_norm(x, shift, scale, 1e-6)?;
            let qkv = self
                .qkv
                .forward(&normed)?
                .reshape((b, l, 3, HEADS, head_dim))?
                .permute((2, 0, 3, 1, 4))?;
            let q = rms_norm(&qkv.get(0)?, &self.query_norm, 1e-6)?;
            let k = rms_norm(&qkv.get(1)?, &self.key_norm, 1e-6)?;
            let q = apply_rope(&q, &rope.cos, &rope.sin)?;
            let k = apply_rope(&k, &rope.cos, &rope.sin)?;
            let attended = attention(&q, &k, &qkv.get(2)?)?;
            let x = (x + self.proj.forward(&attended)?)?;
            let hidden = swiglu(
                &self
                    .mlp_in
                    .forward(&modulated_layer_norm(&x, shift, scale, 1e-6)?)?,
            )?;
            Ok((&x + self.mlp_out.forward(&hidden)?)?)
        }
    }

    /// LoRA and modulation gradients of a 3-block stack: block-wise recompute equals the full
    /// backward.
    #[test]
    fn checkpointed_gradients_equal_full_backward() -> Result<()> {
        let blocks: Vec<Block> = (0..3)
            .map(|i| Block::new(100 * i + 1))
            .collect::<Result<_>>()?;
        let ids: Vec<i64> = (0..2 * 6 * 4).map(|i| (i % 5) as i64).collect();
        let ids = Tensor::from_vec(ids, (2, 6, 4), &Device::Cpu)?;
        let rope = RopeTables::new(&ids, &[2, 2, 2, 2], 2000.0)?;
        let x = random(&[2, 6, WIDTH], 7, DType::F32)?;
        // The modulation is an input that needs a gradient (it comes from the timestep path).
        let shift = Var::from_tensor(&(random(&[2, 1, WIDTH], 8, DType::F32)? * 0.1)?)?;
        let scale = Var::from_tensor(&(random(&[2, 1, WIDTH], 9, DType::F32)? * 0.1)?)?;
        let target = random(&[2, 6, WIDTH], 10, DType::F32)?;

        // Full graph.
        let mut h = x.clone();
        for block in &blocks {
            h = block.forward(&h, &shift, &scale, &rope)?;
        }
        let full = (&h - &target)?.sqr()?.mean_all()?.backward()?;

        // Checkpointed: forward keeps block inputs only, backward walks the blocks in reverse.
        let mut checkpoints = Vec::new();
        let mut h = x.clone();
        for block in &blocks {
            let rope = &rope;
            let (outs, checkpoint) = checkpointed(
                &[h, shift.as_tensor().clone(), scale.as_tensor().clone()],
                move |t| Ok(vec![block.forward(&t[0], &t[1], &t[2], rope)?]),
            )?;
            h = outs[0].clone();
            checkpoints.push(checkpoint);
        }
        let h = Var::from_tensor(&h)?;
        let loss_grads = (h.as_tensor() - &target)?.sqr()?.mean_all()?.backward()?;
        let mut grad = loss_grads.get(&h).cloned();
        let mut total = GradStore::default();
        let (mut shift_grad, mut scale_grad) = (shift.zeros_like()?, scale.zeros_like()?);
        for checkpoint in checkpoints.iter().rev() {
            let gradients = checkpoint.backward(&[grad])?;
            if let Some(g) = &gradients.inputs[1] {
                shift_grad = (shift_grad + g)?;
            }
            if let Some(g) = &gradients.inputs[2] {
                scale_grad = (scale_grad + g)?;
            }
            grad = gradients.inputs[0].clone();
            total.extend(gradients.store)?;
        }

        let mut compared = 0;
        for var in blocks.iter().flat_map(|b| b.vars()) {
            let (Some(a), Some(b)) = (total.get(var), full.get(var)) else {
                panic!("missing LoRA gradient");
            };
            assert!(
                relative_difference(a, b)? < 1e-6,
                "{}",
                relative_difference(a, b)?
            );
            compared += 1;
        }
        assert_eq!(compared, 24);
        for (ours, var) in [(&shift_grad, &shift), (&scale_grad, &scale)] {
            let Some(expected) = full.get(var) else {
                panic!("missing modulation gradient");
            };
            assert!(relative_difference(ours, expected)? < 1e-6);
        }
        // The frozen base weights left nothing in either store.
        for block in &blocks {
            assert!(
                total.get(&block.qkv.weight).is_none() && full.get(&block.qkv.weight).is_none()
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_number_of_output_gradients() -> Result<()> {
        let x = random(&[2, 3], 1, DType::F32)?;
        let (_, checkpoint) = checkpointed(&[x], |t| Ok(vec![(&t[0] * 2.0)?]))?;
        let error = checkpoint
            .backward(&[None, None])
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("1 outputs but 2 output gradients")));
        Ok(())
    }
}
