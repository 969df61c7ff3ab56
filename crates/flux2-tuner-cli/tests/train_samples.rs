//! Sample images during training, end to end on the tiny golden klein models: the files appear
//! with Musubi's names at the requested events, carry their parameters, equal `generate` (pixel
//! for pixel) run with the LoRA saved at the same step (same prompt, seed, size, steps, negative
//! prompt and control image), and sampling leaves the training losses unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flux2_tuner::image_io::read_png_text;

mod common;
use common::{
    cache, command, golden, losses, make_dataset, run, strings, text, train_command, TWO_SQUARES,
};

fn text_encoder() -> String {
    golden()
        .join("klein/text_encoder/model.safetensors")
        .display()
        .to_string()
}

fn ae() -> String {
    golden().join("ae.safetensors").display().to_string()
}

fn dit() -> String {
    golden().join("klein/dit.safetensors").display().to_string()
}

fn train_args(config: &Path, out: &Path, steps: usize) -> Vec<String> {
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
        "--seed",
        "3",
        "--save_every_n_steps",
        "2",
        "--logging_dir",
    ]));
    args.push(out.join("logs").display().to_string());
    args
}

fn sample_args(prompts: &Path) -> Vec<String> {
    let mut args = vec![
        "--sample_prompts".to_string(),
        prompts.display().to_string(),
    ];
    args.extend(["--vae".to_string(), ae()]);
    args.extend(["--text_encoder".to_string(), text_encoder()]);
    args
}

/// `e2e_{label}_{idx}_{YYYYmmddHHMMSS}[_{seed}].png` files of a sample folder, by (label, idx).
fn samples(dir: &Path) -> BTreeMap<(String, String), PathBuf> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let stem = name
            .strip_suffix(".png")
            .unwrap_or_else(|| panic!("{name}"));
        let parts: Vec<&str> = stem.split('_').collect();
        assert!(parts.len() == 4 || parts.len() == 5, "{name}");
        assert_eq!(parts[0], "e2e", "{name}");
        assert_eq!(parts[3].len(), 14, "{name}: time stamp");
        assert!(parts[3].bytes().all(|b| b.is_ascii_digit()), "{name}");
        // Only a seed given with --d ends the name (prompt 0 has --d 7).
        if parts[2] == "00" {
            assert_eq!(parts.get(4), Some(&"7"), "{name}");
        } else {
            assert_eq!(parts.len(), 4, "{name}");
        }
        let previous = found.insert((parts[1].to_string(), parts[2].to_string()), path);
        assert!(previous.is_none(), "two samples for {name}");
    }
    found
}

fn parameters(path: &Path) -> serde_json::Value {
    let chunks = read_png_text(path).unwrap();
    assert!(chunks.iter().any(|(k, _)| k == "parameters"));
    let json = &chunks.iter().find(|(k, _)| k == "flux2_tuner").unwrap().1;
    serde_json::from_str(json).unwrap()
}

