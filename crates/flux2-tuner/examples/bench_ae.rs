//! AE benchmark on CPU (issue 3, points 5 and 6): the real-size FLUX.2 autoencoder (ch 128,
//! ch_mult [1, 2, 4, 4], random weights written in the BFL key format, f32) encodes and decodes a
//! SIZE x SIZE image, `--repeats` times; the medians are printed in seconds.
//!
//! The same work runs in PyTorch in `tools/bench/ae_diffusers.py --serve` (diffusers
//! `AutoencoderKLFlux2`) with the same thread count, when a Python with torch and diffusers is
//! found (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`). Each Rust pass is followed by the
//! same PyTorch pass (single timings on a shared machine move with other tenants' load; a pair of
//! neighbouring passes sees the same load); the ratio is the median of the per-pair ratios.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example bench_ae -- [--size 512] [--threads 2] [--repeats 5]
//!     [--mode both|encode|decode] [--reference yes|no]
//! ```
//! `--mode decode --size 1024 --reference no` under `/usr/bin/time -v` measures the peak memory of a
//! 1024x1024 decode.

use std::path::Path;

use std::time::Instant;

mod bench_support;

use bench_support::StepServer;

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
    decode: bool,
    reference: bool,
}

fn parse_options() -> BenchResult<Options> {
    let mut options = Options {
        size: 512,
        threads: 2,
        repeats: 5,
        encode: true,
        decode: true,
        reference: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => options.size = value.parse()?,
            "--threads" => options.threads = value.parse()?,
            "--repeats" => options.repeats = value.parse::<usize>()?.max(1),
            "--mode" => {
                (options.encode, options.decode) = match value.as_str() {
                    "both" => (true, true),
                    "encode" => (true, false),
                    "decode" => (false, true),
                    _ => {
                        return Err(
                            format!("--mode {value}: expected both, encode or decode").into()
                        )
                    }
                }
            }
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

/// What each side measured, pass by pass: Rust encode and decode timings, and the PyTorch
/// seconds of the pass that followed each (when PyTorch serves).
#[derive(Default)]
struct Passes {
    encode: Vec<Timing>,
    decode: Vec<Timing>,
    torch_encode: Vec<f64>,
    torch_decode: Vec<f64>,
}

/// Encodes and decodes `--repeats` times; each Rust pass is followed by the same pass in PyTorch
/// when `pytorch` serves, so that both see the same machine load.
fn time_paired(
    path: &Path,
    options: &Options,
    pytorch: &mut Option<StepServer>,
) -> BenchResult<Passes> {
    let device = Device::Cpu;
    let checkpoint = Checkpoint::open(path)?;
    let autoencoder = AutoEncoder::load(&checkpoint, DType::F32, &device)?;
    let mut rng = SeededRng::new(1);
    let side = options.size;
    let latent_side = side / autoencoder.config().pixels_per_latent();
    let mut passes = Passes::default();
    for _ in 0..options.repeats {
        let latents = if options.encode {
            let values: Vec<f32> = (0..3 * side * side)
                .map(|_| (2.0 * rng.uniform() - 1.0) as f32)
                .collect();
            let image = Tensor::from_vec(values, (1, 3, side, side), &device)?;
            let (latents, timing) = time_section(|| autoencoder.encode(&image));
            passes.encode.push(timing);
            if let Some(server) = pytorch.as_mut() {
                passes.torch_encode.push(server.run("encode")?);
            }
            latents?
        } else {
            let channels = autoencoder.config().latent_channels();
            let values = rng.normal_vec(channels * latent_side * latent_side);
            Tensor::from_vec(values, (1, channels, latent_side, latent_side), &device)?
        };
        if !options.decode {
            continue;
        }
        let (image, timing) = time_section(|| autoencoder.decode(&latents));
        passes.decode.push(timing);
        if let Some(server) = pytorch.as_mut() {
            passes.torch_decode.push(server.run("decode")?);
        }
        let image = image?;
        let first: f32 = image.flatten_all()?.get(0)?.to_scalar()?;
        if !first.is_finite() || image.dims() != [1, 3, side, side] {
            return Err(format!("bad decode output {:?}", image.dims()).into());
        }
    }
    Ok(passes)
}

/// The PyTorch side stepping on demand, or why there is none.
fn pytorch_server(options: &Options) -> std::result::Result<StepServer, String> {
    let mut command = bench_support::reference_command("ae_diffusers.py")?;
    command.args([
        "--size",
        &options.size.to_string(),
        "--threads",
        &options.threads.to_string(),
        "--serve",
    ]);
    StepServer::spawn(command, "pytorch AE")
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
    let pytorch = if options.reference {
        pytorch_server(&options)
    } else {
        Err("not requested".to_string())
    };
    let mut reference = match pytorch {
        Ok(server) => Some(server),
        Err(reason) => {
            println!("PyTorch unavailable: {reason}");
            None
        }
    };
    let passes = time_paired(&path, &options, &mut reference);
    std::fs::remove_dir_all(&directory)?;
    let passes = passes?;
    let torch = reference.map(|server| server.done()).transpose()?;

    println!(
        "AE, CPU, {} threads, f32: real size (ch {}, ch_mult {:?}, {} parameters), {}x{} image, {} passes, each \
         Rust pass followed by the PyTorch pass; medians, and the median of the per-pair time ratios",
        options.threads,
        config.ch,
        config.ch_mult,
        config.parameter_count(),
        options.size,
        options.size,
        options.repeats
    );
    if let Some(torch) = &torch {
        println!("reference: diffusers AutoencoderKLFlux2, {torch}");
    }
    for (name, rust, torch) in [
        ("encode", &passes.encode, &passes.torch_encode),
        ("decode", &passes.decode, &passes.torch_decode),
    ] {
        if rust.is_empty() {
            continue;
        }
        let wall = bench_support::median(rust.iter().map(|t| t.wall).collect());
        let cpu = bench_support::median(rust.iter().map(|t| t.cpu).collect());
        if torch.len() == rust.len() {
            let ratios = rust.iter().zip(torch).map(|(r, t)| r.wall / t).collect();
            println!(
                "ae_{name} {}px: rust {wall:.3} s, pytorch {:.3} s, ratio {:.2}",
                options.size,
                bench_support::median(torch.clone()),
                bench_support::median(ratios)
            );
        } else {
            println!(
                "ae_{name} {}px: rust {wall:.3} s (cpu {cpu:.2} s)",
                options.size
            );
        }
    }
    Ok(())
}
