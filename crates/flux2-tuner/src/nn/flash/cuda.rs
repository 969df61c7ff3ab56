//! Launches the fused attention kernels of `flash_attention.cu` (PTX built by `build.rs`) on
//! candle's CUDA storage: the forward from the op's `cuda_fwd`, the backward from its `bwd`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor, D};
use half::bf16;

use super::tiled::{BACKWARD_BLOCK_K, BACKWARD_BLOCK_Q, FORWARD_BLOCK_K, FORWARD_BLOCK_Q};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const MODULE: &str = "flux2_flash_attention";
/// Threads per block (`THREADS` in the kernel).
const THREADS: u32 = 128;
/// Row paddings in shared memory (`PAD_BF16`, `PAD_F32` in the kernel).
const PAD_BF16: usize = 8;
const PAD_F32: usize = 4;

/// The kernels' padded head dimension: 16, 32, 64 or 128.
fn padded_head_dim(head_dim: usize) -> candle_core::Result<usize> {
    [16, 32, 64, 128]
        .into_iter()
        .find(|&padded| head_dim <= padded)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("fused attention: head_dim {head_dim} is over 128"))
        })
}

/// Bytes of a shared buffer as the kernel's `SharedCarver` takes them (128-byte aligned).
fn carved(count: usize, element_bytes: usize) -> usize {
    (count * element_bytes).div_ceil(128) * 128
}

/// Dynamic shared memory of the forward kernel (same buffers, same order as the kernel).
fn forward_shared_bytes(dp: usize) -> usize {
    let (bq, bk) = (FORWARD_BLOCK_Q, FORWARD_BLOCK_K);
    let ld = dp + PAD_BF16;
    carved(bq * ld, 2)
        + 2 * carved(bk * ld, 2)
        + carved(bq * (bk + PAD_F32), 4)
        + carved(bq * (bk + PAD_BF16), 2)
        + carved(bq * (dp + PAD_F32), 4)
        + 2 * carved(bq, 4)
}

/// Dynamic shared memory of the backward kernel.
fn backward_shared_bytes(dp: usize) -> usize {
    let (bq, bk) = (BACKWARD_BLOCK_Q, BACKWARD_BLOCK_K);
    let (ld, ldf) = (dp + PAD_BF16, dp + PAD_F32);
    2 * carved(bk * ld, 2)
        + 2 * carved(bk * ldf, 4)
        + 2 * carved(bq * ld, 2)
        + 2 * carved(bq * (bk + PAD_F32), 4)
        + 2 * carved(bq * (bk + PAD_BF16), 2)
        + carved(bq * ldf, 4)
        + 2 * carved(bq, 4)
}

fn kernel(
    device: &CudaDevice,
    name: &str,
    shared_bytes: usize,
) -> candle_core::Result<CudaFunction> {
    let function = device
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function();
    // Over 48 KiB of dynamic shared memory must be asked for (H100: up to 227 KiB).
    function
        .set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )
        .w()?;
    Ok(function)
}

/// Sizes and element strides `(batch, head, row)` of a `[b, h, l, d]` layout with unit stride
/// in `d`.
fn strides(layout: &Layout, name: &str) -> candle_core::Result<[i64; 3]> {
    match layout.stride() {
        &[batch, head, row, 1] => Ok([batch as i64, head as i64, row as i64]),
        other => Err(candle_core::Error::Msg(format!(
            "fused attention: {name} has strides {other:?}, expected a unit stride in the head dim"
        ))),
    }
}

fn bf16_view<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, bf16>> {
    Ok(storage
        .as_cuda_slice::<bf16>()?
        .slice(layout.start_offset()..))
}

/// The CUDA storage inside a tensor's storage (borrowed: cloning would copy the device buffer).
fn cuda_of(storage: &Storage) -> candle_core::Result<&CudaStorage> {
    match storage {
        Storage::Cuda(inner) => Ok(inner),
        _ => Err(candle_core::Error::Msg(
            "fused attention: backward input not on CUDA".into(),
        )),
    }
}

