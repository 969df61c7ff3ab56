//! The memory planner (issue 9 point 4; `flux2-tuner plan` and `--dry_run`): from a command line
//! alone, before loading anything, the expected peak device memory of training or generation,
//! broken down into weights (per dtype, fp8 savings, block swap), activations, LoRA parameters,
//! gradients, optimizer states and the text-encoder / AE phases, and the cheapest added settings
//! that fit a given VRAM (in Musubi's order: gradient checkpointing, fp8, block swap, activation
//! CPU offload). The activation terms are counted from what our ops allocate (see
//! [`activations`]); `examples/plan_check.rs` compares them with measured peaks.

pub mod activations;
pub mod model;
pub mod optimizer;
pub mod phases;
pub mod report;
pub mod suggest;
pub mod swap;
pub mod weights;

use candle_core::DType;

use crate::quant::Fp8Mode;
use crate::train::network::NetworkConfig;

pub use model::{PlanModel, TEXT_TOKENS};
pub use optimizer::OptimizerKind;
pub use phases::plan;
pub use report::render;
pub use suggest::{suggest, Suggestion};
pub use swap::{max_blocks_to_swap, split_blocks_to_swap, SwapSplit};

/// The memory settings of a command line.
#[derive(Debug, Clone, PartialEq)]
pub struct MemorySettings {
    /// Weight dtype of the DiT (bf16, or f32 for `--mixed_precision no` / `--dit_f32`).
    pub dtype: DType,
    /// Activation dtype: the weight dtype, except bf16 training on the CPU, which keeps f32
    /// activations (`Flux2Dit::activation_dtype`). See [`MemorySettings::for_device`].
    pub activation_dtype: DType,
    /// `--fp8_base --fp8_scaled` (training), `--fp8` / `--fp8_scaled` (generate).
    pub fp8: Fp8Mode,
    /// `--blocks_to_swap`.
    pub blocks_to_swap: usize,
    /// `--gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// `--gradient_checkpointing_cpu_offload` (only with checkpointing, as Musubi).
    pub cpu_offload: bool,
    /// `--fp8_text_encoder`.
    pub fp8_text_encoder: bool,
    /// Inference attention without a score matrix: the fused host kernels on the CPU, or
    /// `--attn_mode flash` on CUDA. Otherwise query chunks of up to 2^26 f32 scores exist.
    pub fused_attention: bool,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            activation_dtype: DType::BF16,
            fp8: Fp8Mode::Off,
            blocks_to_swap: 0,
            gradient_checkpointing: false,
            cpu_offload: false,
            fp8_text_encoder: false,
            fused_attention: false,
        }
    }
}

impl MemorySettings {
    /// Defaults for weights of `dtype` on a CPU or GPU, training or not: bf16 training on the CPU
    /// runs f32 activations (`Flux2Dit::activation_dtype`).
    pub fn for_device(dtype: DType, cpu: bool, training: bool) -> Self {
        let activation_dtype = if dtype == DType::BF16 && cpu && training {
            DType::F32
        } else {
            dtype
        };
        Self {
            dtype,
            activation_dtype,
            fused_attention: cpu,
            ..Self::default()
        }
    }

    /// Whether the training step runs block by block: checkpointing, or block swap, which
    /// recomputes every block in the backward as checkpointing does (`train::step`).
    pub fn blockwise_backward(&self) -> bool {
        self.gradient_checkpointing || self.blocks_to_swap > 0
    }
}

/// An image size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    pub width: usize,
    pub height: usize,
}

impl ImageSize {
    /// Latent tokens of the DiT: one per 16x16 pixels.
    pub fn tokens(&self) -> usize {
        (self.width / 16) * (self.height / 16)
    }
}

/// A LoRA training run.
#[derive(Debug, Clone)]
pub struct TrainingJob {
    pub batch_size: usize,
    /// The largest bucket of the dataset.
    pub image: ImageSize,
    /// Control-image tokens per sample (edit training).
    pub control_tokens: usize,
    /// Text tokens ([`TEXT_TOKENS`] for the real text encoders).
    pub text_tokens: usize,
    pub network: NetworkConfig,
    pub optimizer: OptimizerKind,
    /// The largest sample image, when sampling during training.
    pub sample: Option<ImageSize>,
}

/// A generation run.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationJob {
    pub image: ImageSize,
    pub control_tokens: usize,
    /// Text tokens ([`TEXT_TOKENS`] for the real text encoders).
    pub text_tokens: usize,
    /// Bytes of the LoRA files kept unmerged on the device (0 when merged).
    pub unmerged_lora_bytes: u64,
    /// Whether the AE is loaded (images decoded or control images encoded).
    pub uses_ae: bool,
}

/// What is planned.
#[derive(Debug, Clone)]
pub enum Job {
    Training(TrainingJob),
    Generation(GenerationJob),
}

/// One line of a breakdown.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub name: String,
    pub bytes: u64,
}

/// A stretch of the run during which the listed items are on the device together.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: String,
    pub items: Vec<Item>,
    /// True for phases run by another command (the cache jobs), reported but not in the peak.
    pub separate_command: bool,
}

impl Phase {
    /// Bytes of the phase.
    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }
}

/// The planner's answer for one command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// A one-line description of the job.
    pub title: String,
    pub phases: Vec<Phase>,
    /// Remarks (what is not modelled, settings that do not save memory here).
    pub notes: Vec<String>,
    /// Host memory the settings need besides the device (swapped blocks, offloaded activations).
    pub host_bytes: u64,
}

impl Plan {
    /// Peak device bytes over the phases of this command.
    pub fn peak(&self) -> u64 {
        self.phases
            .iter()
            .filter(|p| !p.separate_command)
            .map(Phase::total)
            .max()
            .unwrap_or(0)
    }

    /// The phase that sets the peak.
    pub fn peak_phase(&self) -> Option<&Phase> {
        self.phases
            .iter()
            .filter(|p| !p.separate_command)
            .max_by_key(|p| p.total())
    }

    /// Whether the peak fits `vram` bytes.
    pub fn fits(&self, vram: u64) -> bool {
        self.peak() <= vram
    }
}
