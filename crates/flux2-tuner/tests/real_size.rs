//! Real-size layouts: the key/shape table of every real DiT checkpoint (dev 299 tensors, klein-9B
//! 201, klein-4B 149; spec §2) is written as a real safetensors header over a sparse all-zero file
//! and validated by the loader, including the version checks.

use std::path::PathBuf;

use flux2_tuner::checkpoint::{write_zero_checkpoint, Checkpoint, StorageDtype};
use flux2_tuner::models::dit::check_dit_checkpoint;
use flux2_tuner::models::ModelVersion;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-tuner-real-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn real_checkpoint_layouts_validate_and_versions_are_told_apart() {
    let dir = temp_dir("layouts");
    for (version, tensors, parameters) in [
        (ModelVersion::Dev, 299, 32_223_281_152usize),
        (ModelVersion::Klein9b, 201, 9_078_581_248),
        (ModelVersion::Klein4b, 149, 3_875_544_576),
    ] {
        let path = dir.join(format!("{}.safetensors", version.name()));
        let specs = version.info().dit.expected_keys();
        let bytes = write_zero_checkpoint(&path, &specs, StorageDtype::BF16).unwrap();
        assert!(bytes > 2 * parameters as u64, "{bytes}");
        let checkpoint = Checkpoint::open(&path).unwrap();
        assert_eq!(checkpoint.len(), tensors);
        let config = check_dit_checkpoint(&checkpoint, Some(version)).unwrap();
        assert_eq!(config, version.info().dit);
        assert_eq!(config.parameter_count(), parameters);

        // Every other version is refused with a message naming what the file looks like.
        for other in ModelVersion::ALL {
            let same_architecture = other.info().dit == version.info().dit;
            let result = check_dit_checkpoint(&checkpoint, Some(other));
            if same_architecture {
                assert!(result.is_ok(), "{version} weights refused as {other}");
            } else {
                let message = result.unwrap_err().to_string();
                assert!(
                    message.contains(&format!("not {}", other.name()))
                        && message.contains(version.name()),
                    "{message}"
                );
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// A real-size file with one tensor of the wrong shape is refused before anything is loaded.
#[test]
fn real_layout_with_a_wrong_shape_is_refused() {
    let dir = temp_dir("wrong-shape");
    let mut specs = ModelVersion::Klein4b.info().dit.expected_keys();
    let target = specs
        .iter_mut()
        .find(|s| s.key == "single_blocks.7.linear1.weight")
        .unwrap();
    target.shape = vec![27648, 3071];
    let path = dir.join("flux-2-klein-4b.safetensors");
    write_zero_checkpoint(&path, &specs, StorageDtype::BF16).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let message = check_dit_checkpoint(&checkpoint, Some(ModelVersion::Klein4b))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("single_blocks.7.linear1.weight") && message.contains("[27648, 3071]"),
        "{message}"
    );
}
