//! The cache jobs on a generated tiny dataset (three aspect ratios, captions, control images named
//! as Musubi names them, and a JSONL dataset), with the tiny golden AE and klein text encoder:
//! file names, keys, shapes, metadata and values against the models run directly; skip, stale
//! and bad-image rules; and the training reader on a cache written by hand by Musubi's rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};
use flux2_tuner::data::{
    cache_latents, cache_text_encoder_outputs, load_cached_item, CachedDataset, ConfigFallbacks,
    DatasetConfig, LatentCacheOptions, SilentObserver, TextCacheOptions,
};
use flux2_tuner::image_io::{image_to_tensor, read_rgb, resize_to_bucket};
use flux2_tuner::models::ae::AutoEncoder;
use flux2_tuner::models::text::encoder::{TextEncoder, TextEncoderOptions};
use flux2_tuner::models::{ModelVersion, TextEncoderKind};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-data-cache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A smooth colour pattern that differs per image (`seed`).
fn write_image(path: &Path, width: u32, height: u32, seed: u32) {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            (((x + y) * 3 + seed * 53) % 256) as u8,
        ])
    });
    image.save(path).unwrap();
}

/// images/: a.png 96x64 (one control `a.png`), b.png 48x80 (controls b_0, b_1), c.jpg 64x64
/// (control c_0000), d.png without caption (not part of the dataset); plus a JSONL dataset of
/// two images whose controls keep their own size.
fn make_dataset(root: &Path) -> PathBuf {
    let images = root.join("images");
    let controls = root.join("controls");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&controls).unwrap();
    write_image(&images.join("a.png"), 96, 64, 1);
    write_image(&images.join("b.png"), 48, 80, 2);
    write_image(&images.join("c.jpg"), 64, 64, 3);
    write_image(&images.join("d.png"), 64, 64, 4);
    std::fs::write(images.join("a.txt"), "a red fox\n").unwrap();
    std::fs::write(images.join("b.txt"), "  a tall tower ").unwrap();
    std::fs::write(images.join("c.txt"), "a square").unwrap();
    write_image(&controls.join("a.png"), 40, 40, 5);
    write_image(&controls.join("b_1.png"), 32, 48, 6);
    write_image(&controls.join("b_0.png"), 48, 32, 7);
    write_image(&controls.join("c_0000.png"), 64, 48, 8);

    let extra = root.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    write_image(&extra.join("e.png"), 80, 48, 9);
    write_image(&extra.join("e_ref.png"), 50, 40, 10);
    write_image(&extra.join("f.png"), 64, 64, 11);
    let jsonl = root.join("meta.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{}\n\n{}\n",
            serde_json::json!({"image_path": extra.join("e.png"), "caption": "wide e",
                "control_path": extra.join("e_ref.png")}),
            serde_json::json!({"image_path": extra.join("f.png"), "caption": "square f",
                "control_path_0000": extra.join("e_ref.png")}),
        ),
    )
    .unwrap();

    let config = root.join("dataset.toml");
    std::fs::write(
        &config,
        format!(
            r#"[general]
resolution = 64
caption_extension = ".txt"
enable_bucket = true
batch_size = 2

[[datasets]]
image_directory = "{}"
control_directory = "{}"
cache_directory = "{}"

[[datasets]]
image_jsonl_file = "{}"
cache_directory = "{}"
no_resize_control = true
batch_size = 1
"#,
            images.display(),
            controls.display(),
            root.join("cache").display(),
            jsonl.display(),
            root.join("cache_jsonl").display()
        ),
    )
    .unwrap();
    config
}

fn latent_options(skip_existing: bool) -> LatentCacheOptions {
    LatentCacheOptions {
        vae: golden().join("ae.safetensors"),
        version: ModelVersion::Klein4b,
        vae_dtype: DType::F32,
        device: Device::Cpu,
        batch_size: None,
        num_workers: 2,
        skip_existing,
        keep_cache: false,
        skip_bad_images: false,
    }
}

fn load_config(path: &Path) -> DatasetConfig {
    DatasetConfig::load(path, &ConfigFallbacks::default()).unwrap()
}

