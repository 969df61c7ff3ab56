//! Validation loss on a held-out cached dataset (`--validation_dataset_config`), after sd-scripts'
//! validation (`--validate_every_n_steps`, `--validate_every_n_epochs`, `--max_validation_steps`,
//! `--validation_seed`, fixed timesteps). Musubi has no validation.
//!
//! Every evaluation sees the same items in the same order, at the same timesteps (default: four
//! evenly spaced inside `[min_timestep, max_timestep]`, sd-scripts' `linspace(...)[1:-1]`, so 200,
//! 400, 600, 800) and with the same noise (drawn per item from the validation seed), so the value
//! changes only when the LoRA does. It runs without gradients (the inference kernels, LoRA
//! dropouts off, the LoRA tensors detached so no graph is recorded) and never draws from the
//! training generators, so training is unchanged by it.
//! Differences from sd-scripts: a separate dataset TOML instead of `validation_split`, the
//! timesteps are a flag (`--validation_timesteps`), the mean is per item (batches weighted by their
//! size), and one key, `loss/validation`, is logged; a step that ends an epoch validates once.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use crate::data::config::{ConfigFallbacks, DatasetConfig};
use crate::data::reader::{CachedDataset, CachedItem};
use crate::error::{Error, Result};
use crate::models::dit::Flux2Dit;
use crate::train::data::load_batch;
use crate::train::log::{SummaryValue, TrainingLog};
use crate::train::step::{evaluation_loss, StepBatch};
use crate::train::timesteps::{TimestepConfig, TimestepSampling};
use crate::train::trainer::TrainObserver;
use crate::util::rng::SeededRng;

/// Separates the validation noise from every other use of the seed.
const DOMAIN: u64 = 0x7A11_DA7E_5EED_0001;

/// Number of default timesteps (sd-scripts' `NUM_VALIDATION_TIMESTEPS`).
pub const DEFAULT_TIMESTEP_COUNT: usize = 4;

/// How and when to validate.
#[derive(Debug, Clone)]
pub struct ValidationOptions {
    /// The held-out dataset (Musubi's dataset TOML), cached like the training one.
    pub dataset_config: PathBuf,
    /// Validate after every N optimiser steps.
    pub every_n_steps: Option<usize>,
    /// Validate at the end of every N epochs (every epoch when `None`, as sd-scripts).
    pub every_n_epochs: Option<usize>,
    /// Timesteps in Musubi's 0..1000 units (noise level `t / 1000`).
    pub timesteps: Vec<f64>,
    /// Seed of the per-item noise (the training seed unless `--validation_seed`).
    pub seed: u64,
    /// Use at most this many batches (`--max_validation_steps`).
    pub max_steps: Option<usize>,
}

/// sd-scripts' default timesteps: `linspace(min, max, n + 2)[1:-1]` truncated to integers, with
/// `min`/`max` from `--min_timestep`/`--max_timestep` (0 and 1000 by default).
pub fn default_timesteps(min_timestep: Option<f64>, max_timestep: Option<f64>) -> Vec<f64> {
    let low = min_timestep.unwrap_or(0.0);
    let high = max_timestep.unwrap_or(1000.0);
    let intervals = (DEFAULT_TIMESTEP_COUNT + 1) as f64;
    (1..=DEFAULT_TIMESTEP_COUNT)
        .map(|i| (low + (high - low) * i as f64 / intervals).trunc())
        .collect()
}

/// What the DiT is given for noise level `sigma`, as the training sampler does: `sigma` itself in
/// `sigma` mode, `sigma + 0.001` otherwise (Musubi's +1 on the 0..1000 timestep).
pub fn model_timestep(sampling: TimestepSampling, sigma: f64) -> f64 {
    if sampling == TimestepSampling::Sigma {
        sigma
    } else {
        (sigma * 1000.0 + 1.0) / 1000.0
    }
}

/// A SplitMix64 hash of the seed and an item's place, the seed of that item's noise.
fn item_seed(seed: u64, item: usize) -> u64 {
    let first = SeededRng::new(DOMAIN ^ seed).next_u64();
    SeededRng::new(first ^ item as u64).next_u64()
}

