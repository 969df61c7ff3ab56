//! DiT weight bytes on the device from the key/shape table (the checkpoint header, or the
//! version's table): each tensor in the compute dtype, Musubi's fp8 targets as one byte per value
//! plus (scaled) one f32 scale per 64 input values (`quant::fp8`), and the blocks that
//! `--blocks_to_swap` keeps in host memory left out, with two device slots for the swapped blocks
//! in flight (double buffering).

use candle_core::DType;

use crate::checkpoint::KeySpec;
use crate::quant::fp8::BLOCK_SIZE;
use crate::quant::{is_fp8_target, Fp8Mode};

use super::swap::SwapSplit;

/// Which block a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockId {
    Double(usize),
    Single(usize),
}

/// The block of a BFL key (`double_blocks.3.…`, `single_blocks.7.…`), if any.
pub fn block_of(key: &str) -> Option<BlockId> {
    let index = |rest: &str| rest.split('.').next()?.parse::<usize>().ok();
    if let Some(rest) = key.strip_prefix("double_blocks.") {
        return index(rest).map(BlockId::Double);
    }
    key.strip_prefix("single_blocks.")
        .and_then(index)
        .map(BlockId::Single)
}

/// Bytes of one tensor as stored on the device.
pub fn tensor_bytes(spec: &KeySpec, dtype: DType, fp8: Fp8Mode) -> u64 {
    let elements: usize = spec.shape.iter().product();
    if fp8 != Fp8Mode::Off && spec.shape.len() == 2 && is_fp8_target(&spec.key) {
        let scales = match fp8 {
            Fp8Mode::Scaled => {
                let input = spec.shape[1];
                let blocks = if input % BLOCK_SIZE == 0 {
                    input / BLOCK_SIZE
                } else {
                    1
                };
                4 * spec.shape[0] * blocks
            }
            _ => 0,
        };
        return (elements + scales) as u64;
    }
    (elements * dtype.size_in_bytes()) as u64
}

/// The DiT's weights on the device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightBytes {
    /// Tensors that stay in the compute dtype, on the device.
    pub dense: u64,
    /// fp8 block linears (values and scales) on the device.
    pub fp8: u64,
    /// What the fp8 linears would take in the compute dtype, minus what they take.
    pub fp8_saving: u64,
    /// Swapped blocks (host memory).
    pub swapped: u64,
    /// Two device slots of the largest swapped block.
    pub swap_buffers: u64,
    /// Bytes of each block as stored (double blocks then single blocks), for the training terms
    /// that depend on one block.
    pub double_block: Vec<u64>,
    pub single_block: Vec<u64>,
    /// Elements of each block's fp8-stored linears (their dequantised copies).
    pub double_fp8_elements: Vec<u64>,
    pub single_fp8_elements: Vec<u64>,
    /// Elements of the largest fp8 linear (its dequantisation is the transient).
    pub largest_fp8_linear: u64,
}

impl WeightBytes {
    /// Everything resident on the device: weights not swapped plus the swap slots.
    pub fn on_device(&self) -> u64 {
        self.dense + self.fp8 + self.swap_buffers
    }
}

/// The DiT's weight bytes for `tensors` with `double`/`single` block counts.
pub fn weight_bytes(
    tensors: &[KeySpec],
    depth: usize,
    depth_single: usize,
    dtype: DType,
    fp8: Fp8Mode,
    swap: SwapSplit,
) -> WeightBytes {
    let mut out = WeightBytes {
        double_block: vec![0; depth],
        single_block: vec![0; depth_single],
        double_fp8_elements: vec![0; depth],
        single_fp8_elements: vec![0; depth_single],
        ..WeightBytes::default()
    };
    let swapped = |block: Option<BlockId>| match block {
        Some(BlockId::Double(i)) => i + swap.double >= depth,
        Some(BlockId::Single(i)) => i + swap.single >= depth_single,
        None => false,
    };
    for spec in tensors {
        let bytes = tensor_bytes(spec, dtype, fp8);
        let dense = tensor_bytes(spec, dtype, Fp8Mode::Off);
        let quantised = bytes != dense;
        let block = block_of(&spec.key);
        let elements = spec.shape.iter().product::<usize>() as u64;
        match block {
            Some(BlockId::Double(i)) if i < depth => {
                out.double_block[i] += bytes;
                if quantised {
                    out.double_fp8_elements[i] += elements;
                }
            }
            Some(BlockId::Single(i)) if i < depth_single => {
                out.single_block[i] += bytes;
                if quantised {
                    out.single_fp8_elements[i] += elements;
                }
            }
            _ => {}
        }
        if quantised {
            out.largest_fp8_linear = out.largest_fp8_linear.max(elements);
        }
        if swapped(block) {
            out.swapped += bytes;
        } else if quantised {
            out.fp8 += bytes;
            out.fp8_saving += dense - bytes;
        } else {
            out.dense += bytes;
        }
    }
    let largest_swapped = (depth - swap.double.min(depth)..depth)
        .map(|i| out.double_block[i])
        .chain(
            (depth_single - swap.single.min(depth_single)..depth_single)
                .map(|i| out.single_block[i]),
        )
        .max()
        .unwrap_or(0);
    out.swap_buffers = 2 * largest_swapped;
    out
}
