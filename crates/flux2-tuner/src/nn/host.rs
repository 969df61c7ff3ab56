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

/// The sum of `term(value)` over `values` in 16 interleaved partial sums, so that the loop
/// vectorises: one running float sum is a chain of dependent additions that the compiler must keep
/// in order (a 512-channel LayerNorm row spent 2 us in two such chains). Call it inside
/// [`vectorised`]; the order of the additions differs from a plain left-to-right sum.
#[inline(always)]
pub fn lane_sum<T: Copy, A>(values: &[T], term: impl Fn(T) -> A) -> A
where
    A: Copy + Default + std::ops::AddAssign + std::iter::Sum,
{
    const LANES: usize = 16;
    let mut sums = [A::default(); LANES];
    let chunks = values.chunks_exact(LANES);
    let rest: A = chunks.remainder().iter().map(|&v| term(v)).sum();
    for chunk in chunks {
        for (sum, &v) in sums.iter_mut().zip(chunk) {
            *sum += term(v);
        }
    }
    let mut total = rest;
    for sum in sums {
        total += sum;
    }
    total
}

/// `sum term(a[i], b[i])` in lanes, as [`lane_sum`].
#[inline(always)]
pub fn lane_sum_pairs(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let length = a.len().min(b.len());
    let (a, b) = (&a[..length], &b[..length]);
    let mut sums = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&x, &y)| term(x, y))
        .sum();
    for (a_chunk, b_chunk) in a_chunks.zip(b_chunks) {
        for ((sum, &x), &y) in sums.iter_mut().zip(a_chunk).zip(b_chunk) {
            *sum += term(x, y);
        }
    }
    sums.iter().sum::<f32>() + rest
}

/// `sum a[i] * b[i]` in lanes, as [`lane_sum`].
#[inline(always)]
pub fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum_pairs(a, b, |x, y| x * y)
}

/// A vector of `length` values made in parts of `part` values by the thread pool: each part is
/// set to `zero` by the task that then passes it, with the part's index, to `write`. The zeroing
/// runs while the part's lines are in that core's cache, instead of in a pass over the whole
/// buffer before the tasks write it again (such fills were 2-5 % of a training step).
pub fn written_in_parts<T: Copy + Send + Sync>(
    length: usize,
    part: usize,
    zero: T,
    write: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(length);
    if length == 0 {
        return out;
    }
    out.spare_capacity_mut()[..length]
        .par_chunks_mut(part.max(1))
        .enumerate()
        .for_each(|(index, slots)| write(index, zeroed_part(slots, zero)));
    // SAFETY: the parts cover all `length` slots, each initialised above.
    unsafe { out.set_len(length) };
    out
}

/// `slots` set to `zero` (in 64-byte stores), as initialised values: for a task to zero its part
/// of a new buffer while the part's lines are in its core's cache (see [`written_in_parts`]).
pub fn zeroed_part<T: Copy>(slots: &mut [std::mem::MaybeUninit<T>], zero: T) -> &mut [T] {
    vectorised(
        #[inline(always)]
        || {
            for slot in slots.iter_mut() {
                slot.write(zero);
            }
        },
    );
    // SAFETY: every slot was initialised just above; `MaybeUninit<T>` has `T`'s layout.
    unsafe { std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast::<T>(), slots.len()) }
}

/// A new buffer of `length` values that parallel tasks write through [`SharedOutput`] before
/// anything reads it, with no zero fill first (a fill is a pass over memory that the tasks then
/// write again: 2-5 % of a training step or a bf16 forward).
pub struct WriteOnce<T> {
    values: Vec<T>,
    length: usize,
}

impl<T> WriteOnce<T> {
    pub fn new(length: usize) -> Self {
        Self {
            values: Vec::with_capacity(length),
            length,
        }
    }

    /// Where the tasks write: `length` slots from here.
    pub fn target(&mut self) -> SharedOutput<T> {
        SharedOutput(self.values.as_mut_ptr())
    }

