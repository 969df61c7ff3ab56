//! The training loop, top to bottom (Musubi `_run_training_loop`): read the caches, load the DiT
//! and build the LoRA, then for every batch sample noise and timesteps, run forward and backward,
//! accumulate, clip, step the optimiser and the schedule, and save on the configured cadence.
//! A state saved with `--save_state` resumes at the same step, epoch, batch, optimiser state and
//! random state, so a resumed run reproduces the uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{save_safetensors, write_atomically, Checkpoint};
use crate::data::config::{ConfigFallbacks, DatasetConfig};
use crate::data::reader::CachedDataset;
use crate::error::{Error, Result};
use crate::models::dit::Flux2Dit;
use crate::models::ModelVersion;
use crate::train::data::{batches_per_epoch, epoch_batches, load_batch};
use crate::train::log::{SummaryValue, TrainingLog};
use crate::train::lr_schedule::LrSchedule;
use crate::train::metadata::{build_metadata, RunDescription};
use crate::train::network::{LoraNetwork, NetworkConfig};
use crate::train::optim::{build_optimizer, clip_grad_norm, python_float_repr, Optimizer};
use crate::train::step::{training_step_masked, StepBatch};
use crate::train::timesteps::{
    sample_timesteps, stratified_uniforms, TimestepConfig, TimestepSampling,
};
use crate::util::rng::SeededRng;

/// Everything a training run needs (the CLI fills it from Musubi's flags).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub version: ModelVersion,
    pub dit: PathBuf,
    pub vae: Option<PathBuf>,
    pub dataset_config: PathBuf,
    pub output_dir: PathBuf,
    pub output_name: String,
    pub device: Device,
    /// bf16 (`--mixed_precision bf16`) or f32 (`no`).
    pub dit_dtype: DType,
    pub network: NetworkConfig,
    pub network_args: Vec<String>,
    pub network_weights: Option<PathBuf>,
    pub timesteps: TimestepConfig,
    pub num_timestep_buckets: Option<usize>,
    pub optimizer_type: String,
    pub optimizer_args: Vec<String>,
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub lr_warmup_steps: String,
    pub lr_scheduler_num_cycles: usize,
    pub lr_scheduler_power: f64,
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    pub max_train_steps: usize,
    pub max_train_epochs: Option<usize>,
    pub gradient_accumulation_steps: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    /// `--blocks_to_swap N` (Musubi's split between double and single blocks; 0: off).
    pub blocks_to_swap: usize,
    pub save_every_n_epochs: Option<usize>,
    pub save_every_n_steps: Option<usize>,
    pub save_state: bool,
    pub resume: Option<PathBuf>,
    pub save_precision: DType,
    /// Guidance input of guidance-embedded models (Musubi fixes it at 1.0).
    pub guidance: f64,
    /// TensorBoard events and a JSONL log go here.
    pub logging_dir: Option<PathBuf>,
    /// Keep only the LoRA files (and, separately, state folders) of the last N epochs / steps.
    pub save_last_n_epochs: Option<usize>,
    pub save_last_n_epochs_state: Option<usize>,
    pub save_last_n_steps: Option<usize>,
    pub save_last_n_steps_state: Option<usize>,
    /// Set (by a Ctrl-C handler) to stop after the current step, saving the LoRA and a state.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub run: RunDescription,
    /// Sample images during training (`--sample_prompts` and its flags); see `train::samples`.
    pub samples: Option<crate::train::samples::SampleOptions>,
    /// `--caption_dropout_rate`: probability of training an item on the empty prompt.
    pub caption_dropout_rate: f64,
    /// `--validation_dataset_config` and its schedule (validation loss).
    pub validation: Option<crate::train::validation::ValidationOptions>,
    // Memory (issue 9, fp8 and activation offload).
    /// `--fp8_base --fp8_scaled`: the block linears stored as F8E4M3 with block-wise scales,
    /// quantised while loading, dequantised on use in forward and backward.
    pub fp8: crate::quant::Fp8Mode,
    /// `--gradient_checkpointing_cpu_offload`: the checkpointed block inputs live in host memory
    /// (implies block-wise checkpointing).
    pub gradient_checkpointing_cpu_offload: bool,
    /// `--masked_loss`: the squared error is weighted by the loss masks cached by cache-latents
    /// (`train::masked_loss`).
    pub masked_loss: bool,
    /// `--scale_weight_norms`: the largest Frobenius norm a module's update may have after a step
    /// (`train::max_norm`).
    pub scale_weight_norms: Option<f64>,
    /// `--base_weights` with their multipliers: LoRAs merged into the DiT before training
    /// (`train::base_weights`).
    pub base_weights: Vec<(PathBuf, f64)>,
}

