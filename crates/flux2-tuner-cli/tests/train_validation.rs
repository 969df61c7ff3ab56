//! `train --validation_dataset_config` end to end on the tiny golden models: a held-out dataset
//! is cached like the training one, its loss is logged as `loss/validation` (TensorBoard and
//! JSONL) on the step and epoch schedule, printed, and the training losses are those of a run
//! without validation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

#[test]
fn validation_loss_is_logged_and_leaves_training_unchanged() {
    let dir = std::env::temp_dir().join(format!("flux2-e2e-validation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_dataset(&dir.join("train"), &[[200, 40, 40], [40, 40, 200]]);
    let held_out = make_dataset(&dir.join("held_out"), &[[40, 200, 40], [120, 120, 30]]);
    cache(&config);
    cache(&held_out);

    // Two items, batch size 1: two steps per epoch, so epochs end at steps 2 and 4.
    let plain = dir.join("plain");
    run(&train_args(&config, &plain, 4));
    let validated = dir.join("validated");
    let mut args = train_args(&config, &validated, 4);
    args.extend(strings(&["--validation_dataset_config"]));
    args.push(held_out.display().to_string());
    args.extend(strings(&[
        "--validate_every_n_steps",
        "3",
        "--validation_timesteps",
        "300,700",
    ]));
    let output = run(&args);

    // Training is not disturbed: the same losses, bit for bit.
    let plain_losses = losses(&plain.join("logs"));
    assert_eq!(plain_losses.len(), 4);
    assert_eq!(losses(&validated.join("logs")), plain_losses);

    // Validation after step 3 (every 3 steps) and at the ends of epochs 1 and 2 (steps 2, 4),
    // once each, in the events file and the JSONL log.
    let events = scalars(&validated.join("logs"), "loss/validation");
    assert_eq!(
        events.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert!(
        events.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
        "{events:?}"
    );
    // The LoRA trains between evaluations, so the fixed-noise loss moves.
    assert!(events[0].1 != events[2].1, "{events:?}");
    let jsonl = std::fs::read_to_string(validated.join("logs/e2e.jsonl")).unwrap();
    let logged: Vec<(u64, f64)> = jsonl
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|line| {
            Some((
                line["step"].as_u64()?,
                line.get("loss/validation")?.as_f64()?,
            ))
        })
        .collect();
    assert_eq!(logged.len(), 3, "{jsonl}");
    for ((step, value), (event_step, event_value)) in logged.iter().zip(&events) {
        assert_eq!(step, event_step);
        assert_eq!(*value as f32, *event_value);
    }
    let printed = String::from_utf8_lossy(&output.stderr);
    assert!(
        printed.contains("step 3: validation loss"),
        "not printed:\n{printed}"
    );

    // A schedule flag without the dataset is refused, naming the flag it needs.
    let mut orphan = train_args(&config, &dir.join("orphan"), 1);
    orphan.extend(strings(&["--validate_every_n_steps", "2"]));
    let refused = Command::new(env!("CARGO_BIN_EXE_flux2-tuner"))
        .args(&orphan)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--validation_dataset_config"));
}
