//! What the benchmark programs share: running a reference script of `tools/bench` with the
//! PyTorch virtual environment (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`), the
//! mid-size DiT configuration, option parsing and the median.

// Each benchmark program compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter of the reference environment.
pub const DEFAULT_PYTHON: &str = "/work/venv-ref/bin/python";

/// The command that runs `tools/bench/{script}` with the reference Python, or why there is none.
pub fn reference_command(script: &str) -> Result<Command, String> {
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
    let mut command = Command::new(python);
    command.arg(script);
    Ok(command)
}

/// A child process that runs timed steps on demand, so that two implementations can alternate
/// step by step and see the same load of a shared machine (single timings there move by up to
/// 40 %). Protocol, one line each way: the child prints `ready` once set up; `step` makes it run
/// one step and print its seconds; `done` makes it print one final line (its peak memory and
/// what else it reports) and exit.
pub struct StepServer {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
    name: String,
}

impl StepServer {
    pub fn spawn(mut command: Command, name: &str) -> Result<Self, String> {
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Inherited: a failing child's message shows where the benchmark runs.
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let input = child.stdin.take().ok_or("no stdin")?;
        let output = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut server = Self {
            child,
            input,
            output,
            name: name.to_string(),
        };
        let first = server.read_line()?;
        if first != "ready" {
            return Err(format!("{name} did not start: {first:?}"));
        }
        Ok(server)
    }

    fn read_line(&mut self) -> Result<String, String> {
        use std::io::BufRead;
        let mut line = String::new();
        let read = self
            .output
            .read_line(&mut line)
            .map_err(|e| format!("{}: {e}", self.name))?;
        if read == 0 {
            return Err(format!(
                "{} exited early (its error output is above)",
                self.name
            ));
        }
        Ok(line.trim().to_string())
    }

    fn send(&mut self, command: &str) -> Result<(), String> {
        use std::io::Write;
        writeln!(self.input, "{command}")
            .and_then(|_| self.input.flush())
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// Runs one step in the child; its seconds.
    pub fn step(&mut self) -> Result<f64, String> {
        self.run("step")
    }

    /// Sends `command` (a unit of work the child knows) and returns its seconds.
    pub fn run(&mut self, command: &str) -> Result<f64, String> {
        self.send(command)?;
        let line = self.read_line()?;
        line.parse()
            .map_err(|_| format!("{}: expected seconds, got {line:?}", self.name))
    }

    /// Ends the child; its final line.
    pub fn done(mut self) -> Result<String, String> {
        self.send("done")?;
        let line = self.read_line()?;
        let _ = self.child.wait();
        Ok(line)
    }
}

/// Runs `tools/bench/{script}` with `arguments` and returns its standard output, or why it could
/// not run (no Python, or the script failed: the last lines of its error output).
pub fn run_reference(script: &str, arguments: &[String]) -> Result<String, String> {
    let output = reference_command(script)?
        .args(arguments)
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!("{script} failed: {}", tail.join(" | ")));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Image tokens of the mid-size benchmark: a `GRID_SIDE` x `GRID_SIDE` latent grid.
pub const GRID_SIDE: usize = 32;
/// Text tokens of the mid-size benchmark.
pub const TEXT_TOKENS: usize = 128;

/// The forward-pass inputs of the mid-size benchmark (batch 1, random values from seed 0), owned
/// so that [`MidSizeInput::input`] can lend them as a `DitInput`.
pub struct MidSizeInput {
    image_tokens: candle_core::Tensor,
    text: candle_core::Tensor,
    image_ids: candle_core::Tensor,
    text_ids: candle_core::Tensor,
    timesteps: candle_core::Tensor,
}

impl MidSizeInput {
    pub fn new(
        config: &flux2_tuner::models::dit::DitConfig,
        device: &candle_core::Device,
    ) -> flux2_tuner::error::Result<Self> {
        use flux2_tuner::models::dit::tokens::{image_position_ids, text_position_ids};
        let mut rng = flux2_tuner::util::rng::SeededRng::new(0);
        let mut random = |rows: usize, width: usize| {
            let values: Vec<f32> = (0..rows * width).map(|_| rng.normal() as f32).collect();
            candle_core::Tensor::from_vec(values, (1, rows, width), device)
        };
        Ok(Self {
            image_tokens: random(GRID_SIDE * GRID_SIDE, config.in_channels)?,
            text: random(TEXT_TOKENS, config.context_in_dim)?,
            image_ids: image_position_ids(1, GRID_SIDE, GRID_SIDE, 0, device)?,
            text_ids: text_position_ids(1, TEXT_TOKENS, device)?,
            timesteps: candle_core::Tensor::new(&[0.7f32], device)?,
        })
    }

    pub fn input(&self) -> flux2_tuner::models::dit::DitInput<'_> {
        flux2_tuner::models::dit::DitInput {
            image_tokens: &self.image_tokens,
            image_position_ids: &self.image_ids,
            text_embeddings: &self.text,
            text_position_ids: &self.text_ids,
            timesteps: &self.timesteps,
            guidance: None,
        }
    }
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

/// The serving side of [`StepServer`]: prints `ready`, then for each `step` line on stdin runs
/// `step` and prints the seconds it returns; on `done` prints `done()`'s line and returns.
pub fn serve_steps(
    mut step: impl FnMut() -> Result<f64, Box<dyn std::error::Error>>,
    done: impl FnOnce() -> Result<String, Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, Write};
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "step" => writeln!(stdout, "{}", step()?)?,
            "done" => {
                writeln!(stdout, "{}", done()?)?;
                stdout.flush()?;
                return Ok(());
            }
            other => return Err(format!("unknown command {other:?}; expected step or done").into()),
        }
        stdout.flush()?;
    }
    Ok(())
}
