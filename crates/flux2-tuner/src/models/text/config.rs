//! Hyper-parameters of the decoder-only language models used as FLUX.2 text encoders: the real
//! Qwen3-4B, Qwen3-8B and Mistral-Small-3.x 24B values built in (spec §4; Musubi `load_qwen3`,
//! `M3_CONFIG_JSON`), anything else read from the Hugging Face `config.json` next to the weights
//! (`text_config` of a `Mistral3ForConditionalGeneration` config, the top level of a `Qwen3` one).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::version::TextEncoderKind;

/// Name of the Hugging Face configuration file read for models that are not built in.
pub const CONFIG_FILE_NAME: &str = "config.json";

/// The language-model part of a text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderConfig {
    pub kind: TextEncoderKind,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Explicit in both real models, and `heads * head_dim != hidden` in both.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
}

impl TextEncoderConfig {
    /// Qwen3-4B (klein 4B and base 4B).
    pub fn qwen3_4b() -> Self {
        Self::qwen3(2560, 9728)
    }

    /// Qwen3-8B (klein 9B and base 9B).
    pub fn qwen3_8b() -> Self {
        Self::qwen3(4096, 12288)
    }

    fn qwen3(hidden_size: usize, intermediate_size: usize) -> Self {
        Self {
            kind: TextEncoderKind::Qwen3,
            hidden_size,
            intermediate_size,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            vocab_size: 151_936,
        }
    }

    /// Mistral-Small-3.x 24B, the language model of dev's `Mistral3ForConditionalGeneration`.
    pub fn mistral_small_24b() -> Self {
        Self {
            kind: TextEncoderKind::Mistral3,
            hidden_size: 5120,
            intermediate_size: 32768,
            num_hidden_layers: 40,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 1e9,
            vocab_size: 131_072,
        }
    }

    /// The built-in configurations of `kind`.
    pub fn builtin(kind: TextEncoderKind) -> Vec<Self> {
        match kind {
            TextEncoderKind::Qwen3 => vec![Self::qwen3_4b(), Self::qwen3_8b()],
            TextEncoderKind::Mistral3 => vec![Self::mistral_small_24b()],
        }
    }

    /// Qwen3 normalises every query and key head before RoPE; Mistral does not.
    pub fn has_qk_norm(&self) -> bool {
        self.kind == TextEncoderKind::Qwen3
    }

    /// Checks what the forward pass relies on (GQA group size, even head dim).
    pub fn check(&self, path: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0
        {
            return fail(format!(
                "{} attention heads cannot share {} key/value heads evenly",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return fail(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return fail("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        Ok(())
    }

    /// Reads `config.json` (the transformers 4.x and 5.x spellings of `rope_theta` both accepted).
    pub fn from_config_file(path: &Path, kind: TextEncoderKind) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "cannot read the text-encoder config", e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&json, kind, path)
    }

    fn from_json(json: &Value, kind: TextEncoderKind, path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };
        // A Mistral3ForConditionalGeneration config nests the language model in `text_config`.
        let text = json
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(json);
        let model_type = text
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let expected_types: &[&str] = match kind {
            TextEncoderKind::Qwen3 => &["qwen3"],
            TextEncoderKind::Mistral3 => &["mistral", "ministral"],
        };
        if !model_type.is_empty() && !expected_types.contains(&model_type) {
            return Err(invalid(format!(
                "model_type is `{model_type}`, expected {} for a {kind:?} text encoder",
                expected_types.join(" or ")
            )));
        }
        let integer = |name: &str| -> Result<usize> {
            text.get(name)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    invalid(format!("`{name}` is missing or not a non-negative integer"))
                })
        };
        let number = |value: Option<&Value>, name: &str| -> Result<f64> {
            value
                .and_then(Value::as_f64)
                .ok_or_else(|| invalid(format!("`{name}` is missing or not a number")))
        };
        let rope_parameters = text.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match text.get("rope_theta") {
            Some(value) => number(Some(value), "rope_theta")?,
            None => number(
                rope_parameters.and_then(|p| p.get("rope_theta")),
                "rope_theta",
            )?,
        };
        for scaling in [text.get("rope_scaling"), rope_parameters] {
            let rope_type = scaling
                .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
                .and_then(Value::as_str);
            if let Some(rope_type) = rope_type.filter(|t| *t != "default") {
                return Err(invalid(format!(
                    "RoPE scaling `{rope_type}` is not supported (the FLUX.2 text encoders use plain RoPE)"
                )));
            }
        }
        let num_attention_heads = integer("num_attention_heads")?;
        let hidden_size = integer("hidden_size")?;
        let head_dim = match text.get("head_dim").filter(|v| !v.is_null()) {
            Some(_) => integer("head_dim")?,
            None => hidden_size / num_attention_heads.max(1),
        };
        let config = Self {
            kind,
            hidden_size,
            intermediate_size: integer("intermediate_size")?,
            num_hidden_layers: integer("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: match text.get("num_key_value_heads").filter(|v| !v.is_null()) {
                Some(_) => integer("num_key_value_heads")?,
                None => num_attention_heads,
            },
            head_dim,
            rms_norm_eps: number(text.get("rms_norm_eps"), "rms_norm_eps")?,
            rope_theta,
            vocab_size: integer("vocab_size")?,
        };
        config.check(path)?;
        Ok(config)
    }
}

