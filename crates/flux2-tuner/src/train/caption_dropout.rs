//! Caption dropout (`--caption_dropout_rate p`, sd-scripts' flag; Musubi has none): with
//! probability `p` an item is trained on the empty-prompt embedding instead of its caption's, so
//! the LoRA also learns the unconditional prediction.
//!
//! The decision for an item is a hash of the seed, the epoch, the batch index in the epoch and the
//! item's place in the batch, not a draw from the run's generator: the noise and timesteps stay
//! those of a run without dropout, and a resumed run (which restores epoch and batch) drops the
//! same items as the uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::data::empty_prompt::load_empty_prompt;
use crate::data::reader::{CachedDataset, CachedItem};
use crate::error::{Error, Result};
use crate::util::rng::SeededRng;

/// Separates these draws from every other use of the seed.
const DOMAIN: u64 = 0xC4A7_D40F_0E5A_7E11;

/// The caption-dropout setting of a run with the empty-prompt embedding of each cache directory.
#[derive(Debug, Clone)]
pub struct CaptionDropout {
    pub rate: f64,
    pub seed: u64,
    /// `[512, D]` f32 per cache directory.
    empty: HashMap<PathBuf, Tensor>,
}

/// A SplitMix64 hash of a sequence of values.
fn hash(values: &[u64]) -> u64 {
    values.iter().fold(DOMAIN, |state, value| {
        SeededRng::new(state ^ value).next_u64()
    })
}

fn cache_directory(item: &CachedItem) -> &Path {
    item.text_cache.parent().unwrap_or(Path::new("."))
}

