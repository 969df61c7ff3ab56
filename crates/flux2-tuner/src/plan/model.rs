//! What the planner knows of a model before loading it: the DiT's key/shape table (from the
//! checkpoint header, read through the memory map without touching tensor data, or from the version
//! table when no file is given), the text encoder and the AE configurations.

use std::path::Path;

use crate::checkpoint::{Checkpoint, KeySpec};
use crate::error::Result;
use crate::models::ae::AeConfig;
use crate::models::dit::{check_dit_checkpoint, DitConfig};
use crate::models::text::TextEncoderConfig;
use crate::models::{ModelVersion, TextEncoderKind};

/// Tokens of the text encoder output fed to the DiT (Musubi pads every prompt to 512).
pub const TEXT_TOKENS: usize = 512;

/// A model to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanModel {
    pub version: ModelVersion,
    pub dit: DitConfig,
    /// Every DiT tensor with its shape.
    pub tensors: Vec<KeySpec>,
    pub text_encoder: TextEncoderConfig,
    pub ae: AeConfig,
}

impl PlanModel {
    /// The real model of `version` from the built-in tables.
    pub fn of_version(version: ModelVersion) -> Self {
        let info = version.info();
        Self {
            version,
            tensors: info.dit.expected_keys(),
            dit: info.dit,
            text_encoder: text_encoder_of(version),
            ae: AeConfig::real(),
        }
    }

    /// The model in the DiT file `path` (headers only; every key, shape and dtype checked).
    pub fn from_checkpoint(path: &Path, version: ModelVersion) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let dit = check_dit_checkpoint(&checkpoint, None)?;
        let tensors = checkpoint
            .keys()
            .map(|key| Ok(KeySpec::new(key, checkpoint.shape(key)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tensors,
            dit,
            ..Self::of_version(version)
        })
    }

    /// Parameters of the text encoder's language model (no output head: it is never used).
    pub fn text_encoder_parameters(&self) -> (u64, u64) {
        let c = &self.text_encoder;
        let h = c.hidden_size as u64;
        let q = (c.num_attention_heads * c.head_dim) as u64;
        let kv = (c.num_key_value_heads * c.head_dim) as u64;
        let norms = 2 * h
            + if c.has_qk_norm() {
                2 * c.head_dim as u64
            } else {
                0
            };
        let projections = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size as u64;
        let layers = c.num_hidden_layers as u64;
        let other = c.vocab_size as u64 * h + layers * norms + h;
        (layers * projections, other)
    }
}

/// The text encoder of a version (Qwen3-4B, Qwen3-8B or Mistral-Small 24B).
fn text_encoder_of(version: ModelVersion) -> TextEncoderConfig {
    let info = version.info();
    match info.text_encoder {
        TextEncoderKind::Mistral3 => TextEncoderConfig::mistral_small_24b(),
        TextEncoderKind::Qwen3 if info.text_encoder_hidden_size == 2560 => {
            TextEncoderConfig::qwen3_4b()
        }
        TextEncoderKind::Qwen3 => TextEncoderConfig::qwen3_8b(),
    }
}
