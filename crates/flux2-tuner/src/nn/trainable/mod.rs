//! Trainable op set for LoRA training: every op records its own backward (candle `CustomOp1/2/3`
//! through `apply_op*`, which do record the op), because candle-nn's fused ops
//! (`rms_norm`, `layer_norm`, `rope_i`, `softmax_last_dim`) silently drop gradients and a plain
//! `matmul` computes and stores a full-size gradient for frozen weights (rust-stack.md §4).
//!
//! API (all shapes as in the inference modules `nn::norm`, `nn::rope`, `nn::attention`):
//! - [`rms_norm`]`(x, scale, eps)`: QK-norm, `x [..., c]`, frozen `scale [c]`; grad to `x`.
//! - [`modulated_layer_norm`]`(x, shift, scale, eps)`: `(1 + scale) * LayerNorm(x) + shift`,
//!   `x [b, l, c]`, `shift`/`scale` broadcastable to `x` (`[b, 1, c]`); grads to all three.
//!   Returns `x`'s dtype (the inference `modulate` takes the dtype as an argument: cast after).
//! - [`apply_rope`]`(x, cos, sin)`: interleaved-pair rotation, `x [b, heads, l, d]`, frozen tables
//!   `[b, l, d/2]` (`RopeTables::cos`/`sin`); grad to `x`.
//! - [`attention`]`(q, k, v)`: `softmax(q k^T / sqrt(d)) v` without mask, `[b, heads, l, d]` in,
//!   `[b, l, heads * d]` out (as `nn::attention::attention`); chunked over queries in forward and
//!   backward, keeping only the per-row logsumexp; f32 accumulation; grads to `q`, `k`, `v`.
//!   [`attention_heads`] returns `[b, heads, l, d]`.
//! - [`swiglu`]`(x)`: `silu(first half) * second half` of the last axis (composed, differentiable).
//! - [`frozen_linear`]`(x, weight)`: `x W^T` with `W [out, in]` frozen: the backward computes
//!   `dX` only; nothing weight-sized enters the `GradStore`.
//! - [`bf16_weight_linear`]`(x, weight)`: `frozen_linear` for f32 activations and a bf16 weight on
//!   the CPU (bf16 mixed precision there: AMX products of bf16-rounded operands, f32 results).
//! - [`LoraLinear`]: a frozen base weight plus `lora_down`/`lora_up` `Var`s (f32 masters, cast to
//!   the activation dtype, so bf16 activations run the LoRA matmuls in bf16).
//! - [`fp8_frozen_linear`]`(x, values, scale)`: `frozen_linear` on an F8E4M3 weight with block-wise
//!   scales, dequantised in the forward and again in the backward (the graph keeps only fp8).
//! - [`checkpointed`]`(inputs, forward)` and [`Checkpoint::backward`]`(output_grads)`: block-level
//!   gradient checkpointing (rust-stack.md §4.4); forward keeps only the block inputs, backward
//!   recomputes the block and returns the input gradients and the block's `GradStore`.
//!
//! Devices: each op's forward is written with tensor operations (and candle-nn's fused forward
//! kernels where they exist) on detached copies of its inputs, run the same way by `cpu_fwd` and
//! `cuda_fwd`; the backward is tensor operations too. So the ops also run on CUDA (attention in
//! f32, not fused) until dedicated kernels replace them; only the CPU path is tested here.
//! `frozen_linear`'s forward is the backend matmul itself (gemm / cuBLAS). On the CPU, attention's
//! row-wise steps (softmax with logsumexp, the recomputed probabilities, the score gradient) run as
//! fused, threaded loops (`softmax_rows`).
//!
//! Frozen arguments (`rms_norm`'s scale, the RoPE tables, `frozen_linear`'s weight) are detached:
//! returning no gradient for an argument that candle tracks would make its backward panic.

mod activation_store;
mod attention;
mod bf16_products;
mod bf16_weight_linear;
mod checkpoint;
mod fp8_linear;
mod frozen_linear;
mod lora_linear;
mod modulated_layer_norm;
mod rms_norm;
mod rope;
mod softmax_rows;
mod storage;
mod swiglu;
#[cfg(test)]
mod test_support;

pub use activation_store::{ActivationStore, Stored};
pub use attention::{attention, attention_heads, attention_with_bf16_products};
pub use bf16_weight_linear::bf16_weight_linear;
pub use checkpoint::{checkpointed, checkpointed_in, Checkpoint, CheckpointGradients};
pub use fp8_linear::fp8_frozen_linear;
pub use frozen_linear::frozen_linear;
pub use lora_linear::LoraLinear;
pub use modulated_layer_norm::modulated_layer_norm;
pub use rms_norm::rms_norm;
pub use rope::apply_rope;
pub use swiglu::swiglu;
