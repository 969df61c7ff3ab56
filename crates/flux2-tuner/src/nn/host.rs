//! Direct access to the host memory of CPU tensors, for the hand-written inference kernels
//! ([`crate::nn::amx`], the fused attention). Those kernels record no gradient, so callers take
//! them only for tensors that do not track one.

use candle_core::{CpuStorage, Storage, Tensor};

use crate::error::{Error, Result};

/// True when `tensors` all live on the CPU and none of them records a gradient.
pub fn is_plain_cpu(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && !t.track_op())
}

/// Calls `f` with the values of a contiguous CPU tensor, in memory order.
pub fn with_data<R>(tensor: &Tensor, f: impl FnOnce(&CpuStorage, usize) -> Result<R>) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    if !layout.is_contiguous() {
        return Err(Error::Shape("a host kernel was given a non-contiguous tensor".into()));
    }
    match &*storage {
        Storage::Cpu(cpu) => f(cpu, layout.start_offset()),
        _ => Err(Error::Shape("a host kernel was given a tensor that is not on the CPU".into())),
    }
}

/// A raw output pointer shared by parallel tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub struct SharedOutput<T>(pub *mut T);

// SAFETY: every user writes disjoint elements from each task, and the buffer outlives the tasks.
unsafe impl<T> Send for SharedOutput<T> {}
unsafe impl<T> Sync for SharedOutput<T> {}

impl<T> SharedOutput<T> {
    /// The start of the buffer (a method, so that closures capture the whole `Sync` wrapper).
    #[inline(always)]
    pub fn pointer(self) -> *mut T {
        self.0
    }

    /// # Safety
    /// `index` is in bounds of the buffer and no other task writes it.
    #[inline(always)]
    pub unsafe fn write(self, index: usize, value: T) {
        unsafe { self.0.add(index).write(value) }
    }
}
