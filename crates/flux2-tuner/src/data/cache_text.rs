//! The `cache-text-encoder-outputs` job, as Musubi's `flux_2_cache_text_encoder_outputs.py` with
//! `cache_text_encoder_outputs.py`: every caption is encoded by the version's text encoder
//! (Mistral-3 for dev, Qwen3 for klein) and written as `ctx_vec_{dtype}` `[512, D]` to
//! `{stem}_{arch}_te.safetensors`. Batches follow the dataset's `batch_size`, split by the
//! option's. Differences from Musubi, on purpose: `skip_existing` also re-encodes a cache whose
//! stored caption (`caption1`) differs from the current one or that has no `ctx_vec`, and two
//! items with the same stem are an error instead of an overwrite.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};

use super::cache::{
    list_cache_files, list_leftover_temporaries, strip_dtype_suffix, text_cache_path,
    write_text_cache,
};
use super::cache_latents::{check_image_dataset, claim_cache_path};
use super::config::DatasetConfig;
use super::observer::{CacheObserver, CacheSummary, ItemOutcome};
use super::source::{discover_items, DatasetItem};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::models::text::encoder::{TextEncoder, TextEncoderOptions};
use crate::models::ModelVersion;

/// How to run `cache-text-encoder-outputs`.
#[derive(Debug, Clone)]
pub struct TextCacheOptions {
    /// The text encoder's weights (a file or the first shard).
    pub text_encoder: PathBuf,
    /// `tokenizer.json` or its folder; by default found beside the weights.
    pub tokenizer: Option<PathBuf>,
    pub version: ModelVersion,
    pub device: Device,
    /// Compute dtype, also the stored dtype (Musubi: bfloat16).
    pub dtype: DType,
    /// Store the encoder's linear weights as F8E4M3.
    pub fp8: bool,
    /// Prompts per forward pass, within each dataset batch.
    pub batch_size: Option<usize>,
    pub skip_existing: bool,
    pub keep_cache: bool,
}

/// One dataset's items with their cache paths, in dataset batches, and every path it produces.
type PlannedDataset = (Vec<Vec<(DatasetItem, PathBuf)>>, HashSet<PathBuf>);

/// True when `path` holds a `ctx_vec` for exactly `caption`.
fn is_up_to_date(path: &std::path::Path, caption: &str) -> bool {
    let Ok(checkpoint) = Checkpoint::open(path) else {
        return false;
    };
    checkpoint
        .keys()
        .any(|k| strip_dtype_suffix(k) == "ctx_vec")
        && checkpoint.metadata().get("caption1").map(String::as_str) == Some(caption)
}

/// Runs `cache-text-encoder-outputs` over every dataset of `config`.
pub fn cache_text_encoder_outputs(
    config: &DatasetConfig,
    options: &TextCacheOptions,
    observer: &mut dyn CacheObserver,
) -> Result<CacheSummary> {
    let start = Instant::now();
    let info = options.version.info();
    let architecture = info.cache_architecture;
    let mut summary = CacheSummary::default();

    // Plan everything first: which items need encoding, in dataset batches.
    let mut datasets: Vec<PlannedDataset> = Vec::new();
    let mut total = 0;
    for spec in &config.datasets {
        check_image_dataset(spec)?;
        observer.phase(&format!("listing {}", spec.name()));
        let items = discover_items(spec)?;
        total += items.len();
        let mut claimed = HashMap::new();
        let mut produced = HashSet::new();
        let mut planned = Vec::new();
        for item in items {
            let path = text_cache_path(&spec.cache_directory, &item.stem(), architecture);
            claim_cache_path(&mut claimed, &path, &item.image_path)?;
            produced.insert(path.clone());
            planned.push((item, path));
        }
        let batches = planned
            .chunks(spec.batch_size.max(1))
            .map(<[_]>::to_vec)
            .collect();
        datasets.push((batches, produced));
    }
    observer.started(total);

    let mut encoder: Option<TextEncoder> = None;
    for ((batches, produced), spec) in datasets.iter().zip(&config.datasets) {
        observer.phase(&format!("encoding {}", spec.name()));
        for batch in batches {
            let mut todo = Vec::new();
            for (item, path) in batch {
                if options.skip_existing && is_up_to_date(path, &item.caption) {
                    summary.record(observer, &item.image_path, ItemOutcome::Skipped);
                } else {
                    todo.push((item, path));
                }
            }
            if todo.is_empty() {
                continue;
            }
            // Loaded only when something needs encoding.
            if encoder.is_none() {
                observer.phase(&format!(
                    "loading text encoder {}",
                    options.text_encoder.display()
                ));
                let mut encoder_options = TextEncoderOptions::new(
                    info.text_encoder,
                    options.device.clone(),
                    options.dtype,
                );
                encoder_options.tokenizer = options.tokenizer.clone();
                encoder_options.placement.fp8 = options.fp8;
                encoder = Some(TextEncoder::load(
                    &options.text_encoder,
                    info.text_encoder,
                    &encoder_options,
                )?);
                observer.phase(&format!("encoding {}", spec.name()));
            }
            let Some(text_encoder) = encoder.as_ref() else {
                continue;
            };
            let chunk_size = options.batch_size.unwrap_or(todo.len()).max(1);
            for chunk in todo.chunks(chunk_size) {
                let prompts: Vec<&str> = chunk
                    .iter()
                    .map(|(item, _)| item.caption.as_str())
                    .collect();
                let ctx = text_encoder
                    .encode(&prompts)?
                    .to_dtype(options.dtype)?
                    .to_device(&Device::Cpu)?;
                for (index, (item, path)) in chunk.iter().enumerate() {
                    write_text_cache(path, &ctx.get(index)?, architecture, &item.caption)?;
                    summary.record(observer, &item.image_path, ItemOutcome::Cached);
                }
            }
        }
        let existing = list_cache_files(&spec.cache_directory, architecture, true)?;
        summary.clean_stale(observer, &existing, produced, options.keep_cache)?;
        let leftovers = list_leftover_temporaries(&spec.cache_directory, architecture, true)?;
        summary.clean_stale(observer, &leftovers, produced, false)?;
    }
    // The empty-prompt embedding for `train --caption_dropout_rate`, once per cache directory.
    super::empty_prompt::write_empty_prompt_caches(config, options, &mut encoder, observer)?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}
