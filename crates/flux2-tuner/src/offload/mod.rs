//! Keeping weights in host memory and bringing them to the device when needed (Musubi
//! `--blocks_to_swap`, training-and-data.md §6.2):
//! - [`split`]: how `N` is split between double and single blocks, with the maxima;
//! - [`block_swap`]: the double-buffered copy schedule in forward and backward order, with its
//!   event log (the CPU runs the same path with real copies, for tests);
//! - [`placement`]: which tensors live where, and the blocks handed to the forward.
//!
//! What is CUDA-specific and not done here: candle 0.11.1's public tensor API has no pinned host
//! allocation and no second stream; the copy uses `Tensor::to_device` (a pageable copy on the
//! device's own stream) on a worker thread, so it overlaps the compute thread's work but not the
//! GPU's kernels. cudarc 0.19 has what a true async copy needs (`CudaContext::alloc_pinned`,
//! `CudaStream::fork`, `memcpy_htod`, `record_event` / `wait`, then
//! `CudaStorage::wrap_cuda_slice` + `Tensor::from_storage`).

pub mod block_swap;
pub mod flags;
pub mod generation;
pub mod placement;
pub mod split;

pub use block_swap::{BlockId, BlockKind, BlockSwap, SwapEvent, SwapLedger};
pub use flags::refuse_block_swap_variants;
pub use placement::{
    enable_block_swap, load_device, resident_double, resident_single, split_for_checkpoint,
    Resident,
};
pub use split::{max_blocks_to_swap, split_blocks_to_swap, SwapSplit};
