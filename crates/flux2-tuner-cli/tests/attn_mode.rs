//! `--attn_mode` on generate and train (Musubi's names) and train's `--sdpa` / `--flash_attn`
//! switches: the accepted names, the refusals and their messages, and `flash` on the CPU giving
//! the composed attention's image.

use std::path::{Path, PathBuf};

mod common;
use common::{command, golden, strings, temp_dir, text};

/// A klein generation on the tiny golden model, 64x64, 2 steps, on the CPU.
fn generate_args(out: &Path, attn_mode: &str) -> Vec<String> {
    let g = golden();
    let path = |p: &str| g.join(p).display().to_string();
    strings(&[
        "generate",
        "--model_version",
        "klein-4b",
        "--dit",
        &path("klein/dit.safetensors"),
        "--vae",
        &path("ae.safetensors"),
        "--text_encoder",
        &path("klein/text_encoder/model.safetensors"),
        "--image_size",
        "64",
        "64",
        "--infer_steps",
        "2",
        "--seed",
        "3",
        "--prompt",
        "a red fox",
        "--device",
        "cpu",
        "--attn_mode",
        attn_mode,
        "--save_path",
        &out.display().to_string(),
    ])
}

fn only_png(dir: &Path) -> Vec<u8> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let image = image::open(&files[0]).unwrap().to_rgb8();
    image.into_raw()
}

fn assert_fails_with(args: &[String], needles: &[&str]) {
    let output = command(args);
    let message = text(&output);
    assert!(!output.status.success(), "{args:?} succeeded:\n{message}");
    for needle in needles {
        assert!(message.contains(needle), "{needle:?} not in:\n{message}");
    }
}

/// `torch`, `sdpa` and `flash` (composed on the CPU) give the same pixels; `flash` says why.
#[test]
fn generate_accepts_musubi_names_and_flash_falls_back_on_the_cpu() {
    let mut images = Vec::new();
    for mode in ["torch", "sdpa", "flash"] {
        let out = temp_dir("attn", &format!("generate-{mode}"));
        let output = command(&generate_args(&out, mode));
        let message = text(&output);
        assert!(output.status.success(), "--attn_mode {mode}:\n{message}");
        assert_eq!(
            message.contains("the CPU uses the composed attention"),
            mode == "flash",
            "{message}"
        );
        images.push(only_png(&out));
    }
    assert_eq!(images[0], images[1]);
    assert_eq!(images[0], images[2]);
}

#[test]
fn generate_refuses_unavailable_attention() {
    let out = temp_dir("attn", "generate-refused");
    for mode in ["xformers", "sageattn"] {
        assert_fails_with(
            &generate_args(&out, mode),
            &[&format!("--attn_mode {mode}"), "not available"],
        );
    }
    assert_fails_with(
        &generate_args(&out, "flash3"),
        &["--attn_mode", "flash3", "not one of torch, sdpa, flash"],
    );
}

/// Train checks the attention flags before anything is loaded.
#[test]
fn train_resolves_attn_mode_and_musubi_switches() {
    let out = temp_dir("attn", "train");
    let base = |extra: &[&str]| {
        let mut args = strings(&[
            "train",
            "--model_version",
            "klein-base-4b",
            "--dit",
            &golden().join("klein/dit.safetensors").display().to_string(),
            "--dataset_config",
            &out.join("missing.toml").display().to_string(),
            "--output_dir",
            &out.display().to_string(),
            "--output_name",
            "lora",
            "--network_dim",
            "4",
            "--max_train_steps",
            "1",
        ]);
        args.extend(strings(extra));
        args
    };
    assert_fails_with(
        &base(&["--sdpa", "--flash_attn"]),
        &["--sdpa and --flash_attn"],
    );
    assert_fails_with(
        &base(&["--attn_mode", "torch", "--flash_attn"]),
        &["--attn_mode torch contradicts --flash_attn"],
    );
    assert_fails_with(
        &base(&["--attn_mode", "flash", "--sdpa"]),
        &["--attn_mode flash contradicts --sdpa"],
    );
    assert_fails_with(
        &base(&["--attn_mode", "sageattn"]),
        &["--attn_mode sageattn", "not available"],
    );
    // Accepted combinations get past the attention check and stop at the missing dataset file.
    for extra in [
        &["--attn_mode", "flash", "--flash_attn"][..],
        &["--attn_mode", "sdpa"],
        &["--sdpa"],
        &["--flash_attn"],
        &[],
    ] {
        let output = command(&base(extra));
        let message = text(&output);
        assert!(!output.status.success());
        assert!(
            message.contains("missing.toml")
                && !message.contains("contradicts")
                && !message.contains("not available")
                && !message.contains("choose one"),
            "{extra:?}:\n{message}"
        );
        // On the CPU, flash says that it runs the composed attention.
        let flash = extra.contains(&"flash") || extra.contains(&"--flash_attn");
        assert_eq!(
            message.contains("the CPU uses the composed attention"),
            flash,
            "{extra:?}:\n{message}"
        );
    }
}
