//! The phases of a run and what each holds on the device.
//!
//! Training: the step (weights, LoRA, gradients, optimizer states, activations), optional sampling
//! during training (the resident training state plus an inference forward and the AE decode), and
//! the two cache commands reported beside it. Generation (`sample::generate`): the text encoder
//! alone (freed before the DiT is loaded), sampling (DiT, AE kept for decoding, inference
//! activations), decoding (AE only; the DiT is dropped first).

use candle_core::DType;

use crate::error::Result;
use crate::quant::Fp8Mode;

use super::activations::{
    backward_working_set, double_block_saved, head_saved, inference_block_peak, single_block_saved,
    Tokens,
};
use super::model::TEXT_TOKENS;
use super::swap::split_blocks_to_swap;
use super::weights::{weight_bytes, WeightBytes};
use super::{
    GenerationJob, ImageSize, Item, Job, MemorySettings, Phase, Plan, PlanModel, TrainingJob,
};

/// Bytes with a readable name.
fn item(name: impl Into<String>, bytes: u64) -> Item {
    Item {
        name: name.into(),
        bytes,
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    }
}

/// Plans `job` for `model` under `settings`.
pub fn plan(model: &PlanModel, settings: &MemorySettings, job: &Job) -> Result<Plan> {
    let config = &model.dit;
    let swap = split_blocks_to_swap(
        settings.blocks_to_swap,
        config.depth,
        config.depth_single_blocks,
    )?;
    let weights = weight_bytes(
        &model.tensors,
        config.depth,
        config.depth_single_blocks,
        settings.dtype,
        settings.fp8,
        swap,
    );
    let mut notes = Vec::new();
    let mut items = weight_items(model, settings, &weights, swap);
    let mut host_bytes = weights.swapped;
    let phases = match job {
        Job::Training(training) => {
            let step = training_items(
                model,
                settings,
                training,
                &weights,
                &mut notes,
                &mut host_bytes,
            )?;
            items.extend(step);
            let mut phases = vec![Phase {
                name: "training step".into(),
                items: items.clone(),
                separate_command: false,
            }];
            if let Some(sample) = training.sample {
                phases.push(sampling_during_training(
                    model, settings, training, &weights, sample,
                )?);
            }
            phases.push(text_encoder_phase(
                model,
                settings,
                "cache-text-encoder-outputs",
                true,
            ));
            phases.push(ae_phase(
                model,
                training.image,
                "cache-latents (AE encoder)",
                true,
            ));
            phases
        }
        Job::Generation(generation) => {
            generation_phases(model, settings, generation, items, &weights)
        }
    };
    if settings.cpu_offload && !settings.gradient_checkpointing {
        notes.push(
            "--gradient_checkpointing_cpu_offload takes effect only with --gradient_checkpointing"
                .into(),
        );
    }
    Ok(Plan {
        title: title(model, settings, job),
        phases,
        notes,
        host_bytes,
    })
}

fn title(model: &PlanModel, settings: &MemorySettings, job: &Job) -> String {
    let mut flags = vec![dtype_name(settings.dtype).to_string()];
    match settings.fp8 {
        Fp8Mode::Scaled => flags.push("fp8 scaled".into()),
        Fp8Mode::Plain => flags.push("fp8".into()),
        Fp8Mode::Off => {}
    }
    if settings.blocks_to_swap > 0 {
        flags.push(format!("{} blocks swapped", settings.blocks_to_swap));
    }
    if settings.gradient_checkpointing {
        flags.push("gradient checkpointing".into());
    }
    if settings.cpu_offload {
        flags.push("activation CPU offload".into());
    }
    match job {
        Job::Training(t) => format!(
            "training {} LoRA rank {} with {}, {}x{} batch {} ({} image + {} control + {} text tokens), {}",
            model.version,
            t.network.dim,
            t.optimizer.name(),
            t.image.width,
            t.image.height,
            t.batch_size,
            t.image.tokens(),
            t.control_tokens,
            t.text_tokens,
            flags.join(", ")
        ),
        Job::Generation(g) => format!(
            "generating with {}, {}x{} ({} image + {} control + {} text tokens), {}",
            model.version,
            g.image.width,
            g.image.height,
            g.image.tokens(),
            g.control_tokens,
            g.text_tokens,
            flags.join(", ")
        ),
    }
}