/// Where the configuration of the text encoder at `weights` comes from: `config.json` beside the
/// weights when there is one, else the built-in model whose embedding shape and layer count the
/// file has. Returns the config and the file it was read from, if any.
pub fn resolve_config(
    weights: &Path,
    kind: TextEncoderKind,
    embedding_shape: &[usize],
    layer_count: usize,
) -> Result<(TextEncoderConfig, Option<PathBuf>)> {
    let config_file = weights.parent().map(|d| d.join(CONFIG_FILE_NAME));
    if let Some(file) = config_file.filter(|f| f.exists()) {
        let config = TextEncoderConfig::from_config_file(&file, kind)?;
        return Ok((config, Some(file)));
    }
    let builtin = TextEncoderConfig::builtin(kind);
    builtin
        .iter()
        .find(|c| {
            embedding_shape == [c.vocab_size, c.hidden_size] && layer_count == c.num_hidden_layers
        })
        .cloned()
        .map(|c| (c, None))
        .ok_or_else(|| Error::InvalidConfig {
            path: weights.to_path_buf(),
            message: format!(
                "the embedding is {embedding_shape:?} with {layer_count} layers, which is none of the \
                 built-in {kind:?} models ({}); put the model's {CONFIG_FILE_NAME} next to the weights",
                builtin
                    .iter()
                    .map(|c| format!("[{}, {}] x {}", c.vocab_size, c.hidden_size, c.num_hidden_layers))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral3_config_reads_text_config_and_new_rope_spelling() {
        let json = serde_json::json!({
            "model_type": "mistral3",
            "text_config": {
                "model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 40, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": 384,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e9}
            }
        });
        let config =
            TextEncoderConfig::from_json(&json, TextEncoderKind::Mistral3, Path::new("c.json"))
                .unwrap();
        assert_eq!(
            (config.hidden_size, config.head_dim, config.rope_theta),
            (32, 16, 1e9)
        );
    }

    #[test]
    fn wrong_model_type_and_rope_scaling_are_refused() {
        let base = serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "vocab_size": 10
        });
        let err = TextEncoderConfig::from_json(&base, TextEncoderKind::Qwen3, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("llama") && err.contains("qwen3"), "{err}");
        let mut scaled = base.clone();
        scaled["model_type"] = "qwen3".into();
        scaled["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let err =
            TextEncoderConfig::from_json(&scaled, TextEncoderKind::Qwen3, Path::new("c.json"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("yarn"), "{err}");
    }

    /// Parameter counts of the published models (Qwen3-4B 4.02B with tied embeddings; the
    /// Mistral-Small-3.x language model 23.57B with its lm_head).
    #[test]
    fn builtin_sizes_match_the_published_parameter_counts() {
        let count = |c: &TextEncoderConfig, lm_head: bool| {
            let h = c.hidden_size;
            let q = c.num_attention_heads * c.head_dim;
            let kv = c.num_key_value_heads * c.head_dim;
            let norms = 2 * h + if c.has_qk_norm() { 2 * c.head_dim } else { 0 };
            let layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + norms;
            c.vocab_size * h * if lm_head { 2 } else { 1 } + c.num_hidden_layers * layer + h
        };
        assert_eq!(count(&TextEncoderConfig::qwen3_4b(), false), 4_022_468_096);
        assert_eq!(count(&TextEncoderConfig::qwen3_8b(), true), 8_190_735_360);
        assert_eq!(
            count(&TextEncoderConfig::mistral_small_24b(), true),
            23_572_403_200
        );
    }
}