/// Progress reports.
pub trait TrainObserver {
    fn start(&mut self, _total_steps: usize, _first_step: usize, _epochs: usize) {}
    fn step(&mut self, _step: usize, _loss: f64, _average_loss: f64, _lr: f64) {}
    fn epoch(&mut self, _epoch: usize, _epochs: usize) {}
    fn saved(&mut self, _path: &Path) {}
    /// A sample image was written (`--sample_prompts`).
    fn sampled(&mut self, _path: &Path) {}
    /// The validation loss after `step` (`--validation_dataset_config`).
    fn validation(&mut self, _step: usize, _loss: f64) {}
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub losses: Vec<f64>,
    pub output: PathBuf,
    /// True when the run was stopped by an interrupt (the output is then the interrupted save).
    pub interrupted: bool,
}

/// Position and random state of a run, saved with `--save_state`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RunState {
    global_step: usize,
    epoch: usize,
    /// Batches of `epoch` already consumed.
    batch_in_epoch: usize,
    rng_state: u64,
    rng_spare: Option<f64>,
    /// State of the LoRA dropout generator, when dropouts are used.
    #[serde(default)]
    dropout_rng: Option<(u64, Option<f64>)>,
    losses: Vec<f64>,
}

/// Runs training and returns the losses of every optimiser step.
pub fn train(options: &TrainOptions, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
    let architecture = options.version.info().cache_architecture;
    let config = DatasetConfig::load(&options.dataset_config, &ConfigFallbacks::default())?;
    let datasets = CachedDataset::read_all(&config, architecture)?;
    // Masked loss (masked_loss.rs): every cache must hold its mask before the DiT loads.
    if options.masked_loss {
        crate::train::masked_loss::check_loss_masks(&config, &datasets)?;
    }
    // Caption dropout and validation (validation.rs, caption_dropout.rs).
    let caption_dropout = crate::train::caption_dropout::CaptionDropout::new(
        options.caption_dropout_rate,
        options.seed,
        &datasets,
        architecture,
        &options.device,
    )?;
    let mut validator = match &options.validation {
        Some(validation) => Some(crate::train::validation::Validator::new(
            validation,
            architecture,
        )?),
        None => None,
    };
    let items: usize = datasets.iter().map(CachedDataset::len).sum();
    if items == 0 {
        return Err(Error::InvalidArgument {
            name: "--dataset_config".into(),
            message: format!(
                "{}: no cached items for {architecture}; run cache-latents and cache-text-encoder-outputs first",
                options.dataset_config.display()
            ),
        });
    }
    let accumulation = options.gradient_accumulation_steps.max(1);
    let batches = batches_per_epoch(&datasets);
    let steps_per_epoch = batches.div_ceil(accumulation).max(1);
    let total_steps = match options.max_train_epochs {
        Some(epochs) => epochs * steps_per_epoch,
        None => options.max_train_steps,
    };
    let epochs = total_steps.div_ceil(steps_per_epoch);
    let warmup = crate::train::lr_schedule::parse_steps(
        &options.lr_warmup_steps,
        total_steps,
        "--lr_warmup_steps",
    )?;
    let schedule = LrSchedule::from_flags(
        &options.lr_scheduler,
        warmup,
        options.lr_scheduler_num_cycles,
        options.lr_scheduler_power,
        options.lr_scheduler_min_lr_ratio,
    )?;

    let checkpoint = Checkpoint::open(&options.dit)?;
    // Block swap: split checked from the headers (before anything loads), model loaded on the
    // host, then all but the swapped blocks' weights placed on the device (before the LoRA
    // network is attached).
    let swap = crate::offload::split_for_checkpoint(&checkpoint, options.blocks_to_swap)?;
    // Sample prompts are encoded (text encoder loaded and freed) before the DiT loads.
    let sample_images = crate::train::samples::TrainingSamples::prepare(options)?;
    let load_device = crate::offload::load_device(swap, &options.device);
    let mut merge_base = |dit: &mut Flux2Dit| {
        crate::train::base_weights::merge_base_weights(dit, &options.base_weights, &load_device)
    };
    let mut dit = Flux2Dit::load_merged_with_fp8(
        &checkpoint,
        Some(options.version),
        options.dit_dtype,
        &load_device,
        options.fp8,
        match options.base_weights.is_empty() {
            true => None,
            false => Some(&mut merge_base),
        },
    )?;
    if !swap.is_empty() {
        crate::offload::enable_block_swap(&mut dit, swap, &options.device)?;
    }
    let mut init_rng = SeededRng::new(options.seed);
    let mut network = LoraNetwork::new(
        &dit.config,
        options.network.clone(),
        &mut init_rng,
        &options.device,
    )?;
    if let Some(weights) = &options.network_weights {
        network.load_weights(weights)?;
    }
    let parameters_with_factors = network.parameters();
    let parameters: Vec<_> = parameters_with_factors
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    let mut optimizer = build_optimizer(
        &options.optimizer_type,
        parameters_with_factors,
        &options.optimizer_args,
        options.learning_rate,
    )?;
    // Adafactor with relative_step picks its own rate; Musubi then forces the `adafactor`
    // schedule, which refuses warmup steps.
    if optimizer.own_learning_rate().is_some() && warmup > 0 {
        return Err(Error::InvalidArgument {
            name: "--lr_warmup_steps".into(),
            message: format!(
                "{warmup} warmup steps: Adafactor with relative_step=True uses the adafactor \
                 schedule, which takes none; set 0 or pass --optimizer_args relative_step=False"
            ),
        });
    }

    let mut state = RunState {
        global_step: 0,
        epoch: 1,
        batch_in_epoch: 0,
        rng_state: SeededRng::new(options.seed ^ 0x5DEE_CE66_D1CE_4E5B)
            .state()
            .0,
        rng_spare: None,
        dropout_rng: None,
        losses: Vec::new(),
    };
    if let Some(resume) = &options.resume {
        state = load_state(resume, &network, optimizer.as_mut())?;
        if let (Some(dropout), Some(saved)) = (&network.dropout, state.dropout_rng) {
            dropout.set_rng_state(saved);
        }
    }
    let mut rng = SeededRng::from_state(state.rng_state, state.rng_spare);
    network.attach(&mut dit, 1.0)?;

    let mut run = options.run.clone();
    run.num_train_items = items;
    run.num_batches_per_epoch = batches;
    run.num_epochs = epochs;
    run.max_train_steps = total_steps;
    run.lr_warmup_steps = warmup;
    run.optimizer = optimizer.describe();
    if optimizer.own_learning_rate().is_some() {
        run.lr_scheduler = format!("adafactor:{}", python_float_repr(options.learning_rate));
    }

    let mut log = match &options.logging_dir {
        Some(directory) => Some(TrainingLog::create(directory, &options.output_name)?),
        None => None,
    };
    let mut step_timesteps: Vec<f64> = Vec::new();
    observer.start(total_steps, state.global_step, epochs);
    if let Some(samples) = &sample_images {
        samples.at_first(&mut dit, state.global_step, observer)?;
    }
    let mut pending: Option<Vec<Tensor>> = None;
    // Where checkpointed block inputs go with --gradient_checkpointing_cpu_offload.
    let activation_store = options
        .gradient_checkpointing_cpu_offload
        .then(crate::nn::trainable::ActivationStore::offloading);
    let mut pending_losses = Vec::new();
    let mut last_save: Option<PathBuf> = None;
    'epochs: while state.epoch <= epochs && state.global_step < total_steps {
        observer.epoch(state.epoch, epochs);
        let epoch_batches = epoch_batches(&datasets, options.seed, state.epoch);
        let samples: usize = epoch_batches.iter().map(Vec::len).sum();
        let strata = options.num_timestep_buckets.filter(|n| *n >= 2).map(|n| {
            let mut strata_rng = SeededRng::new(
                options
                    .seed
                    .wrapping_mul(31)
                    .wrapping_add(state.epoch as u64),
            );
            stratified_uniforms(samples, n, &mut strata_rng)
        });
        let mut sample_offset: usize = epoch_batches[..state.batch_in_epoch]
            .iter()
            .map(Vec::len)
            .sum();
        for index in state.batch_in_epoch..epoch_batches.len() {
            let items = &epoch_batches[index];
            let batch = load_batch(items, &options.device)?;
            let text = caption_dropout.apply(items, &batch.text, state.epoch, index)?;
            let (batch_size, _, height, width) = batch.latents.dims4()?;
            let noise = Tensor::from_vec(
                rng.normal_vec(batch.latents.elem_count()),
                batch.latents.dims(),
                &options.device,
            )?;
            let buckets = strata
                .as_ref()
                .map(|s| &s[sample_offset..sample_offset + batch_size]);
            sample_offset += batch_size;
            let sampled = sample_timesteps(
                &options.timesteps,
                batch_size,
                height,
                width,
                &mut rng,
                buckets,
            );
            step_timesteps.extend(&sampled.sigmas);
            let weights: Vec<f64> = sampled
                .sigmas
                .iter()
                .map(|s| options.timesteps.weighting_scheme.loss_weight(*s))
                .collect();
            // Masked loss (masked_loss.rs).
            let mask = match options.masked_loss {
                true => Some(crate::train::masked_loss::load_batch_masks(
                    items,
                    &options.device,
                )?),
                false => None,
            };
            let result = training_step_masked(
                &dit,
                &StepBatch {
                    latents: &batch.latents,
                    noise: &noise,
                    sigmas: &sampled.sigmas,
                    model_timesteps: &sampled.model_timesteps,
                    text: &text,
                    controls: &batch.controls,
                    guidance: Some(options.guidance),
                    weights: &weights,
                },
                mask.as_ref(),
                &parameters,
                options.gradient_checkpointing,
                activation_store.as_ref(),
            )?;
            if !result.loss.is_finite() {
                return Err(Error::InvalidArgument {
                    name: "training".into(),
                    message: format!(
                        "the loss became {} at step {} (epoch {}); stopped. The last good save is {}. \
                         Lower --learning_rate or check the caches.",
                        result.loss,
                        state.global_step + 1,
                        state.epoch,
                        last_save.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
                    ),
                });
            }
            pending_losses.push(result.loss as f64);
            pending = Some(match pending.take() {
                Some(sum) => sum
                    .iter()
                    .zip(&result.gradients)
                    .map(|(a, b)| Ok((a + b)?))
                    .collect::<Result<Vec<_>>>()?,
                None => result.gradients,
            });
            state.batch_in_epoch = index + 1;
            let sync = (index + 1) % accumulation == 0 || index + 1 == epoch_batches.len();
            if !sync {
                continue;
            }
            let mut gradients = pending
                .take()
                .unwrap_or_default()
                .into_iter()
                .map(|g| Ok((g / pending_losses.len() as f64)?))
                .collect::<Result<Vec<_>>>()?;
            if options.max_grad_norm > 0.0 {
                clip_grad_norm(&mut gradients, options.max_grad_norm)?;
            }
            let lr = options.learning_rate * schedule.factor(state.global_step, total_steps);
            optimizer.step(&gradients, lr)?;
            let max_norm = match options.scale_weight_norms {
                Some(limit) => Some(crate::train::max_norm::apply_max_norm(&network, limit)?),
                None => None,
            };
            // The rate to log: Adafactor's own under relative_step; Prodigy also logs d·lr.
            let lr = optimizer.own_learning_rate().unwrap_or(lr);
            let d_lr = optimizer.distance_estimate().map(|d| d * lr);
            let loss = pending_losses.iter().sum::<f64>() / pending_losses.len() as f64;
            pending_losses.clear();
            state.global_step += 1;
            state.losses.push(loss);
            let window = &state.losses[state.losses.len().saturating_sub(steps_per_epoch)..];
            let average = window.iter().sum::<f64>() / window.len() as f64;
            observer.step(state.global_step, loss, average, lr);
            if let Some(log) = &mut log {
                let mut values = vec![
                    SummaryValue::Scalar("loss/current", loss as f32),
                    SummaryValue::Scalar("loss/average", average as f32),
                    SummaryValue::Scalar("lr/unet", lr as f32),
                    SummaryValue::Histogram("timesteps", &step_timesteps),
                ];
                if let Some(d_lr) = d_lr {
                    values.push(SummaryValue::Scalar("lr/d*lr/unet", d_lr as f32));
                }
                if let Some(report) = max_norm {
                    values.extend([
                        SummaryValue::Scalar("max_norm/keys_scaled", report.keys_scaled as f32),
                        SummaryValue::Scalar(
                            "max_norm/average_key_norm",
                            report.average_key_norm as f32,
                        ),
                        SummaryValue::Scalar("max_norm/max_key_norm", report.max_key_norm as f32),
                    ]);
                }
                log.log(state.global_step, &values)?;
            }
            step_timesteps.clear();
            if let Some(validator) = &mut validator {
                let epoch_ended =
                    index + 1 == epoch_batches.len() || state.global_step >= total_steps;
                validator.after_step(
                    &mut dit,
                    &options.timesteps,
                    options.guidance,
                    &options.device,
                    (state.global_step, state.epoch, epoch_ended),
                    observer,
                    log.as_mut(),
                )?;
            }
            let (saved_rng, spare) = rng.state();
            state.rng_state = saved_rng;
            state.rng_spare = spare;
            state.dropout_rng = network.dropout.as_ref().map(|d| d.rng_state());
            if options
                .interrupt
                .as_ref()
                .is_some_and(|flag| flag.load(std::sync::atomic::Ordering::SeqCst))
            {
                let name = format!(
                    "{}-interrupted-step{:08}",
                    options.output_name, state.global_step
                );
                let mut forced = options.clone();
                forced.save_state = true;
                let output = save(
                    &forced,
                    &run,
                    &network,
                    optimizer.as_ref(),
                    &state,
                    &name,
                    observer,
                )?;
                return Ok(TrainSummary {
                    steps: state.global_step,
                    losses: state.losses,
                    output,
                    interrupted: true,
                });
            }
            if let Some(samples) = &sample_images {
                samples.after_step(&mut dit, state.global_step, observer)?;
            }
            if options
                .save_every_n_steps
                .is_some_and(|n| n > 0 && state.global_step % n == 0)
                && state.global_step < total_steps
            {
                let name = format!("{}-step{:08}", options.output_name, state.global_step);
                last_save = Some(save(
                    options,
                    &run,
                    &network,
                    optimizer.as_ref(),
                    &state,
                    &name,
                    observer,
                )?);
                remove_old_saves(options, SaveKind::Step, state.global_step)?;
            }
            if state.global_step >= total_steps {
                // The epoch ends here (Musubi samples at the end of a cut-short last epoch too).
                if let Some(samples) = &sample_images {
                    samples.after_epoch(&mut dit, state.epoch, state.global_step, observer)?;
                }
                break 'epochs;
            }
        }
        if options
            .save_every_n_epochs
            .is_some_and(|n| n > 0 && state.epoch % n == 0)
            && state.epoch < epochs
        {
            let name = format!("{}-{:06}", options.output_name, state.epoch);
            let mut next = state.clone();
            next.epoch += 1;
            next.batch_in_epoch = 0;
            last_save = Some(save(
                options,
                &run,
                &network,
                optimizer.as_ref(),
                &next,
                &name,
                observer,
            )?);
            remove_old_saves(options, SaveKind::Epoch, state.epoch)?;
        }
        if let Some(samples) = &sample_images {
            samples.after_epoch(&mut dit, state.epoch, state.global_step, observer)?;
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
    }
    let output = save(
        options,
        &run,
        &network,
        optimizer.as_ref(),
        &state,
        &options.output_name,
        observer,
    )?;
    Ok(TrainSummary {
        steps: state.global_step,
        losses: state.losses,
        output,
        interrupted: false,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SaveKind {
    Step,
    Epoch,
}

/// `--save_last_n_steps` / `--save_last_n_epochs` (and their `_state` variants): after a save at
/// `position` (a step or an epoch), deletes this run's saves of that kind that fell out of the
/// window (steps older than `position - n`; epochs older than the last `n` saves).
fn remove_old_saves(options: &TrainOptions, kind: SaveKind, position: usize) -> Result<()> {
    let (files, states) = match kind {
        SaveKind::Step => (options.save_last_n_steps, options.save_last_n_steps_state),
        SaveKind::Epoch => (options.save_last_n_epochs, options.save_last_n_epochs_state),
    };
    let cutoff = |n: usize| match kind {
        SaveKind::Step => position.saturating_sub(n),
        SaveKind::Epoch => position.saturating_sub(n * options.save_every_n_epochs.unwrap_or(1)),
    };
    let Ok(entries) = std::fs::read_dir(&options.output_dir) else {
        return Ok(());
    };
    let prefix = match kind {
        SaveKind::Step => format!("{}-step", options.output_name),
        SaveKind::Epoch => format!("{}-", options.output_name),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let (number, is_state) = if let Some(n) = rest.strip_suffix("-state") {
            (n, true)
        } else if let Some(n) = rest.strip_suffix(".safetensors") {
            (n, false)
        } else {
            continue;
        };
        let expected_digits = if kind == SaveKind::Step { 8 } else { 6 };
        if number.len() != expected_digits || !number.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(number) = number.parse::<usize>() else {
            continue;
        };
        let limit = if is_state { states } else { files };
        if let Some(n) = limit {
            if number <= cutoff(n) {
                let path = entry.path();
                let removed = if is_state {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(|e| Error::io(&path, "cannot remove an old save", e))?;
            }
        }
    }
    Ok(())
}

/// Writes `{name}.safetensors` (and `{name}-state/` with `--save_state`).
fn save(
    options: &TrainOptions,
    run: &RunDescription,
    network: &LoraNetwork,
    optimizer: &dyn Optimizer,
    state: &RunState,
    name: &str,
    observer: &mut dyn TrainObserver,
) -> Result<PathBuf> {
    let mut run = run.clone();
    run.steps = state.global_step;
    run.epoch = state.epoch;
    let tensors = network.tensors(options.save_precision)?;
    let metadata = build_metadata(&run, options.version, &tensors)?;
    let path = options.output_dir.join(format!("{name}.safetensors"));
    save_safetensors(&path, &tensors, Some(metadata))?;
    observer.saved(&path);
    if options.save_state {
        let directory = options.output_dir.join(format!("{name}-state"));
        save_safetensors(
            &directory.join("lora.safetensors"),
            &network.tensors(DType::F32)?,
            None,
        )?;
        save_safetensors(
            &directory.join("optimizer.safetensors"),
            &optimizer.state()?,
            None,
        )?;
        let json = serde_json::to_string_pretty(state).map_err(|e| Error::Shape(e.to_string()))?;
        write_atomically(&directory.join("train_state.json"), |w| {
            std::io::Write::write_all(w, json.as_bytes())
        })?;
        observer.saved(&directory);
    }
    Ok(path)
}

/// Restores a state folder written by [`save`].
fn load_state(
    directory: &Path,
    network: &LoraNetwork,
    optimizer: &mut dyn Optimizer,
) -> Result<RunState> {
    let state_file = directory.join("train_state.json");
    let text = std::fs::read_to_string(&state_file).map_err(|e| {
        Error::io(
            &state_file,
            "cannot read the training state (is --resume a -state folder?)",
            e,
        )
    })?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        path: state_file.clone(),
        message: format!("not a training state: {e}"),
    })?;
    let lora = Checkpoint::open(&directory.join("lora.safetensors"))?;
    for module in &network.modules {
        let name = crate::lora::musubi_module_name(&module.path);
        let device = module.down.device().clone();
        module
            .down
            .set(&lora.load(&format!("{name}.lora_down.weight"), DType::F32, &device)?)?;
        module
            .up
            .set(&lora.load(&format!("{name}.lora_up.weight"), DType::F32, &device)?)?;
    }
    let optimizer_file = Checkpoint::open(&directory.join("optimizer.safetensors"))?;
    let mut tensors = HashMap::new();
    for key in optimizer_file.keys() {
        let (_, entry) = optimizer_file
            .entry(key)
            .ok_or_else(|| Error::Shape(format!("missing {key}")))?;
        let dtype = entry.dtype.candle().unwrap_or(DType::F32);
        tensors.insert(
            key.to_string(),
            optimizer_file.load(key, dtype, &Device::Cpu)?,
        );
    }
    optimizer.load_state(&tensors)?;
    Ok(state)
}

/// Whether a sampling method suits FLUX.2 (for a warning in the CLI).
pub fn recommended_sampling(sampling: TimestepSampling) -> bool {
    !matches!(
        sampling,
        TimestepSampling::FluxShift | TimestepSampling::QinglongFlux
    )
}