/// The DiT weight lines shared by every DiT phase.
fn weight_items(
    model: &PlanModel,
    settings: &MemorySettings,
    weights: &WeightBytes,
    swap: super::SwapSplit,
) -> Vec<Item> {
    let mut items = vec![item(
        format!(
            "DiT weights, {} ({} tensors{})",
            dtype_name(settings.dtype),
            model.tensors.len(),
            if settings.fp8 != Fp8Mode::Off {
                ", block linears excluded"
            } else {
                ""
            }
        ),
        weights.dense,
    )];
    if settings.fp8 != Fp8Mode::Off {
        items.push(item(
            format!(
                "DiT block linears, F8E4M3{} (saves {})",
                if settings.fp8 == Fp8Mode::Scaled {
                    " + f32 scale per 64 inputs"
                } else {
                    ""
                },
                super::report::gib(weights.fp8_saving)
            ),
            weights.fp8,
        ));
    }
    if swap.double + swap.single > 0 {
        items.push(item(
            format!(
                "block swap: 2 device slots ({} double + {} single blocks, {} in host memory)",
                swap.double,
                swap.single,
                super::report::gib(weights.swapped)
            ),
            weights.swap_buffers,
        ));
    }
    items
}

/// LoRA parameter count and modules over the DiT's linears.
fn lora_parameters(model: &PlanModel, job: &TrainingJob) -> Result<(u64, Vec<(usize, usize)>)> {
    let mut shapes = Vec::new();
    for (path, [out, input]) in model.dit.linear_shapes() {
        if job.network.targets(&path)? {
            shapes.push((out, input));
        }
    }
    let rank = job.network.dim;
    let count = shapes.iter().map(|(o, i)| (rank * (o + i)) as u64).sum();
    Ok((count, shapes))
}

fn training_items(
    model: &PlanModel,
    settings: &MemorySettings,
    job: &TrainingJob,
    weights: &WeightBytes,
    notes: &mut Vec<String>,
    host_bytes: &mut u64,
) -> Result<Vec<Item>> {
    let config = &model.dit;
    let dtype = settings.activation_dtype;
    let s = dtype.size_in_bytes() as u64;
    let h = config.hidden_size as u64;
    let (parameters, shapes) = lora_parameters(model, job)?;
    let rank = job.network.dim;
    let optimizer_bytes: u64 = shapes
        .iter()
        .map(|&(out, input)| {
            job.optimizer.state_bytes(rank, input) + job.optimizer.state_bytes(out, rank)
        })
        .sum();
    let tokens = Tokens {
        batch: job.batch_size,
        image: job.image.tokens() + job.control_tokens,
        text: job.text_tokens,
    };
    let network = &job.network;
    let targets = |path: &str| network.targets(path).ok().filter(|t| *t).map(|_| rank);
    let double: Vec<u64> = (0..config.depth)
        .map(|i| double_block_saved(config, tokens, dtype, i, &targets))
        .collect();
    let single: Vec<u64> = (0..config.depth_single_blocks)
        .map(|i| single_block_saved(config, tokens, dtype, i, &targets))
        .collect();
    let largest_block = double.iter().chain(&single).copied().max().unwrap_or(0);
    let blocks = (config.depth + config.depth_single_blocks) as u64;
    let block_input = tokens.rows() * h * s;

    let mut items = vec![
        item(
            format!(
                "LoRA parameters, f32 ({} modules, {} parameters)",
                shapes.len(),
                parameters
            ),
            4 * parameters,
        ),
        item("LoRA gradients, f32", 4 * parameters),
        item(
            format!("optimizer states ({})", job.optimizer.name()),
            optimizer_bytes,
        ),
        item(
            "batch: latents, noise, target (f32), text embeddings",
            (job.batch_size
                * (job.image.tokens() + job.control_tokens)
                * config.in_channels
                * 4
                * 4) as u64
                + (job.batch_size * job.text_tokens * config.context_in_dim * 4) as u64,
        ),
    ];
    if settings.blockwise_backward() {
        if !settings.gradient_checkpointing {
            notes.push(
                "block swap runs the backward block by block, as gradient checkpointing does"
                    .into(),
            );
        }
        if settings.cpu_offload && settings.gradient_checkpointing {
            *host_bytes += blocks * block_input;
            items.push(item(
                format!(
                    "block inputs in host memory (CPU offload: {}); one in and one out on the device",
                    super::report::gib(blocks * block_input)
                ),
                2 * block_input,
            ));
        } else {
            items.push(item(
                format!(
                    "block inputs kept by checkpointing ({blocks} blocks x {} tokens)",
                    tokens.rows()
                ),
                blocks * block_input,
            ));
        }
        items.push(item(
            "activations of the block being recomputed",
            largest_block,
        ));
    } else {
        items.push(item(
            format!(
                "saved activations ({} double + {} single blocks, {} tokens)",
                config.depth,
                config.depth_single_blocks,
                tokens.rows()
            ),
            double.iter().chain(&single).sum(),
        ));
    }
    items.push(item(
        "final layer and loss (graph)",
        head_saved(config, tokens, dtype),
    ));
    items.push(item(
        "backward working set (gradients in flight, attention chunks)",
        backward_working_set(config, tokens),
    ));
    if settings.fp8 != Fp8Mode::Off {
        // The graph keeps the fp8 weight itself (`fp8_frozen_linear`) and dequantises it again
        // for the backward: only one linear's dense copy exists at a time.
        items.push(item(
            "fp8 dequantisation transient (largest linear, f32)",
            weights.largest_fp8_linear * (8 + s),
        ));
    }
    Ok(items)
}

