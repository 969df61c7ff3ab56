//! Fused attention, flash-attention style (FlashAttention-2: Dao, 2023), forward and backward, as
//! one candle `CustomOp3` with its own backward: `softmax(q k^T / sqrt(d)) v` without mask, bf16
//! inputs, f32 accumulation, online softmax, the per-row logsumexp kept for the backward.
//!
//! On CUDA (feature `cuda`) the op runs the kernels of `flash_attention.cu` (compiled to PTX by
//! nvcc in `build.rs`); on the CPU it runs [`tiled`], the same tiling in Rust, which is what the
//! CPU tests check against the composed attention. The composed attention (`nn::attention`,
//! `nn::trainable::attention`) stays the reference and the CPU path: `nn::attention` routes here
//! only when [`select`]`(AttentionKernel::Fused)` was called (`--attn_mode flash`) and the inputs
//! are bf16 tensors on a CUDA device ([`applies_to`]).

#[cfg(feature = "cuda")]
mod cuda;
pub mod tiled;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use tiled::{Products, TiledShape};

/// Largest head dimension the CUDA kernels handle (FLUX.2: 128; the tiny test models 24 and 32).
pub const MAX_HEAD_DIM: usize = 128;

/// Which attention the models use on a CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Matmuls and a softmax (candle ops), on every device: the reference.
    Composed,
    /// The fused kernel for bf16 on CUDA; composed everywhere else.
    Fused,
}

static FUSED_SELECTED: AtomicBool = AtomicBool::new(false);

/// Sets the attention used from now on, process-wide (a command-line choice, as Musubi's
/// `--attn_mode`).
pub fn select(kernel: AttentionKernel) {
    FUSED_SELECTED.store(kernel == AttentionKernel::Fused, Ordering::Relaxed);
}

/// The attention chosen with [`select`] (default: composed).
pub fn selected() -> AttentionKernel {
    if FUSED_SELECTED.load(Ordering::Relaxed) {
        AttentionKernel::Fused
    } else {
        AttentionKernel::Composed
    }
}

/// Whether this build has the fused CUDA kernels.
pub fn cuda_kernels_built() -> bool {
    cfg!(feature = "cuda")
}

/// True when attention over `q` should run the fused op: it was selected, this build has the
/// kernels, `q` is bf16 on a CUDA device and its head dimension fits.
pub fn applies_to(q: &Tensor) -> bool {
    selected() == AttentionKernel::Fused
        && cuda_kernels_built()
        && q.device().is_cuda()
        && q.dtype() == DType::BF16
        && q.dims().last().is_some_and(|&d| d <= MAX_HEAD_DIM)
}

/// `softmax(q k^T / sqrt(d)) v` through the fused op.
///
/// # Shapes
/// `q`: `[b, heads, l, d]`; `k`, `v`: `[b, heads, keys, d]`; returns `[b, l, heads * d]` (as
/// `nn::attention::attention`), in `q`'s dtype. Gradients flow to `q`, `k` and `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    Ok(attention_rows(q, k, v)?.reshape((batch, length, heads * head_dim))?)
}

/// As [`attention`], returning `[b, l, heads, d]`.
pub fn attention_rows(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let head_dim = q.dim(3)?;
    crate::nn::attention::check_qkv("fused attention", q, k, v)?;
    if q.device().is_cuda() && (q.dtype() != DType::BF16 || head_dim > MAX_HEAD_DIM) {
        return Err(Error::Shape(format!(
            "fused attention on CUDA takes bf16 with head_dim <= {MAX_HEAD_DIM}, got {:?} and {head_dim}",
            q.dtype()
        )));
    }
    // The kernels read rows with a unit stride in the head dimension; other strides are free.
    let unit_rows = |t: &Tensor| -> Result<Tensor> {
        if t.stride().last() == Some(&1) {
            Ok(t.clone())
        } else {
            Ok(t.contiguous()?)
        }
    };
    let op = FlashAttention {
        logsumexp: Mutex::new(None),
    };
    Ok(unit_rows(q)?.apply_op3(&unit_rows(k)?, &unit_rows(v)?, op)?)
}

/// The op; the forward leaves the logsumexp `[b * heads, l]` (f32) here for the backward.
struct FlashAttention {
    logsumexp: Mutex<Option<Tensor>>,
}

impl FlashAttention {
    fn keep_logsumexp(&self, logsumexp: Tensor) -> candle_core::Result<()> {
        *self
            .logsumexp
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned lock".into()))? =
            Some(logsumexp);
        Ok(())
    }

    fn logsumexp(&self) -> candle_core::Result<Tensor> {
        self.logsumexp
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned lock".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused attention: backward before forward".into())
            })
    }
}

