//! Peak host memory while loading the real-size klein-4B DiT in bf16 on the CPU (issue 9 point 5):
//! the real key/shape table is written as a safetensors file (sparse and all-zero by default, or
//! filled with non-zero bytes with `--filled`), then `Flux2Dit::load` reads it through the memory
//! map and the process's peak resident memory (`VmHWM`) is printed next to the weight bytes.
//!
//! ```text
//! cargo run --release -p flux2-tuner --example load_memory -- [--filled] [--dir /tmp]
//! ```

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::{write_zero_checkpoint, Checkpoint, StorageDtype};
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::models::ModelVersion;

type LoadResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Fields of `/proc/self/status` in bytes.
fn status_bytes(field: &str) -> LoadResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .ok_or_else(|| format!("no {field} in /proc/self/status"))?;
    let kilobytes: u64 = line
        .trim_start_matches(field)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kilobytes * 1024)
}

/// Overwrites the data section (after the header) with a non-zero byte pattern, 64 MiB at a time.
fn fill_data(path: &PathBuf) -> LoadResult<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    let length = file.metadata()?.len();
    let mut header_length = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open(path)?, &mut header_length)?;
    let start = 8 + u64::from_le_bytes(header_length);
    file.seek(SeekFrom::Start(start))?;
    // 0x3c3c as bf16 is about 0.0115: a small finite weight.
    let chunk = vec![0x3cu8; 64 << 20];
    let mut written = start;
    while written < length {
        let count = ((length - written) as usize).min(chunk.len());
        file.write_all(&chunk[..count])?;
        written += count as u64;
    }
    file.sync_all()?;
    Ok(())
}

fn main() -> LoadResult<()> {
    let mut filled = false;
    let mut directory = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--filled" => filled = true,
            "--dir" => directory = PathBuf::from(args.next().ok_or("--dir needs a value")?),
            other => return Err(format!("unknown option {other}; expected --filled, --dir").into()),
        }
    }
    let path = directory.join(format!(
        "flux2-load-memory-{}.safetensors",
        std::process::id()
    ));
    let config = ModelVersion::Klein4b.info().dit;
    let total = write_zero_checkpoint(&path, &config.expected_keys(), StorageDtype::BF16)?;
    if filled {
        fill_data(&path)?;
    }
    let weights = 2 * config.parameter_count() as u64;
    let before = status_bytes("VmRSS:")?;
    let started = std::time::Instant::now();
    let result = (|| -> LoadResult<(u64, u64, u64)> {
        let checkpoint = Checkpoint::open(&path)?;
        let dit = Flux2Dit::load(
            &checkpoint,
            Some(ModelVersion::Klein4b),
            DType::BF16,
            &Device::Cpu,
        )?;
        let after_load = status_bytes("VmRSS:")?;
        let file_pages = status_bytes("RssFile:")?;
        drop(checkpoint);
        let without_map = status_bytes("VmRSS:")?;
        drop(dit);
        Ok((after_load, file_pages, without_map))
    })();
    let _ = std::fs::remove_file(&path);
    let (after_load, file_pages, without_map) = result?;
    let peak = status_bytes("VmHWM:")?;
    println!(
        "klein-4B real-size layout, bf16, {} file ({:.2} GiB), loaded in {:.1} s",
        if filled { "filled" } else { "sparse all-zero" },
        total as f64 / GIB,
        started.elapsed().as_secs_f64()
    );
    println!("weights (one copy): {:.2} GiB", weights as f64 / GIB);
    println!("resident before loading: {:.2} GiB", before as f64 / GIB);
    println!(
        "resident after loading: {:.2} GiB (file pages mapped: {:.2} GiB; {:.2} GiB once the checkpoint is closed)",
        after_load as f64 / GIB,
        file_pages as f64 / GIB,
        without_map as f64 / GIB
    );
    println!(
        "peak resident (VmHWM): {:.2} GiB = {:.2} x the weights",
        peak as f64 / GIB,
        peak as f64 / weights as f64
    );
    Ok(())
}
