//! `flux2-tuner cache-latents` and `cache-text-encoder-outputs` on a tiny dataset with the golden
//! AE and klein text encoder: files written, the summary line, skip/stale/bad-image behaviour and
//! refused flags.

use std::path::{Path, PathBuf};

use candle_core::DType;
use flux2_tuner::checkpoint::Checkpoint;

mod common;
use common::{command, golden, temp_dir, text};

fn write_image(path: &Path, width: u32, height: u32, seed: u32) {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 9 + seed) as u8, (y * 4 + seed * 3) as u8, 90])
    })
    .save(path)
    .unwrap();
}

/// Three images (wide, tall, square) with captions and one control each; returns the config.
fn make_dataset(root: &Path) -> PathBuf {
    let images = root.join("images");
    let controls = root.join("controls");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&controls).unwrap();
    for (name, width, height) in [("wide", 96, 64), ("tall", 48, 80), ("square", 64, 64)] {
        write_image(&images.join(format!("{name}.png")), width, height, width);
        std::fs::write(
            images.join(format!("{name}.txt")),
            format!("a {name} picture"),
        )
        .unwrap();
        write_image(&controls.join(format!("{name}_0.png")), 40, 40, height);
    }
    let config = root.join("dataset.toml");
    std::fs::write(
        &config,
        format!(
            "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\nenable_bucket = true\n\n[[datasets]]\nimage_directory = \"{}\"\ncontrol_directory = \"{}\"\ncache_directory = \"{}\"\n",
            images.display(),
            controls.display(),
            root.join("cache").display()
        ),
    )
    .unwrap();
    config
}

fn latents_args(config: &Path) -> Vec<String> {
    vec![
        "cache-latents".into(),
        "--dataset_config".into(),
        config.display().to_string(),
        "--vae".into(),
        golden().join("ae.safetensors").display().to_string(),
        "--model_version".into(),
        "klein-base-9b".into(),
        "--device".into(),
        "cpu".into(),
    ]
}

#[test]
fn help_lists_the_cache_commands_and_their_flags() {
    let help = text(&command(&["--help"]));
    assert!(
        help.contains("cache-latents") && help.contains("cache-text-encoder-outputs"),
        "{help}"
    );
    let help = text(&command(&["cache-latents", "--help"]));
    for flag in [
        "--dataset_config",
        "--vae",
        "--vae_dtype",
        "--batch_size",
        "--skip_existing",
        "--keep_cache",
        "--skip_bad_images",
        "--num_workers",
    ] {
        assert!(
            help.contains(flag),
            "{flag} missing from cache-latents --help"
        );
    }
    let help = text(&command(&["cache-text-encoder-outputs", "--help"]));
    for flag in [
        "--text_encoder",
        "--fp8_text_encoder",
        "--tokenizer",
        "--model_version",
    ] {
        assert!(help.contains(flag), "{flag} missing");
    }
}

#[test]
fn cache_latents_writes_caches_skips_them_and_lists_stale_ones() {
    let root = temp_dir("cli-cache", "latents");
    let config = make_dataset(&root);
    let output = command(&latents_args(&config));
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("cached 3 items, skipped 0, failed 0 in"),
        "{stdout}"
    );
    let cache = root.join("cache");
    let wide = cache.join("wide_0096x0064_f2k9b.safetensors");
    let checkpoint = Checkpoint::open(&wide).unwrap();
    let mut keys: Vec<&str> = checkpoint.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["latents_3x5_float32", "latents_control_0_3x5_float32"]
    );
    assert_eq!(checkpoint.metadata()["architecture"], "flux_2_klein_9b");
    assert!(cache.join("tall_0048x0080_f2k9b.safetensors").is_file());
    assert!(cache.join("square_0064x0064_f2k9b.safetensors").is_file());

    // --skip_existing skips all three (their keys match the buckets); a cache no item produces
    // is deleted and listed.
    let stale = cache.join("old_0064x0064_f2k9b.safetensors");
    std::fs::copy(cache.join("square_0064x0064_f2k9b.safetensors"), &stale).unwrap();
    let mut args = latents_args(&config);
    args.push("--skip_existing".into());
    let output = command(&args);
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    assert!(all.contains("cached 0 items, skipped 3, failed 0"), "{all}");
    assert!(
        all.contains(&format!("removed stale cache {}", stale.display())),
        "{all}"
    );
    assert!(!stale.exists());

    // --vae_dtype bfloat16 stores bfloat16 latents.
    let mut args = latents_args(&config);
    args.extend([
        "--vae_dtype".into(),
        "bfloat16".into(),
        "--batch_size".into(),
        "1".into(),
    ]);
    let output = command(&args);
    assert!(output.status.success(), "{}", text(&output));
    let checkpoint = Checkpoint::open(&wide).unwrap();
    assert!(checkpoint.keys().any(|k| k == "latents_3x5_bfloat16"));
    let latents = checkpoint
        .load(
            "latents_3x5_bfloat16",
            DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
    assert_eq!(latents.dims(), [128, 3, 5]);
}