/// `generate` with a sample's parameters (f32 DiT, LoRA unmerged as in training); returns its PNG.
fn generate(sample: &Path, lora: Option<&Path>, out: &Path, extra: &[&str]) -> PathBuf {
    let json = parameters(sample);
    let mut args = strings(&["generate", "--model_version", "klein-base-4b", "--dit_f32"]);
    args.extend(["--dit".to_string(), dit()]);
    args.extend(["--vae".to_string(), ae()]);
    args.extend(["--text_encoder".to_string(), text_encoder()]);
    args.extend([
        "--prompt".to_string(),
        json["prompt"].as_str().unwrap().to_string(),
    ]);
    args.extend([
        "--negative_prompt".to_string(),
        json["negative_prompt"].as_str().unwrap().to_string(),
    ]);
    args.extend([
        "--image_size".to_string(),
        json["height"].to_string(),
        json["width"].to_string(),
    ]);
    args.extend(["--infer_steps".to_string(), json["infer_steps"].to_string()]);
    args.extend(["--seed".to_string(), json["seed"].to_string()]);
    args.extend(["--guidance_scale".to_string(), json["guidance"].to_string()]);
    for control in json["control_images"].as_array().unwrap() {
        args.extend([
            "--control_image_path".to_string(),
            control.as_str().unwrap().to_string(),
        ]);
    }
    if let Some(lora) = lora {
        args.extend([
            "--lora_weight".to_string(),
            lora.display().to_string(),
            "--lora_unmerged".to_string(),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let _ = std::fs::remove_dir_all(out);
    args.extend(["--save_path".to_string(), out.display().to_string()]);
    run(&args);
    let files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

/// Largest per-channel difference between two PNGs of the same size.
fn max_difference(a: &Path, b: &Path) -> u8 {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn samples_during_training_match_generate_and_leave_training_unchanged() {
    let dir = std::env::temp_dir().join(format!("flux2-samples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_dataset(&dir, &TWO_SQUARES);
    cache(&config);
    let control = dir.join("control.png");
    image::RgbImage::from_fn(64, 80, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 3) as u8, 90])
    })
    .save(&control)
    .unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        format!(
            "# sample prompts\n\
             a red square --w 64 --h 64 --s 3 --d 7 --g 2.5 --n blurry\n\
             \n\
             A Blue Square --W 48 --H 70 --S 2 --G 3 --CI {}\n",
            control.display()
        ),
    )
    .unwrap();

    // Four steps (two epochs of two batches) with samples at the start, every 2 steps and every
    // 2 epochs; and the same run without samples.
    let sampled = dir.join("sampled");
    let mut args = train_args(&config, &sampled, 4);
    args.extend(sample_args(&prompts));
    args.extend(strings(&[
        "--sample_at_first",
        "--sample_every_n_steps",
        "2",
        "--sample_every_n_epochs",
        "2",
    ]));
    let output = run(&args);
    let plain = dir.join("plain");
    run(&train_args(&config, &plain, 4));

    // 1. Sampling does not disturb training: identical losses.
    let with_samples = losses(&sampled.join("logs"));
    let without = losses(&plain.join("logs"));
    assert_eq!(with_samples.len(), 4);
    assert_eq!(
        with_samples, without,
        "sampling changed the training losses"
    );

    // 2. Names and counts: e000000 (at first), 000002 and 000004 (steps), e000002 (epoch 2),
    // each for prompts 00 and 01.
    let found = samples(&sampled.join("sample"));
    let keys: Vec<(String, String)> = found.keys().cloned().collect();
    let mut expected = Vec::new();
    for label in ["000002", "000004", "e000000", "e000002"] {
        for index in ["00", "01"] {
            expected.push((label.to_string(), index.to_string()));
        }
    }
    assert_eq!(keys, expected);
    let log = text(&output);
    for path in found.values() {
        assert!(log.contains(&format!("sample {}", path.display())), "{log}");
    }

    // 3. Parameters in the PNG text chunks, and the image sizes.
    let key = |label: &str, index: &str| found[&(label.to_string(), index.to_string())].clone();
    let first = parameters(&key("000002", "00"));
    assert_eq!(first["prompt"], "a red square");
    assert_eq!(first["negative_prompt"], "blurry");
    assert_eq!(first["seed"], 7);
    assert_eq!(first["infer_steps"], 3);
    assert_eq!(first["guidance"], 2.5);
    assert_eq!(
        (first["width"].clone(), first["height"].clone()),
        (64.into(), 64.into())
    );
    assert_eq!(first["model_version"], "klein-base-4b");
    assert_eq!(first["training_step"], 2);
    assert_eq!(first["loras"][0], "e2e@step2:1");
    let second = parameters(&key("000002", "01"));
    assert_eq!(second["prompt"], "A Blue Square");
    // The default negative prompt is Musubi's single space; 70 is floored to 64.
    assert_eq!(second["negative_prompt"], " ");
    assert_eq!(
        (second["width"].clone(), second["height"].clone()),
        (48.into(), 64.into())
    );
    assert_eq!(second["infer_steps"], 2);
    assert_eq!(second["guidance"], 3.0);
    assert_eq!(second["control_images"][0], control.display().to_string());
    // Without --d, the seed is the same at every event of the run.
    let seed = second["seed"].as_u64().unwrap();
    for label in ["000004", "e000000", "e000002"] {
        assert_eq!(parameters(&key(label, "01"))["seed"], seed);
    }
    assert_eq!(parameters(&key("e000002", "00"))["training_epoch"], 2);
    let image = image::open(key("000002", "01")).unwrap();
    assert_eq!((image.width(), image.height()), (48, 64));

    // 4. Each sample equals generate with the LoRA of its step: step 2's saved file, the final
    // file for step 4 (and epoch 2, the same weights), no LoRA at the start (lora_up is zero).
    let step2 = sampled.join("e2e-step00000002.safetensors");
    let last = sampled.join("e2e.safetensors");
    let cases: [(&str, Option<&Path>); 4] = [
        ("e000000", None),
        ("000002", Some(&step2)),
        ("000004", Some(&last)),
        ("e000002", Some(&last)),
    ];
    let mut differences = Vec::new();
    for (label, lora) in cases {
        for index in ["00", "01"] {
            let sample = key(label, index);
            let reference = generate(&sample, lora, &dir.join("generated"), &[]);
            differences.push((label, index, max_difference(&sample, &reference)));
        }
    }
    assert!(
        differences.iter().all(|(_, _, d)| *d == 0),
        "samples differ from generate (same code, same inputs): {differences:?}"
    );
    // The LoRA matters: step 4's sample is not the untrained one.
    assert!(max_difference(&key("000004", "00"), &key("e000000", "00")) > 1);

    // 5. --fp8_text_encoder (Qwen3) encodes the prompts as generate's --fp8_text_encoder does.
    let fp8 = dir.join("fp8");
    let mut args = train_args(&config, &fp8, 1);
    args.extend(sample_args(&prompts));
    args.extend(strings(&["--sample_at_first", "--fp8_text_encoder"]));
    run(&args);
    let found = samples(&fp8.join("sample"));
    assert_eq!(found.len(), 2);
    let sample = found[&("e000000".to_string(), "00".to_string())].clone();
    let reference = generate(
        &sample,
        None,
        &dir.join("generated-fp8"),
        &["--fp8_text_encoder"],
    );
    assert_eq!(max_difference(&sample, &reference), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sampling_flags_are_checked_before_training() {
    let dir = std::env::temp_dir().join(format!("flux2-sample-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let base = |version: &str| {
        let mut args = strings(&["train", "--model_version", version, "--dit"]);
        args.push(dit());
        args.extend(strings(&[
            "--dataset_config",
            "unused.toml",
            "--output_dir",
        ]));
        args.push(dir.join("out").display().to_string());
        args
    };
    let failure = |args: Vec<String>| {
        let output = command(&args);
        assert!(!output.status.success(), "{args:?} succeeded");
        text(&output)
    };

    let mut args = base("klein-base-4b");
    args.extend(strings(&["--sample_every_n_steps", "2"]));
    let message = failure(args);
    assert!(message.contains("need --sample_prompts"), "{message}");

    let mut args = base("klein-base-4b");
    args.extend([
        "--sample_prompts".to_string(),
        prompts.display().to_string(),
    ]);
    args.extend(["--vae".to_string(), ae(), "--sample_at_first".to_string()]);
    let message = failure(args);
    assert!(message.contains("needs --text_encoder"), "{message}");

    let mut args = base("klein-base-4b");
    args.extend([
        "--sample_prompts".to_string(),
        prompts.display().to_string(),
    ]);
    args.extend(["--text_encoder".to_string(), text_encoder()]);
    let message = failure(args);
    assert!(message.contains("needs --vae"), "{message}");

    let mut args = base("dev");
    args.extend(sample_args(&prompts));
    args.extend(strings(&["--sample_at_first", "--fp8_text_encoder"]));
    let message = failure(args);
    assert!(
        message.contains("--fp8_text_encoder") && message.contains("Mistral"),
        "{message}"
    );

    let mut args = base("klein-base-4b");
    args.extend(sample_args(&dir.join("missing.txt")));
    let message = failure(args);
    assert!(message.contains("missing.txt"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}