fn keys(path: &Path) -> Vec<(String, Vec<usize>)> {
    let checkpoint = Checkpoint::open(path).unwrap();
    let mut keys: Vec<(String, Vec<usize>)> = checkpoint
        .keys()
        .map(|k| (k.to_string(), checkpoint.shape(k).unwrap().to_vec()))
        .collect();
    keys.sort();
    keys
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The AE run directly on an image resized by hand to `bucket`.
fn direct_latents(ae: &AutoEncoder, path: &Path, bucket: (u32, u32)) -> Tensor {
    let image = resize_to_bucket(&read_rgb(path).unwrap(), bucket).unwrap();
    ae.encode(&image_to_tensor(&image, &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn latent_caches_have_musubis_names_keys_and_the_aes_values() {
    let root = temp_dir("latents");
    let config_path = make_dataset(&root);
    let config = load_config(&config_path);
    let summary = cache_latents(&config, &latent_options(false), &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.skipped, summary.failed), (5, 0, 0));

    // Resolution 64 with buckets: area 4096, s = 64, min 32: (32,128) (48,80) (64,64) (80,48)
    // (128,32). a 96x64 (1.5) -> (80, 48); b 48x80 (0.6) -> (48, 80); c -> (64, 64).
    let cache = root.join("cache");
    let mut names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "a_0096x0064_f2k4b.safetensors",
            "b_0048x0080_f2k4b.safetensors",
            "c_0064x0064_f2k4b.safetensors"
        ]
    );
    // Controls are resized to the target bucket by default; b's controls in suffix order.
    assert_eq!(
        keys(&cache.join("a_0096x0064_f2k4b.safetensors")),
        [
            ("latents_3x5_float32".to_string(), vec![128, 3, 5]),
            ("latents_control_0_3x5_float32".to_string(), vec![128, 3, 5]),
        ]
    );
    assert_eq!(
        keys(&cache.join("b_0048x0080_f2k4b.safetensors")),
        [
            ("latents_5x3_float32".to_string(), vec![128, 5, 3]),
            ("latents_control_0_5x3_float32".to_string(), vec![128, 5, 3]),
            ("latents_control_1_5x3_float32".to_string(), vec![128, 5, 3]),
        ]
    );
    let checkpoint = Checkpoint::open(&cache.join("a_0096x0064_f2k4b.safetensors")).unwrap();
    let metadata = checkpoint.metadata();
    assert_eq!(metadata["architecture"], "flux_2_klein_4b");
    assert_eq!(
        (metadata["width"].as_str(), metadata["height"].as_str()),
        ("96", "64")
    );
    assert_eq!(metadata["format_version"], "1.0.1");

    let ae_checkpoint = Checkpoint::open(&golden().join("ae.safetensors")).unwrap();
    let ae = AutoEncoder::load(&ae_checkpoint, DType::F32, &Device::Cpu).unwrap();
    let load = |file: &str, key: &str| {
        Checkpoint::open(&cache.join(file))
            .unwrap()
            .load(key, DType::F32, &Device::Cpu)
            .unwrap()
    };
    let images = root.join("images");
    let controls = root.join("controls");
    let checks = [
        (
            "a_0096x0064_f2k4b.safetensors",
            "latents_3x5_float32",
            images.join("a.png"),
            (80, 48),
        ),
        (
            "a_0096x0064_f2k4b.safetensors",
            "latents_control_0_3x5_float32",
            controls.join("a.png"),
            (80, 48),
        ),
        (
            "b_0048x0080_f2k4b.safetensors",
            "latents_5x3_float32",
            images.join("b.png"),
            (48, 80),
        ),
        (
            "b_0048x0080_f2k4b.safetensors",
            "latents_control_0_5x3_float32",
            controls.join("b_0.png"),
            (48, 80),
        ),
        (
            "b_0048x0080_f2k4b.safetensors",
            "latents_control_1_5x3_float32",
            controls.join("b_1.png"),
            (48, 80),
        ),
        (
            "c_0064x0064_f2k4b.safetensors",
            "latents_4x4_float32",
            images.join("c.jpg"),
            (64, 64),
        ),
        (
            "c_0064x0064_f2k4b.safetensors",
            "latents_control_0_4x4_float32",
            controls.join("c_0000.png"),
            (64, 64),
        ),
    ];
    for (file, key, source, bucket) in checks {
        let expected = direct_latents(&ae, &source, bucket);
        let difference = max_difference(&load(file, key), &expected);
        assert!(
            difference < 1e-5,
            "{file} {key}: max difference {difference}"
        );
    }

    // JSONL dataset with no_resize_control: e 80x48 -> bucket (80, 48); its control 50x40 keeps
    // its own size floored to 16: 48x32 -> latents_control_0_2x3. f's `control_path_0000` is
    // renumbered to control 0.
    let jsonl_cache = root.join("cache_jsonl");
    assert_eq!(
        keys(&jsonl_cache.join("e_0080x0048_f2k4b.safetensors")),
        [
            ("latents_3x5_float32".to_string(), vec![128, 3, 5]),
            ("latents_control_0_2x3_float32".to_string(), vec![128, 2, 3]),
        ]
    );
    let e_control = Checkpoint::open(&jsonl_cache.join("e_0080x0048_f2k4b.safetensors"))
        .unwrap()
        .load("latents_control_0_2x3_float32", DType::F32, &Device::Cpu)
        .unwrap();
    let expected = direct_latents(&ae, &root.join("extra/e_ref.png"), (48, 32));
    assert!(max_difference(&e_control, &expected) < 1e-5);
    assert!(jsonl_cache.join("f_0064x0064_f2k4b.safetensors").is_file());
}

#[test]
fn skip_existing_reencodes_changed_buckets_and_stale_caches_are_removed() {
    let root = temp_dir("skip");
    let config_path = make_dataset(&root);
    let config = load_config(&config_path);
    cache_latents(&config, &latent_options(false), &mut SilentObserver).unwrap();

    let summary = cache_latents(&config, &latent_options(true), &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.skipped), (0, 5));

    // A file cut short under the final name (another program killed while writing, since ours
    // write to a hidden temporary and rename) is not trusted: it is encoded again, and a
    // temporary left behind by a killed run is removed.
    let cache = root.join("cache");
    let cut = cache.join("c_0064x0064_f2k4b.safetensors");
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let leftover = cache.join(".a_0096x0064_f2k4b.safetensors.99999999.tmp");
    std::fs::write(&leftover, &bytes[..10]).unwrap();
    let summary = cache_latents(&config, &latent_options(true), &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.skipped), (1, 4));
    assert_eq!(keys(&cut)[0].0, "latents_4x4_float32");
    assert!(!leftover.exists());
    assert_eq!(summary.removed, std::slice::from_ref(&leftover));

    // A stale latent cache and a text cache in the same directory: only the former is touched.
    let stale = cache.join("gone_0064x0064_f2k4b.safetensors");
    std::fs::copy(cache.join("c_0064x0064_f2k4b.safetensors"), &stale).unwrap();
    let text = cache.join("gone_f2k4b_te.safetensors");
    std::fs::write(&text, b"not touched by cache-latents").unwrap();
    let mut keep = latent_options(true);
    keep.keep_cache = true;
    let summary = cache_latents(&config, &keep, &mut SilentObserver).unwrap();
    assert_eq!(summary.kept, std::slice::from_ref(&stale));
    assert!(stale.is_file());

    // Bucketing off at 64x64: a and b change bucket; their names stay (original size), so
    // Musubi would skip them; here they are re-encoded. c keeps (64, 64) and is skipped.
    let text_config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("enable_bucket = true", "enable_bucket = false");
    std::fs::write(&config_path, text_config).unwrap();
    let config = load_config(&config_path);
    let summary = cache_latents(&config, &latent_options(true), &mut SilentObserver).unwrap();
    // a, b re-encoded; e (80x48 -> 64x64) re-encoded; c and f skipped.
    assert_eq!((summary.cached, summary.skipped), (3, 2));
    assert_eq!(summary.removed, std::slice::from_ref(&stale));
    assert!(!stale.exists() && text.is_file());
    assert_eq!(
        keys(&cache.join("a_0096x0064_f2k4b.safetensors"))[0],
        ("latents_4x4_float32".to_string(), vec![128, 4, 4])
    );
}