impl CaptionDropout {
    /// Checks the rate and, when it is above 0, reads the empty-prompt embedding of every cache
    /// directory of `datasets` (an error names a missing file and the command that writes it).
    pub fn new(
        rate: f64,
        seed: u64,
        datasets: &[CachedDataset],
        architecture: &str,
        device: &Device,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(Error::InvalidArgument {
                name: "--caption_dropout_rate".into(),
                message: format!("{rate} is not a probability between 0 and 1"),
            });
        }
        let mut empty = HashMap::new();
        if rate > 0.0 {
            for item in datasets.iter().flat_map(|d| d.buckets.values().flatten()) {
                let directory = cache_directory(item);
                if !empty.contains_key(directory) {
                    let embedding = load_empty_prompt(directory, architecture, DType::F32, device)?;
                    empty.insert(directory.to_path_buf(), embedding);
                }
            }
        }
        Ok(Self { rate, seed, empty })
    }

    /// A setting with given embeddings (per cache directory), for tests and tools.
    pub fn with_embeddings(rate: f64, seed: u64, empty: HashMap<PathBuf, Tensor>) -> Self {
        Self { rate, seed, empty }
    }

    /// Whether item `position` of batch `batch_index` (0-based) of epoch `epoch` is trained on the
    /// empty prompt: `uniform(hash(seed, epoch, batch, position)) < rate`.
    pub fn is_dropped(&self, epoch: usize, batch_index: usize, position: usize) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let bits = hash(&[self.seed, epoch as u64, batch_index as u64, position as u64]);
        let uniform = (bits >> 11) as f64 / (1u64 << 53) as f64;
        uniform < self.rate
    }

    /// The text conditioning `[b, 512, D]` of a batch with the dropped items' rows replaced by the
    /// empty-prompt embedding of their cache directory.
    pub fn apply(
        &self,
        items: &[CachedItem],
        text: &Tensor,
        epoch: usize,
        batch_index: usize,
    ) -> Result<Tensor> {
        let dropped: Vec<usize> = (0..items.len())
            .filter(|&position| self.is_dropped(epoch, batch_index, position))
            .collect();
        if dropped.is_empty() {
            return Ok(text.clone());
        }
        let mut rows = Vec::with_capacity(items.len());
        for (position, item) in items.iter().enumerate() {
            let row = if dropped.contains(&position) {
                let directory = cache_directory(item);
                self.empty
                    .get(directory)
                    .ok_or_else(|| Error::InvalidArgument {
                        name: "--caption_dropout_rate".into(),
                        message: format!(
                            "no empty-prompt embedding was read for {}",
                            directory.display()
                        ),
                    })?
                    .to_dtype(text.dtype())?
            } else {
                text.get(position)?
            };
            rows.push(row);
        }
        Tensor::stack(&rows, 0).map_err(|e| {
            Error::Shape(format!(
                "the empty-prompt embedding does not fit the text caches of {:?}: {e}",
                items.iter().map(|i| &i.key).collect::<Vec<_>>()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::reader::BatchKey;

    fn item(key: &str, directory: &str) -> CachedItem {
        CachedItem {
            key: key.into(),
            latent_cache: PathBuf::from(directory)
                .join(format!("{key}_0064x0064_f2k4b.safetensors")),
            text_cache: PathBuf::from(directory).join(format!("{key}_f2k4b_te.safetensors")),
            original_size: (64, 64),
            batch_key: BatchKey {
                bucket: (64, 64),
                control_keys: Vec::new(),
            },
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn the_dropped_fraction_matches_the_rate() {
        for rate in [0.1, 0.3, 0.5] {
            let dropout = CaptionDropout::with_embeddings(rate, 42, HashMap::new());
            let mut dropped = 0usize;
            let count = 20_000;
            for index in 0..count {
                if dropout.is_dropped(1 + index / 1000, (index / 4) % 250, index % 4) {
                    dropped += 1;
                }
            }
            let fraction = dropped as f64 / count as f64;
            // Binomial standard deviation sqrt(p(1-p)/n) <= 0.0036; allow 4 of them.
            let tolerance = 4.0 * (rate * (1.0 - rate) / count as f64).sqrt();
            assert!(
                (fraction - rate).abs() < tolerance,
                "rate {rate}: dropped {fraction}"
            );
        }
    }

    #[test]
    fn decisions_depend_only_on_seed_epoch_batch_and_position() {
        let a = CaptionDropout::with_embeddings(0.5, 7, HashMap::new());
        let b = CaptionDropout::with_embeddings(0.5, 7, HashMap::new());
        let other_seed = CaptionDropout::with_embeddings(0.5, 8, HashMap::new());
        let draws = |d: &CaptionDropout| -> Vec<bool> {
            (0..200)
                .map(|i| d.is_dropped(1 + i / 50, i % 50, i % 3))
                .collect()
        };
        assert_eq!(draws(&a), draws(&b));
        assert_ne!(draws(&a), draws(&other_seed));
        let never = CaptionDropout::with_embeddings(0.0, 7, HashMap::new());
        let always = CaptionDropout::with_embeddings(1.0, 7, HashMap::new());
        assert!(draws(&never).iter().all(|d| !d));
        assert!(draws(&always).iter().all(|d| *d));
    }

    #[test]
    fn dropped_rows_become_the_empty_embedding_of_their_directory() {
        let device = Device::Cpu;
        let text = Tensor::arange(0f32, 3.0 * 4.0 * 2.0, &device)
            .unwrap()
            .reshape((3, 4, 2))
            .unwrap();
        let empty_a = Tensor::full(-1f32, (4, 2), &device).unwrap();
        let empty_b = Tensor::full(-2f32, (4, 2), &device).unwrap();
        let embeddings = HashMap::from([
            (PathBuf::from("a"), empty_a.clone()),
            (PathBuf::from("b"), empty_b.clone()),
        ]);
        let items = [item("x", "a"), item("y", "b"), item("z", "a")];
        let always = CaptionDropout::with_embeddings(1.0, 3, embeddings.clone());
        let replaced = always.apply(&items, &text, 1, 0).unwrap();
        assert_eq!(replaced.dims(), &[3, 4, 2]);
        assert_eq!(values(&replaced.get(0).unwrap()), values(&empty_a));
        assert_eq!(values(&replaced.get(1).unwrap()), values(&empty_b));
        assert_eq!(values(&replaced.get(2).unwrap()), values(&empty_a));
        let never = CaptionDropout::with_embeddings(0.0, 3, embeddings.clone());
        assert_eq!(
            values(&never.apply(&items, &text, 1, 0).unwrap()),
            values(&text)
        );
        // At 0.5 each row is either its own caption's or the empty one, as `is_dropped` says.
        let half = CaptionDropout::with_embeddings(0.5, 3, embeddings);
        for batch in 0..8 {
            let mixed = half.apply(&items, &text, 2, batch).unwrap();
            for (position, item) in items.iter().enumerate() {
                let expected = if half.is_dropped(2, batch, position) {
                    if item.text_cache.starts_with("a") {
                        values(&empty_a)
                    } else {
                        values(&empty_b)
                    }
                } else {
                    values(&text.get(position).unwrap())
                };
                assert_eq!(values(&mixed.get(position).unwrap()), expected);
            }
        }
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        let error = CaptionDropout::new(1.5, 1, &[], "f2k4b", &Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("--caption_dropout_rate"));
        assert!(error.to_string().contains("1.5"));
    }
}