    /// The written values.
    ///
    /// # Safety
    /// All `length` values were written through [`Self::target`].
    pub unsafe fn assume_written(mut self) -> Vec<T> {
        // SAFETY: the capacity is `length`, and the caller guarantees that every slot is written.
        unsafe { self.values.set_len(self.length) };
        self.values
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

/// Buffers of at least this many bytes are written by the thread pool, in parts of a quarter of
/// it.
const PARALLEL_BYTES: usize = 1 << 20;

/// Elements of `T` per parallel part, and whether `length` of them are worth splitting.
fn parallel_parts<T>(length: usize) -> (usize, bool) {
    let size = std::mem::size_of::<T>().max(1);
    (
        (PARALLEL_BYTES / 4 / size).max(1),
        length * size >= PARALLEL_BYTES,
    )
}

/// `length` copies of `value`. Large buffers are written by the thread pool: the models'
/// activations are allocated on the calling thread, and a freed heap block that is reused must
/// be filled again (`calloc` zeroes it alone), which otherwise runs on one core between the
/// parallel products.
pub fn filled<T: Copy + Send + Sync>(length: usize, value: T) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(length);
    let spare = &mut out.spare_capacity_mut()[..length];
    // 64-byte stores: the baseline loop stored 16 bytes at a time, and these fills of cache-resident
    // activation buffers ran at the store rate.
    let fill = |chunk: &mut [std::mem::MaybeUninit<T>]| {
        vectorised(
            #[inline(always)]
            || {
                for slot in chunk {
                    slot.write(value);
                }
            },
        )
    };
    let (part, parallel) = parallel_parts::<T>(length);
    if parallel {
        spare.par_chunks_mut(part).for_each(fill);
    } else {
        fill(spare);
    }
    // SAFETY: every one of the `length` elements was written above.
    unsafe { out.set_len(length) };
    out
}

/// `map` applied to each of `values`, written by the thread pool for large inputs (as
/// [`filled`]). Mark `map` `#[inline(always)]`: the loop is compiled for AVX-512 (see
/// [`vectorised`]).
pub fn mapped<T: Copy + Sync, U: Send>(values: &[T], map: impl Fn(T) -> U + Sync) -> Vec<U> {
    use rayon::prelude::*;
    let length = values.len();
    let mut out = Vec::with_capacity(length);
    let spare = &mut out.spare_capacity_mut()[..length];
    let run = |(targets, sources): (&mut [std::mem::MaybeUninit<U>], &[T])| {
        vectorised(
            #[inline(always)]
            || {
                for (target, &source) in targets.iter_mut().zip(sources) {
                    target.write(map(source));
                }
            },
        )
    };
    let (part, parallel) = parallel_parts::<U>(length);
    if parallel {
        spare
            .par_chunks_mut(part)
            .zip(values.par_chunks(part))
            .for_each(run);
    } else {
        run((spare, values));
    }
    // SAFETY: every one of the `length` elements was written above.
    unsafe { out.set_len(length) };
    out
}

/// `update` applied to each of `values` in place, by the thread pool for large inputs.
pub fn update_each<T: Send>(values: &mut [T], update: impl Fn(&mut T) + Sync) {
    use rayon::prelude::*;
    let run = |chunk: &mut [T]| {
        vectorised(
            #[inline(always)]
            || chunk.iter_mut().for_each(&update),
        )
    };
    let (part, parallel) = parallel_parts::<T>(values.len());
    if parallel {
        values.par_chunks_mut(part).for_each(run);
    } else {
        run(values);
    }
}

/// `Tensor::cat(&[a, b], dim)`, copied by the thread pool for contiguous f32 / bf16 CPU tensors
/// that record no gradient (candle copies on one core, between parallel products); other
/// tensors go through `Tensor::cat`.
pub fn cat_pair(a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    let same_outer = a.rank() == b.rank()
        && dim < a.rank()
        && a.dims()[..dim] == b.dims()[..dim]
        && a.dims()[dim + 1..] == b.dims()[dim + 1..];
    if !is_plain_cpu(&[a, b])
        || !same_outer
        || a.dtype() != b.dtype()
        || !a.is_contiguous()
        || !b.is_contiguous()
    {
        return Ok(Tensor::cat(&[a, b], dim)?);
    }
    let mut dims = a.dims().to_vec();
    dims[dim] += b.dims()[dim];
    let outer: usize = dims[..dim].iter().product();
    let (a_count, b_count) = (a.elem_count(), b.elem_count());
    with_data(a, |a_storage, a_offset| {
        with_data(b, |b_storage, b_offset| {
            let (a_range, b_range) = (a_offset..a_offset + a_count, b_offset..b_offset + b_count);
            match (a_storage, b_storage) {
                (CpuStorage::F32(x), CpuStorage::F32(y)) => {
                    joined_values(&x[a_range], &y[b_range], outer, &dims, a)
                }
                (CpuStorage::BF16(x), CpuStorage::BF16(y)) => {
                    joined_values(&x[a_range], &y[b_range], outer, &dims, a)
                }
                _ => Ok(Tensor::cat(&[a, b], dim)?),
            }
        })
    })
}

/// The tensor of `dims` on `like`'s device holding [`interleaved`] `a` and `b`.
fn joined_values<T: candle_core::WithDType>(
    a: &[T],
    b: &[T],
    outer: usize,
    dims: &[usize],
    like: &Tensor,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        interleaved(a, b, outer),
        dims,
        like.device(),
    )?)
}

