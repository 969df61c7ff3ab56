//! Where a block-swapping DiT keeps its tensors (Musubi `move_to_device_except_swap_blocks`):
//! the Linear weights (and fp8 scales) of the swapped blocks in host memory, everything else
//! (other blocks, their norms, embedders, modulations, final layer, LoRA adapters) on the compute
//! device; and how a swapped block is handed to the forward with device copies of its weights.

use std::ops::Deref;
use std::sync::Arc;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::models::dit::blocks::{DoubleStreamBlock, SingleStreamBlock};
use crate::models::dit::Flux2Dit;
use crate::nn::Linear;
use crate::offload::block_swap::{BlockId, BlockKind, BlockSwap, BlockWeights, UploadedWeights};
use crate::offload::split::SwapSplit;

/// The Linear layers of a double block, in the order of `DoubleStreamBlock::linears`.
fn double_linears_mut(block: &mut DoubleStreamBlock) -> [&mut Linear; 8] {
    [
        &mut block.img_attn.qkv,
        &mut block.img_attn.proj,
        &mut block.img_mlp.layer_0,
        &mut block.img_mlp.layer_2,
        &mut block.txt_attn.qkv,
        &mut block.txt_attn.proj,
        &mut block.txt_mlp.layer_0,
        &mut block.txt_mlp.layer_2,
    ]
}

fn single_linears_mut(block: &mut SingleStreamBlock) -> [&mut Linear; 2] {
    [&mut block.linear1, &mut block.linear2]
}

fn weights_of<'a>(linears: impl IntoIterator<Item = &'a Linear>) -> BlockWeights {
    linears
        .into_iter()
        .map(|l| (l.weight.clone(), l.weight_scale.clone()))
        .collect()
}

fn install<'a>(linears: impl IntoIterator<Item = &'a mut Linear>, weights: BlockWeights) {
    for (linear, (weight, scale)) in linears.into_iter().zip(weights) {
        linear.weight = weight;
        linear.weight_scale = scale;
    }
}

/// The host weights of `id` (swapped blocks keep them in the model's block lists).
fn host_weights(dit: &Flux2Dit, id: BlockId) -> Result<BlockWeights> {
    let missing = || Error::BlockSwap(format!("{:?} block {} does not exist", id.kind, id.index));
    Ok(match id.kind {
        BlockKind::Double => weights_of(DoubleStreamBlock::linears(
            dit.double_blocks.get(id.index).ok_or_else(missing)?,
        )),
        BlockKind::Single => weights_of(SingleStreamBlock::linears(
            dit.single_blocks.get(id.index).ok_or_else(missing)?,
        )),
    })
}

/// A block ready to compute: the model's own (not swapped), or a copy whose Linear weights are
/// on the device and are freed when this is dropped.
pub enum Resident<'a, B> {
    InPlace(&'a B),
    Uploaded { block: B, _weights: UploadedWeights },
}

impl<B> Deref for Resident<'_, B> {
    type Target = B;

    fn deref(&self) -> &B {
        match self {
            Resident::InPlace(block) => block,
            Resident::Uploaded { block, .. } => block,
        }
    }
}

fn swap_of(dit: &Flux2Dit, id: BlockId) -> Option<&Arc<BlockSwap>> {
    dit.block_swap.as_ref().filter(|swap| swap.is_swapped(id))
}

/// Double block `index`, with its weights on the device.
pub fn resident_double(dit: &Flux2Dit, index: usize) -> Result<Resident<'_, DoubleStreamBlock>> {
    let block = dit
        .double_blocks
        .get(index)
        .ok_or_else(|| Error::BlockSwap(format!("double block {index} does not exist")))?;
    let id = BlockId::double(index);
    let Some(swap) = swap_of(dit, id) else {
        return Ok(Resident::InPlace(block));
    };
    let mut uploaded = swap.acquire(id, |id| host_weights(dit, id))?;
    // The clone shares norms and LoRA adapters (the same `Var` tensors, so gradients reach them).
    let mut copy = block.clone();
    install(
        double_linears_mut(&mut copy),
        std::mem::take(&mut uploaded.weights),
    );
    Ok(Resident::Uploaded {
        block: copy,
        _weights: uploaded,
    })
}

