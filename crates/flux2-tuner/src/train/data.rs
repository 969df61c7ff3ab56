//! The training batches of an epoch from the cached datasets (Musubi's `BucketBatchManager`):
//! items are shuffled inside their bucket, cut into batches of the dataset's batch size, and the
//! batches of every dataset are shuffled together. The order depends only on the seed and the
//! epoch, so a resumed run sees the same batches.

use candle_core::{DType, Device, Tensor};

use crate::data::reader::{load_cached_item, CachedDataset, CachedItem};
use crate::error::{Error, Result};
use crate::util::rng::SeededRng;

/// The batches of epoch `epoch` (1-based).
pub fn epoch_batches(datasets: &[CachedDataset], seed: u64, epoch: usize) -> Vec<Vec<CachedItem>> {
    let mut rng = SeededRng::new(
        seed.wrapping_add(epoch as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut batches = Vec::new();
    for dataset in datasets {
        for items in dataset.buckets.values() {
            let mut items = items.clone();
            rng.shuffle(&mut items);
            for chunk in items.chunks(dataset.batch_size.max(1)) {
                batches.push(chunk.to_vec());
            }
        }
    }
    rng.shuffle(&mut batches);
    batches
}

/// Number of batches per epoch.
pub fn batches_per_epoch(datasets: &[CachedDataset]) -> usize {
    datasets
        .iter()
        .map(|d| {
            d.buckets
                .values()
                .map(|items| items.len().div_ceil(d.batch_size.max(1)))
                .sum::<usize>()
        })
        .sum()
}

/// The stacked tensors of one batch.
pub struct LoadedBatch {
    /// `[b, 128, h, w]` f32.
    pub latents: Tensor,
    /// `[b, 128, hi, wi]` per control index.
    pub controls: Vec<Tensor>,
    /// `[b, 512, context]` f32.
    pub text: Tensor,
}

/// Loads and stacks the caches of a batch.
pub fn load_batch(items: &[CachedItem], device: &Device) -> Result<LoadedBatch> {
    let loaded = items
        .iter()
        .map(|item| load_cached_item(item, DType::F32, device))
        .collect::<Result<Vec<_>>>()?;
    let stack = |tensors: Vec<&Tensor>, what: &str| -> Result<Tensor> {
        Tensor::stack(&tensors, 0).map_err(|e| {
            Error::Shape(format!(
                "cannot batch the {what} of {:?}: {e}",
                items.iter().map(|i| &i.key).collect::<Vec<_>>()
            ))
        })
    };
    let latents = stack(loaded.iter().map(|t| &t.latents).collect(), "latents")?;
    let text = stack(
        loaded.iter().map(|t| &t.ctx_vec).collect(),
        "text-encoder outputs",
    )?;
    let control_count = loaded.first().map(|t| t.controls.len()).unwrap_or(0);
    let controls = (0..control_count)
        .map(|i| {
            stack(
                loaded.iter().map(|t| &t.controls[i]).collect(),
                "control latents",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LoadedBatch {
        latents,
        controls,
        text,
    })
}
