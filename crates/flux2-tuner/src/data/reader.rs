//! The training side of the caches, as Musubi's `ImageDataset.prepare_for_training` and
//! `BucketBatchManager`: list every latent cache of the dataset's architecture, pair it with its
//! text cache (items without one are left out and listed), recompute the bucket from the original
//! size in the file name, split buckets by control-latent keys, repeat items `num_repeats` times
//! and cut each bucket into batches. Nothing is re-encoded here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::bucket::BucketSelector;
use super::cache::{
    list_cache_files, parse_latent_cache_name, strip_dtype_suffix, text_cache_path,
};
use super::config::{DatasetConfig, DatasetSpec};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// What items must share to be stacked in one batch: the target bucket (pixels, width x height)
/// and the dtype-stripped control keys (`latents_control_{i}_{h}x{w}`), sorted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchKey {
    pub bucket: (u32, u32),
    pub control_keys: Vec<String>,
}

/// One cached training item.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedItem {
    /// The image's stem (`item_key`).
    pub key: String,
    pub latent_cache: PathBuf,
    pub text_cache: PathBuf,
    /// (width, height) of the original image, from the file name.
    pub original_size: (u32, u32),
    pub batch_key: BatchKey,
}

/// The cached items of one dataset, grouped for batching.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedDataset {
    pub index: usize,
    pub batch_size: usize,
    /// Items per batch key (sorted by key), each repeated `num_repeats` times.
    pub buckets: BTreeMap<BatchKey, Vec<CachedItem>>,
    /// Latent caches left out because their text cache is missing.
    pub missing_text_caches: Vec<PathBuf>,
}

impl CachedDataset {
    /// Lists the caches of `spec` for `architecture` (`f2d`, `f2k4b`, `f2k9b`).
    pub fn read(spec: &DatasetSpec, architecture: &str) -> Result<Self> {
        let selector =
            BucketSelector::new(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale);
        let mut buckets: BTreeMap<BatchKey, Vec<CachedItem>> = BTreeMap::new();
        let mut missing_text_caches = Vec::new();
        for latent_cache in list_cache_files(&spec.cache_directory, architecture, false)? {
            let name = latent_cache
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some((key, original_size)) = parse_latent_cache_name(&name, architecture) else {
                return Err(Error::InvalidArgument {
                    name: "latent cache".into(),
                    message: format!(
                        "{}: the name is not {{stem}}_{{W}}x{{H}}_{architecture}.safetensors",
                        latent_cache.display()
                    ),
                });
            };
            let text_cache = text_cache_path(&spec.cache_directory, &key, architecture);
            if !text_cache.is_file() {
                missing_text_caches.push(latent_cache);
                continue;
            }
            let checkpoint = Checkpoint::open(&latent_cache)?;
            let mut control_keys: Vec<String> = checkpoint
                .keys()
                .filter(|k| k.starts_with("latents_control_"))
                .map(|k| strip_dtype_suffix(k).to_string())
                .collect();
            control_keys.sort();
            let batch_key = BatchKey {
                bucket: selector.bucket(original_size),
                control_keys,
            };
            let item = CachedItem {
                key,
                latent_cache,
                text_cache,
                original_size,
                batch_key: batch_key.clone(),
            };
            let bucket = buckets.entry(batch_key).or_default();
            for _ in 0..spec.num_repeats {
                bucket.push(item.clone());
            }
        }
        Ok(Self {
            index: spec.index,
            batch_size: spec.batch_size,
            buckets,
            missing_text_caches,
        })
    }

    /// Every dataset of a configuration.
    pub fn read_all(config: &DatasetConfig, architecture: &str) -> Result<Vec<Self>> {
        config
            .datasets
            .iter()
            .map(|spec| Self::read(spec, architecture))
            .collect()
    }

    /// Number of items counting repeats.
    pub fn len(&self) -> usize {
        self.buckets.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batches in Musubi's unshuffled order: buckets by sorted key, each cut into runs of
    /// `batch_size` (the last one may be shorter). The trainer shuffles them.
    pub fn batches(&self) -> Vec<Vec<&CachedItem>> {
        self.buckets
            .values()
            .flat_map(|items| items.chunks(self.batch_size.max(1)))
            .map(|chunk| chunk.iter().collect())
            .collect()
    }
}

/// The tensors of one cached item.
#[derive(Debug, Clone)]
pub struct CachedTensors {
    /// `[128, h, w]`.
    pub latents: Tensor,
    /// `[128, hi, wi]` per control, in index order.
    pub controls: Vec<Tensor>,
    /// `[512, D]`.
    pub ctx_vec: Tensor,
}

fn cache_error(path: &Path, message: String) -> Error {
    Error::InvalidSafetensors {
        path: path.to_path_buf(),
        reason: message,
    }
}

/// `latents_{h}x{w}` or `latents_control_{i}_{h}x{w}` to `(h, w)`.
fn key_grid(base: &str) -> Option<(usize, usize)> {
    let grid = base.rsplit('_').next()?;
    let (h, w) = grid.split_once('x')?;
    Some((h.parse().ok()?, w.parse().ok()?))
}

/// Loads one item's latents, control latents and text conditioning as `dtype` on `device`,
/// checking that shapes agree with their keys.
pub fn load_cached_item(item: &CachedItem, dtype: DType, device: &Device) -> Result<CachedTensors> {
    let latent_file = Checkpoint::open(&item.latent_cache)?;
    let path = item.latent_cache.as_path();
    let load_grid = |key: &str| -> Result<Tensor> {
        let base = strip_dtype_suffix(key);
        let (h, w) = key_grid(base)
            .ok_or_else(|| cache_error(path, format!("key `{key}` has no {{h}}x{{w}} part")))?;
        let tensor = latent_file.load(key, dtype, device)?;
        if tensor.dims() != [128, h, w] {
            return Err(Error::WrongShape {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected: vec![128, h, w],
                found: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    };
    let targets: Vec<&str> = latent_file
        .keys()
        .filter(|k| k.starts_with("latents_") && !k.starts_with("latents_control_"))
        .collect();
    let [target] = targets.as_slice() else {
        return Err(cache_error(
            path,
            format!("expected one `latents_{{h}}x{{w}}_{{dtype}}` tensor, found {targets:?}"),
        ));
    };
    let latents = load_grid(target)?;
    let mut controls = Vec::new();
    for index in 0.. {
        let prefix = format!("latents_control_{index}_");
        let Some(key) = latent_file.keys().find(|k| k.starts_with(&prefix)) else {
            break;
        };
        controls.push(load_grid(key)?);
    }
    let text_file = Checkpoint::open(&item.text_cache)?;
    let ctx_key = text_file
        .keys()
        .find(|k| strip_dtype_suffix(k) == "ctx_vec")
        .ok_or_else(|| cache_error(&item.text_cache, "no `ctx_vec_{dtype}` tensor".into()))?
        .to_string();
    let ctx_vec = text_file.load(&ctx_key, dtype, device)?;
    if ctx_vec.rank() != 2 || ctx_vec.dim(0)? != 512 {
        return Err(Error::WrongShape {
            path: item.text_cache.clone(),
            key: ctx_key,
            expected: vec![512, ctx_vec.dims().last().copied().unwrap_or(0)],
            found: ctx_vec.dims().to_vec(),
        });
    }
    Ok(CachedTensors {
        latents,
        controls,
        ctx_vec,
    })
}
