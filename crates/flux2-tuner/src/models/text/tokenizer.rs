//! Prompt to token ids, as the FLUX.2 pipelines build the text-encoder input (spec §4; BFL
//! `text_encoder.py`, diffusers `pipeline_flux2*.py`, Musubi `flux2_utils.py`):
//! 1. render the chat template: dev's system message and Mistral instruct format (with `[IMG]`
//!    removed from the prompt), or Qwen3's user turn plus an empty thinking block;
//! 2. tokenise `tokenizer.json` with no added special tokens (the template carries them);
//! 3. keep the first `max_length` (512) tokens and pad to exactly `max_length` with the pad token,
//!    on the model's padding side, with the matching attention mask.
//!
//! Padding side and pad token come from `tokenizer_config.json` beside `tokenizer.json` when it
//! names them. Otherwise: Qwen3 pads on the right (the transformers default; the Qwen3
//! `tokenizer_config.json` has no `padding_side`) with `<|endoftext|>`; Mistral pads on the left
//! (transformers' `MistralCommonBackend` default `padding_side = "left"`) with `<pad>`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::version::TextEncoderKind;

/// FLUX.2-dev's system message (BFL `system_messages.py`); note the newline after "object".
pub const DEV_SYSTEM_MESSAGE: &str = "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object\nattribution and actions without speculation.";

/// Sequence length the FLUX.2 text encoders are run at.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The flag that names a tokenizer explicitly.
pub const TOKENIZER_FLAG: &str = "--tokenizer";

/// Which end of the sequence padding goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    Left,
    Right,
}

/// Token ids and attention masks of a batch, each row exactly `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u8>>,
}

impl TokenBatch {
    /// `input_ids` as a `[b, l]` u32 tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let rows = self.input_ids.len();
        let length = self.input_ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (rows, length), device)?)
    }

    /// `attention_mask` as a `[b, l]` u8 tensor.
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        let rows = self.attention_mask.len();
        let length = self.attention_mask.first().map_or(0, Vec::len);
        let flat: Vec<u8> = self.attention_mask.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (rows, length), device)?)
    }
}

