//! The dataset configuration: Musubi's documented examples parse unchanged to the values Musubi
//! resolves (dataset table, then [general], then --batch_size, then defaults), bad files fail
//! naming the file and the key, and the bucket table matches Musubi's algorithm.

use std::path::{Path, PathBuf};

use flux2_tuner::data::{BucketSelector, ConfigFallbacks, DatasetConfig, DatasetSource};

fn example(name: &str) -> (String, PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/musubi_examples")
        .join(name);
    (std::fs::read_to_string(&path).unwrap(), path)
}

fn parse(text: &str) -> Result<DatasetConfig, String> {
    DatasetConfig::parse(text, Path::new("dataset.toml"), &ConfigFallbacks::default())
        .map_err(|e| e.to_string())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-data-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn image_caption_example_resolves_general_values() {
    let (text, path) = example("image_captions.toml");
    let config = DatasetConfig::parse(&text, &path, &ConfigFallbacks::default()).unwrap();
    assert_eq!(config.datasets.len(), 1);
    let spec = &config.datasets[0];
    assert_eq!(
        spec.source,
        DatasetSource::ImageDirectory("/path/to/image_dir".into())
    );
    assert_eq!(
        spec.cache_directory,
        PathBuf::from("/path/to/cache_directory")
    );
    assert_eq!(spec.resolution, (960, 544));
    assert_eq!(spec.caption_extension.as_deref(), Some(".txt"));
    assert_eq!((spec.batch_size, spec.num_repeats), (1, 1));
    assert!(spec.enable_bucket && !spec.bucket_no_upscale);
    assert_eq!(spec.control_directory, None);
}

#[test]
fn jsonl_and_control_examples_parse() {
    let (text, path) = example("image_jsonl.toml");
    let config = DatasetConfig::parse(&text, &path, &ConfigFallbacks::default()).unwrap();
    assert_eq!(
        config.datasets[0].source,
        DatasetSource::ImageJsonl("/path/to/metadata.jsonl".into())
    );
    assert_eq!(config.datasets[0].caption_extension, None);

    let (text, path) = example("control_resize.toml");
    let config = DatasetConfig::parse(&text, &path, &ConfigFallbacks::default()).unwrap();
    let spec = &config.datasets[0];
    assert_eq!(spec.control_directory, Some("/path/to/control_dir".into()));
    assert_eq!(spec.control_resolution, Some((1024, 1024)));
    assert!(!spec.no_resize_control);
    // No [general]: Musubi's defaults, and the cache goes next to the images.
    assert_eq!(spec.resolution, (960, 544));
    assert_eq!(spec.cache_directory, PathBuf::from("/path/to/image_dir"));
    assert!(!spec.enable_bucket);
}

#[test]
fn video_and_specification_examples_parse() {
    for name in ["video_captions.toml", "video_jsonl.toml"] {
        let (text, path) = example(name);
        let config = DatasetConfig::parse(&text, &path, &ConfigFallbacks::default()).unwrap();
        assert_eq!(config.datasets.len(), 2, "{name}");
        assert!(config
            .datasets
            .iter()
            .all(|d| matches!(d.source, DatasetSource::Video(_))));
    }
    let (text, path) = example("specifications.toml");
    let config = DatasetConfig::parse(&text, &path, &ConfigFallbacks::default()).unwrap();
    assert_eq!(config.datasets.len(), 4);
    let first = &config.datasets[0];
    assert_eq!((first.batch_size, first.num_repeats), (4, 1));
    // enable_bucket = false in the dataset overrides [general]; bucket_no_upscale = true is
    // then forced off, as Musubi's BaseDataset does.
    assert!(!first.enable_bucket && !first.bucket_no_upscale);
    assert_eq!(first.control_directory, Some("/path/to/control_dir".into()));
    assert_eq!(config.datasets[1].batch_size, 1);
    // The example reuses one cache directory, which Musubi refuses when building datasets:
    // parse accepts it, the file-system check does not.
    let error = config.check_paths().unwrap_err().to_string();
    assert!(error.contains("cache directory"), "{error}");
}

#[test]
fn fallback_order_is_dataset_general_flag_default() {
    let text = r#"
[general]
num_repeats = 3
[[datasets]]
image_directory = "/a"
caption_extension = ".caption"
num_repeats = 5
[[datasets]]
image_directory = "/b"
caption_extension = ".txt"
resolution = 512
"#;
    let fallbacks = ConfigFallbacks {
        batch_size: Some(6),
    };
    let config = DatasetConfig::parse(text, Path::new("d.toml"), &fallbacks).unwrap();
    assert_eq!(config.datasets[0].num_repeats, 5);
    assert_eq!(config.datasets[1].num_repeats, 3);
    // No table sets batch_size: --batch_size fills it.
    assert_eq!(config.datasets[0].batch_size, 6);
    assert_eq!(config.datasets[1].resolution, (512, 512));
    assert_eq!(config.datasets[0].resolution, (960, 544));
}

#[test]
fn deprecated_keys_are_renamed_and_json_is_read() {
    let text = r#"
[[datasets]]
image_directory = "/a"
caption_extension = ".txt"
control_directory = "/c"
flux_kontext_no_resize_control = true
qwen_image_edit_control_resolution = [1024, 768]
"#;
    let spec = &parse(text).unwrap().datasets[0];
    assert!(spec.no_resize_control);
    assert_eq!(spec.control_resolution, Some((1024, 768)));

    let json = r#"{"general": {"resolution": [768, 512], "enable_bucket": true},
        "datasets": [{"image_jsonl_file": "/m.jsonl", "cache_directory": "/cache"}]}"#;
    let config =
        DatasetConfig::parse(json, Path::new("d.json"), &ConfigFallbacks::default()).unwrap();
    assert_eq!(config.datasets[0].resolution, (768, 512));
    assert!(config.datasets[0].enable_bucket);
}