#[test]
fn a_corrupt_image_stops_the_run_before_its_cache_or_is_listed() {
    let root = temp_dir("corrupt");
    let config_path = make_dataset(&root);
    let images = root.join("images");
    std::fs::write(
        images.join("bad.png"),
        b"\x89PNG\r\n\x1a\nthis is not a png",
    )
    .unwrap();
    std::fs::write(images.join("bad.txt"), "broken").unwrap();
    write_image(&root.join("controls/bad.png"), 32, 32, 12);
    let config = load_config(&config_path);
    let error = cache_latents(&config, &latent_options(false), &mut SilentObserver)
        .unwrap_err()
        .to_string();
    assert!(error.contains("bad.png"), "{error}");
    let cache = root.join("cache");
    let written: Vec<String> = std::fs::read_dir(&cache)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(written.iter().all(|n| !n.starts_with("bad")), "{written:?}");

    let mut options = latent_options(false);
    options.skip_bad_images = true;
    let summary = cache_latents(&config, &options, &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.failed), (5, 1));
    assert_eq!(summary.bad_images[0].0, images.join("bad.png"));
}

#[test]
fn images_too_small_for_a_bucket_are_refused_by_name() {
    let root = temp_dir("small");
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    write_image(&images.join("tiny.png"), 15, 40, 1);
    std::fs::write(images.join("tiny.txt"), "tiny").unwrap();
    let config_path = root.join("dataset.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[datasets]]\nimage_directory = \"{}\"\ncaption_extension = \".txt\"\nresolution = 64\nenable_bucket = true\nbucket_no_upscale = true\n",
            images.display()
        ),
    )
    .unwrap();
    let error = cache_latents(
        &load_config(&config_path),
        &latent_options(false),
        &mut SilentObserver,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("tiny.png") && error.contains("0x32 bucket"),
        "{error}"
    );
}

