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
        return Err(Error::Shape(
            "a host kernel was given a non-contiguous tensor".into(),
        ));
    }
    match &*storage {
        Storage::Cpu(cpu) => f(cpu, layout.start_offset()),
        _ => Err(Error::Shape(
            "a host kernel was given a tensor that is not on the CPU".into(),
        )),
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

/// Runs `f` compiled for AVX-512 (or AVX2) when the CPU has it: the closure is inlined into a
/// function with those target features, so its loops vectorise beyond baseline x86-64 (SSE2).
///
/// Mark the closure `#[inline(always)]` (and any function it calls for its loops): a large
/// closure is otherwise compiled as a function of its own, for baseline x86-64, and called.
#[inline(always)]
pub fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            return unsafe { run_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Buffers at least this long are filled by the thread pool.
const PARALLEL_FILL: usize = 1 << 18;

/// `length` copies of `value`. Large buffers are written by the thread pool: the models'
/// activations are allocated on the calling thread, and a freed heap block that is reused must
/// be filled again (`calloc` zeroes it alone), which otherwise runs on one core between the
/// parallel products.
pub fn filled<T: Copy + Send + Sync>(length: usize, value: T) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(length);
    let spare = &mut out.spare_capacity_mut()[..length];
    let fill = |chunk: &mut [std::mem::MaybeUninit<T>]| {
        for slot in chunk {
            slot.write(value);
        }
    };
    if length >= PARALLEL_FILL {
        spare.par_chunks_mut(PARALLEL_FILL / 4).for_each(fill);
    } else {
        fill(spare);
    }
    // SAFETY: every one of the `length` elements was written above.
    unsafe { out.set_len(length) };
    out
}

/// `length` f32 zeros (see [`filled`]).
pub fn zeroed_f32(length: usize) -> Vec<f32> {
    filled(length, 0.0)
}

thread_local! {
    static SCRATCH_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with this thread's f32 scratch of `length` values, kept between calls so that the
/// kernels' per-block buffers are neither allocated nor zeroed each time. The contents are stale:
/// `f` must write before it reads. Not reentrant.
pub fn with_f32_scratch<R>(length: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH_F32.with(|cell| {
        let mut buffer = cell.borrow_mut();
        if buffer.len() < length {
            buffer.resize(length, 0.0);
        }
        f(&mut buffer[..length])
    })
}