/// The chat-formatted text a prompt is tokenised from.
pub fn render_prompt(kind: TextEncoderKind, prompt: &str) -> String {
    match kind {
        TextEncoderKind::Mistral3 => format!(
            "<s>[SYSTEM_PROMPT]{DEV_SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{}[/INST]",
            prompt.replace("[IMG]", "")
        ),
        TextEncoderKind::Qwen3 => format!(
            "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ),
    }
}

/// The places a tokenizer is looked for, in order: an explicit path (a `tokenizer.json` or a
/// folder holding one), else beside the text-encoder weights, in a `tokenizer/` folder beside
/// them, and in the `tokenizer/` sibling of their folder (the Hugging Face repository layout
/// `<repo>/text_encoder/model-*.safetensors` + `<repo>/tokenizer/tokenizer.json`).
pub fn tokenizer_candidates(text_encoder: &Path, explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = explicit {
        return if path.is_dir() {
            vec![path.join("tokenizer.json")]
        } else {
            vec![path.to_path_buf()]
        };
    }
    let directory = if text_encoder.is_dir() {
        text_encoder.to_path_buf()
    } else {
        text_encoder
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let mut candidates = vec![
        directory.join("tokenizer.json"),
        directory.join("tokenizer").join("tokenizer.json"),
    ];
    if let Some(parent) = directory.parent() {
        candidates.push(parent.join("tokenizer").join("tokenizer.json"));
    }
    candidates
}

/// The first existing candidate, or an error listing every place looked at.
pub fn locate_tokenizer(text_encoder: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    let candidates = tokenizer_candidates(text_encoder, explicit);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked = candidates
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let hint = match explicit {
        Some(_) => format!("the path given with {TOKENIZER_FLAG} holds no tokenizer.json"),
        None => format!(
            "no tokenizer.json found for the text encoder; pass {TOKENIZER_FLAG} PATH (the model's \
             tokenizer.json, or the folder holding it)"
        ),
    };
    Err(Error::io(
        candidates.first().cloned().unwrap_or_default(),
        format!("{hint}; looked at: {looked}"),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    ))
}

/// A `tokenizer.json` with the FLUX.2 formatting, truncation and padding rules.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    kind: TextEncoderKind,
    path: PathBuf,
    pub pad_token_id: u32,
    pub padding_side: PaddingSide,
    pub max_length: usize,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` beside it.
    pub fn load(path: &Path, kind: TextEncoderKind) -> Result<Self> {
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::InvalidConfig {
                path: path.to_path_buf(),
                message: format!("not a valid tokenizer.json: {e}"),
            })?;
        // Truncation and padding are applied here, not by the file's own settings.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::InvalidConfig {
                path: path.to_path_buf(),
                message: format!("cannot disable truncation: {e}"),
            })?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| Error::io(&config_path, "cannot read tokenizer config", e))?;
            serde_json::from_str::<Value>(&text).map_err(|e| Error::InvalidConfig {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?
        } else {
            Value::Null
        };
        let padding_side = match config.get("padding_side").and_then(Value::as_str) {
            Some("left") => PaddingSide::Left,
            Some("right") => PaddingSide::Right,
            Some(other) => {
                return Err(Error::InvalidConfig {
                    path: config_path,
                    message: format!("padding_side is `{other}`, expected `left` or `right`"),
                })
            }
            None => match kind {
                TextEncoderKind::Mistral3 => PaddingSide::Left,
                TextEncoderKind::Qwen3 => PaddingSide::Right,
            },
        };
        // `pad_token` is a string or an added-token object with `content`.
        let configured_pad = config.get("pad_token").and_then(|v| {
            v.as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))
                .map(str::to_string)
        });
        let pad_token = configured_pad.unwrap_or_else(|| {
            match kind {
                TextEncoderKind::Mistral3 => "<pad>",
                TextEncoderKind::Qwen3 => "<|endoftext|>",
            }
            .to_string()
        });
        let pad_token_id =
            tokenizer
                .token_to_id(&pad_token)
                .ok_or_else(|| Error::InvalidConfig {
                    path: path.to_path_buf(),
                    message: format!("the pad token `{pad_token}` is not in the vocabulary"),
                })?;
        Ok(Self {
            tokenizer,
            kind,
            path: path.to_path_buf(),
            pad_token_id,
            padding_side,
            max_length: MAX_SEQUENCE_LENGTH,
        })
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` with no special tokens added (those in the text are still matched).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::InvalidConfig {
                path: self.path.clone(),
                message: format!("cannot tokenise the prompt: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Renders, tokenises, truncates and pads each prompt.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<TokenBatch> {
        let mut batch = TokenBatch {
            input_ids: Vec::with_capacity(prompts.len()),
            attention_mask: Vec::with_capacity(prompts.len()),
        };
        for prompt in prompts {
            let mut ids = self.encode_text(&render_prompt(self.kind, prompt))?;
            ids.truncate(self.max_length);
            let real = ids.len();
            let pads = self.max_length - real;
            let (ids, mask) = match self.padding_side {
                PaddingSide::Right => {
                    ids.resize(self.max_length, self.pad_token_id);
                    let mut mask = vec![1u8; real];
                    mask.resize(self.max_length, 0);
                    (ids, mask)
                }
                PaddingSide::Left => {
                    let mut padded = vec![self.pad_token_id; pads];
                    padded.extend(ids);
                    let mut mask = vec![0u8; pads];
                    mask.resize(self.max_length, 1);
                    (padded, mask)
                }
            };
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral_template_drops_image_tokens_and_has_one_bos() {
        let text = render_prompt(TextEncoderKind::Mistral3, "a [IMG]cat");
        assert!(text.starts_with("<s>[SYSTEM_PROMPT]You are an AI"));
        assert!(text.ends_with("[INST]a cat[/INST]"));
        assert_eq!(text.matches("<s>").count(), 1);
    }

    #[test]
    fn missing_tokenizer_names_every_place_and_the_flag() {
        let root =
            std::env::temp_dir().join(format!("flux2-tokenizer-missing-{}", std::process::id()));
        let weights = root
            .join("text_encoder")
            .join("model-00001-of-00002.safetensors");
        let err = locate_tokenizer(&weights, None).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_FLAG), "{err}");
        assert!(
            err.contains(
                &root
                    .join("tokenizer")
                    .join("tokenizer.json")
                    .display()
                    .to_string()
            ),
            "{err}"
        );
        assert!(
            err.contains(
                &root
                    .join("text_encoder")
                    .join("tokenizer.json")
                    .display()
                    .to_string()
            ),
            "{err}"
        );
    }

    #[test]
    fn hugging_face_sibling_folder_is_found() {
        let root =
            std::env::temp_dir().join(format!("flux2-tokenizer-sibling-{}", std::process::id()));
        std::fs::create_dir_all(root.join("tokenizer")).unwrap();
        std::fs::create_dir_all(root.join("text_encoder")).unwrap();
        std::fs::write(root.join("tokenizer").join("tokenizer.json"), "{}").unwrap();
        let weights = root
            .join("text_encoder")
            .join("model-00001-of-00002.safetensors");
        let found = locate_tokenizer(&weights, None).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, root.join("tokenizer").join("tokenizer.json"));
    }
}
