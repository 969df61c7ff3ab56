//! The text encoder of a FLUX.2 version: checkpoint checks, tokenizer and language model together,
//! turning prompts into the DiT's conditioning `[b, 512, 3 * hidden]`, the hidden states after the
//! version's layers (dev 10/20/30, klein 9/18/27) laid side by side per token (feature index
//! `j * hidden + d` for the `j`-th layer).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, KeySpec};
use crate::error::{Error, Result};
use crate::models::text::config::{resolve_config, TextEncoderConfig};
use crate::models::text::decoder::{stored_layer_count, DecoderStack, KeyLayout};
use crate::models::text::storage::WeightPlacement;
use crate::models::text::tokenizer::{locate_tokenizer, PromptTokenizer, TokenBatch};
use crate::models::text::{mistral3, qwen3};
use crate::models::version::{ModelVersion, TextEncoderKind};

/// A text-encoder checkpoint whose layout, configuration and key/shape table have been checked.
pub struct TextEncoderCheckpoint {
    pub checkpoint: Checkpoint,
    pub kind: TextEncoderKind,
    pub config: TextEncoderConfig,
    pub layout: KeyLayout,
    /// The `config.json` the configuration came from; `None` for a built-in real model.
    pub config_file: Option<PathBuf>,
}

impl TextEncoderCheckpoint {
    /// Opens a single file or the first shard of a split checkpoint and validates it strictly
    /// (headers only). Harmless extras: `lm_head` for both kinds, Mistral-3's `vision_tower.*` and
    /// `multi_modal_projector.*`, RoPE `inv_freq` buffers.
    pub fn open(path: &Path, kind: TextEncoderKind) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let layout = match kind {
            TextEncoderKind::Qwen3 => qwen3::layout(),
            TextEncoderKind::Mistral3 => mistral3::layout(&checkpoint)?,
        };
        let embedding = checkpoint
            .shape(&layout.key("embed_tokens.weight"))?
            .to_vec();
        let layers = stored_layer_count(&checkpoint, &layout);
        let (config, config_file) = resolve_config(path, kind, &embedding, layers)?;
        let specs = expected_keys(&config, &layout);
        match kind {
            TextEncoderKind::Qwen3 => checkpoint.validate(&specs, qwen3::is_harmless_extra)?,
            TextEncoderKind::Mistral3 => {
                checkpoint.validate(&specs, |k| mistral3::is_harmless_extra(&layout, k))?
            }
        }
        // The unused output projection is optional, but when present it must fit the model.
        if let Ok(shape) = checkpoint.shape(&layout.lm_head) {
            let expected = [config.vocab_size, config.hidden_size];
            if shape != expected {
                return Err(Error::WrongShape {
                    path: checkpoint.path().to_path_buf(),
                    key: layout.lm_head.clone(),
                    expected: expected.to_vec(),
                    found: shape.to_vec(),
                });
            }
        }
        Ok(Self {
            checkpoint,
            kind,
            config,
            layout,
            config_file,
        })
    }
}

/// The key/shape table of a text encoder in `layout`.
pub fn expected_keys(config: &TextEncoderConfig, layout: &KeyLayout) -> Vec<KeySpec> {
    match config.kind {
        TextEncoderKind::Qwen3 => qwen3::expected_keys(config),
        TextEncoderKind::Mistral3 => mistral3::expected_keys(config, layout),
    }
}

/// How to build a [`TextEncoder`].
#[derive(Debug, Clone)]
pub struct TextEncoderOptions {
    pub placement: WeightPlacement,
    /// `hidden_states` indices stacked into the conditioning (three for FLUX.2).
    pub layers: Vec<usize>,
    /// An explicit `tokenizer.json` (or its folder); else it is looked for beside the weights.
    pub tokenizer: Option<PathBuf>,
}

impl TextEncoderOptions {
    /// The FLUX.2 layers of `kind` from the version table (dev 10/20/30, klein 9/18/27) on
    /// `device` in `dtype`.
    pub fn new(kind: TextEncoderKind, device: Device, dtype: candle_core::DType) -> Self {
        let layers = ModelVersion::ALL
            .into_iter()
            .map(ModelVersion::info)
            .find(|info| info.text_encoder == kind)
            .map(|info| info.text_encoder_layers.to_vec())
            .unwrap_or_default();
        Self {
            placement: WeightPlacement::new(device, dtype),
            layers,
            tokenizer: None,
        }
    }
}

/// Tokenizer plus truncated language model.
pub struct TextEncoder {
    pub kind: TextEncoderKind,
    pub tokenizer: PromptTokenizer,
    pub model: DecoderStack,
    pub layers: Vec<usize>,
}

impl TextEncoder {
    /// Opens and validates the weights at `path`, finds the tokenizer, and loads the layers the
    /// requested hidden states need.
    pub fn load(path: &Path, kind: TextEncoderKind, options: &TextEncoderOptions) -> Result<Self> {
        if options.layers.is_empty() {
            return Err(Error::InvalidArgument {
                name: "text-encoder layers".into(),
                message: "at least one hidden-state index is needed".into(),
            });
        }
        let checked = TextEncoderCheckpoint::open(path, kind)?;
        let tokenizer_path = locate_tokenizer(path, options.tokenizer.as_deref())?;
        let tokenizer = PromptTokenizer::load(&tokenizer_path, kind)?;
        // Shared with weights read from the file on use (layer streaming).
        let checkpoint = Arc::new(checked.checkpoint);
        let model = DecoderStack::load(
            &checkpoint,
            &checked.layout,
            &checked.config,
            &options.layers,
            &options.placement,
        )?;
        Ok(Self {
            kind,
            tokenizer,
            model,
            layers: options.layers.clone(),
        })
    }

    /// Hidden size of the language model (the conditioning is `layers.len()` times wider).
    pub fn hidden_size(&self) -> usize {
        self.model.config.hidden_size
    }

    /// Prompts to conditioning `[b, max_length, layers.len() * hidden]`, all in one forward pass.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        let tokens = self.tokenizer.tokenize(prompts)?;
        self.encode_tokens(&tokens)
    }

    /// Already tokenised batch to conditioning.
    pub fn encode_tokens(&self, tokens: &TokenBatch) -> Result<Tensor> {
        let ids = tokens.ids_tensor(&self.model.placement.device)?;
        let states = self
            .model
            .hidden_states(&ids, &tokens.attention_mask, &self.layers)?;
        Ok(Tensor::cat(&states, 2)?)
    }
}
