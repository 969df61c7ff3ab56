//! Loss masks on the data side (beyond Musubi): the dataset keys, reading alpha channels and mask
//! files, the bucket resize and 16x16 area average against hand computations, and cache-latents
//! writing the mask into a cache that the training side reads back (with the tiny golden AE).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::data::cache::write_text_cache;
use flux2_tuner::data::mask::{
    latent_mask, load_latent_mask, loss_mask_key, mask_to_bucket, read_alpha, read_mask_file,
    MaskIndex, MaskSource,
};
use flux2_tuner::data::{
    cache_latents, CachedDataset, ConfigFallbacks, DatasetConfig, LatentCacheOptions,
    SilentObserver,
};
use flux2_tuner::models::ModelVersion;
use flux2_tuner::train::masked_loss::{check_loss_masks, load_batch_masks};
use image::{GrayImage, Luma, Rgba, RgbaImage};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-data-mask-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn parse(text: &str) -> Result<DatasetConfig, String> {
    DatasetConfig::parse(text, Path::new("dataset.toml"), &ConfigFallbacks::default())
        .map_err(|e| e.to_string())
}

#[test]
fn the_latent_mask_is_the_mean_of_each_16_pixel_block() {
    // 48x32 pixels: a 2x3 grid of blocks, each with a mean worked out by hand.
    let mask = GrayImage::from_fn(48, 32, |x, y| {
        let (column, row) = (x / 16, y / 16);
        let (u, v) = (x % 16, y % 16);
        Luma([match (row, column) {
            (0, 0) => 255,                            // all white: 1
            (0, 1) => ((u + v) % 2 == 0) as u8 * 255, // checkerboard: 128/256
            (0, 2) => (u < 4) as u8 * 255,            // 4 of 16 columns: 1/4
            (1, 0) => 51,                             // 51/255 = 0.2
            (1, 1) => 0,                              // all black: 0
            _ => ((u, v) == (7, 9)) as u8 * 255,      // one pixel: 1/256
        }])
    });
    let grid = latent_mask(&mask).unwrap();
    assert_eq!(grid.dims(), [1, 2, 3]);
    let expected = [1.0, 0.5, 0.25, 0.2, 0.0, 1.0 / 256.0];
    for (found, wanted) in values(&grid).iter().zip(expected) {
        assert!((found - wanted).abs() < 1e-7, "{found} vs {wanted}");
    }
    // Only whole latent cells can be averaged.
    let error = latent_mask(&GrayImage::new(40, 32))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("multiple of 16") && error.contains("40x32"),
        "{error}"
    );
}

#[test]
fn masks_get_the_images_bucket_resize_and_centre_crop() {
    let path = Path::new("mask.png");
    // 48x32 into a 32x32 bucket: scale 1, centre crop of columns 8..40. White columns 0..24 become
    // columns 0..16 of the bucket: the left latent column.
    let wide = GrayImage::from_fn(48, 32, |x, _| Luma([(x < 24) as u8 * 255]));
    let cropped = latent_mask(&mask_to_bucket(&wide, (32, 32), path).unwrap()).unwrap();
    assert_eq!(values(&cropped), [1.0, 0.0, 1.0, 0.0]);
    // A mask of twice the image's size (128x128 for a 64x64 bucket) is area-halved: white rows
    // 0..64 become rows 0..32, the top two latent rows.
    let large = GrayImage::from_fn(128, 128, |_, y| Luma([(y < 64) as u8 * 255]));
    let halved = latent_mask(&mask_to_bucket(&large, (64, 64), path).unwrap()).unwrap();
    assert_eq!(halved.dims(), [1, 4, 4]);
    let mut expected = vec![1.0; 8];
    expected.extend([0.0; 8]);
    assert_eq!(values(&halved), expected);
}