/// The held-out batches and the schedule.
pub struct Validator {
    pub options: ValidationOptions,
    /// In a fixed order (datasets, then buckets by key, then items), cut to `max_steps`.
    pub batches: Vec<Vec<CachedItem>>,
    /// The last step validated (a step that ends an epoch is due twice).
    last_step: Option<usize>,
}

impl Validator {
    /// Reads the validation caches of `architecture`; an empty set or a bad timestep is an error.
    pub fn new(options: &ValidationOptions, architecture: &str) -> Result<Self> {
        let flag = |name: &str, message: String| Error::InvalidArgument {
            name: name.into(),
            message,
        };
        if options.timesteps.is_empty() {
            return Err(flag(
                "--validation_timesteps",
                "at least one timestep is needed".into(),
            ));
        }
        if let Some(t) = options
            .timesteps
            .iter()
            .find(|t| !(0.0..=1000.0).contains(*t))
        {
            return Err(flag(
                "--validation_timesteps",
                format!("{t} is outside 0..1000 (timestep units, noise level t / 1000)"),
            ));
        }
        if options.every_n_steps == Some(0) || options.every_n_epochs == Some(0) {
            return Err(flag(
                "--validate_every_n_steps / --validate_every_n_epochs",
                "0 is not an interval; leave the flag out instead".into(),
            ));
        }
        let config = DatasetConfig::load(&options.dataset_config, &ConfigFallbacks::default())?;
        let datasets = CachedDataset::read_all(&config, architecture)?;
        let mut batches: Vec<Vec<CachedItem>> = datasets
            .iter()
            .flat_map(|d| d.batches())
            .map(|batch| batch.into_iter().cloned().collect())
            .collect();
        if let Some(limit) = options.max_steps {
            batches.truncate(limit);
        }
        if batches.is_empty() {
            return Err(flag(
                "--validation_dataset_config",
                format!(
                    "{}: no cached items for {architecture}; run cache-latents and \
                     cache-text-encoder-outputs on it first",
                    options.dataset_config.display()
                ),
            ));
        }
        Ok(Self {
            options: options.clone(),
            batches,
            last_step: None,
        })
    }

    /// Number of items one evaluation goes through.
    pub fn items(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }

    /// Whether to validate after optimiser step `step` of epoch `epoch`; `epoch_ended` when the
    /// step finished the epoch (or the run).
    pub fn is_due(&self, step: usize, epoch: usize, epoch_ended: bool) -> bool {
        if self.last_step == Some(step) {
            return false;
        }
        let by_step = self
            .options
            .every_n_steps
            .is_some_and(|n| n > 0 && step % n == 0);
        let by_epoch = epoch_ended && epoch % self.options.every_n_epochs.unwrap_or(1).max(1) == 0;
        by_step || by_epoch
    }

