//! `train` with the memory flags of issue 9 on the tiny golden dev model (its linears are 64 wide,
//! so fp8 uses Musubi's one scale per 64 inputs): `--fp8_base --fp8_scaled` and
//! `--gradient_checkpointing --gradient_checkpointing_cpu_offload` train and save a LoRA; offload
//! saves the same LoRA as checkpointing on the device; invalid combinations are refused with the
//! reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;

mod common;
use common::{cache_for, command, golden, make_dataset, run, strings, train_command, TWO_SQUARES};

/// Two 64x64 images with captions and a dataset TOML in `dir`, cached for dev.
fn make_cached_dataset(dir: &Path) -> PathBuf {
    let config = make_dataset(dir, &TWO_SQUARES);
    cache_for(&config, "dev", "dev");
    config
}

/// Two bf16 training steps into `out/lora.safetensors`, plus `extra` flags.
fn train_args(config: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let dit = golden().join("dev/dit.safetensors");
    let mut args = train_command("dev", &dit, config, out);
    args.extend(strings(&[
        "--output_name",
        "lora",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--network_dim",
        "4",
        "--network_alpha",
        "4",
        "--mixed_precision",
        "bf16",
        "--seed",
        "5",
    ]));
    args.extend(strings(extra));
    args
}

/// The final loss `train` prints.
fn final_loss(output: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = stdout
        .split("final loss ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no final loss in {stdout}"));
    text.trim().parse().unwrap()
}

/// A LoRA file's tensors as f32 values, sorted by key.
type LoraValues = Vec<(String, Vec<f32>)>;

/// Every tensor of a LoRA file as f32 values, by key, and its metadata.
fn lora(path: &Path) -> (LoraValues, BTreeMap<String, String>) {
    let file = Checkpoint::open(path).unwrap();
    let mut keys: Vec<String> = file.keys().map(str::to_string).collect();
    keys.sort();
    let tensors = keys
        .into_iter()
        .map(|key| {
            let values = file
                .load(&key, DType::F32, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (key, values)
        })
        .collect();
    let metadata = file.metadata().clone();
    (tensors, metadata)
}

#[test]
fn fp8_and_activation_offload_train_a_lora() {
    let dir = std::env::temp_dir().join(format!("flux2-train-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_cached_dataset(&dir);

    let plain = run(&train_args(&config, &dir.join("plain"), &[]));
    let fp8 = run(&train_args(
        &config,
        &dir.join("fp8"),
        &["--fp8_base", "--fp8_scaled"],
    ));
    let checkpointed = run(&train_args(
        &config,
        &dir.join("checkpointed"),
        &["--gradient_checkpointing"],
    ));
    let offloaded = run(&train_args(
        &config,
        &dir.join("offloaded"),
        &[
            "--gradient_checkpointing",
            "--gradient_checkpointing_cpu_offload",
        ],
    ));

    // fp8: a LoRA with finite values, a finite loss close to (but not the same as) bf16's.
    let (plain_loss, fp8_loss) = (final_loss(&plain), final_loss(&fp8));
    println!("final loss after 2 steps: bf16 {plain_loss}, fp8 {fp8_loss}");
    assert!(fp8_loss.is_finite());
    assert!(((fp8_loss - plain_loss) / plain_loss).abs() < 0.05);
    assert_ne!(fp8_loss, plain_loss, "fp8 weights changed nothing");
    let (fp8_tensors, fp8_metadata) = lora(&dir.join("fp8/lora.safetensors"));
    assert!(!fp8_tensors.is_empty());
    assert!(fp8_tensors
        .iter()
        .all(|(_, values)| values.iter().all(|v| v.is_finite())));
    assert_eq!(fp8_metadata["ss_fp8_base"], "True");

    // Offload: the same LoRA as checkpointing on the device, bit for bit.
    assert_eq!(final_loss(&offloaded), final_loss(&checkpointed));
    let (offloaded_tensors, offloaded_metadata) = lora(&dir.join("offloaded/lora.safetensors"));
    let (checkpointed_tensors, _) = lora(&dir.join("checkpointed/lora.safetensors"));
    assert_eq!(offloaded_tensors, checkpointed_tensors);
    assert_eq!(
        offloaded_metadata["ss_gradient_checkpointing_cpu_offload"],
        "True"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_memory_flag_combinations_are_refused() {
    let dir =
        std::env::temp_dir().join(format!("flux2-train-memory-refused-{}", std::process::id()));
    let config = dir.join("unused.toml");
    for (flags, expected) in [
        (&["--fp8_scaled"][..], "--fp8_scaled needs --fp8_base"),
        (&["--fp8_base"][..], "--fp8_base without --fp8_scaled"),
        (
            &["--gradient_checkpointing_cpu_offload"][..],
            "--gradient_checkpointing_cpu_offload needs --gradient_checkpointing",
        ),
    ] {
        let output = command(&train_args(&config, &dir, flags));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
    assert!(!dir.exists(), "a refused run wrote output");
}
