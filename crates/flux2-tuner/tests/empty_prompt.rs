//! The empty-prompt embedding of `cache-text-encoder-outputs` (for caption dropout): written into
//! every cache directory, equal to the encoder's output for "", kept by `skip_existing` without
//! loading the encoder, and read back by `load_empty_prompt` (a missing file names the command).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flux2_tuner::data::empty_prompt::{empty_prompt_cache_path, load_empty_prompt};
use flux2_tuner::data::{
    cache_text_encoder_outputs, CacheObserver, ConfigFallbacks, DatasetConfig, TextCacheOptions,
};
use flux2_tuner::models::text::encoder::{TextEncoder, TextEncoderOptions};
use flux2_tuner::models::ModelVersion;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

/// Records the phases, to see whether the encoder was loaded.
#[derive(Default)]
struct Phases(Vec<String>);

impl CacheObserver for Phases {
    fn phase(&mut self, message: &str) {
        self.0.push(message.to_string());
    }
}

fn values(tensor: &candle_core::Tensor) -> Vec<f32> {
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn every_cache_directory_gets_the_encoders_empty_prompt() {
    let root = std::env::temp_dir().join(format!("flux2-empty-prompt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut tables = String::new();
    for name in ["first", "second"] {
        let images = root.join(name);
        std::fs::create_dir_all(&images).unwrap();
        image::RgbImage::from_pixel(32, 32, image::Rgb([10, 20, 30]))
            .save(images.join("a.png"))
            .unwrap();
        std::fs::write(images.join("a.txt"), format!("the {name} one")).unwrap();
        tables.push_str(&format!(
            "[[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\n\n",
            images.display(),
            root.join(format!("{name}_cache")).display()
        ));
    }
    let config_path = root.join("dataset.toml");
    std::fs::write(
        &config_path,
        format!("[general]\nresolution = [32, 32]\ncaption_extension = \".txt\"\n\n{tables}"),
    )
    .unwrap();
    let config = DatasetConfig::load(&config_path, &ConfigFallbacks::default()).unwrap();
    let encoder_path = golden().join("klein/text_encoder/model.safetensors");
    let mut options = TextCacheOptions {
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
    cache_text_encoder_outputs(&config, &options, &mut Phases::default()).unwrap();

    let info = ModelVersion::KleinBase4b.info();
    let encoder = TextEncoder::load(
        &encoder_path,
        info.text_encoder,
        &TextEncoderOptions::new(info.text_encoder, Device::Cpu, DType::BF16),
    )
    .unwrap();
    // The cache stores the bf16 rounding of the encoder's output, as every text cache.
    let direct = encoder
        .encode(&[""])
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .get(0)
        .unwrap();
    for name in ["first_cache", "second_cache"] {
        let directory = root.join(name);
        assert!(empty_prompt_cache_path(&directory, "f2k4b").is_file());
        let cached = load_empty_prompt(&directory, "f2k4b", DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(cached.dims(), &[512, 3 * encoder.hidden_size()]);
        let differing = values(&cached)
            .iter()
            .zip(values(&direct))
            .filter(|(a, b)| **a != *b)
            .count();
        assert_eq!(differing, 0, "{name}: {differing} values differ");
    }

    // skip_existing keeps it (and the item caches) without loading the encoder; a missing one is
    // written again.
    options.skip_existing = true;
    let mut phases = Phases::default();
    cache_text_encoder_outputs(&config, &options, &mut phases).unwrap();
    assert!(
        phases
            .0
            .iter()
            .all(|p| !p.starts_with("loading text encoder")),
        "{:?}",
        phases.0
    );
    let second = empty_prompt_cache_path(&root.join("second_cache"), "f2k4b");
    std::fs::remove_file(&second).unwrap();
    let message = load_empty_prompt(
        &root.join("second_cache"),
        "f2k4b",
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("empty_prompt.f2k4b_te.safetensors")
            && message.contains("cache-text-encoder-outputs"),
        "{message}"
    );
    let mut phases = Phases::default();
    cache_text_encoder_outputs(&config, &options, &mut phases).unwrap();
    assert!(phases
        .0
        .iter()
        .any(|p| p.starts_with("loading text encoder")));
    assert!(second.is_file());
    // The item caches are still exactly one per image: the empty prompt is no item.
    let summary = cache_text_encoder_outputs(&config, &options, &mut Phases::default()).unwrap();
    assert_eq!((summary.cached, summary.skipped), (0, 2));
}