    /// The noise of a batch whose first item is the `first_item`-th of the evaluation: each item's
    /// own seeded draw, the same at every evaluation.
    pub fn batch_noise(&self, first_item: usize, latents: &Tensor) -> Result<Tensor> {
        let per_item: Vec<usize> = latents.dims()[1..].to_vec();
        let count: usize = per_item.iter().product();
        let rows = (0..latents.dim(0)?)
            .map(|i| {
                let mut rng = SeededRng::new(item_seed(self.options.seed, first_item + i));
                Ok(Tensor::from_vec(
                    rng.normal_vec(count),
                    per_item.as_slice(),
                    latents.device(),
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// The validation loss of the DiT as it is now (LoRA attached): the per-item mean over every
    /// timestep of `weight(t) * |prediction - (noise - latents)|^2`, weights from the run's
    /// weighting scheme.
    pub fn evaluate(
        &self,
        dit: &mut Flux2Dit,
        timesteps: &TimestepConfig,
        guidance: f64,
        device: &Device,
    ) -> Result<f64> {
        let mut total = 0.0;
        let mut first_item = 0;
        for items in &self.batches {
            let batch = load_batch(items, device)?;
            let size = items.len();
            let noise = self.batch_noise(first_item, &batch.latents)?;
            first_item += size;
            for t in &self.options.timesteps {
                let sigma = t / 1000.0;
                let sigmas = vec![sigma; size];
                let model_timesteps = vec![model_timestep(timesteps.sampling, sigma); size];
                let weights = vec![timesteps.weighting_scheme.loss_weight(sigma); size];
                let loss = evaluation_loss(
                    dit,
                    &StepBatch {
                        latents: &batch.latents,
                        noise: &noise,
                        sigmas: &sigmas,
                        model_timesteps: &model_timesteps,
                        text: &batch.text,
                        controls: &batch.controls,
                        guidance: Some(guidance),
                        weights: &weights,
                    },
                )?
                .to_scalar::<f32>()?;
                total += f64::from(loss) * size as f64;
            }
        }
        Ok(total / (first_item * self.options.timesteps.len()) as f64)
    }

    /// Validates when due after a step, reporting to the observer and logging `loss/validation`.
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        dit: &mut Flux2Dit,
        timesteps: &TimestepConfig,
        guidance: f64,
        device: &Device,
        (step, epoch, epoch_ended): (usize, usize, bool),
        observer: &mut dyn TrainObserver,
        log: Option<&mut TrainingLog>,
    ) -> Result<()> {
        if !self.is_due(step, epoch, epoch_ended) {
            return Ok(());
        }
        let loss = self.evaluate(dit, timesteps, guidance, device)?;
        self.last_step = Some(step);
        observer.validation(step, loss);
        if let Some(log) = log {
            log.log(
                step,
                &[SummaryValue::Scalar("loss/validation", loss as f32)],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timesteps_are_sd_scripts_linspace() {
        assert_eq!(
            default_timesteps(None, None),
            vec![200.0, 400.0, 600.0, 800.0]
        );
        // numpy: linspace(100, 900, 6, dtype=int)[1:-1] = [260, 420, 580, 740].
        assert_eq!(
            default_timesteps(Some(100.0), Some(900.0)),
            vec![260.0, 420.0, 580.0, 740.0]
        );
        // linspace(0, 999, 6) = 199.8, 399.6, 599.4, 799.2 truncated.
        assert_eq!(
            default_timesteps(None, Some(999.0)),
            vec![199.0, 399.0, 599.0, 799.0]
        );
    }

    #[test]
    fn model_timesteps_follow_the_training_sampler() {
        assert_eq!(model_timestep(TimestepSampling::Sigma, 0.4), 0.4);
        assert!((model_timestep(TimestepSampling::Flux2Shift, 0.4) - 0.401).abs() < 1e-15);
    }

    fn validator(every_n_steps: Option<usize>, every_n_epochs: Option<usize>) -> Validator {
        Validator {
            options: ValidationOptions {
                dataset_config: PathBuf::from("validation.toml"),
                every_n_steps,
                every_n_epochs,
                timesteps: vec![500.0],
                seed: 9,
                max_steps: None,
            },
            batches: Vec::new(),
            last_step: None,
        }
    }

    #[test]
    fn schedule_follows_steps_and_epochs_once_per_step() {
        let by_epoch = validator(None, None);
        assert!(!by_epoch.is_due(3, 1, false));
        assert!(by_epoch.is_due(4, 1, true));
        let every_second_epoch = validator(None, Some(2));
        assert!(!every_second_epoch.is_due(4, 1, true));
        assert!(every_second_epoch.is_due(8, 2, true));
        let mut by_step = validator(Some(3), Some(100));
        assert!(by_step.is_due(3, 1, false));
        assert!(!by_step.is_due(4, 1, false));
        assert!(by_step.is_due(6, 2, true));
        by_step.last_step = Some(6);
        assert!(!by_step.is_due(6, 2, true));
    }

    #[test]
    fn noise_is_per_item_and_repeatable() {
        let v = validator(None, None);
        let latents = Tensor::zeros((2, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = v.batch_noise(5, &latents).unwrap();
        let b = v.batch_noise(5, &latents).unwrap();
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(values(&a), values(&b));
        // Item 6 is the second row of a batch starting at 5 and the first of one starting at 6.
        let shifted = v.batch_noise(6, &latents).unwrap();
        assert_eq!(values(&a.get(1).unwrap()), values(&shifted.get(0).unwrap()));
        assert_ne!(values(&a.get(0).unwrap()), values(&a.get(1).unwrap()));
        let expected = SeededRng::new(item_seed(9, 5)).normal_vec(12);
        assert_eq!(values(&a.get(0).unwrap()), expected);
    }
}
