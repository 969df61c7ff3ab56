//! The `flux2-tuner` binary on the tiny golden models, in temporary folders: generation with and
//! without control images and LoRAs, and every documented bad input exiting non-zero with a
//! message that names it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::image_io::read_png_text;

mod common;
use common::{command, golden, temp_dir, text};

/// The common arguments of a klein (or dev) generation on the tiny models.
fn model_args(variant: &str, version: &str, out: &Path) -> Vec<String> {
    let g = golden();
    vec![
        "generate".into(),
        "--model_version".into(),
        version.into(),
        "--dit".into(),
        g.join(variant)
            .join("dit.safetensors")
            .display()
            .to_string(),
        "--vae".into(),
        g.join("ae.safetensors").display().to_string(),
        "--text_encoder".into(),
        g.join(variant)
            .join("text_encoder/model.safetensors")
            .display()
            .to_string(),
        "--image_size".into(),
        "64".into(),
        "96".into(),
        "--seed".into(),
        "7".into(),
        "--save_path".into(),
        out.display().to_string(),
    ]
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

fn write_control_image(path: &Path, width: u32, height: u32) {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, 128])
    });
    image.save(path).unwrap();
}

#[test]
fn help_lists_the_jobs_and_version_prints() {
    let output = command(&["--help"]);
    assert!(output.status.success());
    let help = text(&output);
    assert!(
        help.contains("generate") && help.contains("inspect"),
        "{help}"
    );
    let output = command(&["generate", "--help"]);
    let help = text(&output);
    for flag in [
        "--model_version",
        "--control_image_path",
        "--lora_multiplier",
        "--embedded_cfg_scale",
        "--from_file",
    ] {
        assert!(help.contains(flag), "{flag} missing from generate --help");
    }
    let output = command(&["--version"]);
    assert!(text(&output).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn klein_with_lora_writes_a_png_with_its_parameters() {
    let out = temp_dir("cli", "klein-lora");
    let mut args = model_args("klein", "klein-4b", &out);
    let lora = golden()
        .join("klein/lora.safetensors")
        .display()
        .to_string();
    args.extend(
        [
            "--prompt",
            "a red fox",
            "--lora_weight",
            &lora,
            "--lora_multiplier",
            "0.75",
        ]
        .map(String::from),
    );
    let output = command(&args);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("s per step"), "{}", text(&output));
    let files = pngs(&out);
    assert_eq!(files.len(), 1);
    let image = image::open(&files[0]).unwrap();
    assert_eq!((image.width(), image.height()), (96, 64));
    let chunks = read_png_text(&files[0]).unwrap();
    let parameters = &chunks.iter().find(|(k, _)| k == "flux2_tuner").unwrap().1;
    let json: serde_json::Value = serde_json::from_str(parameters).unwrap();
    assert_eq!(json["prompt"], "a red fox");
    assert_eq!(json["seed"], 7);
    assert_eq!(
        json["infer_steps"], 4,
        "klein distilled defaults to 4 steps"
    );
    assert_eq!(json["model_version"], "klein-4b");
    assert!(json["loras"][0]
        .as_str()
        .unwrap()
        .ends_with("lora.safetensors:0.75"));
}

#[test]
fn dev_with_two_control_images_and_klein_base_with_cfg() {
    let out = temp_dir("cli", "controls");
    let first = out.join("a.png");
    let second = out.join("b.png");
    write_control_image(&first, 80, 64);
    write_control_image(&second, 64, 100);
    let mut args = model_args("dev", "dev", &out);
    args.extend(
        [
            "--prompt",
            "make it snowy",
            "--infer_steps",
            "2",
            "--control_image_path",
        ]
        .map(String::from),
    );
    args.push(first.display().to_string());
    args.push(second.display().to_string());
    let output = command(&args);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(pngs(&out).len(), 3, "two inputs and one output");

    let out = temp_dir("cli", "cfg");
    let mut args = model_args("klein", "klein-base-4b", &out);
    args.extend(
        [
            "--prompt",
            "a cat",
            "--negative_prompt",
            "blurry",
            "--infer_steps",
            "3",
            "--guidance_scale",
            "5",
        ]
        .map(String::from),
    );
    let output = command(&args);
    assert!(output.status.success(), "{}", text(&output));
    let chunks = read_png_text(&pngs(&out)[0]).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&chunks.iter().find(|(k, _)| k == "flux2_tuner").unwrap().1).unwrap();
    assert_eq!(
        (json["guidance"].as_f64(), json["negative_prompt"].as_str()),
        (Some(5.0), Some("blurry"))
    );
}

