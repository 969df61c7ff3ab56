//! Qwen3 (`Qwen3ForCausalLM`, klein's text encoder): the standard causal-LM key layout with
//! per-head `q_norm`/`k_norm`. The output projection `lm_head.weight` is absent when tied
//! (Qwen3-4B) and present otherwise (Qwen3-8B); either way it is never used.

use crate::checkpoint::KeySpec;
use crate::models::text::config::TextEncoderConfig;
use crate::models::text::decoder::{language_model_keys, KeyLayout};

/// Qwen3's key layout: `model.*` and `lm_head.weight`.
pub fn layout() -> KeyLayout {
    KeyLayout::causal_lm()
}

/// The tensors a Qwen3 checkpoint must hold (everything but the optional `lm_head`).
pub fn expected_keys(config: &TextEncoderConfig) -> Vec<KeySpec> {
    language_model_keys(config, &KeyLayout::causal_lm())
}

/// Tensors that may be present and are ignored: the output projection (untied models) and the
/// RoPE frequency buffers some older exports carry.
pub fn is_harmless_extra(key: &str) -> bool {
    key == "lm_head.weight" || key.ends_with(".rotary_emb.inv_freq")
}
