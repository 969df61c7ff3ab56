//! Masked loss (`--masked_loss`), beyond Musubi Tuner; as kohya-ss/sd-scripts'
//! `apply_masked_loss`: the per-element squared error is multiplied by the cached loss mask
//! (`data::mask`, one weight per packed-latent cell, broadcast over the 128 channels) before the
//! usual mean over all elements.
//!
//! The mean is NOT renormalised by the mask's mean, on purpose and as sd-scripts: the loss is
//! `sum(mask * weight * (prediction - target)^2) / (b * 128 * h * w)`. A mask of ones gives the
//! unmasked loss exactly; a sample whose mask covers a quarter of the image contributes a quarter
//! of the gradient it would contribute unmasked, so every trained cell keeps the same weight
//! whatever the size of its mask (renormalising would scale small masks' cells up, and would make
//! one sample's weight depend on the others in its batch). Learning rates tuned on sd-scripts
//! masked runs carry over.
//!
//! The multiplication is a candle op in the loss graph, so the gradient of the LoRA parameters
//! is the masked one in both the plain and the block-checkpointed backward. Masked cells still
//! reach the loss through attention (the model sees the whole noisy image), as in sd-scripts;
//! only their own error terms are dropped.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::data::config::DatasetConfig;
use crate::data::mask::LOSS_MASK_PREFIX;
use crate::data::reader::{CachedDataset, CachedItem};
use crate::error::{Error, Result};

/// `squared * mask` with `mask` `[b, 1, h, w]` broadcast over the channels of `squared`
/// `[b, c, h, w]`; `squared` unchanged without a mask.
pub fn apply_loss_mask(squared: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(squared.clone());
    };
    let (batch, _, height, width) = squared.dims4()?;
    if mask.dims() != [batch, 1, height, width] {
        return Err(Error::Shape(format!(
            "the loss mask is {:?}, expected [{batch}, 1, {height}, {width}] for latents {:?}",
            mask.dims(),
            squared.dims()
        )));
    }
    Ok(squared.broadcast_mul(&mask.to_dtype(squared.dtype())?)?)
}

/// The loss-mask key of an open latent cache and the `(h, w)` grid of its target latents.
fn mask_key_and_grid(cache: &Checkpoint, path: &Path) -> Result<(Option<String>, (usize, usize))> {
    let latents_key = cache
        .keys()
        .find(|k| k.starts_with("latents_") && !k.starts_with("latents_control_"))
        .ok_or_else(|| Error::InvalidSafetensors {
            path: path.to_path_buf(),
            reason: "no `latents_{h}x{w}_{dtype}` tensor".into(),
        })?
        .to_string();
    let grid = match cache.shape(&latents_key)? {
        [_, height, width] => (*height, *width),
        other => {
            return Err(Error::WrongShape {
                path: path.to_path_buf(),
                key: latents_key,
                expected: vec![128, 0, 0],
                found: other.to_vec(),
            })
        }
    };
    let mask_key = cache
        .keys()
        .find(|k| k.starts_with(LOSS_MASK_PREFIX))
        .map(str::to_string);
    Ok((mask_key, grid))
}

fn missing_mask(path: &Path, grid: (usize, usize)) -> Error {
    Error::InvalidArgument {
        name: "--masked_loss".into(),
        message: format!(
            "{} has no loss mask (`{LOSS_MASK_PREFIX}{}x{}_float32`); re-run cache-latents with \
             `alpha_mask = true` or `mask_directory` set for its dataset",
            path.display(),
            grid.0,
            grid.1
        ),
    }
}

/// Loads the `[1, h, w]` loss mask of one latent cache, checking it against the latent grid.
fn load_item_mask(path: &Path, device: &Device) -> Result<Tensor> {
    let cache = Checkpoint::open(path)?;
    let (key, grid) = mask_key_and_grid(&cache, path)?;
    let key = key.ok_or_else(|| missing_mask(path, grid))?;
    let mask = cache.load(&key, DType::F32, device)?;
    let expected = [1, grid.0, grid.1];
    if mask.dims() != expected {
        return Err(Error::WrongShape {
            path: path.to_path_buf(),
            key,
            expected: expected.to_vec(),
            found: mask.dims().to_vec(),
        });
    }
    Ok(mask)
}

/// Checks before training that every dataset asks for masks and every cache holds one of its
/// latent grid, naming the dataset or the cache file to fix.
pub fn check_loss_masks(config: &DatasetConfig, datasets: &[CachedDataset]) -> Result<()> {
    for dataset in datasets {
        let Some(spec) = config.datasets.iter().find(|s| s.index == dataset.index) else {
            continue;
        };
        if !spec.alpha_mask && spec.mask_directory.is_none() {
            return Err(Error::InvalidArgument {
                name: "--masked_loss".into(),
                message: format!(
                    "{} in {} sets neither `alpha_mask = true` nor `mask_directory`; set one (an \
                     image without alpha then trains everywhere) and re-run cache-latents",
                    spec.name(),
                    config.path.display()
                ),
            });
        }
        let mut seen = HashSet::new();
        for item in dataset.buckets.values().flatten() {
            if !seen.insert(item.latent_cache.clone()) {
                continue;
            }
            let path = item.latent_cache.as_path();
            let cache = Checkpoint::open(path)?;
            let (key, grid) = mask_key_and_grid(&cache, path)?;
            let key = key.ok_or_else(|| missing_mask(path, grid))?;
            let shape = cache.shape(&key)?;
            if shape != [1, grid.0, grid.1] {
                return Err(Error::WrongShape {
                    path: path.to_path_buf(),
                    key,
                    expected: vec![1, grid.0, grid.1],
                    found: shape.to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// The stacked `[b, 1, h, w]` f32 loss masks of a batch.
pub fn load_batch_masks(items: &[CachedItem], device: &Device) -> Result<Tensor> {
    let masks = items
        .iter()
        .map(|item| load_item_mask(&item.latent_cache, device))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&masks, 0).map_err(|e| {
        Error::Shape(format!(
            "cannot batch the loss masks of {:?}: {e}",
            items.iter().map(|i| &i.key).collect::<Vec<_>>()
        ))
    })
}
