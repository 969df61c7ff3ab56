//! AE benchmark on CPU (issue 3, points 5 and 6): the real-size FLUX.2 autoencoder (ch 128,
//! ch_mult [1, 2, 4, 4], random weights written in the BFL key format, f32) encodes and decodes a
//! SIZE x SIZE image; the best of `--repeats` runs is printed in seconds.
//!
//! The same work is then timed in PyTorch by `tools/bench/ae_diffusers.py` (diffusers
//! `AutoencoderKLFlux2`) with the same thread count, when a Python with torch and diffusers is
//! found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`), and both are printed side by side.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_ae -- [--size 512] [--threads 2] [--repeats 1]
//!     [--mode both|decode] [--reference yes|no]
//! ```
//! `--mode decode --size 1024 --reference no` under `/usr/bin/time -v` measures the peak memory of a
//! 1024x1024 decode.

use std::path::Path;

use std::time::Instant;

mod bench_support;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::ae::{write_random_ae, AeConfig, AutoEncoder};
use flux2_tuner::util::rng::SeededRng;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Options {
    size: usize,
    threads: usize,
    repeats: usize,
    encode: bool,
    reference: bool,
}

fn parse_options() -> BenchResult<Options> {
    let mut options = Options {
        size: 512,
        threads: 2,
        repeats: 1,
        encode: true,
        reference: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => options.size = value.parse()?,
            "--threads" => options.threads = value.parse()?,
            "--repeats" => options.repeats = value.parse::<usize>()?.max(1),
            "--mode" => options.encode = value != "decode",
            "--reference" => options.reference = value != "no",
            _ => {
                return Err(format!(
                "unknown option {flag}; expected --size, --threads, --repeats, --mode, --reference"
            )
                .into())
            }
        }
    }
    if options.size % 16 != 0 || options.size == 0 {
        return Err(format!("--size {} must be a positive multiple of 16", options.size).into());
    }
    Ok(options)
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat` (Linux; 0
/// elsewhere). On a shared machine the CPU time of a section varies less than its wall time.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is the 3rd, utime and stime the 14th and
    // 15th, in clock ticks of 1/100 s.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index - 3)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// A timed section: wall seconds and CPU seconds.
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

fn time_section<R>(f: impl FnOnce() -> R) -> (R, Timing) {
    let (start, cpu) = (Instant::now(), process_cpu_seconds());
    let result = f();
    let timing = Timing {
        wall: start.elapsed().as_secs_f64(),
        cpu: process_cpu_seconds() - cpu,
    };
    (result, timing)
}

/// Best timings of encode and of decode (encode is `None` in decode-only mode).
fn time_rust(path: &Path, options: &Options) -> BenchResult<(Option<Timing>, Timing)> {
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(path)?;
    let autoencoder = AutoEncoder::load(&checkpoint, DType::F32, &device)?;
    let mut rng = SeededRng::new(1);
    let side = options.size;
    let latent_side = side / autoencoder.config().pixels_per_latent();
    let (mut encode, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..options.repeats {
        let latents = if options.encode {
            let values: Vec<f32> = (0..3 * side * side)
                .map(|_| (2.0 * rng.uniform() - 1.0) as f32)
                .collect();
            let image = Tensor::from_vec(values, (1, 3, side, side), &device)?;
            let (latents, timing) = time_section(|| autoencoder.encode(&image));
            encode.push(timing);
            latents?
        } else {
            let channels = autoencoder.config().latent_channels();
            let values = rng.normal_vec(channels * latent_side * latent_side);
            Tensor::from_vec(values, (1, channels, latent_side, latent_side), &device)?
        };
        let (image, timing) = time_section(|| autoencoder.decode(&latents));
        decode.push(timing);
        let image = image?;
        let first: f32 = image.flatten_all()?.get(0)?.to_scalar()?;
        if !first.is_finite() || image.dims() != [1, 3, side, side] {
            return Err(format!("bad decode output {:?}", image.dims()).into());
        }
    }
    let best = |timings: &[Timing]| {
        timings
            .iter()
            .copied()
            .min_by(|a, b| a.wall.total_cmp(&b.wall))
            .unwrap_or(Timing {
                wall: f64::NAN,
                cpu: f64::NAN,
            })
    };
    Ok((options.encode.then(|| best(&encode)), best(&decode)))
}

/// The reference timings `(encode, decode, torch description)`, or why they are missing.
fn time_pytorch(options: &Options) -> std::result::Result<(f64, f64, String), String> {
    let script = "ae_diffusers.py";
    let stdout = bench_support::run_reference(
        script,
        &[
            "--size".to_string(),
            options.size.to_string(),
            "--threads".to_string(),
            options.threads.to_string(),
            "--repeats".to_string(),
            options.repeats.to_string(),
        ],
    )?;
    let value = |key: &str| -> std::result::Result<String, String> {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .ok_or_else(|| format!("no {key}= in the output of {script}"))
    };
    let seconds = |key: &str| -> std::result::Result<f64, String> {
        value(key)?.parse().map_err(|e| format!("{key}: {e}"))
    };
    let torch = stdout.lines().next().unwrap_or("torch ?").to_string();
    Ok((
        seconds("encode_seconds")?,
        seconds("decode_seconds")?,
        torch,
    ))
}

fn main() -> BenchResult<()> {
    flux2_tuner::util::memory::keep_freed_buffers();
    let options = parse_options()?;
    // candle's CPU kernels run on rayon's global pool, which reads this on first use.
    std::env::set_var("RAYON_NUM_THREADS", options.threads.to_string());

    let config = AeConfig::real();
    let directory = std::env::temp_dir().join(format!("flux2-bench-ae-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let path = directory.join("ae.safetensors");
    write_random_ae(&config, &path, 0, DType::F32)?;
    let rust = time_rust(&path, &options);
    std::fs::remove_dir_all(&directory)?;
    let (rust_encode, rust_decode) = rust?;

    println!(
        "AE, CPU, {} threads, f32: real size (ch {}, ch_mult {:?}, {} parameters), {}x{} image, best of {}",
        options.threads,
        config.ch,
        config.ch_mult,
        config.parameter_count(),
        options.size,
        options.size,
        options.repeats
    );
    let reference = if options.reference && options.encode {
        time_pytorch(&options)
    } else {
        Err("not requested".to_string())
    };
    match (reference, rust_encode) {
        (Ok((torch_encode, torch_decode, torch)), Some(rust_encode)) => {
            println!("reference: diffusers AutoencoderKLFlux2, {torch}");
            for (name, rust_seconds, torch_seconds) in [
                ("encode", rust_encode, torch_encode),
                ("decode", rust_decode, torch_decode),
            ] {
                println!(
                    "ae_{name} {}px: rust {:.3} s, pytorch {torch_seconds:.3} s, ratio {:.2}",
                    options.size,
                    rust_seconds.wall,
                    rust_seconds.wall / torch_seconds
                );
            }
        }
        (reference, rust_encode) => {
            if let Err(reason) = reference {
                println!("PyTorch unavailable: {reason}");
            }
            if let Some(timing) = rust_encode {
                println!(
                    "ae_encode {}px: rust {:.3} s (cpu {:.2} s)",
                    options.size, timing.wall, timing.cpu
                );
            }
            println!(
                "ae_decode {}px: rust {:.3} s (cpu {:.2} s)",
                options.size, rust_decode.wall, rust_decode.cpu
            );
        }
    }
    Ok(())
}
