//! `train --caption_dropout_rate` end to end on the tiny golden models: the cache job writes the
//! empty-prompt embedding (the text encoder's output for ""), dropping every caption trains
//! exactly as a dataset whose captions are all empty, rate 0 changes nothing, a resumed run drops
//! the same items, and a missing embedding is an error naming the command that writes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::data::empty_prompt::empty_prompt_cache_path;
use flux2_tuner::models::text::encoder::{TextEncoder, TextEncoderOptions};
use flux2_tuner::models::ModelVersion;
use flux2_tuner::train::log::read_scalars;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

fn run(args: &[String]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_flux2-tuner"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{:?} failed:\n{}{}",
        args,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// 64x64 images of the given colours with captions, and a dataset TOML, in `dir`; caches go to
/// `dir/cache`.
fn make_dataset(dir: &Path, colours: &[[u8; 3]]) -> PathBuf {
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
            "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\nbatch_size = 1\nenable_bucket = true\n\n\
             [[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\nnum_repeats = 1\n",
            images.display(),
            dir.join("cache").display()
        ),
    )
    .unwrap();
    config
}

/// Runs cache-latents and cache-text-encoder-outputs on a dataset.
fn cache(config: &Path) {
    let g = golden();
    let mut latents = strings(&[
        "cache-latents",
        "--model_version",
        "klein-base-4b",
        "--dataset_config",
    ]);
    latents.push(config.display().to_string());
    latents.push("--vae".into());
    latents.push(g.join("ae.safetensors").display().to_string());
    run(&latents);
    let mut text = strings(&[
        "cache-text-encoder-outputs",
        "--model_version",
        "klein-base-4b",
        "--dataset_config",
    ]);
    text.push(config.display().to_string());
    text.push("--text_encoder".into());
    text.push(
        g.join("klein/text_encoder/model.safetensors")
            .display()
            .to_string(),
    );
    run(&text);
}

fn train_args(config: &Path, out: &Path, steps: usize) -> Vec<String> {
    let g = golden();
    let mut args = strings(&["train", "--model_version", "klein-base-4b", "--dit"]);
    args.push(g.join("klein/dit.safetensors").display().to_string());
    args.extend(strings(&["--dataset_config"]));
    args.push(config.display().to_string());
    args.extend(strings(&["--output_dir"]));
    args.push(out.display().to_string());
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
fn scalars(dir: &Path, tag: &str) -> Vec<(u64, f32)> {
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

fn losses(dir: &Path) -> Vec<f32> {
    scalars(dir, "loss/current")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

fn values(tensor: &candle_core::Tensor) -> Vec<f32> {
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn caption_dropout_trains_on_the_cached_empty_prompt() {
    let dir = std::env::temp_dir().join(format!("flux2-e2e-dropout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_dataset(&dir, &[[200, 40, 40], [40, 40, 200]]);
    cache(&config);

    // 1. The empty-prompt file holds the text encoder's output for "" (bf16, as every text cache).
    let empty_file = empty_prompt_cache_path(&dir.join("cache"), "f2k4b");
    assert_eq!(
        empty_file.file_name().unwrap().to_string_lossy(),
        "empty_prompt.f2k4b_te.safetensors"
    );
    let cached = Checkpoint::open(&empty_file).unwrap();
    assert_eq!(cached.metadata()["caption1"], "");
    let cached = cached
        .load("ctx_vec_bfloat16", DType::BF16, &Device::Cpu)
        .unwrap();
    let info: ModelVersion = "klein-base-4b".parse().unwrap();
    let info = info.info();
    let encoder = TextEncoder::load(
        &golden().join("klein/text_encoder/model.safetensors"),
        info.text_encoder,
        &TextEncoderOptions::new(info.text_encoder, Device::Cpu, DType::BF16),
    )
    .unwrap();
    let direct = encoder
        .encode(&[""])
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .get(0)
        .unwrap();
    assert_eq!(cached.dims(), direct.dims());
    assert_eq!(cached.dims()[0], 512);
    assert_eq!(values(&cached), values(&direct));

    // 2. Rate 0 is the run without the flag, bit for bit.
    let plain = dir.join("plain");
    run(&train_args(&config, &plain, 4));
    let plain_losses = losses(&plain.join("logs"));
    assert_eq!(plain_losses.len(), 4);
    let zero = dir.join("zero");
    let mut zero_args = train_args(&config, &zero, 4);
    zero_args.extend(strings(&["--caption_dropout_rate", "0"]));
    run(&zero_args);
    assert_eq!(losses(&zero.join("logs")), plain_losses);

    // 3. Rate 1 is training on a copy of the dataset whose text caches are all the empty prompt.
    let all = dir.join("all");
    let mut all_args = train_args(&config, &all, 4);
    all_args.extend(strings(&["--caption_dropout_rate", "1"]));
    run(&all_args);
    let all_losses = losses(&all.join("logs"));
    let empty_copy = dir.join("empty_copy");
    std::fs::create_dir_all(empty_copy.join("cache")).unwrap();
    for entry in std::fs::read_dir(dir.join("cache")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let source = if name.ends_with("_f2k4b_te.safetensors") {
            empty_file.clone()
        } else {
            path.clone()
        };
        std::fs::copy(&source, empty_copy.join("cache").join(&name)).unwrap();
    }
    let copy_config = empty_copy.join("dataset.toml");
    std::fs::write(
        &copy_config,
        std::fs::read_to_string(&config).unwrap().replace(
            &dir.join("cache").display().to_string(),
            &empty_copy.join("cache").display().to_string(),
        ),
    )
    .unwrap();
    let on_empty = dir.join("on_empty");
    run(&train_args(&copy_config, &on_empty, 4));
    assert_eq!(all_losses, losses(&on_empty.join("logs")));
    assert_ne!(all_losses, plain_losses);

    // 4. Rate 0.5: some items dropped, and a run resumed at step 2 drops the same ones.
    let half = dir.join("half");
    let mut half_args = train_args(&config, &half, 4);
    half_args.extend(strings(&[
        "--caption_dropout_rate",
        "0.5",
        "--save_every_n_steps",
        "2",
        "--save_state",
    ]));
    run(&half_args);
    let half_losses = losses(&half.join("logs"));
    assert_ne!(half_losses, plain_losses);
    assert_ne!(half_losses, all_losses);
    let resumed = dir.join("resumed");
    let mut resumed_args = train_args(&config, &resumed, 4);
    resumed_args.extend(strings(&["--caption_dropout_rate", "0.5", "--resume"]));
    resumed_args.push(half.join("e2e-step00000002-state").display().to_string());
    run(&resumed_args);
    assert_eq!(losses(&resumed.join("logs")), half_losses[2..]);

    // 5. Without the empty-prompt file the run stops before training and says what to run.
    std::fs::remove_file(empty_copy.join("cache/empty_prompt.f2k4b_te.safetensors")).unwrap();
    let mut missing = train_args(&copy_config, &dir.join("missing"), 1);
    missing.extend(strings(&["--caption_dropout_rate", "0.1"]));
    let refused = Command::new(env!("CARGO_BIN_EXE_flux2-tuner"))
        .args(&missing)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("empty_prompt.f2k4b_te.safetensors")
            && message.contains("cache-text-encoder-outputs"),
        "{message}"
    );
}
