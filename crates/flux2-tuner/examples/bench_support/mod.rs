//! What the benchmark programs share: running a reference script of `tools/bench` with the
//! PyTorch virtual environment (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`), the
//! mid-size DiT configuration, option parsing and the median.

// Each benchmark program compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter of the reference environment.
pub const DEFAULT_PYTHON: &str = "/work/venv-ref/bin/python";

/// Runs `tools/bench/{script}` with `arguments` and returns its standard output, or why it could
/// not run (no Python, or the script failed: the last lines of its error output).
pub fn run_reference(script: &str, arguments: &[String]) -> Result<String, String> {
    let python = std::env::var_os("FLUX2_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON));
    if !python.exists() {
        return Err(format!(
            "no Python at {} (set FLUX2_REF_PYTHON)",
            python.display()
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/bench")
        .join(script);
    let output = Command::new(&python)
        .arg(&script)
        .args(arguments)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!("{} failed: {}", script.display(), tail.join(" | ")));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The mid-size DiT every CPU benchmark uses (hidden 512 = 8 heads x 64, 2 double + 4 single
/// blocks, RoPE 4 x 16, no guidance embedding); the `tools/bench` scripts build the same one.
pub fn mid_size_dit_config(text_width: usize) -> flux2_tuner::models::dit::DitConfig {
    flux2_tuner::models::dit::DitConfig {
        in_channels: 128,
        context_in_dim: text_width,
        hidden_size: 512,
        num_heads: 8,
        depth: 2,
        depth_single_blocks: 4,
        mlp_hidden_size: 3 * 512,
        axes_dim: [16; 4],
        theta: 2000.0,
        guidance_embed: false,
    }
}

/// `--threads`, `--warmup` and `--iterations`.
pub struct Options {
    pub threads: usize,
    pub warmup: usize,
    pub iterations: usize,
}

/// Parses the options from the command line, starting from `defaults`.
pub fn parse_options(defaults: Options) -> Result<Options, Box<dyn std::error::Error>> {
    parse_options_from(std::env::args().skip(1), defaults)
}

/// As [`parse_options`], for the given arguments (without the program name).
pub fn parse_options_from(
    arguments: impl IntoIterator<Item = String>,
    defaults: Options,
) -> Result<Options, Box<dyn std::error::Error>> {
    let mut options = defaults;
    let mut args = arguments.into_iter();
    while let Some(flag) = args.next() {
        let value: usize = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .parse()?;
        match flag.as_str() {
            "--threads" => options.threads = value,
            "--warmup" => options.warmup = value,
            "--iterations" => options.iterations = value.max(1),
            _ => {
                return Err(format!(
                    "unknown option {flag}; expected --threads, --warmup, --iterations"
                )
                .into())
            }
        }
    }
    Ok(options)
}

/// The median of timings (the mean of the two middle ones for an even count).
pub fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    let middle = seconds.len() / 2;
    if seconds.len() % 2 == 0 {
        (seconds[middle - 1] + seconds[middle]) / 2.0
    } else {
        seconds[middle]
    }
}

/// CPU seconds of this process so far (`clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`): unlike wall
/// time, not inflated while other processes hold the cores.
pub fn cpu_seconds() -> f64 {
    const SYS_CLOCK_GETTIME: i64 = 228;
    const CLOCK_PROCESS_CPUTIME_ID: i64 = 2;
    let mut time = [0i64; 2];
    let result: i64;
    // SAFETY: the syscall writes one `struct timespec` (two i64) into `time`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_CLOCK_GETTIME => result,
            in("rdi") CLOCK_PROCESS_CPUTIME_ID,
            in("rsi") time.as_mut_ptr(),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if result != 0 {
        return f64::NAN;
    }
    time[0] as f64 + time[1] as f64 * 1e-9
}