#[test]
fn bad_configs_name_the_file_and_the_key() {
    let cases = [
        (
            "[[datasets]]\nimage_directory = \"/a\"\ncaption_extention = \".txt\"\n",
            "unknown key `caption_extention`",
        ),
        (
            "[general]\ncache_directory = \"/c\"\n",
            "[general]: unknown key `cache_directory`",
        ),
        (
            "[[datasets]]\nimage_directory = \"/a\"\nbatch_size = \"4\"\n",
            "`batch_size` must be an integer",
        ),
        (
            "[[datasets]]\nimage_directory = \"/a\"\nresolution = [1, 2, 3]\n",
            "`resolution` must be an integer or a list of two integers",
        ),
        (
            "[[datasets]]\nimage_directory = \"/a\"\nenable_bucket = \"yes\"\n",
            "`enable_bucket` must be true or false",
        ),
        (
            "[[datasets]]\nimage_jsonl_file = \"/m.jsonl\"\n",
            "`cache_directory` is required",
        ),
        (
            "[[datasets]]\nimage_directory = \"/a\"\nresolution = [1000, 750]\n",
            "must be multiples of 16",
        ),
        (
            "[[datasets]]\nimage_directory = \"/a\"\nbatch_size = 0\n",
            "`batch_size` must be a positive integer",
        ),
        ("[[datasets]]\nnum_repeats = 2\n", "needs `image_directory`"),
        ("[trainer]\nx = 1\n", "unknown top-level key `trainer`"),
        ("[[datasets]\n", "not valid TOML"),
    ];
    for (text, expected) in cases {
        let error = parse(text).unwrap_err();
        assert!(error.starts_with("dataset.toml: "), "{error}");
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn missing_directories_are_errors_naming_the_key() {
    let dir = temp_dir("missing");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let config_path = dir.join("dataset.toml");
    let text = format!(
        "[[datasets]]\nimage_directory = \"{}\"\ncaption_extension = \".txt\"\ncontrol_directory = \"{}\"\n",
        dir.join("images").display(),
        dir.join("no_controls").display()
    );
    std::fs::write(&config_path, text).unwrap();
    let error = DatasetConfig::load(&config_path, &ConfigFallbacks::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&config_path.display().to_string())
            && error.contains("`control_directory`")
            && error.contains("does not exist"),
        "{error}"
    );
    let missing = dir.join("absent.toml");
    let error = DatasetConfig::load(&missing, &ConfigFallbacks::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("absent.toml"), "{error}");
}

/// Bucket table, each value derived by hand from Musubi's `BucketSelector` (`bucket.py`):
///
/// resolution 960x544, bucketing on: area 522240, s = int(sqrt(522240)) = 722, min =
/// floor16(361) = 352, widths 352, 368, ..., 736 with h = floor16(522240 // w), plus transposes
/// (47 distinct). Nearest aspect ratio:
/// * 1920x1080 (1.7778): w = 544 gives 522240 // 544 = 960 -> (960, 544) = 1.7647, error 0.013;
///   its neighbours (976, 528) = 1.848 and (928, 560) = 1.657 are farther.
/// * 1080x1920: the transpose, (544, 960).
/// * 512x512 (1.0): w = 720 gives 725 -> 720: (720, 720), error 0.
/// * 300x200 (1.5): (880, 592) = 1.4865 (w = 592: 882 -> 880) beats (896, 576) = 1.5556.
/// * 4000x3000 and 64x48 (1.3333): w = 624: 836 -> 832, (832, 624) = 1.3333 exactly (small
///   images are enlarged when no_upscale is off).
/// * 700x500 (1.4): (848, 608) = 1.3947 (w = 608: 858 -> 848) beats (880, 592) = 1.4865.
///
/// resolution 512x512, bucketing on, bucket_no_upscale: area 262144.
/// * 300x200 (60000 <= 262144): own size floored to 16: (288, 192). 64x48 -> (64, 48).
///   512x512 (equal area) -> (512, 512). 15x15 -> (0, 0) (refused by the cache job).
/// * 1920x1080 (larger): w = 384: 262144 // 384 = 682 -> 672: (672, 384) = 1.75, error 0.028;
///   (640, 400) = 1.6 and (704, 368) = 1.913 are farther.
/// * 700x500 (1.4, larger): w = 432: 606 -> 592: (592, 432) = 1.370 beats (576, 448) = 1.286
///   and (624, 416) = 1.5. 4000x3000 (1.3333): (592, 432), error 0.037 < 0.048 of (576, 448).
///
/// resolution 1024x1024, bucketing off: always (1024, 1024).
/// (resolution, enable_bucket, bucket_no_upscale, image size, expected bucket); sizes are
/// (width, height).
type BucketRow = ((u32, u32), bool, bool, (u32, u32), (u32, u32));

#[test]
fn bucket_table_matches_musubis_algorithm() {
    let table: [BucketRow; 20] = [
        ((960, 544), true, false, (1920, 1080), (960, 544)),
        ((960, 544), true, false, (1080, 1920), (544, 960)),
        ((960, 544), true, false, (512, 512), (720, 720)),
        ((960, 544), true, false, (300, 200), (880, 592)),
        ((960, 544), true, false, (4000, 3000), (832, 624)),
        ((960, 544), true, false, (64, 48), (832, 624)),
        ((960, 544), true, false, (700, 500), (848, 608)),
        ((512, 512), true, true, (300, 200), (288, 192)),
        ((512, 512), true, true, (64, 48), (64, 48)),
        ((512, 512), true, true, (512, 512), (512, 512)),
        ((512, 512), true, true, (15, 15), (0, 0)),
        ((512, 512), true, true, (1920, 1080), (672, 384)),
        ((512, 512), true, true, (1080, 1920), (384, 672)),
        ((512, 512), true, true, (700, 500), (592, 432)),
        ((512, 512), true, true, (4000, 3000), (592, 432)),
        ((1024, 1024), false, false, (1920, 1080), (1024, 1024)),
        ((1024, 1024), false, true, (300, 200), (1024, 1024)),
        ((1024, 1024), false, false, (64, 48), (1024, 1024)),
        ((960, 544), true, false, (544, 960), (544, 960)),
        ((960, 544), true, false, (960, 544), (960, 544)),
    ];
    for (resolution, enable, no_upscale, image, expected) in table {
        let selector = BucketSelector::new(resolution, enable, no_upscale);
        assert_eq!(
            selector.bucket(image),
            expected,
            "resolution {resolution:?} bucket {enable} no_upscale {no_upscale} image {image:?}"
        );
    }
    assert_eq!(
        BucketSelector::new((960, 544), true, false)
            .resolutions()
            .len(),
        47
    );
}
