//! The real Qwen3-4B, Qwen3-8B and Mistral-Small-3.x 24B key/shape tables through the loader, on
//! sparse all-zero files with real headers (`write_zero_checkpoint`; nothing but headers is read).
//! No `config.json` is written, so the built-in configurations are what the shapes must match.

use std::path::{Path, PathBuf};

use flux2_tuner::checkpoint::{write_zero_checkpoint, KeySpec, StorageDtype};
use flux2_tuner::models::text::decoder::KeyLayout;
use flux2_tuner::models::text::encoder::expected_keys;
use flux2_tuner::models::text::{TextEncoderCheckpoint, TextEncoderConfig};
use flux2_tuner::models::TextEncoderKind;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flux2-te-real-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `specs` as `count` shards named like the Hugging Face repositories; returns shard 1.
fn write_shards(dir: &Path, specs: &[KeySpec], count: usize) -> Result<PathBuf> {
    let per_shard = specs.len().div_ceil(count);
    for (i, chunk) in specs.chunks(per_shard).enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        write_zero_checkpoint(&dir.join(name), chunk, StorageDtype::BF16)?;
    }
    Ok(dir.join(format!("model-00001-of-{count:05}.safetensors")))
}

fn mistral_legacy_layout() -> KeyLayout {
    KeyLayout {
        model_prefix: "language_model.model.".into(),
        lm_head: "language_model.lm_head.weight".into(),
    }
}

/// A few vision-tower and projector tensors, as the FLUX.2-dev `text_encoder/` shards carry.
fn vision_extras() -> Vec<KeySpec> {
    vec![
        KeySpec::new("vision_tower.patch_conv.weight", &[1024, 3, 14, 14]),
        KeySpec::new("vision_tower.ln_pre.weight", &[1024]),
        KeySpec::new(
            "vision_tower.transformer.layers.0.attention.q_proj.weight",
            &[1024, 1024],
        ),
        KeySpec::new("multi_modal_projector.norm.weight", &[1024]),
        KeySpec::new(
            "multi_modal_projector.patch_merger.merging_layer.weight",
            &[1024, 4096],
        ),
        KeySpec::new("multi_modal_projector.linear_1.weight", &[5120, 1024]),
        KeySpec::new("multi_modal_projector.linear_2.weight", &[5120, 5120]),
    ]
}

#[test]
fn qwen3_4b_without_lm_head_in_two_shards() -> Result<()> {
    let config = TextEncoderConfig::qwen3_4b();
    let specs = expected_keys(&config, &KeyLayout::causal_lm());
    assert_eq!(specs.len(), 2 + 36 * 11);
    let dir = scratch("qwen3-4b")?;
    let first = write_shards(&dir, &specs, 2)?;
    let opened = TextEncoderCheckpoint::open(&first, TextEncoderKind::Qwen3);
    std::fs::remove_dir_all(&dir)?;
    let opened = opened?;
    assert_eq!(opened.config, config);
    assert!(opened.config_file.is_none());
    Ok(())
}

#[test]
fn qwen3_8b_with_lm_head_in_four_shards() -> Result<()> {
    let config = TextEncoderConfig::qwen3_8b();
    let mut specs = expected_keys(&config, &KeyLayout::causal_lm());
    specs.push(KeySpec::new("lm_head.weight", &[151_936, 4096]));
    let dir = scratch("qwen3-8b")?;
    let first = write_shards(&dir, &specs, 4)?;
    let opened = TextEncoderCheckpoint::open(&first, TextEncoderKind::Qwen3);
    std::fs::remove_dir_all(&dir)?;
    assert_eq!(opened?.config, config);
    Ok(())
}

#[test]
fn mistral_small_24b_legacy_names_with_vision_tower() -> Result<()> {
    let config = TextEncoderConfig::mistral_small_24b();
    let layout = mistral_legacy_layout();
    let mut specs = expected_keys(&config, &layout);
    assert_eq!(specs.len(), 2 + 40 * 9);
    specs.push(KeySpec::new(
        "language_model.lm_head.weight",
        &[131_072, 5120],
    ));
    specs.extend(vision_extras());
    let dir = scratch("mistral-24b")?;
    let first = write_shards(&dir, &specs, 10)?;
    let opened = TextEncoderCheckpoint::open(&first, TextEncoderKind::Mistral3);
    std::fs::remove_dir_all(&dir)?;
    let opened = opened?;
    assert_eq!(opened.config, config);
    assert_eq!(opened.layout, layout);
    Ok(())
}

/// A wrong shape, a missing layer and an unknown tensor are each refused with the key named.
#[test]
fn real_tables_refuse_wrong_files() -> Result<()> {
    let config = TextEncoderConfig::qwen3_4b();
    let good = expected_keys(&config, &KeyLayout::causal_lm());
    let dir = scratch("refusals")?;
    let cases: Vec<(&str, Vec<KeySpec>, &str)> = vec![
        (
            "shape",
            good.iter()
                .map(|s| {
                    if s.key == "model.layers.7.mlp.up_proj.weight" {
                        KeySpec::new(s.key.clone(), &[9728, 2048])
                    } else {
                        s.clone()
                    }
                })
                .collect(),
            "model.layers.7.mlp.up_proj.weight",
        ),
        (
            "missing",
            good.iter()
                .filter(|s| s.key != "model.layers.20.self_attn.k_norm.weight")
                .cloned()
                .collect(),
            "model.layers.20.self_attn.k_norm.weight",
        ),
        (
            "extra",
            good.iter()
                .cloned()
                .chain([KeySpec::new(
                    "model.layers.3.self_attn.q_proj.bias",
                    &[4096],
                )])
                .collect(),
            "model.layers.3.self_attn.q_proj.bias",
        ),
    ];
    let mut failures = Vec::new();
    for (name, specs, key) in cases {
        let file = dir.join(format!("{name}.safetensors"));
        write_zero_checkpoint(&file, &specs, StorageDtype::BF16)?;
        match TextEncoderCheckpoint::open(&file, TextEncoderKind::Qwen3) {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) if !e.to_string().contains(key) => failures.push(format!("{name}: {e}")),
            Err(_) => {}
        }
    }
    std::fs::remove_dir_all(&dir)?;
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}
