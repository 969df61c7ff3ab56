//! The `cache-latents` job, as Musubi's `flux_2_cache_latents.py` with `cache_latents.py`
//! `encode_datasets`: every image (resized and cropped to its bucket) and each of its control
//! images (sized by the dataset's control options) is encoded with the AE and written to a
//! Musubi-compatible latent cache. Differences from Musubi, on purpose:
//! * `skip_existing` skips a cache only when its keys match the current bucket and control sizes
//!   (Musubi only checks that the file exists, so stale buckets survive);
//! * an unreadable image stops the run, naming it, before anything is written for it, unless
//!   `skip_bad_images`, which lists it instead;
//! * two items that would write the same cache file are an error instead of an overwrite.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::bucket::BucketSelector;
use super::cache::{
    cache_key_bases, control_key_base, latent_cache_path, latent_key_base, list_cache_files,
    list_leftover_temporaries, write_latent_cache,
};
use super::config::{DatasetConfig, DatasetSource, DatasetSpec};
use super::mask::{load_latent_mask, loss_mask_key_base, MaskIndex, MaskSource};
use super::observer::{CacheObserver, CacheSummary, ItemOutcome};
use super::source::{discover_items, image_size, DatasetItem};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::image_io::{
    control_resolution_for_caching, image_to_tensor, read_rgb, resize_to_bucket,
};
use crate::models::ae::AutoEncoder;
use crate::models::ModelVersion;

/// How to run `cache-latents`.
#[derive(Debug, Clone)]
pub struct LatentCacheOptions {
    /// `ae.safetensors` (BFL format).
    pub vae: PathBuf,
    /// Decides the cache architecture tag (`f2d`, `f2k4b`, `f2k9b`).
    pub version: ModelVersion,
    /// AE compute dtype; the cached latents are stored in it too (Musubi: float32 by default).
    pub vae_dtype: DType,
    pub device: Device,
    /// Splits each bucket batch into AE calls of at most this many images.
    pub batch_size: Option<usize>,
    /// Images read and resized in parallel.
    pub num_workers: usize,
    pub skip_existing: bool,
    pub keep_cache: bool,
    pub skip_bad_images: bool,
}

/// One item with its planned cache: sizes known from the image headers.
struct Plan {
    item: DatasetItem,
    original_size: (u32, u32),
    bucket: (u32, u32),
    control_sizes: Vec<(u32, u32)>,
    cache_path: PathBuf,
    /// Where the loss mask comes from, for datasets with `alpha_mask` / `mask_directory`.
    mask: Option<MaskSource>,
}

/// A planned item whose pixels are loaded and resized, ready for the AE.
struct Prepared {
    plan: Plan,
    image: RgbImage,
    controls: Vec<RgbImage>,
    /// `[1, h, w]` f32 loss mask on the latent grid.
    mask: Option<Tensor>,
}

/// Items waiting for a full batch: target bucket, control sizes, items.
type PendingBatch = ((u32, u32), Vec<(u32, u32)>, Vec<Prepared>);

enum Work {
    Encode(Box<Prepared>),
    UpToDate(Plan),
}

/// Refuses datasets FLUX.2 cannot train on.
pub(crate) fn check_image_dataset(spec: &DatasetSpec) -> Result<()> {
    if let DatasetSource::Video(path) = &spec.source {
        return Err(Error::InvalidArgument {
            name: spec.name(),
            message: format!(
                "{} is a video dataset; FLUX.2 trains on images only",
                path.display()
            ),
        });
    }
    if spec.multiple_target {
        return Err(Error::InvalidArgument {
            name: format!("{}: multiple_target", spec.name()),
            message: "multiple targets are for Qwen-Image-Layered, not FLUX.2".into(),
        });
    }
    Ok(())
}

/// Two items writing one cache file would overwrite each other (Musubi lets the last one win):
/// records `cache` for `image` in `seen`, or fails naming both images.
pub(crate) fn claim_cache_path(
    seen: &mut HashMap<PathBuf, PathBuf>,
    cache: &Path,
    image: &Path,
) -> Result<()> {
    if let Some(other) = seen.insert(cache.to_path_buf(), image.to_path_buf()) {
        return Err(Error::InvalidArgument {
            name: "dataset".into(),
            message: format!(
                "{} and {} would both be cached as {}; give them different file names",
                other.display(),
                image.display(),
                cache.display()
            ),
        });
    }
    Ok(())
}

fn too_small(path: &Path, size: (u32, u32), target: (u32, u32)) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: format!(
            "a {}x{} image gets a {}x{} bucket (bucket_no_upscale floors sides to multiples of \
             16); use images of at least 16 pixels a side",
            size.0, size.1, target.0, target.1
        ),
    }
}

