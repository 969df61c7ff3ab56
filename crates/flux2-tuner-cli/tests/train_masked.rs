//! Masked loss end to end on the tiny golden models: RGBA images and a mask directory are cached
//! with their masks, and `train --masked_loss` weights the loss by them. Checks: the cached masks
//! are the hand-averaged alpha / mask files and the latents ignore alpha; an opaque alpha mask
//! gives the unmasked losses exactly; at the first step (LoRA up matrices are zero, so every run
//! sees the same prediction) the left-half and right-half masked losses add up to the unmasked
//! loss; fully transparent images train on nothing (loss 0 whatever their pixels); and a dataset
//! or a cache without masks is refused with the fix.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;

mod common;
use common::{command, golden, losses, run, strings, train_command};

/// The alpha of a pixel `(x, y)`.
type Alpha = fn(u32, u32) -> u8;

/// A 64x64 RGBA image: a colour pattern (`seed`) with the alpha given per pixel.
fn write_rgba(path: &Path, seed: u32, alpha: impl Fn(u32, u32) -> u8) {
    image::RgbaImage::from_fn(64, 64, |x, y| {
        image::Rgba([
            ((x * 3 + seed * 40) % 256) as u8,
            ((y * 2 + seed * 70) % 256) as u8,
            ((x + y + seed * 20) % 256) as u8,
            alpha(x, y),
        ])
    })
    .save(path)
    .unwrap();
}

/// One dataset table: `name` is the image folder and (with `cache_`) the cache folder.
fn table(root: &Path, images: &str, cache: &str, extra: &str) -> String {
    format!(
        "[[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\n{extra}\n\n",
        root.join(images).display(),
        root.join(cache).display()
    )
}

fn write_config(root: &Path, name: &str, tables: &[String]) -> PathBuf {
    let path = root.join(name);
    std::fs::write(
        &path,
        format!(
            "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\nbatch_size = 1\nenable_bucket = true\n\n{}",
            tables.concat()
        ),
    )
    .unwrap();
    path
}

fn train_args(config: &Path, out: &Path, masked: bool) -> Vec<String> {
    let dit = golden().join("klein/dit.safetensors");
    let mut args = train_command("klein-base-4b", &dit, config, out);
    args.extend(strings(&[
        "--output_name",
        "masked",
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
        "--timestep_sampling",
        "sigma",
        "--min_timestep",
        "500",
        "--max_timestep",
        "500",
        "--seed",
        "5",
        "--logging_dir",
    ]));
    args.push(out.join("logs").display().to_string());
    if masked {
        args.push("--masked_loss".into());
    }
    args
}

fn train(root: &Path, config: &Path, name: &str, masked: bool) -> Vec<f32> {
    let out = root.join(name);
    run(&train_args(config, &out, masked));
    losses(&out.join("logs"))
}