#[test]
fn a_bad_image_stops_the_run_naming_it_unless_skipped() {
    let root = temp_dir("cli-cache", "bad");
    let config = make_dataset(&root);
    let bad = root.join("images/broken.png");
    std::fs::write(&bad, b"definitely not an image").unwrap();
    std::fs::write(root.join("images/broken.txt"), "broken").unwrap();
    write_image(&root.join("controls/broken.png"), 32, 32, 1);
    let output = command(&latents_args(&config));
    assert!(!output.status.success());
    let all = text(&output);
    assert!(all.contains(&bad.display().to_string()), "{all}");

    let mut args = latents_args(&config);
    args.push("--skip_bad_images".into());
    let output = command(&args);
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    assert!(all.contains("cached 3 items, skipped 0, failed 1"), "{all}");
    assert!(
        all.contains(&format!("skipped unreadable image {}", bad.display())),
        "{all}"
    );
}

#[test]
fn refused_flags_and_bad_configs_say_why() {
    let root = temp_dir("cli-cache", "refused");
    let config = make_dataset(&root);
    let mut args = latents_args(&config);
    args.extend(["--debug_mode".into(), "console".into()]);
    let output = command(&args);
    assert!(!output.status.success());
    assert!(text(&output).contains("--debug_mode"), "{}", text(&output));

    let bad_config = root.join("bad.toml");
    std::fs::write(&bad_config, "[[datasets]]\nimage_dir = \"/x\"\n").unwrap();
    let output = command(&latents_args(&bad_config));
    let all = text(&output);
    assert!(!output.status.success());
    assert!(
        all.contains("bad.toml") && all.contains("unknown key `image_dir`"),
        "{all}"
    );

    let output = command(&[
        "cache-latents",
        "--dataset_config",
        &config.display().to_string(),
    ]);
    assert!(text(&output).contains("--vae is required"));
}

#[test]
fn cache_text_encoder_outputs_writes_ctx_vec_per_caption() {
    let root = temp_dir("cli-cache", "text");
    let config = make_dataset(&root);
    let encoder = golden().join("klein/text_encoder/model.safetensors");
    let args = [
        "cache-text-encoder-outputs",
        "--dataset_config",
        &config.display().to_string(),
        "--text_encoder",
        &encoder.display().to_string(),
        "--model_version",
        "klein-4b",
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ];
    let output = command(&args);
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    assert!(all.contains("cached 3 items, skipped 0, failed 0"), "{all}");
    let file = root.join("cache/tall_f2k4b_te.safetensors");
    let checkpoint = Checkpoint::open(&file).unwrap();
    assert_eq!(checkpoint.shape("ctx_vec_bfloat16").unwrap(), [512, 120]);
    assert_eq!(checkpoint.metadata()["caption1"], "a tall picture");

    let mut again = args.to_vec();
    again.push("--skip_existing");
    let output = command(&again);
    assert!(
        text(&output).contains("cached 0 items, skipped 3, failed 0"),
        "{}",
        text(&output)
    );
}