/// Inference activations of one forward: the residual stream (`[txt; img]` and its input) plus
/// one block's peak.
fn inference_items(
    model: &PlanModel,
    settings: &MemorySettings,
    tokens: Tokens,
    weights: &WeightBytes,
) -> Vec<Item> {
    let config = &model.dit;
    let s = settings.dtype.size_in_bytes() as u64;
    let h = config.hidden_size as u64;
    let mut items = vec![
        item(
            format!("residual stream ({} tokens)", tokens.rows()),
            2 * tokens.rows() * h * s,
        ),
        item(
            "one block's activations and attention chunk",
            inference_block_peak(config, tokens, settings.dtype, settings.fused_attention),
        ),
    ];
    if settings.fp8 != Fp8Mode::Off {
        items.push(item(
            "fp8 dequantisation transient (largest linear)",
            weights.largest_fp8_linear * (8 + s),
        ));
    }
    items
}

/// AE weight bytes (f32, as loaded) and the activations of encoding or decoding `image`: about
/// four full-resolution feature maps of the first level's channels in f32 (the convolutions run
/// in strips, so no im2col copy of the whole map exists).
fn ae_bytes(model: &PlanModel, image: ImageSize) -> (u64, u64) {
    let weights = 4 * model.ae.parameter_count() as u64;
    let maps = 4 * (model.ae.level_channels(0) * image.width * image.height * 4) as u64;
    (weights, maps)
}

fn ae_phase(model: &PlanModel, image: ImageSize, name: &str, separate: bool) -> Phase {
    let (weights, maps) = ae_bytes(model, image);
    Phase {
        name: name.into(),
        items: vec![
            item("AE weights, f32", weights),
            item(
                format!("AE activations at {}x{}", image.width, image.height),
                maps,
            ),
        ],
        separate_command: separate,
    }
}