fn cached(root: &Path, cache: &str, key: &str) -> Vec<f32> {
    Checkpoint::open(&root.join(cache).join("item_0064x0064_f2k4b.safetensors"))
        .unwrap()
        .load(key, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn masked_loss_trains_on_the_masked_part_only() {
    let root = std::env::temp_dir().join(format!("flux2-masked-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // Image folders, one item each: the same colours with a left-half alpha (`half`), fully
    // opaque (`opaque`); fully transparent with two different colour patterns (`clear_a/b`).
    let folders: [(&str, u32, Alpha); 4] = [
        ("half", 1, |x, _| if x < 32 { 255 } else { 0 }),
        ("opaque", 1, |_, _| 255),
        ("clear_a", 2, |_, _| 0),
        ("clear_b", 3, |_, _| 0),
    ];
    for (folder, seed, alpha) in folders {
        let dir = root.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        write_rgba(&dir.join("item.png"), seed, alpha);
        std::fs::write(dir.join("item.txt"), "a small test pattern").unwrap();
    }
    // The complement of `half`'s alpha as a mask file (white on the right half).
    let masks = root.join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 0 } else { 255 }]))
        .save(masks.join("item.png"))
        .unwrap();
    let mask_line = format!("mask_directory = \"{}\"", masks.display());
    let tables = [
        (
            "left",
            table(&root, "half", "cache_left", "alpha_mask = true"),
        ),
        ("right", table(&root, "half", "cache_right", &mask_line)),
        ("plain", table(&root, "half", "cache_plain", "")),
        (
            "opaque",
            table(&root, "opaque", "cache_opaque", "alpha_mask = true"),
        ),
        (
            "clear_a",
            table(&root, "clear_a", "cache_clear_a", "alpha_mask = true"),
        ),
        (
            "clear_b",
            table(&root, "clear_b", "cache_clear_b", "alpha_mask = true"),
        ),
    ];
    // One config caches everything; each training run gets a config of one dataset.
    let all = write_config(
        &root,
        "all.toml",
        &tables.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(),
    );
    let mut cache = strings(&[
        "cache-latents",
        "--model_version",
        "klein-base-4b",
        "--dataset_config",
    ]);
    cache.push(all.display().to_string());
    cache.push("--vae".into());
    cache.push(golden().join("ae.safetensors").display().to_string());
    run(&cache);
    let mut cache = strings(&[
        "cache-text-encoder-outputs",
        "--model_version",
        "klein-base-4b",
        "--dataset_config",
    ]);
    cache.push(all.display().to_string());
    cache.push("--text_encoder".into());
    cache.push(
        golden()
            .join("klein/text_encoder/model.safetensors")
            .display()
            .to_string(),
    );
    run(&cache);

    // The cached masks on the 4x4 latent grid, and latents that ignore alpha.
    let key = "flux2_tuner_loss_mask_4x4_float32";
    assert_eq!(
        cached(&root, "cache_left", key),
        [1.0, 1.0, 0.0, 0.0].repeat(4)
    );
    assert_eq!(
        cached(&root, "cache_right", key),
        [0.0, 0.0, 1.0, 1.0].repeat(4)
    );
    assert_eq!(cached(&root, "cache_opaque", key), [1.0; 16]);
    assert_eq!(cached(&root, "cache_clear_a", key), [0.0; 16]);
    let latents = cached(&root, "cache_plain", "latents_4x4_float32");
    for cache in ["cache_left", "cache_right", "cache_opaque"] {
        assert_eq!(cached(&root, cache, "latents_4x4_float32"), latents);
    }
    let plain_keys: Vec<String> =
        Checkpoint::open(&root.join("cache_plain/item_0064x0064_f2k4b.safetensors"))
            .unwrap()
            .keys()
            .map(String::from)
            .collect();
    assert_eq!(plain_keys, ["latents_4x4_float32"]);

    let config = |name: &str| {
        let (_, text) = tables.iter().find(|(n, _)| *n == name).unwrap();
        write_config(&root, &format!("{name}.toml"), std::slice::from_ref(text))
    };
    let plain = train(&root, &config("plain"), "run_plain", false);
    let opaque = train(&root, &config("opaque"), "run_opaque", true);
    let left = train(&root, &config("left"), "run_left", true);
    let right = train(&root, &config("right"), "run_right", true);
    let clear_a = train(&root, &config("clear_a"), "run_clear_a", true);
    let clear_b = train(&root, &config("clear_b"), "run_clear_b", true);
    println!("unmasked {plain:?}\nopaque {opaque:?}\nleft {left:?}\nright {right:?}\nclear {clear_a:?} {clear_b:?}");

    // A mask of ones is the unmasked loss exactly, at every step.
    assert_eq!(plain.len(), 2);
    assert_eq!(opaque, plain);
    // Step 1: same prediction in every run, so the two halves add up to the whole.
    assert!(left[0] > 0.0 && right[0] > 0.0 && left[0] < plain[0] && right[0] < plain[0]);
    let sum = left[0] + right[0];
    assert!(
        (sum - plain[0]).abs() <= 1e-5 * plain[0],
        "left {} + right {} = {sum} vs unmasked {}",
        left[0],
        right[0],
        plain[0]
    );
    // Pixels under a zero mask do not reach the loss: two different transparent images train on
    // nothing.
    assert_eq!(clear_a, [0.0, 0.0]);
    assert_eq!(clear_b, [0.0, 0.0]);

    // --masked_loss on a dataset without mask options, and on caches written without masks.
    let refused = command(&train_args(
        &config("plain"),
        &root.join("run_refused"),
        true,
    ));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && message.contains("datasets[0]")
            && message.contains("alpha_mask"),
        "{message}"
    );
    let stale = write_config(
        &root,
        "stale.toml",
        &[table(&root, "half", "cache_plain", "alpha_mask = true")],
    );
    let refused = command(&train_args(&stale, &root.join("run_stale"), true));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && message.contains("item_0064x0064_f2k4b.safetensors")
            && message.contains("re-run cache-latents"),
        "{message}"
    );
}