/// Sizes from the headers: original size, bucket, control target sizes, cache path.
fn plan_item(
    item: &DatasetItem,
    spec: &DatasetSpec,
    selector: &BucketSelector,
    architecture: &str,
    masks: &MaskIndex,
) -> Result<Plan> {
    let mask = masks.source_for(&item.image_path)?;
    let original_size = image_size(&item.image_path)?;
    let bucket = selector.bucket(original_size);
    if bucket.0 == 0 || bucket.1 == 0 {
        return Err(too_small(&item.image_path, original_size, bucket));
    }
    let mut control_sizes = Vec::new();
    for control in &item.control_paths {
        let size = image_size(control)?;
        let target = control_resolution_for_caching(size, bucket, spec.control_resize());
        if target.0 == 0 || target.1 == 0 {
            return Err(too_small(control, size, target));
        }
        control_sizes.push(target);
    }
    Ok(Plan {
        cache_path: latent_cache_path(
            &spec.cache_directory,
            &item.stem(),
            original_size,
            architecture,
        ),
        item: item.clone(),
        original_size,
        bucket,
        control_sizes,
        mask,
    })
}

/// True when the cache at the planned path holds exactly the planned latent keys.
fn is_up_to_date(plan: &Plan) -> bool {
    let mut expected = vec![latent_key_base(plan.bucket)];
    for (index, size) in plan.control_sizes.iter().enumerate() {
        expected.push(control_key_base(index, *size));
    }
    if plan.mask.is_some() {
        expected.push(loss_mask_key_base(plan.bucket));
    }
    expected.sort();
    plan.cache_path.is_file() && cache_key_bases(&plan.cache_path) == Some(expected)
}

