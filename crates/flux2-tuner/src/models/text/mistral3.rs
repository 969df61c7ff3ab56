//! Mistral-3 (`Mistral3ForConditionalGeneration`, dev's text encoder): only its Mistral language
//! model is used. Three key layouts are accepted:
//! - legacy, as in the published FLUX.2-dev `text_encoder/` shards and Musubi's expectation:
//!   `language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`,
//!   `multi_modal_projector.*`;
//! - current transformers: `model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`,
//!   `model.multi_modal_projector.*`;
//! - a text-only `MistralForCausalLM` export: `model.*`, `lm_head.weight`.
//!
//! The vision tower and projector are ignored (Musubi loads them only to satisfy a strict load).

use crate::checkpoint::{Checkpoint, KeySpec};
use crate::error::{Error, Result};
use crate::models::text::config::TextEncoderConfig;
use crate::models::text::decoder::{language_model_keys, KeyLayout};

/// The accepted layouts, in detection order.
pub fn layouts() -> [KeyLayout; 3] {
    [
        KeyLayout {
            model_prefix: "language_model.model.".into(),
            lm_head: "language_model.lm_head.weight".into(),
        },
        KeyLayout {
            model_prefix: "model.language_model.".into(),
            lm_head: "lm_head.weight".into(),
        },
        KeyLayout::causal_lm(),
    ]
}

/// The layout whose `embed_tokens` the checkpoint holds.
pub fn layout(checkpoint: &Checkpoint) -> Result<KeyLayout> {
    let candidates = layouts();
    candidates
        .iter()
        .find(|l| checkpoint.entry(&l.key("embed_tokens.weight")).is_some())
        .cloned()
        .ok_or_else(|| Error::MissingKey {
            path: checkpoint.path().to_path_buf(),
            key: format!(
                "{} (or {})",
                candidates[0].key("embed_tokens.weight"),
                candidates[1..]
                    .iter()
                    .map(|l| l.key("embed_tokens.weight"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            expected: Vec::new(),
        })
}

/// The tensors a Mistral-3 checkpoint in `layout` must hold (everything but `lm_head`).
pub fn expected_keys(config: &TextEncoderConfig, layout: &KeyLayout) -> Vec<KeySpec> {
    language_model_keys(config, layout)
}

/// Tensors that may be present and are ignored: the output projection and, beside a
/// multimodal layout, the vision tower and the projector.
pub fn is_harmless_extra(layout: &KeyLayout, key: &str) -> bool {
    if key == layout.lm_head || key.ends_with(".rotary_emb.inv_freq") {
        return true;
    }
    let multimodal_root = match layout.model_prefix.as_str() {
        "language_model.model." => "",
        "model.language_model." => "model.",
        _ => return false,
    };
    key.strip_prefix(multimodal_root).is_some_and(|rest| {
        rest.starts_with("vision_tower.") || rest.starts_with("multi_modal_projector.")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vision_keys_are_harmless_only_beside_their_layout() {
        let [legacy, current, text_only] = layouts();
        assert!(is_harmless_extra(
            &legacy,
            "vision_tower.transformer.layers.0.attention.wq.weight"
        ));
        assert!(is_harmless_extra(
            &legacy,
            "multi_modal_projector.linear_1.weight"
        ));
        assert!(is_harmless_extra(&legacy, "language_model.lm_head.weight"));
        assert!(!is_harmless_extra(
            &legacy,
            "model.vision_tower.patch_conv.weight"
        ));
        assert!(is_harmless_extra(
            &current,
            "model.vision_tower.patch_conv.weight"
        ));
        assert!(is_harmless_extra(&current, "lm_head.weight"));
        assert!(!is_harmless_extra(
            &current,
            "vision_tower.patch_conv.weight"
        ));
        assert!(!is_harmless_extra(
            &text_only,
            "vision_tower.patch_conv.weight"
        ));
        assert!(!is_harmless_extra(
            &legacy,
            "language_model.model.layers.40.mlp.up_proj.weight"
        ));
    }
}
