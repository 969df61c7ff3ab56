//! Helpers shared by the CLI end-to-end tests: the golden fixture folder, running the binary,
//! the tiny image dataset, the cache commands, the usual training arguments and the TensorBoard
//! scalars read back.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flux2_tuner::train::log::read_scalars;

/// The two colours of the usual two-image dataset.
pub const TWO_SQUARES: [[u8; 3]; 2] = [[200, 40, 40], [40, 40, 200]];

pub fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

/// A fresh, empty folder `flux2-{prefix}-{name}-{pid}` in the temp folder.
pub fn temp_dir(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the binary, whatever its exit status.
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flux2-tuner"))
        .args(args)
        .output()
        .unwrap()
}

/// Stdout then stderr of a run.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the binary and asserts that it succeeded.
pub fn run<S: AsRef<OsStr> + Debug>(args: &[S]) -> Output {
    let output = command(args);
    assert!(
        output.status.success(),
        "{:?} failed:\n{}",
        args,
        text(&output)
    );
    output
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// 64x64 images of the given colours with captions, and a dataset TOML (bucketing on), in `dir`;
/// caches go to `dir/cache`.
pub fn make_dataset(dir: &Path, colours: &[[u8; 3]]) -> PathBuf {
    make_dataset_with_buckets(dir, colours, true)
}

/// As `make_dataset`, with `enable_bucket` written only when `buckets` is set.
pub fn make_dataset_with_buckets(dir: &Path, colours: &[[u8; 3]], buckets: bool) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (index, colour) in colours.iter().enumerate() {
        let image = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([
                colour[0].wrapping_add((x * 2) as u8),
                colour[1].wrapping_add((y * 2) as u8),
                colour[2],
            ])
        });
        image.save(images.join(format!("item{index}.png"))).unwrap();
        std::fs::write(
            images.join(format!("item{index}.txt")),
            format!("a square number {index}"),
        )
        .unwrap();
    }
    let config = dir.join("dataset.toml");
    std::fs::write(
        &config,
        format!(
            "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\nbatch_size = 1\n{}\n\
             [[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\nnum_repeats = 1\n",
            if buckets {
                "enable_bucket = true\n"
            } else {
                ""
            },
            images.display(),
            dir.join("cache").display()
        ),
    )
    .unwrap();
    config
}

/// The cache-latents command for a dataset of `model_version`, with the golden AE.
pub fn cache_latents_args(config: &Path, model_version: &str) -> Vec<String> {
    let mut args = strings(&[
        "cache-latents",
        "--model_version",
        model_version,
        "--dataset_config",
    ]);
    args.push(config.display().to_string());
    args.push("--vae".into());
    args.push(golden().join("ae.safetensors").display().to_string());
    args
}

/// The cache-text-encoder-outputs command for a dataset of `model_version`, with the golden text
/// encoder in `golden/{model_folder}/text_encoder`.
pub fn cache_text_encoder_args(
    config: &Path,
    model_version: &str,
    model_folder: &str,
) -> Vec<String> {
    let mut args = strings(&[
        "cache-text-encoder-outputs",
        "--model_version",
        model_version,
        "--dataset_config",
    ]);
    args.push(config.display().to_string());
    args.push("--text_encoder".into());
    args.push(
        golden()
            .join(model_folder)
            .join("text_encoder/model.safetensors")
            .display()
            .to_string(),
    );
    args
}

/// Runs cache-latents and cache-text-encoder-outputs on a klein dataset.
pub fn cache(config: &Path) {
    cache_for(config, "klein-base-4b", "klein");
}

/// Runs cache-latents and cache-text-encoder-outputs on a dataset of `model_version`, with the
/// golden text encoder of `model_folder`.
pub fn cache_for(config: &Path, model_version: &str, model_folder: &str) {
    run(&cache_latents_args(config, model_version));
    run(&cache_text_encoder_args(
        config,
        model_version,
        model_folder,
    ));
}

/// The start of every `train` command: model version, DiT, dataset config and output folder.
pub fn train_command(model_version: &str, dit: &Path, config: &Path, out: &Path) -> Vec<String> {
    let mut args = strings(&["train", "--model_version", model_version, "--dit"]);
    args.push(dit.display().to_string());
    args.push("--dataset_config".into());
    args.push(config.display().to_string());
    args.push("--output_dir".into());
    args.push(out.display().to_string());
    args
}

/// A klein LoRA training of `steps` steps at a fixed timestep (500), logging to `out/logs`.
pub fn train_args(config: &Path, out: &Path, steps: usize) -> Vec<String> {
    let dit = golden().join("klein/dit.safetensors");
    let mut args = train_command("klein-base-4b", &dit, config, out);
    args.extend(strings(&[
        "--output_name",
        "e2e",
        "--max_train_steps",
        &steps.to_string(),
        "--learning_rate",
        "3e-3",
        "--network_dim",
        "4",
        "--network_alpha",
        "4",
        "--optimizer_type",
        "AdamW",
        "--mixed_precision",
        "no",
        "--timestep_sampling",
        "sigma",
        "--min_timestep",
        "500",
        "--max_timestep",
        "500",
        "--seed",
        "3",
        "--logging_dir",
    ]));
    args.push(out.join("logs").display().to_string());
    args
}

/// The scalars of `tag` in the TensorBoard events of a log folder, by step.
pub fn scalars(dir: &Path, tag: &str) -> Vec<(u64, f32)> {
    let mut values = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents")
        {
            values.extend(
                read_scalars(&path)
                    .unwrap()
                    .into_iter()
                    .filter(|s| s.tag == tag)
                    .map(|s| (s.step, s.value)),
            );
        }
    }
    values.sort_by_key(|(step, _)| *step);
    values
}

/// The `loss/current` values of a log folder, in step order.
pub fn losses(dir: &Path) -> Vec<f32> {
    scalars(dir, "loss/current")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}