/// `outer` runs of `[a part, b part]`: part `o` of `a` is `a[o * |a| / outer ..]`, likewise `b`.
fn interleaved<T: Copy + Send + Sync>(a: &[T], b: &[T], outer: usize) -> Vec<T> {
    use rayon::prelude::*;
    let outer = outer.max(1);
    let (a_inner, b_inner) = (a.len() / outer, b.len() / outer);
    let width = a_inner + b_inner;
    let total = outer * width;
    let mut out = Vec::with_capacity(total);
    let copy = |(o, run): (usize, &mut [std::mem::MaybeUninit<T>])| {
        let (first, second) = run.split_at_mut(a_inner);
        for (slot, &value) in first.iter_mut().zip(&a[o * a_inner..(o + 1) * a_inner]) {
            slot.write(value);
        }
        for (slot, &value) in second.iter_mut().zip(&b[o * b_inner..(o + 1) * b_inner]) {
            slot.write(value);
        }
    };
    let spare = &mut out.spare_capacity_mut()[..total];
    if parallel_parts::<T>(total).1 && width > 0 {
        spare.par_chunks_mut(width).enumerate().for_each(copy);
    } else if width > 0 {
        spare.chunks_mut(width).enumerate().for_each(copy);
    }
    // SAFETY: each of the `outer` runs of `width` slots was written above.
    unsafe { out.set_len(total) };
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
/// `f` must write before it reads.
///
/// The buffer is taken out of its cell while `f` runs: if `f` waits on the thread pool, the
/// thread may run another task that calls this too, and that call gets a buffer of its own.
pub fn with_f32_scratch<R>(length: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = SCRATCH_F32.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    if buffer.len() < length {
        buffer.resize(length, 0.0);
    }
    let result = f(&mut buffer[..length]);
    SCRATCH_F32.with(|cell| {
        let mut kept = cell.borrow_mut();
        // A nested call may have put back its own buffer meanwhile: keep the larger.
        if kept.len() < buffer.len() {
            *kept = buffer;
        }
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A call made while an outer call holds the scratch (as a task run by a thread that waits on
    /// the pool would) gets its own buffer; the outer call's values are untouched.
    #[test]
    fn scratch_calls_nest() {
        let sum = with_f32_scratch(8, |outer| {
            outer.fill(1.0);
            let inner = with_f32_scratch(4, |inner| {
                inner.fill(2.0);
                inner.iter().sum::<f32>()
            });
            inner + outer.iter().sum::<f32>()
        });
        assert_eq!(sum, 16.0);
        // The larger buffer is kept for the next call.
        with_f32_scratch(8, |buffer| assert_eq!(buffer.len(), 8));
    }

    /// Every slot is handed to `write` once, zeroed, with its part's index; parts cover the
    /// buffer, the last one short.
    #[test]
    fn written_in_parts_covers_every_slot() {
        for (length, part) in [(0, 4), (1, 4), (10, 4), (3 << 20, 1 << 18), (1000, 1)] {
            let values = written_in_parts(length, part, 7u32, |index, values| {
                for (offset, value) in values.iter_mut().enumerate() {
                    assert_eq!(*value, 7, "slots arrive set to the zero value");
                    *value = (index * part + offset) as u32;
                }
            });
            assert_eq!(values.len(), length);
            assert!(values.iter().enumerate().all(|(i, &v)| v == i as u32));
        }
    }

    #[test]
    fn write_once_returns_what_the_tasks_wrote() {
        use rayon::prelude::*;
        let length = 100_000;
        let mut buffer = WriteOnce::<f32>::new(length);
        let target = buffer.target();
        (0..length).into_par_iter().for_each(|i| {
            // SAFETY: each index is written once, inside the buffer.
            unsafe { target.write(i, i as f32 * 0.5) }
        });
        // SAFETY: all `length` values were written above.
        let values = unsafe { buffer.assume_written() };
        assert_eq!(values.len(), length);
        assert!(values.iter().enumerate().all(|(i, &v)| v == i as f32 * 0.5));
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        for length in [0, 1, 15, 16, 17, 100, 1027] {
            let a: Vec<f32> = (0..length).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..length).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((lane_sum(&a, |v| v * v) as f64 - plain).abs() < 1e-4 * (1.0 + plain));
            let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((lane_dot(&a, &b) as f64 - dot).abs() < 1e-4 * (1.0 + dot.abs()));
            let f64_sum: f64 = lane_sum(&a, |v| v as f64);
            let plain_sum: f64 = a.iter().map(|&v| v as f64).sum();
            assert!((f64_sum - plain_sum).abs() < 1e-9);
        }
    }

    fn ramp(dims: &[usize], start: f32) -> Result<Tensor> {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count).map(|i| start + i as f32).collect();
        Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
    }

    /// Against `Tensor::cat` along an inner and the last dimension, f32 and bf16, small and
    /// large enough for the thread pool; a transposed input takes the fallback.
    #[test]
    fn cat_pair_equals_candle_cat() -> Result<()> {
        for (a_dims, b_dims, dim) in [
            (vec![2, 3, 5, 4], vec![2, 3, 7, 4], 2),
            (vec![3, 6], vec![3, 9], 1),
            (vec![1, 600, 512], vec![1, 600, 1536], 2),
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let a = ramp(&a_dims, 0.0)?.to_dtype(dtype)?;
                let b = ramp(&b_dims, 0.5)?.to_dtype(dtype)?;
                let ours = cat_pair(&a, &b, dim)?.to_dtype(DType::F32)?;
                let candle = Tensor::cat(&[&a, &b], dim)?.to_dtype(DType::F32)?;
                assert_eq!(ours.dims(), candle.dims());
                let difference: f32 = (ours - candle)?.abs()?.sum_all()?.to_scalar()?;
                assert_eq!(
                    difference, 0.0,
                    "{a_dims:?} + {b_dims:?} along {dim}, {dtype:?}"
                );
            }
        }
        let a = ramp(&[4, 3], 0.0)?.t()?;
        let b = ramp(&[2, 4], 1.0)?;
        let ours = cat_pair(&a, &b, 0)?;
        let candle = Tensor::cat(&[&a, &b], 0)?;
        let difference: f32 = (ours - candle)?.abs()?.sum_all()?.to_scalar()?;
        assert_eq!(difference, 0.0);
        Ok(())
    }

    #[test]
    fn filled_and_mapped_write_every_element() {
        for length in [0, 5, 1 << 19] {
            let values = filled(length, 2.5f32);
            assert_eq!(values.len(), length);
            assert!(values.iter().all(|&v| v == 2.5));
            let doubled = mapped(&values, |v| v * 2.0);
            assert!(doubled.len() == length && doubled.iter().all(|&v| v == 5.0));
            let mut updated = values.clone();
            update_each(&mut updated, |v| *v += 1.0);
            assert!(updated.iter().all(|&v| v == 3.5));
        }
    }
}