/// Single block `index`, with its weights on the device.
pub fn resident_single(dit: &Flux2Dit, index: usize) -> Result<Resident<'_, SingleStreamBlock>> {
    let block = dit
        .single_blocks
        .get(index)
        .ok_or_else(|| Error::BlockSwap(format!("single block {index} does not exist")))?;
    let id = BlockId::single(index);
    let Some(swap) = swap_of(dit, id) else {
        return Ok(Resident::InPlace(block));
    };
    let mut uploaded = swap.acquire(id, |id| host_weights(dit, id))?;
    let mut copy = block.clone();
    install(
        single_linears_mut(&mut copy),
        std::mem::take(&mut uploaded.weights),
    );
    Ok(Resident::Uploaded {
        block: copy,
        _weights: uploaded,
    })
}

/// Places the model for block swap: the Linear weights of the last `split.double` double and
/// `split.single` single blocks go to host memory, every other tensor (and every LoRA adapter)
/// to `device`. Load the model on the CPU first, so that the swapped weights never reach the
/// device. An empty split only moves the model to `device` and turns swapping off.
pub fn enable_block_swap(dit: &mut Flux2Dit, split: SwapSplit, device: &Device) -> Result<()> {
    let swap = BlockSwap::new(
        split,
        dit.double_blocks.len(),
        dit.single_blocks.len(),
        device,
    )?;
    let host = Device::Cpu;
    let double_count = dit.double_blocks.len();
    let single_count = dit.single_blocks.len();
    for (index, block) in dit.double_blocks.iter_mut().enumerate() {
        let swapped = index >= double_count - split.double;
        for linear in double_linears_mut(block) {
            place_linear(linear, if swapped { &host } else { device }, device)?;
        }
        for attention in [&mut block.img_attn, &mut block.txt_attn] {
            attention.norm.query_norm = attention.norm.query_norm.to_device(device)?;
            attention.norm.key_norm = attention.norm.key_norm.to_device(device)?;
        }
    }
    for (index, block) in dit.single_blocks.iter_mut().enumerate() {
        let swapped = index >= single_count - split.single;
        for linear in single_linears_mut(block) {
            place_linear(linear, if swapped { &host } else { device }, device)?;
        }
        block.norm.query_norm = block.norm.query_norm.to_device(device)?;
        block.norm.key_norm = block.norm.key_norm.to_device(device)?;
    }
    // The remaining linears: embedders, modulations, final layer.
    for (path, linear) in dit.linears_mut() {
        if !path.starts_with("double_blocks.") && !path.starts_with("single_blocks.") {
            place_linear(linear, device, device)?;
        }
    }
    dit.block_swap = if split.is_empty() {
        None
    } else {
        Some(Arc::new(swap))
    };
    Ok(())
}

fn place_linear(linear: &mut Linear, weight_device: &Device, device: &Device) -> Result<()> {
    linear.weight = linear.weight.to_device(weight_device)?;
    linear.weight_scale = linear
        .weight_scale
        .as_ref()
        .map(|s| s.to_device(weight_device))
        .transpose()?;
    for adapter in &mut linear.adapters {
        // A tensor already on `device` is returned as is (same id), so `Var`s stay attached.
        adapter.down = adapter.down.to_device(device)?;
        adapter.up = adapter.up.to_device(device)?;
    }
    Ok(())
}

/// Musubi's split of `blocks_to_swap` for the DiT in `checkpoint` (headers only), so that a too
/// large `N` fails before anything is loaded.
pub fn split_for_checkpoint(
    checkpoint: &crate::checkpoint::Checkpoint,
    blocks_to_swap: usize,
) -> Result<SwapSplit> {
    let config = crate::models::dit::DitConfig::infer(checkpoint)?;
    crate::offload::split::split_blocks_to_swap(
        blocks_to_swap,
        config.depth,
        config.depth_single_blocks,
    )
}

/// The device to load the DiT on: the host when blocks are swapped (everything else is moved to
/// `device` by [`enable_block_swap`]), else `device`.
pub fn load_device(split: SwapSplit, device: &Device) -> Device {
    if split.is_empty() {
        device.clone()
    } else {
        Device::Cpu
    }
}
