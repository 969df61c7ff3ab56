//! With the `cuda` feature: compiles the fused attention kernels (`src/nn/flash/flash_attention.cu`)
//! to PTX with nvcc at build time. The default (CPU) build runs nothing and needs no CUDA toolkit.
//!
//! nvcc at build time rather than NVRTC at run time: the build machine has the toolkit anyway
//! (candle-kernels needs nvcc), kernel compile errors show up in the build instead of on a GPU
//! machine, and the GPU machine needs neither libnvrtc nor the CUDA headers.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/nn/flash/flash_attention.cu";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={SOURCE}");
    for variable in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={variable}");
    }
    let nvcc = env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| env::var_os("CUDA_ROOT").map(|root| PathBuf::from(root).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // bf16 tensor cores (WMMA) need compute capability 8.0 or newer; 90 = H100/H200.
    let capability = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let capability: String = capability.chars().filter(char::is_ascii_digit).collect();
    if capability.parse::<u32>().map_or(true, |cap| cap < 80) {
        panic!("CUDA_COMPUTE_CAP={capability}: the fused attention needs 80 or newer");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out_dir.join("flash_attention.ptx");
    let output = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{capability}"))
        .arg("-o")
        .arg(&ptx)
        .arg(SOURCE)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed on {SOURCE}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
