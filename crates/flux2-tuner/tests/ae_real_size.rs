//! The real FLUX.2 AE layout (spec §2.2: ch 128, ch_mult [1, 2, 4, 4], 2 blocks, z 32): its
//! key/shape table written as a real safetensors header over a sparse all-zero file, inferred back
//! and validated by the loader; and the loader's refusals of damaged or foreign AE files.

use std::path::PathBuf;

use flux2_tuner::checkpoint::{write_zero_checkpoint, Checkpoint, KeySpec, StorageDtype};
use flux2_tuner::models::ae::{check_ae_checkpoint, AeConfig, CONFIG_FILE_NAME};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-tuner-ae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shape_of<'a>(specs: &'a [KeySpec], key: &str) -> Option<&'a [usize]> {
    specs
        .iter()
        .find(|s| s.key == key)
        .map(|s| s.shape.as_slice())
}

#[test]
fn real_ae_layout_matches_the_spec_and_validates() {
    let specs = AeConfig::real().expected_keys();
    // Counted by hand: encoder 108 tensors (conv_in 2, 8 blocks x 8 + 2 shortcuts x 2, 3
    // downsamples x 2, mid 26, norm_out/conv_out/quant_conv 6), decoder 140, BatchNorm 2.
    assert_eq!(specs.len(), 250);
    let table: &[(&str, &[usize])] = &[
        ("encoder.conv_in.weight", &[128, 3, 3, 3]),
        (
            "encoder.down.1.block.0.nin_shortcut.weight",
            &[256, 128, 1, 1],
        ),
        (
            "encoder.down.2.block.0.nin_shortcut.weight",
            &[512, 256, 1, 1],
        ),
        ("encoder.down.2.downsample.conv.weight", &[512, 512, 3, 3]),
        ("encoder.mid.attn_1.q.weight", &[512, 512, 1, 1]),
        ("encoder.mid.attn_1.proj_out.bias", &[512]),
        ("encoder.norm_out.weight", &[512]),
        ("encoder.conv_out.weight", &[64, 512, 3, 3]),
        ("encoder.quant_conv.weight", &[64, 64, 1, 1]),
        ("decoder.post_quant_conv.weight", &[32, 32, 1, 1]),
        ("decoder.conv_in.weight", &[512, 32, 3, 3]),
        ("decoder.up.3.block.2.conv2.weight", &[512, 512, 3, 3]),
        (
            "decoder.up.1.block.0.nin_shortcut.weight",
            &[256, 512, 1, 1],
        ),
        (
            "decoder.up.0.block.0.nin_shortcut.weight",
            &[128, 256, 1, 1],
        ),
        ("decoder.up.1.upsample.conv.weight", &[256, 256, 3, 3]),
        ("decoder.norm_out.weight", &[128]),
        ("decoder.conv_out.weight", &[3, 128, 3, 3]),
        ("bn.running_mean", &[128]),
        ("bn.running_var", &[128]),
    ];
    for (key, shape) in table {
        assert_eq!(shape_of(&specs, key), Some(*shape), "{key}");
    }
    // Shortcuts only where the channel count changes; no downsample after the last level, no
    // upsample after level 0; no attention outside the mid blocks.
    let shortcuts = specs
        .iter()
        .filter(|s| s.key.ends_with("nin_shortcut.weight"))
        .count();
    assert_eq!(shortcuts, 4);
    assert!(shape_of(&specs, "encoder.down.3.downsample.conv.weight").is_none());
    assert!(shape_of(&specs, "decoder.up.0.upsample.conv.weight").is_none());
    assert!(!specs.iter().any(|s| s.key.contains(".attn.")));
    // Spec: about 84.0M parameters, encoder 34.4M, decoder 49.6M.
    let count = |prefix: &str| -> usize {
        specs
            .iter()
            .filter(|s| s.key.starts_with(prefix))
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    };
    assert_eq!((count("encoder.") as f64 / 1e5).round(), 344.0);
    assert_eq!((count("decoder.") as f64 / 1e5).round(), 496.0);

    let dir = temp_dir("real");
    let path = dir.join("ae.safetensors");
    write_zero_checkpoint(&path, &specs, StorageDtype::F32).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let config = check_ae_checkpoint(&checkpoint).unwrap();
    assert_eq!(config, AeConfig::real());
    assert_eq!(config.pixels_per_latent(), 16);
    assert_eq!(config.latent_channels(), 128);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_ae_files_are_refused_with_the_key() {
    let dir = temp_dir("damaged");
    let mut specs = AeConfig::real().expected_keys();

    // A wrong shape names the key, the shape found and the one expected.
    let index = specs
        .iter()
        .position(|s| s.key == "decoder.conv_in.bias")
        .unwrap();
    specs[index].shape = vec![256];
    let path = dir.join("wrong.safetensors");
    write_zero_checkpoint(&path, &specs, StorageDtype::F32).unwrap();
    let message = check_ae_checkpoint(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("decoder.conv_in.bias")
            && message.contains("[256]")
            && message.contains("[512]"),
        "{message}"
    );

    // A missing tensor is named.
    specs[index].shape = vec![512];
    specs.retain(|s| s.key != "encoder.mid.attn_1.k.bias");
    let path = dir.join("missing.safetensors");
    write_zero_checkpoint(&path, &specs, StorageDtype::F32).unwrap();
    let message = check_ae_checkpoint(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(message.contains("encoder.mid.attn_1.k.bias"), "{message}");

    // An unknown tensor is refused (the only harmless extra is bn.num_batches_tracked).
    specs.push(KeySpec::new("encoder.mid.attn_1.k.bias", &[512]));
    specs.push(KeySpec::new(
        "encoder.down.0.attn.0.q.weight",
        &[128, 128, 1, 1],
    ));
    let path = dir.join("extra.safetensors");
    write_zero_checkpoint(&path, &specs, StorageDtype::F32).unwrap();
    let message = check_ae_checkpoint(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("encoder.down.0.attn.0.q.weight"),
        "{message}"
    );

    // A diffusers-format VAE is recognised as such.
    let path = dir.join("diffusers.safetensors");
    let diffusers = [KeySpec::new(
        "encoder.down_blocks.0.resnets.0.conv1.weight",
        &[128, 128, 3, 3],
    )];
    write_zero_checkpoint(&path, &diffusers, StorageDtype::F32).unwrap();
    let message = check_ae_checkpoint(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(message.contains("diffusers"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn group_count_comes_from_the_override_file() {
    // ch 48 with ch_mult [1, 2]: 48 channels do not divide into 32 groups.
    let config = AeConfig {
        ch: 48,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        num_groups: 16,
        ..AeConfig::real()
    };
    let dir = temp_dir("groups");
    let path = dir.join("ae.safetensors");
    write_zero_checkpoint(&path, &config.expected_keys(), StorageDtype::F32).unwrap();
    let message = check_ae_checkpoint(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("48 channels") && message.contains(CONFIG_FILE_NAME),
        "{message}"
    );

    std::fs::write(dir.join(CONFIG_FILE_NAME), r#"{"num_groups": 16}"#).unwrap();
    let inferred = check_ae_checkpoint(&Checkpoint::open(&path).unwrap()).unwrap();
    assert_eq!(inferred, config);

    std::fs::write(dir.join(CONFIG_FILE_NAME), r#"{"groups": 16}"#).unwrap();
    let message = check_ae_checkpoint(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(CONFIG_FILE_NAME) && message.contains("num_groups"),
        "{message}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
