//! `--blocks_to_swap` through the binary. The tiny golden models (2 + 2 and 2 + 3 blocks) cannot
//! swap under Musubi's `n − 2` rule, so these tests write a random klein-like DiT with 4 double and
//! 6 single blocks (maximum N = 4) that fits the golden klein text encoder and AE. On the CPU each
//! upload is a real copy, so the swapped runs go through the whole copy schedule.

use std::path::{Path, PathBuf};

use candle_core::DType;
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::DitConfig;

mod common;
use common::{
    cache, command, golden, losses, make_dataset_with_buckets, run, strings, temp_dir, text,
    train_command, TWO_SQUARES,
};

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A klein-shaped DiT (hidden 72, 3 heads, context 120 = the golden klein TE) with 4 + 6 blocks.
fn write_dit(dir: &Path) -> PathBuf {
    let config = DitConfig {
        in_channels: 128,
        context_in_dim: 120,
        hidden_size: 72,
        num_heads: 3,
        depth: 4,
        depth_single_blocks: 6,
        mlp_hidden_size: 216,
        axes_dim: [6, 6, 6, 6],
        theta: 2000.0,
        guidance_embed: false,
    };
    let file = dir.join("dit.safetensors");
    write_random_dit(&config, &file, 17, DType::BF16).unwrap();
    file
}

fn generate_args(dit: &Path, out: &Path) -> Vec<String> {
    let g = golden();
    let mut args = strings(&["generate", "--model_version", "klein-4b", "--dit"]);
    args.push(path(dit));
    args.push("--vae".into());
    args.push(path(&g.join("ae.safetensors")));
    args.push("--text_encoder".into());
    args.push(path(&g.join("klein/text_encoder/model.safetensors")));
    args.extend(strings(&[
        "--image_size",
        "64",
        "96",
        "--seed",
        "7",
        "--prompt",
        "a red fox",
        "--device",
        "cpu",
        "--save_path",
    ]));
    args.push(path(out));
    args
}

fn png_pixels(dir: &Path) -> Vec<u8> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    image::open(&files[0]).unwrap().to_rgb8().into_raw()
}

#[test]
fn generate_with_swap_gives_the_same_pixels() {
    let dir = temp_dir("swap", "generate");
    let dit = write_dit(&dir);
    let plain = dir.join("plain");
    run(&generate_args(&dit, &plain));
    // N = 3 swaps 2 double + 3 single blocks.
    let swapped = dir.join("swapped");
    let mut args = generate_args(&dit, &swapped);
    args.extend(strings(&["--blocks_to_swap", "3"]));
    let output = run(&args);
    assert!(
        text(&output).contains("2 double + 3 single blocks in host memory"),
        "{}",
        text(&output)
    );
    let pixels = png_pixels(&plain);
    assert!(pixels.iter().any(|&p| p != pixels[0]), "a flat image");
    assert_eq!(png_pixels(&swapped), pixels);

    // Too many: the error names the model's maximum.
    let mut args = generate_args(&dit, &dir.join("too-many"));
    args.extend(strings(&["--blocks_to_swap", "5"]));
    let output = command(&args);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("--blocks_to_swap")
            && text(&output).contains("maximum for this model is 4"),
        "{}",
        text(&output)
    );
    let mut args = generate_args(&dit, &dir.join("pinned"));
    args.extend(strings(&[
        "--blocks_to_swap",
        "2",
        "--use_pinned_memory_for_block_swap",
    ]));
    let output = command(&args);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("--use_pinned_memory_for_block_swap"),
        "{}",
        text(&output)
    );
}

#[test]
fn generate_fp8_with_swap_gives_the_fp8_pixels() {
    let dir = temp_dir("swap", "generate-fp8");
    let dit = write_dit(&dir);
    let dense = dir.join("dense");
    run(&generate_args(&dit, &dense));
    let fp8 = dir.join("fp8");
    let mut args = generate_args(&dit, &fp8);
    args.push("--fp8_scaled".into());
    run(&args);
    let swapped = dir.join("fp8-swapped");
    let mut args = generate_args(&dit, &swapped);
    args.extend(strings(&["--fp8_scaled", "--blocks_to_swap", "3"]));
    let output = run(&args);
    assert!(
        text(&output).contains("2 double + 3 single blocks in host memory"),
        "{}",
        text(&output)
    );
    let pixels = png_pixels(&fp8);
    // fp8 changed the weights (so it was applied), and the swapped run used the same weights.
    assert_ne!(pixels, png_pixels(&dense), "--fp8_scaled changed nothing");
    assert_eq!(png_pixels(&swapped), pixels);
}

/// Two 64x64 images with captions and a dataset TOML, cached with the golden klein TE and AE.
fn cached_dataset(dir: &Path) -> PathBuf {
    let config = make_dataset_with_buckets(dir, &TWO_SQUARES, false);
    cache(&config);
    config
}

fn train_args(dit: &Path, config: &Path, out: &Path) -> Vec<String> {
    let mut args = train_command("klein-base-4b", dit, config, out);
    args.extend(strings(&[
        "--output_name",
        "swap",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "3e-3",
        "--network_dim",
        "4",
        "--network_alpha",
        "4",
        "--mixed_precision",
        "no",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--logging_dir",
    ]));
    args.push(path(&out.join("logs")));
    args
}

fn train(dit: &Path, config: &Path, out: &Path, extra: &[&str]) -> Vec<f32> {
    let mut args = train_args(dit, config, out);
    args.extend(strings(extra));
    run(&args);
    let losses = losses(&out.join("logs"));
    assert_eq!(losses.len(), 2, "{out:?}");
    losses
}

#[test]
fn train_with_swap_gives_the_same_losses() {
    let dir = temp_dir("swap", "train");
    let dit = write_dit(&dir);
    let config = cached_dataset(&dir);
    let checkpointed = train(
        &dit,
        &config,
        &dir.join("checkpointed"),
        &["--gradient_checkpointing"],
    );
    let swapped = train(
        &dit,
        &config,
        &dir.join("swapped"),
        &["--gradient_checkpointing", "--blocks_to_swap", "4"],
    );
    assert_eq!(swapped, checkpointed);
    // Without checkpointing a swapping step runs block-wise (the weights come back in reverse
    // order for the backward): the checkpointed losses again, bit for bit, and the full-graph
    // losses up to summation order.
    let swapped_full = train(
        &dit,
        &config,
        &dir.join("swapped-full"),
        &["--blocks_to_swap", "1"],
    );
    assert_eq!(swapped_full, checkpointed);
    let full = train(&dit, &config, &dir.join("full"), &[]);
    for (a, b) in full.iter().zip(&checkpointed) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{full:?} vs {checkpointed:?}"
        );
    }

    let mut args = train_args(&dit, &config, &dir.join("too-many"));
    args.extend(strings(&["--blocks_to_swap", "5"]));
    let output = command(&args);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("maximum for this model is 4"),
        "{}",
        text(&output)
    );
    for flag in [
        "--use_pinned_memory_for_block_swap",
        "--block_swap_h2d_only",
    ] {
        let mut args = train_args(&dit, &config, &dir.join("refused"));
        args.extend(strings(&["--blocks_to_swap", "2", flag]));
        let output = command(&args);
        assert!(!output.status.success());
        assert!(text(&output).contains(flag), "{}", text(&output));
    }
}
