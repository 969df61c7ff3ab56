//! `flux2-tuner plan` and `--dry_run`: the output form (phases, lines, peak, fit verdict,
//! suggestion as flags), the dataset config read for `train --dry_run`, and the errors.

mod common;
use common::{command, temp_dir};

fn stdout_of(args: &[&str]) -> String {
    let output = command(args);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The GiB value printed on the first line containing `text`.
fn gib_on(output: &str, text: &str) -> f64 {
    let line = output
        .lines()
        .find(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no line with `{text}` in\n{output}"));
    line.split_whitespace()
        .zip(line.split_whitespace().skip(1))
        .find(|(_, unit)| *unit == "GiB")
        .map(|(value, _)| value.parse().unwrap())
        .unwrap()
}

#[test]
fn dev_training_on_24_gb_suggests_checkpointing_fp8_and_swap() {
    let output = stdout_of(&[
        "plan",
        "train",
        "--model_version",
        "dev",
        "--resolution",
        "1024",
        "1024",
        "--network_dim",
        "16",
        "--optimizer_type",
        "AdamW",
        "--device",
        "cuda",
        "--vram_gb",
        "24",
    ]);
    assert!(output.starts_with("memory plan: training dev LoRA rank 16 with AdamW, 1024x1024 batch 1 (4096 image + 0 control + 512 text tokens)"), "{output}");
    assert!(output.contains("phase: training step: "), "{output}");
    assert!(output.contains("phase: cache-text-encoder-outputs (separate command): "));
    // 32 223 281 152 bf16 parameters.
    assert_eq!(gib_on(&output, "DiT weights, bf16 (299 tensors)"), 60.02);
    assert!(output.contains("fits: no, "), "{output}");
    let suggestion = output
        .lines()
        .find(|l| l.starts_with("suggestion: add "))
        .unwrap_or_else(|| panic!("no suggestion in\n{output}"));
    assert!(
        suggestion.starts_with(
            "suggestion: add --gradient_checkpointing --fp8_base --fp8_scaled --blocks_to_swap "
        ),
        "{suggestion}"
    );
}

#[test]
fn dry_run_reads_the_dataset_config_and_loads_nothing() {
    let dir = temp_dir("cli-plan", "dataset");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let config = dir.join("dataset.toml");
    std::fs::write(
        &config,
        format!(
            "[general]\nresolution = [512, 768]\nbatch_size = 2\n\n[[datasets]]\nimage_directory = {:?}\ncache_directory = {:?}\n",
            dir.join("images"),
            dir.join("cache")
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    // The DiT file does not exist: the plan uses the version table and says so.
    let output = stdout_of(&[
        "train",
        "--dry_run",
        "--model_version",
        "klein-4b",
        "--dit",
        "/nonexistent/flux-2-klein-4b.safetensors",
        "--dataset_config",
        &config,
        "--network_dim",
        "8",
        "--optimizer_type",
        "adamw8bit",
        "--gradient_checkpointing",
        "--device",
        "cuda",
        "--vram_gb",
        "80",
    ]);
    assert!(
        output.contains("not found: sizes from the klein-4b table"),
        "{output}"
    );
    assert!(output.contains("512x768 batch 2 (1536 image"), "{output}");
    assert!(output.contains("optimizer states (AdamW8bit)"), "{output}");
    assert!(
        output.contains("block inputs kept by checkpointing (25 blocks x 4096 tokens)"),
        "{output}"
    );
    assert!(output.contains("fits: yes, in 80.00 GiB"), "{output}");
    assert!(!output.contains("suggestion"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_dry_run_and_plan_generate_agree() {
    let args = [
        "--model_version",
        "klein-4b",
        "--prompt",
        "a cat",
        "--image_size",
        "1024",
        "1024",
        "--device",
        "cuda",
        "--vram_gb",
        "8",
    ];
    let mut dry = vec!["generate", "--dry_run"];
    dry.extend(args);
    let mut planned = vec!["plan", "generate"];
    planned.extend(args);
    let output = stdout_of(&dry);
    assert_eq!(output, stdout_of(&planned));
    for phase in [
        "phase: text encoder (freed before the DiT loads): ",
        "phase: sampling: ",
        "phase: decoding (DiT freed): ",
    ] {
        assert!(output.contains(phase), "{output}");
    }
    assert!(output.contains("fits: no"), "{output}");
    assert!(
        output.contains("suggestion: add --fp8_scaled (peak "),
        "{output}"
    );
    // With fp8 the block linears are one byte per value: the saving is printed.
    let fp8 = stdout_of(&[
        "plan",
        "generate",
        "--model_version",
        "klein-4b",
        "--prompt",
        "a cat",
        "--fp8_scaled",
        "--blocks_to_swap",
        "13",
        "--device",
        "cuda",
        "--vram_gb",
        "8",
    ]);
    assert!(
        fp8.contains("DiT block linears, F8E4M3 + f32 scale per 64 inputs (saves "),
        "{fp8}"
    );
    assert!(
        fp8.contains("block swap: 2 device slots (3 double + 18 single blocks"),
        "{fp8}"
    );
    assert!(fp8.contains("fits: yes"), "{fp8}");
}

#[test]
fn plan_needs_a_vram_size_without_cuda_and_refuses_bad_values() {
    if cfg!(feature = "cuda") {
        return;
    }
    let output = command(&[
        "plan",
        "train",
        "--model_version",
        "klein-4b",
        "--device",
        "cpu",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--vram_gb is required"), "{stderr}");
    let output = command(&[
        "plan",
        "train",
        "--model_version",
        "klein-4b",
        "--blocks_to_swap",
        "14",
        "--vram_gb",
        "16",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("--blocks_to_swap") && stderr.contains("14"),
        "{stderr}"
    );
    // --dry_run without --vram_gb prints the plan without a verdict.
    let output = stdout_of(&[
        "train",
        "--dry_run",
        "--model_version",
        "klein-4b",
        "--device",
        "cpu",
    ]);
    assert!(
        output.contains("peak device memory: ") && !output.contains("fits:"),
        "{output}"
    );
}

/// Runs the binary with `args` and checks that it fails naming `expected` on stderr.
fn assert_refused(args: &[&str], expected: &str) {
    let output = command(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains(expected),
        "{stderr}"
    );
}

#[test]
fn dry_run_refuses_what_a_real_run_refuses() {
    // The flag checks run before the plan: a refused flag is named, not planned.
    assert_refused(
        &[
            "train",
            "--dry_run",
            "--model_version",
            "klein-4b",
            "--device",
            "cpu",
            "--vram_gb",
            "80",
            "--xformers",
        ],
        "--xformers",
    );
    // A value check of `options` that needs no file runs too.
    assert_refused(
        &[
            "train",
            "--dry_run",
            "--model_version",
            "klein-4b",
            "--device",
            "cpu",
            "--fp8_scaled",
        ],
        "--fp8_scaled needs --fp8_base",
    );
    assert_refused(
        &[
            "generate",
            "--dry_run",
            "--model_version",
            "klein-4b",
            "--prompt",
            "a cat",
            "--device",
            "cpu",
            "--compile",
        ],
        "--compile",
    );
    // `plan` runs the same checks.
    assert_refused(
        &[
            "plan",
            "train",
            "--model_version",
            "klein-4b",
            "--vram_gb",
            "80",
            "--sage_attn",
        ],
        "--sage_attn",
    );
}
