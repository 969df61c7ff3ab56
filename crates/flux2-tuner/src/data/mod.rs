//! Datasets and pre-computed caches, file-compatible with Musubi Tuner: the dataset TOML
//! ([`config`]), file discovery ([`source`]), aspect-ratio buckets ([`bucket`]), the cache files
//! ([`cache`]) and the training-side reader ([`reader`]), and the two cache jobs
//! ([`cache_latents()`], [`cache_text_encoder_outputs()`]) reporting through [`CacheObserver`].

pub mod bucket;
pub mod cache;
pub mod cache_latents;
pub mod cache_text;
pub mod config;
pub mod empty_prompt;
pub mod mask;
pub mod observer;
pub mod reader;
pub mod source;

pub use bucket::BucketSelector;
pub use cache_latents::{cache_latents, LatentCacheOptions};
pub use cache_text::{cache_text_encoder_outputs, TextCacheOptions};
pub use config::{ConfigFallbacks, DatasetConfig, DatasetSource, DatasetSpec};
pub use observer::{CacheObserver, CacheSummary, ItemOutcome, SilentObserver};
pub use reader::{load_cached_item, BatchKey, CachedDataset, CachedItem, CachedTensors};
pub use source::{discover_items, DatasetItem};
