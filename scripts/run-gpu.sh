#!/usr/bin/env bash
# Runs a CUDA binary built by scripts/build-cuda.sh on a GPU machine without Rust or a CUDA
# toolkit: unpacks it from dist/, finds the CUDA 13 libraries (cuBLAS, cuRAND, cudart) — in
# $CUDA_LIBRARY_DIR, else in the current Python's `nvidia` wheels (a PyTorch virtual environment),
# else anywhere on the machine — and runs it. The driver (libcuda.so.1) comes from the system.
#
#   scripts/run-gpu.sh [--binary flux2-tuner|golden|gpu_check] [ARGS...]
#   e.g. scripts/run-gpu.sh generate --model_version klein-4b --dit ... --device cuda
#
# Settings: DIST (default dist/flux2-tuner-cuda-sm90), PYTHON (default python3),
# CUDA_LIBRARY_DIR (a folder holding libcublas.so.13).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dist=${DIST:-$repo/dist/flux2-tuner-cuda-sm${CUDA_COMPUTE_CAP:-90}}
python=${PYTHON:-python3}
binary=flux2-tuner
if [ "${1:-}" = "--binary" ]; then
  binary=$2
  shift 2
fi

log() { printf '[run-gpu] %s\n' "$*" >&2; }

# The CUDA 13 user-space libraries.
cuda_library_dir() {
  if [ -n "${CUDA_LIBRARY_DIR:-}" ]; then
    printf '%s\n' "$CUDA_LIBRARY_DIR"
    return
  fi
  local dir
  dir=$("$python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' \
    2>/dev/null || true)
  if [ -n "$dir" ] && [ -f "$dir/libcublas.so.13" ]; then
    printf '%s\n' "$dir"
    return
  fi
  # Older wheel layouts: one folder per library (nvidia/cublas/lib, nvidia/cuda_runtime/lib, ...).
  local found
  found=$(find / -xdev -name 'libcublas.so.13' 2>/dev/null | head -1 || true)
  if [ -n "$found" ]; then
    dirname "$found"
    return
  fi
  return 1
}

library_dir=$(cuda_library_dir) || {
  log "no libcublas.so.13 found: set CUDA_LIBRARY_DIR, or PYTHON to a Python with the nvidia-cublas wheel"
  exit 1
}
# cuRAND and cudart may sit in sibling folders of older wheel layouts; add every folder that has one.
extra=""
for library in libcurand.so.10 libcudart.so.13 libcublasLt.so.13; do
  if [ ! -f "$library_dir/$library" ]; then
    found=$(find "$(dirname "$(dirname "$library_dir")")" -name "$library" 2>/dev/null | head -1 || true)
    [ -n "$found" ] && extra="$extra:$(dirname "$found")"
  fi
done
export LD_LIBRARY_PATH="$library_dir$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

packed=$dist/$binary.gz
[ -f "$packed" ] || { log "no $packed: build it with scripts/build-cuda.sh"; exit 1; }
bin_dir=${RUN_GPU_BIN_DIR:-${TMPDIR:-/tmp}/flux2-tuner-cuda}
mkdir -p "$bin_dir"
if [ ! -x "$bin_dir/$binary" ] || [ "$packed" -nt "$bin_dir/$binary" ]; then
  gunzip -c "$packed" > "$bin_dir/$binary.tmp"
  chmod +x "$bin_dir/$binary.tmp"
  mv "$bin_dir/$binary.tmp" "$bin_dir/$binary"
fi
missing=$(ldd "$bin_dir/$binary" | grep 'not found' || true)
if [ -n "$missing" ]; then
  log "missing libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):"
  printf '%s\n' "$missing" >&2
  exit 1
fi
exec "$bin_dir/$binary" "$@"
