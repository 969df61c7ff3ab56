//! Moves between a custom op's raw storage and detached tensors, so that an op's forward can be
//! written once with tensor operations and run on the CPU and CUDA backends alike.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape, Storage, Tensor};

/// A backend storage that can be wrapped into, and found inside, a [`Storage`].
pub(crate) trait DeviceStorage: BackendStorage {
    fn wrap(self) -> Storage;
    fn find(storage: &Storage) -> Option<&Self>;
}

impl DeviceStorage for CpuStorage {
    fn wrap(self) -> Storage {
        Storage::Cpu(self)
    }

    fn find(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(inner) => Some(inner),
            _ => None,
        }
    }
}

impl DeviceStorage for CudaStorage {
    fn wrap(self) -> Storage {
        Storage::Cuda(self)
    }

    fn find(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(inner) => Some(inner),
            _ => None,
        }
    }
}

/// A contiguous, graph-free tensor holding `storage` seen through `layout`, converted to `dtype`.
pub(crate) fn tensor_from<S: DeviceStorage>(
    storage: &S,
    layout: &Layout,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    // `to_dtype` walks the layout, so the copy is contiguous even for strided inputs.
    let converted = storage.to_dtype(layout, dtype)?;
    Ok(Tensor::from_storage(
        converted.wrap(),
        layout.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// The contents of `tensor`, converted to `dtype`, as a contiguous storage of backend `S`.
pub(crate) fn storage_from<S: DeviceStorage>(
    tensor: &Tensor,
    dtype: DType,
) -> candle_core::Result<(S, Shape)> {
    let (storage, layout) = tensor.storage_and_layout();
    let inner = S::find(&storage).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "trainable op: result on {:?}, expected the input's backend",
            tensor.device().location()
        ))
    })?;
    Ok((inner.to_dtype(layout, dtype)?, layout.shape().clone()))
}

/// The dtype the ops compute in: f64 stays f64 (for finite-difference tests), everything else
/// is computed in f32.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Sums `gradient` over the axes that `shape` broadcasts, the backward of a broadcast.
pub(crate) fn sum_to_shape(gradient: &Tensor, shape: &Shape) -> candle_core::Result<Tensor> {
    let target = shape.dims();
    let dims = gradient.dims();
    let leading = dims.len() - target.len();
    let mut reduced = gradient.clone();
    if leading > 0 {
        reduced = reduced.sum((0..leading).collect::<Vec<_>>())?;
    }
    let broadcast_axes: Vec<usize> = target
        .iter()
        .zip(&dims[leading..])
        .enumerate()
        .filter(|(_, (&want, &have))| want == 1 && have != 1)
        .map(|(axis, _)| axis)
        .collect();
    if !broadcast_axes.is_empty() {
        reduced = reduced.sum_keepdim(broadcast_axes)?;
    }
    reduced.reshape(target)
}