#[test]
fn alpha_channels_and_mask_files_are_read_as_8_bit_weights() {
    let dir = temp_dir("read");
    let rgba = RgbaImage::from_fn(20, 10, |x, y| Rgba([10, 20, 30, (x * 10 + y) as u8]));
    rgba.save(dir.join("rgba.png")).unwrap();
    let alpha = read_alpha(&dir.join("rgba.png")).unwrap();
    assert_eq!(alpha.dimensions(), (20, 10));
    assert_eq!(alpha.get_pixel(13, 7)[0], 137);
    // No alpha channel: everything trains.
    image::RgbImage::from_pixel(8, 4, image::Rgb([1, 2, 3]))
        .save(dir.join("rgb.png"))
        .unwrap();
    let opaque = read_alpha(&dir.join("rgb.png")).unwrap();
    assert!(opaque.pixels().all(|p| p[0] == 255));
    // A greyscale mask is its grey level; a colour mask its red channel (as sd-scripts).
    GrayImage::from_fn(6, 6, |x, _| Luma([x as u8 * 40]))
        .save(dir.join("grey.png"))
        .unwrap();
    assert_eq!(
        read_mask_file(&dir.join("grey.png"))
            .unwrap()
            .get_pixel(5, 2)[0],
        200
    );
    image::RgbImage::from_pixel(6, 6, image::Rgb([90, 255, 0]))
        .save(dir.join("colour.png"))
        .unwrap();
    assert_eq!(
        read_mask_file(&dir.join("colour.png"))
            .unwrap()
            .get_pixel(1, 1)[0],
        90
    );
    let error = read_mask_file(&dir.join("missing.png"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("missing.png"), "{error}");
}

#[test]
fn the_dataset_keys_parse_and_bad_ones_name_the_key() {
    let config = parse(
        "[general]\ncaption_extension = \".txt\"\n\n[[datasets]]\nimage_directory = \"/i\"\nalpha_mask = true\n\n\
         [[datasets]]\nimage_directory = \"/j\"\nmask_directory = \"/m\"\n\n[[datasets]]\nimage_directory = \"/k\"\n",
    )
    .unwrap();
    let specs = &config.datasets;
    assert!(specs[0].alpha_mask && specs[0].mask_directory.is_none());
    assert!(!specs[1].alpha_mask && specs[1].mask_directory == Some(PathBuf::from("/m")));
    assert!(!specs[2].alpha_mask && specs[2].mask_directory.is_none());

    let both = parse(
        "[[datasets]]\nimage_directory = \"/i\"\nalpha_mask = true\nmask_directory = \"/m\"\n",
    )
    .unwrap_err();
    assert!(
        both.contains("datasets[0]") && both.contains("not both"),
        "{both}"
    );
    let wrong_type = parse("[[datasets]]\nimage_directory = \"/i\"\nalpha_mask = 1\n").unwrap_err();
    assert!(
        wrong_type.contains("`alpha_mask` must be true or false"),
        "{wrong_type}"
    );
    // Image datasets only; and unknown keys still fail.
    let video = parse("[[datasets]]\nvideo_directory = \"/v\"\nalpha_mask = true\n").unwrap_err();
    assert!(video.contains("unknown key `alpha_mask`"), "{video}");
    let unknown = parse("[[datasets]]\nimage_directory = \"/i\"\nmask_dir = \"/m\"\n").unwrap_err();
    assert!(unknown.contains("unknown key `mask_dir`"), "{unknown}");

    // A mask directory that does not exist is named on load.
    let dir = temp_dir("config");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let path = dir.join("dataset.toml");
    std::fs::write(
        &path,
        format!(
            "[[datasets]]\nimage_directory = \"{}\"\nmask_directory = \"{}\"\n",
            dir.join("images").display(),
            dir.join("nowhere").display()
        ),
    )
    .unwrap();
    let error = DatasetConfig::load(&path, &ConfigFallbacks::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`mask_directory`")
            && error.contains("nowhere")
            && error.contains("does not exist"),
        "{error}"
    );
}

#[test]
fn a_missing_or_ambiguous_mask_names_the_image_and_the_directory() {
    let dir = temp_dir("index");
    let masks = dir.join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    GrayImage::new(4, 4).save(masks.join("a.png")).unwrap();
    GrayImage::new(4, 4).save(masks.join("b.png")).unwrap();
    GrayImage::new(4, 4).save(masks.join("b.jpg")).unwrap();
    let config = parse(&format!(
        "[[datasets]]\nimage_directory = \"/i\"\nmask_directory = \"{}\"\n",
        masks.display()
    ))
    .unwrap();
    let index = MaskIndex::for_dataset(&config.datasets[0]).unwrap();
    assert_eq!(
        index.source_for(Path::new("/i/a.webp")).unwrap(),
        Some(MaskSource::File(masks.join("a.png")))
    );
    let missing = index
        .source_for(Path::new("/i/c.png"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("/i/c.png") && missing.contains("no mask") && missing.contains("masks"),
        "{missing}"
    );
    let ambiguous = index
        .source_for(Path::new("/i/b.png"))
        .unwrap_err()
        .to_string();
    assert!(ambiguous.contains("2 masks named b.*"), "{ambiguous}");
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

fn write_config(path: &Path, images: &Path, cache: &Path, mask_line: &str) {
    std::fs::write(
        path,
        format!(
            "[[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\ncaption_extension = \".txt\"\n\
             resolution = 64\nenable_bucket = true\nbatch_size = 2\n{mask_line}\n",
            images.display(),
            cache.display()
        ),
    )
    .unwrap();
}

fn load(path: &Path) -> DatasetConfig {
    DatasetConfig::load(path, &ConfigFallbacks::default()).unwrap()
}

fn cache_keys(path: &Path) -> Vec<String> {
    let mut keys: Vec<String> = Checkpoint::open(path)
        .unwrap()
        .keys()
        .map(String::from)
        .collect();
    keys.sort();
    keys
}

#[test]
fn cache_latents_stores_the_mask_and_training_reads_it_back() {
    let root = temp_dir("cache");
    let images = root.join("images");
    let cache = root.join("cache");
    std::fs::create_dir_all(&images).unwrap();
    // a.png: RGBA 64x64, opaque on the left half. b.png: RGB, no alpha.
    RgbaImage::from_fn(64, 64, |x, y| {
        Rgba([
            (x * 4) as u8,
            (y * 4) as u8,
            90,
            if x < 32 { 255 } else { 0 },
        ])
    })
    .save(images.join("a.png"))
    .unwrap();
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(y * 3) as u8, 40, (x * 2) as u8])
    })
    .save(images.join("b.png"))
    .unwrap();
    std::fs::write(images.join("a.txt"), "a").unwrap();
    std::fs::write(images.join("b.txt"), "b").unwrap();
    let config_path = root.join("dataset.toml");
    write_config(&config_path, &images, &cache, "alpha_mask = true");
    cache_latents(
        &load(&config_path),
        &latent_options(false),
        &mut SilentObserver,
    )
    .unwrap();

    let a_cache = cache.join("a_0064x0064_f2k4b.safetensors");
    let b_cache = cache.join("b_0064x0064_f2k4b.safetensors");
    assert_eq!(
        cache_keys(&a_cache),
        [loss_mask_key(4, 4), "latents_4x4_float32".to_string()]
    );
    let file = Checkpoint::open(&a_cache).unwrap();
    let mask = file
        .load(&loss_mask_key(4, 4), DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(mask.dims(), [1, 4, 4]);
    assert_eq!(values(&mask), [1.0, 1.0, 0.0, 0.0].repeat(4));
    let b_mask = Checkpoint::open(&b_cache)
        .unwrap()
        .load(&loss_mask_key(4, 4), DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(values(&b_mask), [1.0; 16]);

    // The training side: text caches by hand, then the masks come back stacked per batch.
    let ctx = Tensor::ones((512, 24), DType::F32, &Device::Cpu).unwrap();
    for stem in ["a", "b"] {
        write_text_cache(
            &cache.join(format!("{stem}_f2k4b_te.safetensors")),
            &ctx,
            "f2k4b",
            stem,
        )
        .unwrap();
    }
    let config = load(&config_path);
    let datasets = CachedDataset::read_all(&config, "f2k4b").unwrap();
    check_loss_masks(&config, &datasets).unwrap();
    let batch = &datasets[0].batches()[0];
    let items: Vec<_> = batch.iter().map(|item| (*item).clone()).collect();
    let masks = load_batch_masks(&items, &Device::Cpu).unwrap();
    assert_eq!(masks.dims(), [2, 1, 4, 4]);
    assert_eq!(values(&masks.get(0).unwrap()), values(&mask));

    // Without the option the caches are re-encoded without a mask (--skip_existing compares the
    // keys) and the latents are unchanged: alpha is dropped, never composited.
    let plain_path = root.join("plain.toml");
    write_config(&plain_path, &images, &cache, "");
    cache_latents(
        &load(&plain_path),
        &latent_options(true),
        &mut SilentObserver,
    )
    .unwrap();
    assert_eq!(cache_keys(&a_cache), ["latents_4x4_float32".to_string()]);
    let plain = Checkpoint::open(&a_cache)
        .unwrap()
        .load("latents_4x4_float32", DType::F32, &Device::Cpu)
        .unwrap();
    let masked = file
        .load("latents_4x4_float32", DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(values(&plain), values(&masked));

    // --masked_loss on those caches: the cache without a mask is named, with the fix.
    let config = load(&config_path);
    let datasets = CachedDataset::read_all(&config, "f2k4b").unwrap();
    let error = check_loss_masks(&config, &datasets)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("a_0064x0064_f2k4b.safetensors")
            && error.contains("no loss mask")
            && error.contains("re-run cache-latents"),
        "{error}"
    );
    let error = load_batch_masks(&items, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(error.contains("re-run cache-latents"), "{error}");
    // A dataset that asks for no mask is named.
    let plain = load(&plain_path);
    let error = check_loss_masks(&plain, &datasets).unwrap_err().to_string();
    assert!(
        error.contains("datasets[0]")
            && error.contains("neither `alpha_mask = true` nor `mask_directory`"),
        "{error}"
    );
}

#[test]
fn cache_latents_reads_masks_from_a_mask_directory_and_refuses_a_missing_one() {
    let root = temp_dir("directory");
    let images = root.join("images");
    let masks = root.join("masks");
    let cache = root.join("cache");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 7]))
        .save(images.join("a.png"))
        .unwrap();
    std::fs::write(images.join("a.txt"), "a").unwrap();
    // Twice the image's size, white on the top half, saved as JPEG-free greyscale PNG.
    GrayImage::from_fn(128, 128, |_, y| Luma([(y < 64) as u8 * 255]))
        .save(masks.join("a.png"))
        .unwrap();
    let config_path = root.join("dataset.toml");
    write_config(
        &config_path,
        &images,
        &cache,
        &format!("mask_directory = \"{}\"", masks.display()),
    );
    cache_latents(
        &load(&config_path),
        &latent_options(false),
        &mut SilentObserver,
    )
    .unwrap();
    let mask = Checkpoint::open(&cache.join("a_0064x0064_f2k4b.safetensors"))
        .unwrap()
        .load(&loss_mask_key(4, 4), DType::F32, &Device::Cpu)
        .unwrap();
    let mut expected = vec![1.0; 8];
    expected.extend([0.0; 8]);
    assert_eq!(values(&mask), expected);
    // The library function gives the same.
    let direct = load_latent_mask(
        &MaskSource::File(masks.join("a.png")),
        &images.join("a.png"),
        (64, 64),
    )
    .unwrap();
    assert_eq!(values(&direct), expected);

    // A second image without a mask: the run stops before the AE, naming the image.
    image::RgbImage::new(64, 64)
        .save(images.join("b.png"))
        .unwrap();
    std::fs::write(images.join("b.txt"), "b").unwrap();
    let error = cache_latents(
        &load(&config_path),
        &latent_options(false),
        &mut SilentObserver,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("b.png") && error.contains("no mask for this image"),
        "{error}"
    );
    assert!(!cache.join("b_0064x0064_f2k4b.safetensors").exists());
}