fn read_resized(path: &Path, target: (u32, u32)) -> Result<RgbImage> {
    let image = read_rgb(path)?;
    resize_to_bucket(&image, target).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Plans an item and, unless its cache is up to date, reads and resizes its pixels.
fn prepare(
    item: &DatasetItem,
    spec: &DatasetSpec,
    selector: &BucketSelector,
    architecture: &str,
    skip_existing: bool,
    masks: &MaskIndex,
) -> Result<Work> {
    let plan = plan_item(item, spec, selector, architecture, masks)?;
    if skip_existing && is_up_to_date(&plan) {
        return Ok(Work::UpToDate(plan));
    }
    let image = read_resized(&item.image_path, plan.bucket)?;
    let controls = item
        .control_paths
        .iter()
        .zip(&plan.control_sizes)
        .map(|(path, size)| read_resized(path, *size))
        .collect::<Result<Vec<_>>>()?;
    let mask = plan
        .mask
        .as_ref()
        .map(|source| load_latent_mask(source, &item.image_path, plan.bucket))
        .transpose()?;
    Ok(Work::Encode(Box::new(Prepared {
        plan,
        image,
        controls,
        mask,
    })))
}

/// The path of the file a preparation error is about (the image or one of its controls).
fn error_path(error: &Error, item: &DatasetItem) -> PathBuf {
    match error {
        Error::Image { path, .. } | Error::Io { path, .. } => path.clone(),
        _ => item.image_path.clone(),
    }
}

/// Encodes `batch` (one bucket, same control sizes) and writes each item's cache.
fn encode_batch(
    ae: &AutoEncoder,
    batch: &[Prepared],
    options: &LatentCacheOptions,
    architecture: &str,
    summary: &mut CacheSummary,
    observer: &mut dyn CacheObserver,
) -> Result<()> {
    let chunk_size = options.batch_size.unwrap_or(batch.len()).max(1);
    for chunk in batch.chunks(chunk_size) {
        let images = chunk
            .iter()
            .map(|p| image_to_tensor(&p.image, &options.device))
            .collect::<Result<Vec<_>>>()?;
        let latents = ae
            .encode(&Tensor::cat(&images, 0)?)?
            .to_dtype(options.vae_dtype)?
            .to_device(&Device::Cpu)?;
        for (index, prepared) in chunk.iter().enumerate() {
            // Controls one at a time, as Musubi (their sizes may differ from the target's).
            let controls = prepared
                .controls
                .iter()
                .map(|control| {
                    let tensor = image_to_tensor(control, &options.device)?;
                    Ok(ae
                        .encode(&tensor)?
                        .squeeze(0)?
                        .to_dtype(options.vae_dtype)?
                        .to_device(&Device::Cpu)?)
                })
                .collect::<Result<Vec<_>>>()?;
            write_latent_cache(
                &prepared.plan.cache_path,
                &latents.get(index)?,
                &controls,
                prepared.mask.as_ref(),
                architecture,
                prepared.plan.original_size,
            )?;
            summary.record(
                observer,
                &prepared.plan.item.image_path,
                ItemOutcome::Cached,
            );
        }
    }
    Ok(())
}

/// Runs `cache-latents` over every dataset of `config`.
pub fn cache_latents(
    config: &DatasetConfig,
    options: &LatentCacheOptions,
    observer: &mut dyn CacheObserver,
) -> Result<CacheSummary> {
    let start = Instant::now();
    let architecture = options.version.info().cache_architecture;
    let mut listed = Vec::new();
    let mut mask_indexes = Vec::new();
    for spec in &config.datasets {
        check_image_dataset(spec)?;
        observer.phase(&format!("listing {}", spec.name()));
        let items = discover_items(spec)?;
        // Missing or ambiguous masks stop the run before the AE loads (or are listed per item).
        let masks = MaskIndex::for_dataset(spec)?;
        if !options.skip_bad_images {
            for item in &items {
                masks.source_for(&item.image_path)?;
            }
        }
        listed.push(items);
        mask_indexes.push(masks);
    }
    observer.phase(&format!("loading AE {}", options.vae.display()));
    let checkpoint = Checkpoint::open(&options.vae)?;
    let ae = AutoEncoder::load(&checkpoint, options.vae_dtype, &options.device)?;
    observer.started(listed.iter().map(Vec::len).sum());
    let mut summary = CacheSummary::default();
    for ((spec, items), masks) in config.datasets.iter().zip(&listed).zip(&mask_indexes) {
        observer.phase(&format!("encoding {}", spec.name()));
        let produced = cache_dataset(&ae, spec, items, masks, options, &mut summary, observer)?;
        let existing = list_cache_files(&spec.cache_directory, architecture, false)?;
        summary.clean_stale(observer, &existing, &produced, options.keep_cache)?;
        let leftovers = list_leftover_temporaries(&spec.cache_directory, architecture, false)?;
        summary.clean_stale(observer, &leftovers, &produced, false)?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// One dataset: items are prepared `num_workers` at a time in parallel, then, in order, collected
/// per batch key (bucket and control sizes, as Musubi's caching key) and encoded whenever a key
/// has `batch_size` items; the rest is flushed at the end in first-seen key order.
fn cache_dataset(
    ae: &AutoEncoder,
    spec: &DatasetSpec,
    items: &[DatasetItem],
    masks: &MaskIndex,
    options: &LatentCacheOptions,
    summary: &mut CacheSummary,
    observer: &mut dyn CacheObserver,
) -> Result<HashSet<PathBuf>> {
    let architecture = options.version.info().cache_architecture;
    let selector = BucketSelector::new(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale);
    let batch_size = spec.batch_size.max(1);
    let mut produced = HashSet::new();
    let mut claimed = HashMap::new();
    let mut pending: Vec<PendingBatch> = Vec::new();
    for window in items.chunks(options.num_workers.max(1)) {
        let results: Vec<Result<Work>> = std::thread::scope(|scope| {
            let handles: Vec<_> = window
                .iter()
                .map(|item| {
                    let selector = &selector;
                    scope.spawn(move || {
                        prepare(
                            item,
                            spec,
                            selector,
                            architecture,
                            options.skip_existing,
                            masks,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidArgument {
                            name: "image reader".into(),
                            message: "a reading thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for (item, result) in window.iter().zip(results) {
            let work = match result {
                Ok(work) => work,
                Err(error) if options.skip_bad_images => {
                    let path = error_path(&error, item);
                    summary.record(observer, &path, ItemOutcome::Failed(error.to_string()));
                    continue;
                }
                Err(error) => return Err(error),
            };
            let plan = match &work {
                Work::Encode(prepared) => &prepared.plan,
                Work::UpToDate(plan) => plan,
            };
            produced.insert(plan.cache_path.clone());
            claim_cache_path(&mut claimed, &plan.cache_path, &item.image_path)?;
            let prepared = match work {
                Work::UpToDate(plan) => {
                    summary.record(observer, &plan.item.image_path, ItemOutcome::Skipped);
                    continue;
                }
                Work::Encode(prepared) => *prepared,
            };
            let key = (prepared.plan.bucket, prepared.plan.control_sizes.clone());
            let position = match pending
                .iter()
                .position(|(b, c, _)| *b == key.0 && *c == key.1)
            {
                Some(position) => position,
                None => {
                    pending.push((key.0, key.1, Vec::new()));
                    pending.len() - 1
                }
            };
            pending[position].2.push(prepared);
            if pending[position].2.len() >= batch_size {
                let (_, _, batch) = pending.remove(position);
                encode_batch(ae, &batch, options, architecture, summary, observer)?;
            }
        }
    }
    for (_, _, batch) in pending {
        encode_batch(ae, &batch, options, architecture, summary, observer)?;
    }
    Ok(produced)
}
