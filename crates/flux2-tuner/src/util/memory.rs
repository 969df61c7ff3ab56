//! Allocator settings for tensor work.
//!
//! glibc returns every allocation above its mmap threshold to the kernel when it is freed, so the
//! next tensor of that size is a fresh mapping whose pages fault in and are zeroed one by one. A
//! training step frees and allocates hundreds of activation-sized buffers: with the defaults a
//! fifth of a CPU step went to page faults. Raising the thresholds keeps freed buffers in the heap
//! for reuse; the peak resident memory stays the same (measured in BENCHMARKS.md).

/// Keeps freed tensor buffers (up to glibc's 32 MiB mmap-threshold limit) in the heap for reuse.
/// Call once at program start; a no-op outside Linux with glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