#[test]
fn text_caches_hold_the_encoders_output_and_follow_the_skip_rules() {
    let root = temp_dir("text");
    let config_path = make_dataset(&root);
    let config = load_config(&config_path);
    let encoder_path = golden().join("klein/text_encoder/model.safetensors");
    let options = TextCacheOptions {
        text_encoder: encoder_path.clone(),
        tokenizer: None,
        version: ModelVersion::KleinBase4b,
        device: Device::Cpu,
        dtype: DType::BF16,
        fp8: false,
        batch_size: None,
        skip_existing: false,
        keep_cache: false,
    };
    let summary = cache_text_encoder_outputs(&config, &options, &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.skipped), (5, 0));

    let encoder = TextEncoder::load(
        &encoder_path,
        TextEncoderKind::Qwen3,
        &TextEncoderOptions::new(TextEncoderKind::Qwen3, Device::Cpu, DType::BF16),
    )
    .unwrap();
    let width = 3 * encoder.hidden_size();
    // Captions are stripped, as Musubi's `.strip()`.
    for (file, caption) in [
        ("cache/a_f2k4b_te.safetensors", "a red fox"),
        ("cache/b_f2k4b_te.safetensors", "a tall tower"),
        ("cache_jsonl/f_f2k4b_te.safetensors", "square f"),
    ] {
        let path = root.join(file);
        assert_eq!(
            keys(&path),
            [("ctx_vec_bfloat16".to_string(), vec![512, width])]
        );
        let checkpoint = Checkpoint::open(&path).unwrap();
        assert_eq!(checkpoint.metadata()["caption1"], caption);
        assert_eq!(checkpoint.metadata()["architecture"], "flux_2_klein_4b");
        let stored = checkpoint
            .load("ctx_vec_bfloat16", DType::F32, &Device::Cpu)
            .unwrap();
        let direct = encoder.encode(&[caption]).unwrap().squeeze(0).unwrap();
        let scale = max_difference(&direct, &direct.zeros_like().unwrap());
        let difference = max_difference(&stored, &direct);
        assert!(
            difference <= 0.02 * scale,
            "{file}: {difference} vs scale {scale}"
        );
    }

    // skip_existing: everything up to date; then a caption change re-encodes only that item.
    let mut skip = options.clone();
    skip.skip_existing = true;
    let summary = cache_text_encoder_outputs(&config, &skip, &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.skipped), (0, 5));
    std::fs::write(root.join("images/c.txt"), "a different square").unwrap();
    std::fs::write(root.join("cache/old_f2k4b_te.safetensors"), b"stale").unwrap();
    let summary = cache_text_encoder_outputs(&config, &skip, &mut SilentObserver).unwrap();
    assert_eq!((summary.cached, summary.skipped), (1, 4));
    assert_eq!(
        summary.removed,
        [root.join("cache/old_f2k4b_te.safetensors")]
    );
}