/// The text encoder's weights (bf16; projections F8E4M3 with `--fp8_text_encoder`) and the
/// activations of one 512-token prompt.
fn text_encoder_phase(
    model: &PlanModel,
    settings: &MemorySettings,
    name: &str,
    separate: bool,
) -> Phase {
    let (projections, other) = model.text_encoder_parameters();
    let projection_bytes = if settings.fp8_text_encoder { 1 } else { 2 };
    let c = &model.text_encoder;
    let tokens = TEXT_TOKENS as u64;
    let activations = tokens * 2 * (6 * c.hidden_size as u64 + 3 * c.intermediate_size as u64)
        + 2 * 4 * (c.num_attention_heads as u64) * tokens * tokens
        + 3 * tokens * c.hidden_size as u64 * 4;
    Phase {
        name: name.into(),
        items: vec![
            item(
                format!(
                    "text encoder weights ({} projections, bf16 rest)",
                    if settings.fp8_text_encoder {
                        "F8E4M3"
                    } else {
                        "bf16"
                    }
                ),
                projections * projection_bytes + other * 2,
            ),
            item("text encoder activations (512 tokens)", activations),
        ],
        separate_command: separate,
    }
}

fn sampling_during_training(
    model: &PlanModel,
    settings: &MemorySettings,
    job: &TrainingJob,
    weights: &WeightBytes,
    sample: ImageSize,
) -> Result<Phase> {
    let mut items = weight_items(
        model,
        settings,
        weights,
        split_blocks_to_swap(
            settings.blocks_to_swap,
            model.dit.depth,
            model.dit.depth_single_blocks,
        )?,
    );
    let (parameters, shapes) = lora_parameters(model, job)?;
    let optimizer_bytes: u64 = shapes
        .iter()
        .map(|&(out, input)| {
            job.optimizer.state_bytes(job.network.dim, input)
                + job.optimizer.state_bytes(out, job.network.dim)
        })
        .sum();
    items.push(item("LoRA parameters, f32", 4 * parameters));
    items.push(item(
        format!("optimizer states ({})", job.optimizer.name()),
        optimizer_bytes,
    ));
    let tokens = Tokens {
        batch: 1,
        image: sample.tokens(),
        text: job.text_tokens,
    };
    items.extend(inference_items(model, settings, tokens, weights));
    let (ae_weights, ae_maps) = ae_bytes(model, sample);
    items.push(item("AE weights, f32 (decoding samples)", ae_weights));
    items.push(item(
        format!("AE decode at {}x{}", sample.width, sample.height),
        ae_maps,
    ));
    Ok(Phase {
        name: format!(
            "sampling during training ({}x{})",
            sample.width, sample.height
        ),
        items,
        separate_command: false,
    })
}

fn generation_phases(
    model: &PlanModel,
    settings: &MemorySettings,
    job: &GenerationJob,
    mut items: Vec<Item>,
    weights: &WeightBytes,
) -> Vec<Phase> {
    let tokens = Tokens {
        batch: 1,
        image: job.image.tokens() + job.control_tokens,
        text: job.text_tokens,
    };
    if job.unmerged_lora_bytes > 0 {
        items.push(item("LoRA weights kept unmerged", job.unmerged_lora_bytes));
    }
    let (ae_weights, ae_maps) = ae_bytes(model, job.image);
    if job.uses_ae {
        items.push(item("AE weights, f32 (kept for decoding)", ae_weights));
    }
    items.push(item(
        "text conditioning and latents",
        (job.text_tokens * model.dit.context_in_dim * 4 * 2) as u64
            + (tokens.image * model.dit.in_channels * 4 * 3) as u64,
    ));
    items.extend(inference_items(model, settings, tokens, weights));
    let mut phases = vec![
        text_encoder_phase(
            model,
            settings,
            "text encoder (freed before the DiT loads)",
            false,
        ),
        Phase {
            name: "sampling".into(),
            items,
            separate_command: false,
        },
    ];
    if job.uses_ae {
        phases.push(Phase {
            name: "decoding (DiT freed)".into(),
            items: vec![
                item("AE weights, f32", ae_weights),
                item(
                    format!("AE decode at {}x{}", job.image.width, job.image.height),
                    ae_maps,
                ),
            ],
            separate_command: false,
        });
    }
    phases
}
