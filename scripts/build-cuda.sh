#!/usr/bin/env bash
# Builds the CUDA binary (`flux2-tuner`), the golden test binary and the GPU check binary on a
# machine WITHOUT a CUDA toolkit, using the PyPI CUDA 13.0 wheels and link stubs
# (docs: rust-stack.md §7). Users with a CUDA toolkit just run `cargo build --release --features cuda`.
#
# Output: dist/flux2-tuner-cuda-sm${CUDA_COMPUTE_CAP}/ with stripped, gzipped binaries (flux2-tuner,
# golden, gpu_check) and BUILD_INFO, ready for
# scripts/run-gpu.sh and scripts/gpu-check.sh on a GPU machine without Rust.
#
# Settings (environment):
#   CUDA_VENV          virtual environment holding the CUDA wheels
#                      (default: ${XDG_CACHE_HOME:-$HOME/.cache}/flux2-tuner/cuda13-venv)
#   CUDA_COMPUTE_CAP   target GPU compute capability (default 90 = H100/H200; 89 Ada, 120 Blackwell)
#   CARGO_TARGET_DIR   cargo target directory (default: target/cuda, kept apart from CPU builds)
#   BUILD_NICE         niceness of the build (default 0; 19 on a shared machine)
# Idempotent: the venv, wheels, symlinks and stub are only created when missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cuda_venv=${CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/flux2-tuner/cuda13-venv}
compute_cap=${CUDA_COMPUTE_CAP:-90}
target_dir=${CARGO_TARGET_DIR:-$repo/target/cuda}
nice_level=${BUILD_NICE:-0}
dist=$repo/dist/flux2-tuner-cuda-sm$compute_cap

# CUDA 13.0.x, not newer: candle's kernels ship as PTX and a CUDA 13.0 driver (580.x) rejects PTX
# with an ISA newer than 9.0. These are the versions PyPI torch 2.11 itself pins, so the GPU
# machine's torch venv provides the same sonames (libcublas.so.13, libcurand.so.10, ...).
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
)

log() { printf '[build-cuda] %s\n' "$*" >&2; }

# 1. The toolkit from PyPI.
if [ ! -x "$cuda_venv/bin/python" ]; then
  log "creating $cuda_venv"
  mkdir -p "$(dirname "$cuda_venv")"
  python3 -m venv "$cuda_venv"
fi
marker=$cuda_venv/.flux2-tuner-wheels
if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "${wheels[*]}" ]; then
  log "installing CUDA 13.0 wheels"
  "$cuda_venv/bin/pip" install --quiet "${wheels[@]}"
  printf '%s' "${wheels[*]}" > "$marker"
fi
cuda_root=$("$cuda_venv/bin/python" -c \
  'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cuda_root/bin/nvcc" ] || { log "no nvcc in $cuda_root/bin"; exit 1; }

# 2. Link-time fixes: candle forces cudarc's dynamic linking, so the linker needs unversioned
# names and a libcuda (the driver is in no wheel; the stub is for linking only).
for name in cublas cublasLt cudart nvrtc; do
  ln -sfn "lib$name.so.13" "$cuda_root/lib/lib$name.so"
done
ln -sfn libcurand.so.10 "$cuda_root/lib/libcurand.so"
stub_dir=$cuda_root/lib/stubs
if [ ! -f "$stub_dir/libcuda.so" ]; then
  log "generating the libcuda link stub"
  (cd "$repo" && cargo fetch --quiet)
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  cudarc_driver=$(find "$cargo_home"/registry/src -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' \
    | sort | tail -1)
  mkdir -p "$stub_dir"
  grep -ohE '^pub unsafe fn (cu[A-Za-z0-9_]+)\(' "$cudarc_driver" \
    | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/int \1(void){return 999;}/' \
    | sort -u > "$stub_dir/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/stub.c"
fi

# 3. Build. cudarc reads the CUDA version from `nvcc --version`; without nvidia-smi the compute
# capability must be given.
export CUDA_ROOT=$cuda_root CUDA_PATH=$cuda_root NVCC=$cuda_root/bin/nvcc
export PATH=$cuda_root/bin:$PATH CUDA_COMPUTE_CAP=$compute_cap CARGO_TARGET_DIR=$target_dir
export LIBRARY_PATH=$cuda_root/lib:$stub_dir${LIBRARY_PATH:+:$LIBRARY_PATH}
cd "$repo"
start=$(date +%s)
log "cargo build --release --features cuda (sm_$compute_cap, target $target_dir)"
nice -n "$nice_level" cargo build --release --features cuda -p flux2-tuner-cli
nice -n "$nice_level" cargo build --release --features cuda -p flux2-tuner --example gpu_check
# The golden harness is a test binary (its own main); find its path in cargo's JSON messages.
test_json=$(nice -n "$nice_level" cargo test --release --features cuda -p flux2-tuner \
  --test golden --no-run --message-format=json)
log "built in $(( $(date +%s) - start )) s"

executable_of() { # $1 = target name
  printf '%s\n' "$test_json" | "$cuda_venv/bin/python" -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == name \
            and message.get("executable"):
        print(message["executable"])' "$1" | tail -1
}

# 4. Stripped, gzipped binaries under dist/.
rm -rf "$dist"
mkdir -p "$dist"
package() { # $1 = built executable, $2 = name in dist
  [ -n "$1" ] && [ -x "$1" ] || { log "missing executable for $2"; exit 1; }
  strip -o "$dist/$2" "$1"
  gzip -9 -f "$dist/$2"
}
package "$target_dir/release/flux2-tuner" flux2-tuner
package "$(executable_of golden)" golden
package "$target_dir/release/examples/gpu_check" gpu_check
printf 'commit %s\ncompute_cap %s\nbuilt %s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$compute_cap" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$dist/BUILD_INFO"
ls -l "$dist" >&2
log "done: $dist"