/// The same seed gives the same image; the latent output decodes to the same image again.
#[test]
fn seeds_reproduce_and_latents_decode() {
    let out = temp_dir("cli", "latents");
    let mut args = model_args("klein", "klein-4b", &out);
    args.extend(["--prompt", "a tree", "--output_type", "both"].map(String::from));
    assert!(command(&args).status.success());
    let first = pngs(&out);
    let latent = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("_latent.safetensors"))
        .unwrap();
    let decoded = temp_dir("cli", "latents-decoded");
    let output = command(&[
        "generate",
        "--vae",
        &golden().join("ae.safetensors").display().to_string(),
        "--latent_path",
        &latent.display().to_string(),
        "--save_path",
        &decoded.display().to_string(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let a = image::open(&first[0]).unwrap().to_rgb8();
    let b = image::open(&pngs(&decoded)[0]).unwrap().to_rgb8();
    assert_eq!(a.as_raw(), b.as_raw());
    let again = temp_dir("cli", "latents-again");
    let mut args = model_args("klein", "klein-4b", &again);
    args.extend(["--prompt", "a tree"].map(String::from));
    assert!(command(&args).status.success());
    let c = image::open(&pngs(&again)[0]).unwrap().to_rgb8();
    assert_eq!(a.as_raw(), c.as_raw());
}

/// `--save_merged_model` writes a DiT in the original format with the LoRA folded in.
#[test]
fn merged_model_export_equals_base_plus_lora() {
    let out = temp_dir("cli", "merged");
    let target = out.join("merged.safetensors");
    let g = golden();
    let output = command(&[
        "generate",
        "--model_version",
        "klein-4b",
        "--dit",
        &g.join("klein/dit.safetensors").display().to_string(),
        "--lora_weight",
        &g.join("klein/lora.safetensors").display().to_string(),
        "--lora_multiplier",
        "0.5",
        "--dit_f32",
        "--save_merged_model",
        &target.display().to_string(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let merged = Checkpoint::open(&target).unwrap();
    let base = Checkpoint::open(&g.join("klein/dit.safetensors")).unwrap();
    assert_eq!(merged.len(), base.len());
    let lora = Checkpoint::open(&g.join("klein/lora.safetensors")).unwrap();
    let key = "single_blocks.1.linear2.weight";
    let prefix = "lora_unet_single_blocks_1_linear2";
    let down = lora
        .load(
            &format!("{prefix}.lora_down.weight"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let up = lora
        .load(
            &format!("{prefix}.lora_up.weight"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let alpha = lora
        .load(&format!("{prefix}.alpha"), DType::F32, &Device::Cpu)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let rank = down.dims()[0] as f64;
    let expected = (base.load(key, DType::F32, &Device::Cpu).unwrap()
        + (up.matmul(&down).unwrap() * (0.5 * alpha / rank)).unwrap())
    .unwrap();
    let actual = merged.load(key, DType::F32, &Device::Cpu).unwrap();
    let error = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(error < 1e-6, "{error}");
}

#[test]
fn from_file_generates_one_image_per_line() {
    let out = temp_dir("cli", "from-file");
    let prompts = out.join("prompts.txt");
    std::fs::write(
        &prompts,
        "# two prompts\na boat --d 1 --s 2\na car --w 32 --h 48 --d 2\n",
    )
    .unwrap();
    let images = out.join("images");
    let mut args = model_args("klein", "klein-4b", &images);
    args.extend(["--from_file".to_string(), prompts.display().to_string()]);
    let output = command(&args);
    assert!(output.status.success(), "{}", text(&output));
    let files = pngs(&images);
    assert_eq!(files.len(), 2);
    let sizes: Vec<(u32, u32)> = files
        .iter()
        .map(|f| image::image_dimensions(f).unwrap())
        .collect();
    assert!(
        sizes.contains(&(96, 64)) && sizes.contains(&(32, 48)),
        "{sizes:?}"
    );
}

/// Each documented bad input exits non-zero and names what is wrong.
#[test]
fn bad_inputs_are_named() {
    let out = temp_dir("cli", "bad");
    let g = golden();
    let check = |extra: &[&str], replace: Option<(&str, String)>, expected: &[&str]| {
        let mut args = model_args("klein", "klein-4b", &out);
        args.extend(["--prompt".to_string(), "x".to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some((flag, value)) = replace {
            let position = args.iter().position(|a| a == flag).unwrap();
            args[position + 1] = value;
        }
        let output = command(&args);
        let message = text(&output);
        assert!(!output.status.success(), "succeeded: {args:?}");
        for fragment in expected {
            assert!(message.contains(fragment), "`{fragment}` not in: {message}");
        }
    };
    // Missing file.
    check(
        &[],
        Some(("--dit", "/nonexistent/dit.safetensors".into())),
        &["/nonexistent/dit.safetensors", "not found"],
    );
    // Wrong version: the klein model given as dev.
    check(
        &[],
        Some(("--model_version", "dev".into())),
        &["not dev", "guidance"],
    );
    // Unreadable image.
    let garbage = out.join("garbage.png");
    std::fs::write(&garbage, b"not an image at all").unwrap();
    check(
        &["--control_image_path", &garbage.display().to_string()],
        None,
        &["garbage.png"],
    );
    // Bad LoRA file: not safetensors, and a LoRA of the other (dev) model.
    let bad_lora = out.join("bad_lora.safetensors");
    std::fs::write(&bad_lora, b"12345678").unwrap();
    check(
        &["--lora_weight", &bad_lora.display().to_string()],
        None,
        &["bad_lora.safetensors"],
    );
    let dev_lora = g.join("dev/lora.safetensors").display().to_string();
    check(
        &["--lora_weight", &dev_lora],
        None,
        &["dev/lora.safetensors", "another model"],
    );
    // Bad flag values.
    check(
        &[],
        Some(("--image_size", "100".into())),
        &["--image_size", "100"],
    );
    check(&["--output_type", "gif"], None, &["--output_type", "gif"]);
    check(
        &["--attn_mode", "xformers"],
        None,
        &["--attn_mode", "xformers"],
    );
    check(
        &["--blocks_to_swap", "2"],
        None,
        &["--blocks_to_swap", "cannot swap any block"],
    );
    check(
        &[],
        Some(("--model_version", "klein-5b".into())),
        &["klein-5b"],
    );
    let klein_lora = g.join("klein/lora.safetensors").display().to_string();
    check(
        &["--lora_weight", &klein_lora, "--include_patterns", "("],
        None,
        &["--include_patterns", "regex"],
    );
}

/// `selftest` runs every job on tiny random models and reports each stage.
#[test]
fn selftest_passes() {
    let keep = temp_dir("cli", "selftest");
    let output = command(&["selftest", "--keep_dir", &keep.display().to_string()]);
    let message = text(&output);
    assert!(output.status.success(), "{message}");
    assert!(
        message.contains("selftest passed: 6 of 6 stages"),
        "{message}"
    );
    assert!(keep.join("output/selftest.safetensors").exists());
}

/// `--fp8_scaled` and `--fp8` generate images; the fp8 image stays close to the bf16 one.
#[test]
fn fp8_generation_runs() {
    let mut images = Vec::new();
    for flag in [None, Some("--fp8_scaled"), Some("--fp8")] {
        let out = temp_dir(
            "cli",
            &format!("fp8-{}", flag.unwrap_or("none").trim_start_matches('-')),
        );
        let mut args = model_args("klein", "klein-4b", &out);
        args.extend(["--prompt", "a lake"].map(String::from));
        if let Some(flag) = flag {
            args.push(flag.to_string());
        }
        let output = command(&args);
        assert!(output.status.success(), "{}", text(&output));
        images.push(image::open(&pngs(&out)[0]).unwrap().to_rgb8());
    }
    for fp8 in &images[1..] {
        let mean_difference = images[0]
            .as_raw()
            .iter()
            .zip(fp8.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / fp8.as_raw().len() as f64;
        assert!(
            mean_difference < 25.0,
            "fp8 image differs by {mean_difference} levels on average"
        );
    }
}

/// `train --config_file` reads the options from TOML; unknown keys are named; flags override.
#[test]
fn train_config_file_is_read_and_overridden() {
    let out = temp_dir("cli", "config-file");
    let file = out.join("run.toml");
    let dit = golden().join("klein/dit.safetensors").display().to_string();
    std::fs::write(
        &file,
        format!(
            "[model]\nmodel_version = \"klein-4b\"\ndit = \"{dit}\"\n[data]\ndataset_config = \"/nonexistent/from-file.toml\"\n\
             output_dir = \"{}\"\n",
            out.display()
        ),
    )
    .unwrap();
    let output = command(&["train", "--config_file", &file.display().to_string()]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("/nonexistent/from-file.toml"),
        "{}",
        text(&output)
    );
    let output = command(&[
        "train",
        "--config_file",
        &file.display().to_string(),
        "--dataset_config",
        "/nonexistent/from-flag.toml",
    ]);
    assert!(
        text(&output).contains("/nonexistent/from-flag.toml"),
        "{}",
        text(&output)
    );
    std::fs::write(&file, "learning_rat = 0.1\n").unwrap();
    let output = command(&["train", "--config_file", &file.display().to_string()]);
    assert!(
        !output.status.success() && text(&output).contains("learning_rat"),
        "{}",
        text(&output)
    );
}