/// A cache pair written by hand exactly as Musubi's `save_latent_cache_flux_2` and
/// `save_text_encoder_output_cache_flux_2` would (bf16 tensors, Musubi's metadata), with an item
/// key containing `_`, is found, bucketed and loaded by the training reader.
#[test]
fn the_reader_loads_a_cache_written_by_musubis_rules() {
    let root = temp_dir("reader");
    let images = root.join("images");
    let cache = root.join("cache");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let config_path = root.join("dataset.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\ncaption_extension = \".txt\"\nresolution = 64\nenable_bucket = true\nbatch_size = 2\nnum_repeats = 2\n",
            images.display(),
            cache.display()
        ),
    )
    .unwrap();
    let device = Device::Cpu;
    let latent = |h: usize, w: usize, offset: f64| {
        Tensor::arange(0f32, (128 * h * w) as f32, &device)
            .unwrap()
            .affine(0.001, offset)
            .unwrap()
            .reshape((128, h, w))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let metadata = |w: u32, h: u32| {
        Some(HashMap::from([
            ("architecture".to_string(), "flux_2_klein_4b".to_string()),
            ("width".to_string(), w.to_string()),
            ("height".to_string(), h.to_string()),
            ("format_version".to_string(), "1.0.1".to_string()),
        ]))
    };
    // Original 70x100 (ar 0.7): bucket (48, 80) (0.6) vs (64, 64) (1.0) -> (48, 80): 5x3 latents.
    save_safetensors(
        &cache.join("my_photo_0070x0100_f2k4b.safetensors"),
        &[
            ("latents_5x3_bfloat16".into(), latent(5, 3, 0.0)),
            ("latents_control_0_4x4_bfloat16".into(), latent(4, 4, 1.0)),
        ],
        metadata(70, 100),
    )
    .unwrap();
    // Same bucket, no control: a different batch key.
    save_safetensors(
        &cache.join("plain_0048x0080_f2k4b.safetensors"),
        &[("latents_5x3_bfloat16".into(), latent(5, 3, 2.0))],
        metadata(48, 80),
    )
    .unwrap();
    // A latent cache without its text cache is left out and listed.
    save_safetensors(
        &cache.join("orphan_0064x0064_f2k4b.safetensors"),
        &[("latents_4x4_bfloat16".into(), latent(4, 4, 0.0))],
        metadata(64, 64),
    )
    .unwrap();
    let ctx = Tensor::ones((512, 24), DType::BF16, &device).unwrap();
    for stem in ["my_photo", "plain"] {
        save_safetensors(
            &cache.join(format!("{stem}_f2k4b_te.safetensors")),
            &[("ctx_vec_bfloat16".into(), ctx.clone())],
            Some(HashMap::from([
                ("architecture".to_string(), "flux_2_klein_4b".to_string()),
                ("caption1".to_string(), format!("caption of {stem}")),
                ("format_version".to_string(), "1.0.1".to_string()),
            ])),
        )
        .unwrap();
    }

    let config = load_config(&config_path);
    let dataset = CachedDataset::read(&config.datasets[0], "f2k4b").unwrap();
    assert_eq!(
        dataset.missing_text_caches,
        [cache.join("orphan_0064x0064_f2k4b.safetensors")]
    );
    assert_eq!(dataset.len(), 4, "two items, num_repeats = 2");
    let batches = dataset.batches();
    assert_eq!(
        batches.len(),
        2,
        "different control keys never share a batch"
    );
    let photo = batches
        .iter()
        .flatten()
        .find(|item| item.key == "my_photo")
        .unwrap();
    assert_eq!(photo.original_size, (70, 100));
    assert_eq!(photo.batch_key.bucket, (48, 80));
    assert_eq!(photo.batch_key.control_keys, ["latents_control_0_4x4"]);
    assert!(batches.iter().all(|b| b.len() == 2 && b[0].key == b[1].key));

    let tensors = load_cached_item(photo, DType::F32, &device).unwrap();
    assert_eq!(tensors.latents.dims(), [128, 5, 3]);
    assert_eq!(tensors.controls.len(), 1);
    assert_eq!(
        max_difference(&tensors.controls[0], &latent(4, 4, 1.0)),
        0.0
    );
    assert_eq!(max_difference(&tensors.latents, &latent(5, 3, 0.0)), 0.0);
    assert_eq!(tensors.ctx_vec.dims(), [512, 24]);
}
