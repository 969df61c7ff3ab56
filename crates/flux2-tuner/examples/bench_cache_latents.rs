//! `cache-latents` benchmark on CPU (issue 6, point 7): the whole job (PNG decode, bucketing,
//! real-size FLUX.2 AE encode with random weights in f32, atomic safetensors writes) over
//! `--images` 512x512 images, reported in images per second.
//!
//! Next to it, the AE encode alone in PyTorch/diffusers (`tools/bench/ae_diffusers.py`, which also
//! times a decode that is not counted here) with the same thread count, when a Python with torch
//! and diffusers is found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`).
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_cache_latents -- [--images 4] [--threads 2]
//!     [--batch_size 1] [--reference yes|no]
//! ```

use std::path::{Path, PathBuf};

mod bench_support;

use candle_core::{DType, Device};
use flux2_tuner::data::{
    cache_latents, ConfigFallbacks, DatasetConfig, LatentCacheOptions, SilentObserver,
};
use flux2_tuner::models::ae::{write_random_ae, AeConfig};
use flux2_tuner::models::ModelVersion;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SIDE: u32 = 512;

struct Options {
    images: usize,
    threads: usize,
    batch_size: usize,
    reference: bool,
}

fn parse_options() -> BenchResult<Options> {
    let mut options = Options {
        images: 4,
        threads: 2,
        batch_size: 1,
        reference: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--images" => options.images = value.parse::<usize>()?.max(1),
            "--threads" => options.threads = value.parse::<usize>()?.max(1),
            "--batch_size" => options.batch_size = value.parse::<usize>()?.max(1),
            "--reference" => options.reference = value != "no",
            _ => {
                return Err(format!(
                    "unknown option {flag}; expected --images, --threads, --batch_size, --reference"
                )
                .into())
            }
        }
    }
    Ok(options)
}

/// `count` different 512x512 PNG images with captions, and a dataset config for them.
fn write_dataset(directory: &Path, count: usize) -> BenchResult<PathBuf> {
    let images = directory.join("images");
    std::fs::create_dir_all(&images)?;
    for index in 0..count as u32 {
        let image = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
            image::Rgb([
                ((x * 3 + index * 41) % 256) as u8,
                ((y * 5 + index * 13) % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        image.save(images.join(format!("image{index:03}.png")))?;
        std::fs::write(images.join(format!("image{index:03}.txt")), "caption")?;
    }
    let config = directory.join("dataset.toml");
    std::fs::write(
        &config,
        format!(
            "[general]\nresolution = [{SIDE}, {SIDE}]\ncaption_extension = \".txt\"\nenable_bucket = true\nbatch_size = {count}\n\n[[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\n",
            images.display(),
            directory.join("cache").display()
        ),
    )?;
    Ok(config)
}

/// The reference's best encode seconds and its torch description, or why they are missing.
fn time_pytorch(options: &Options) -> std::result::Result<(f64, String), String> {
    let script = "ae_diffusers.py";
    let stdout = bench_support::run_reference(
        script,
        &[
            "--size".to_string(),
            SIDE.to_string(),
            "--threads".to_string(),
            options.threads.to_string(),
            "--repeats".to_string(),
            ("2").to_string(),
        ],
    )?;
    let seconds = stdout
        .lines()
        .find_map(|line| line.strip_prefix("encode_seconds="))
        .ok_or_else(|| format!("no encode_seconds= in the output of {script}"))?
        .parse::<f64>()
        .map_err(|e| format!("encode_seconds: {e}"))?;
    Ok((
        seconds,
        stdout.lines().next().unwrap_or("torch ?").to_string(),
    ))
}

fn main() -> BenchResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    let options = parse_options()?;
    // candle's CPU kernels run on rayon's global pool, which reads this on first use.
    std::env::set_var("RAYON_NUM_THREADS", options.threads.to_string());
    let directory = std::env::temp_dir().join(format!("flux2-bench-cache-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let vae = directory.join("ae.safetensors");
    let config = AeConfig::real();
    write_random_ae(&config, &vae, 0, DType::F32)?;
    let dataset = write_dataset(&directory, options.images)?;
    let dataset = DatasetConfig::load(&dataset, &ConfigFallbacks::default())?;
    let job = LatentCacheOptions {
        vae,
        version: ModelVersion::Klein4b,
        vae_dtype: DType::F32,
        device: Device::Cpu,
        batch_size: Some(options.batch_size),
        num_workers: options.threads,
        skip_existing: false,
        keep_cache: false,
        skip_bad_images: false,
    };
    let summary = cache_latents(&dataset, &job, &mut SilentObserver);
    std::fs::remove_dir_all(&directory)?;
    let summary = summary?;

    println!(
        "cache-latents, CPU, {} threads, f32 real-size AE ({} parameters), {} images of {SIDE}x{SIDE}, AE batch {}",
        options.threads,
        config.parameter_count(),
        options.images,
        options.batch_size
    );
    println!(
        "rust cache-latents: {} images in {:.2} s (AE load included) = {:.3} images/s",
        summary.cached,
        summary.seconds,
        summary.cached as f64 / summary.seconds
    );
    if options.reference {
        match time_pytorch(&options) {
            Ok((seconds, torch)) => println!(
                "pytorch diffusers AutoencoderKLFlux2 encode only ({torch}): {seconds:.2} s per image = {:.3} images/s",
                1.0 / seconds
            ),
            Err(reason) => println!("PyTorch unavailable: {reason}"),
        }
    }
    Ok(())
}