/// `[b, h, l, d]` sizes as the tiled code's `[b * h, l, d]`.
fn tiled_shape(q: &[usize], keys: usize) -> candle_core::Result<TiledShape> {
    match q {
        &[batch, heads, queries, head_dim] => Ok(TiledShape {
            batch_heads: batch * heads,
            queries,
            keys,
            head_dim,
        }),
        other => Err(candle_core::Error::Msg(format!(
            "fused attention: q has shape {other:?}, expected [b, heads, l, d]"
        ))),
    }
}

fn cpu_f32(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<f32>> {
    // `to_dtype` walks the layout, so the result is contiguous in `[b, h, l, d]` order.
    match storage.to_dtype(layout, DType::F32)? {
        CpuStorage::F32(values) => Ok(values),
        _ => Err(candle_core::Error::Msg(
            "fused attention: f32 conversion".into(),
        )),
    }
}

/// `[b, h, l, d]` values as a contiguous f32 vector.
fn tensor_f32(tensor: &Tensor) -> candle_core::Result<Vec<f32>> {
    tensor
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    /// The tiled algorithm of the kernel, in f32 (the CPU mirror; see [`tiled`]).
    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = q_layout.shape().dims();
        let shape = tiled_shape(dims, k_layout.shape().dims()[2])?;
        let (out, logsumexp) = tiled::forward(
            &cpu_f32(q, q_layout)?,
            &cpu_f32(k, k_layout)?,
            &cpu_f32(v, v_layout)?,
            shape,
            Products::F32,
        );
        self.keep_logsumexp(Tensor::from_vec(
            logsumexp,
            (shape.batch_heads, shape.queries),
            &Device::Cpu,
        )?)?;
        let (batch, heads, queries, head_dim) = (dims[0], dims[1], dims[2], dims[3]);
        let out = Tensor::from_vec(out, (batch, heads, queries, head_dim), &Device::Cpu)?
            .transpose(1, 2)?
            .contiguous()?;
        let (storage, layout) = out.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            return Err(candle_core::Error::Msg(
                "fused attention: CPU result".into(),
            ));
        };
        Ok((
            storage.to_dtype(layout, q.dtype())?,
            Shape::from((batch, queries, heads, head_dim)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (out, shape, logsumexp) = cuda::forward((q, q_layout), (k, k_layout), (v, v_layout))?;
        self.keep_logsumexp(logsumexp)?;
        Ok((out, shape))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Err(candle_core::Error::Msg(
            "fused attention: this build has no CUDA kernels (build with --features cuda)".into(),
        ))
    }

    /// `out` and `grad` are `[b, l, heads, d]`; the gradients come back in the inputs' dtypes.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let logsumexp = self.logsumexp()?;
        let heads_first = |t: &Tensor| t.detach().transpose(1, 2);
        let (q_grad, k_grad, v_grad) = if q.device().is_cuda() {
            cuda_backward(q, k, v, &heads_first(out)?, &heads_first(grad)?, &logsumexp)?
        } else {
            cpu_backward(q, k, v, &heads_first(out)?, &heads_first(grad)?, &logsumexp)?
        };
        Ok((
            Some(q_grad.to_dtype(q.dtype())?),
            Some(k_grad.to_dtype(k.dtype())?),
            Some(v_grad.to_dtype(v.dtype())?),
        ))
    }
}

/// The tiled backward on the CPU; `out`, `grad` as `[b, heads, l, d]`.
fn cpu_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    logsumexp: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let shape = tiled_shape(q.dims(), k.dim(2)?)?;
    let grad_values = tensor_f32(grad)?;
    let delta = tiled::delta(&tensor_f32(out)?, &grad_values, shape.head_dim);
    let (q_grad, k_grad, v_grad) = tiled::backward(
        &tensor_f32(q)?,
        &tensor_f32(k)?,
        &tensor_f32(v)?,
        &grad_values,
        &tensor_f32(logsumexp)?,
        &delta,
        shape,
        Products::F32,
    );
    Ok((
        Tensor::from_vec(q_grad, q.dims(), &Device::Cpu)?,
        Tensor::from_vec(k_grad, k.dims(), &Device::Cpu)?,
        Tensor::from_vec(v_grad, v.dims(), &Device::Cpu)?,
    ))
}

#[cfg(feature = "cuda")]
fn cuda_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    logsumexp: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    cuda::backward(q, k, v, out, grad, logsumexp)
}

#[cfg(not(feature = "cuda"))]
fn cuda_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    Err(candle_core::Error::Msg(
        "fused attention: this build has no CUDA kernels (build with --features cuda)".into(),
    ))
}

#[cfg(test)]
mod tests;