fn wrap(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Output `[b, l, h, d]` (bf16) and the logsumexp `[b * h, l]` (f32).
pub(super) fn forward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape, Tensor)> {
    let (batch, heads, queries, head_dim) = q.1.shape().dims4()?;
    let keys = k.1.shape().dims()[2];
    for (name, storage) in [("q", q.0), ("k", k.0), ("v", v.0)] {
        if storage.dtype() != DType::BF16 {
            return Err(candle_core::Error::Msg(format!(
                "fused attention: {name} is {:?}, the CUDA kernel takes bf16",
                storage.dtype()
            )));
        }
    }
    let device = q.0.device().clone();
    let dp = padded_head_dim(head_dim)?;
    let shared_bytes = forward_shared_bytes(dp);
    let function = kernel(&device, &format!("flash_forward_{dp}"), shared_bytes)?;
    let [q_batch, q_head, q_row] = strides(q.1, "q")?;
    let [k_batch, k_head, k_row] = strides(k.1, "k")?;
    let [v_batch, v_head, v_row] = strides(v.1, "v")?;
    let (q_view, k_view, v_view) = (
        bf16_view(q.0, q.1)?,
        bf16_view(k.0, k.1)?,
        bf16_view(v.0, v.1)?,
    );
    // SAFETY: every element is written by the kernel.
    let out = unsafe { device.alloc::<bf16>(batch * queries * heads * head_dim)? };
    let logsumexp = unsafe { device.alloc::<f32>(batch * heads * queries)? };
    let (heads_arg, queries_arg, keys_arg, head_dim_arg) =
        (heads as i32, queries as i32, keys as i32, head_dim as i32);
    let scale = 1.0f32 / (head_dim as f32).sqrt();
    let config = LaunchConfig {
        grid_dim: (
            queries.div_ceil(FORWARD_BLOCK_Q) as u32,
            (batch * heads) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&function);
    builder.arg(&q_view);
    builder.arg(&k_view);
    builder.arg(&v_view);
    builder.arg(&out);
    builder.arg(&logsumexp);
    builder.arg(&heads_arg);
    builder.arg(&queries_arg);
    builder.arg(&keys_arg);
    builder.arg(&head_dim_arg);
    builder.arg(&scale);
    for stride in [
        &q_batch, &q_head, &q_row, &k_batch, &k_head, &k_row, &v_batch, &v_head, &v_row,
    ] {
        builder.arg(stride);
    }
    // SAFETY: argument types and order match `flash_forward_*`; buffers hold the sizes above.
    unsafe { builder.launch(config) }.w()?;
    drop(builder);
    let logsumexp = wrap(
        CudaStorage::wrap_cuda_slice(logsumexp, device.clone()),
        (batch * heads, queries),
    );
    Ok((
        CudaStorage::wrap_cuda_slice(out, device),
        Shape::from((batch, queries, heads, head_dim)),
        logsumexp,
    ))
}

/// `(dq, dk, dv)` in f32 `[b, h, l, d]`; `out`, `grad` are `[b, h, l, d]` views.
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    logsumexp: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (batch, heads, queries, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    // delta = rowsum(dO * O) in f32, `[b * h, l]`.
    let delta = (grad.to_dtype(DType::F32)? * out.to_dtype(DType::F32)?)?
        .sum(D::Minus1)?
        .reshape((batch * heads, queries))?
        .contiguous()?;
    let unit_rows = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.detach().to_dtype(DType::BF16)?;
        if t.stride().last() == Some(&1) {
            Ok(t)
        } else {
            t.contiguous()
        }
    };
    let (q, k, v, grad) = (
        unit_rows(q)?,
        unit_rows(k)?,
        unit_rows(v)?,
        unit_rows(grad)?,
    );
    let logsumexp = logsumexp.contiguous()?;
    let device = match q.device() {
        candle_core::Device::Cuda(device) => device.clone(),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "fused attention: CUDA backward called on {other:?}"
            )))
        }
    };
    let dp = padded_head_dim(head_dim)?;
    let shared_bytes = backward_shared_bytes(dp);
    let function = kernel(&device, &format!("flash_backward_{dp}"), shared_bytes)?;

    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (g_storage, g_layout) = grad.storage_and_layout();
    let (l_storage, l_layout) = logsumexp.storage_and_layout();
    let (d_storage, d_layout) = delta.storage_and_layout();
    let (q_cuda, k_cuda, v_cuda, g_cuda) = (
        cuda_of(&q_storage)?,
        cuda_of(&k_storage)?,
        cuda_of(&v_storage)?,
        cuda_of(&g_storage)?,
    );
    let (l_cuda, d_cuda) = (cuda_of(&l_storage)?, cuda_of(&d_storage)?);
    let [q_batch, q_head, q_row] = strides(q_layout, "q")?;
    let [k_batch, k_head, k_row] = strides(k_layout, "k")?;
    let [v_batch, v_head, v_row] = strides(v_layout, "v")?;
    let [g_batch, g_head, g_row] = strides(g_layout, "grad")?;
    let (q_view, k_view, v_view, g_view) = (
        bf16_view(q_cuda, q_layout)?,
        bf16_view(k_cuda, k_layout)?,
        bf16_view(v_cuda, v_layout)?,
        bf16_view(g_cuda, g_layout)?,
    );
    let l_view = l_cuda
        .as_cuda_slice::<f32>()?
        .slice(l_layout.start_offset()..);
    let d_view = d_cuda
        .as_cuda_slice::<f32>()?
        .slice(d_layout.start_offset()..);
    // dq is accumulated atomically: zeros first. dk, dv are written whole.
    let q_grad = device.alloc_zeros::<f32>(batch * heads * queries * head_dim)?;
    let k_grad = unsafe { device.alloc::<f32>(batch * heads * keys * head_dim)? };
    let v_grad = unsafe { device.alloc::<f32>(batch * heads * keys * head_dim)? };
    let (heads_arg, queries_arg, keys_arg, head_dim_arg) =
        (heads as i32, queries as i32, keys as i32, head_dim as i32);
    let scale = 1.0f32 / (head_dim as f32).sqrt();
    let config = LaunchConfig {
        grid_dim: (
            keys.div_ceil(BACKWARD_BLOCK_K) as u32,
            (batch * heads) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    };
    let stream = device.cuda_stream();
    let mut builder = stream.launch_builder(&function);
    builder.arg(&q_view);
    builder.arg(&k_view);
    builder.arg(&v_view);
    builder.arg(&g_view);
    builder.arg(&l_view);
    builder.arg(&d_view);
    builder.arg(&q_grad);
    builder.arg(&k_grad);
    builder.arg(&v_grad);
    builder.arg(&heads_arg);
    builder.arg(&queries_arg);
    builder.arg(&keys_arg);
    builder.arg(&head_dim_arg);
    builder.arg(&scale);
    for stride in [
        &q_batch, &q_head, &q_row, &k_batch, &k_head, &k_row, &v_batch, &v_head, &v_row, &g_batch,
        &g_head, &g_row,
    ] {
        builder.arg(stride);
    }
    // SAFETY: argument types and order match `flash_backward_*`; buffers hold the sizes above.
    unsafe { builder.launch(config) }.w()?;
    drop(builder);
    let shape = |length: usize| (batch, heads, length, head_dim);
    Ok((
        wrap(
            CudaStorage::wrap_cuda_slice(q_grad, device.clone()),
            shape(queries),
        ),
        wrap(
            CudaStorage::wrap_cuda_slice(k_grad, device.clone()),
            shape(keys),
        ),
        wrap(CudaStorage::wrap_cuda_slice(v_grad, device), shape(keys)),
    ))
}
