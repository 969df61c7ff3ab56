#!/usr/bin/env bash
# The GPU check of issue 10, one run under about 8 minutes on an H100/H200 machine without Rust:
#   1. the fused attention kernel against the composed attention (fresh random inputs; output and
#      gradient relative errors; timings at klein 1024x1024 size)
#   2. the golden cases on CUDA (f32 and bf16 tolerances), composed and with the fused kernel
#   3. benchmarks with random weights at real size, each next to PyTorch (diffusers, SDPA) on the
#      machine's own torch: klein-4B 1024x1024 4-step generation (s/image), klein-base-4B LoRA
#      rank 32 training step at 1024x1024 (s/step, peak VRAM) with and without gradient
#      checkpointing; the ratios are printed last.
# Binaries come from dist/ (scripts/build-cuda.sh, carried to the GPU machine) and run through
# scripts/run-gpu.sh. Stages run in order of importance within a time budget; a stage that fails
# or runs out of time is reported and the rest go on.
#
# Settings: PYTHON (default: the first python3 that imports torch), GPU_CHECK_BUDGET_S (default 450),
# GPU_CHECK_DIR (work folder, default /tmp/flux2-gpu-check).
# CPU smoke test of this script (no GPU, tiny sizes, binaries from target/release):
#   GPU_CHECK_LOCAL=1 scripts/gpu-check.sh
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The Python of the machine's torch environment: $PYTHON, else the first of python3 and the
# virtual environments under / that imports torch.
find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3 $(find / -maxdepth 5 -path '*/bin/python3' -not -path '/proc/*' 2>/dev/null); do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import torch' 2>/dev/null; then
      printf '%s\n' "$candidate"
      return
    fi
  done
  printf '%s\n' "${PYTHON:-python3}"
}
python=$(find_python)
export PYTHON=$python  # run-gpu.sh finds the CUDA libraries in its nvidia wheels
budget=${GPU_CHECK_BUDGET_S:-450}
work=${GPU_CHECK_DIR:-/tmp/flux2-gpu-check}
local_mode=${GPU_CHECK_LOCAL:-0}
mkdir -p "$work"
results=$work/results.txt
: > "$results"
started=$(date +%s)

if [ "$local_mode" = 1 ]; then
  device=cpu config=tiny size=128 steps=2 warmup=0 iterations=1
else
  device=cuda config=klein-4b size=1024 steps=4 warmup=1 iterations=2
fi

log() { printf '\n=== %s\n' "$*"; }

# Our binaries: from dist/ through run-gpu.sh, or the local CPU build.
if [ "$local_mode" = 1 ]; then
  gpu_check=("$repo/target/release/examples/gpu_check")
  golden=(echo "local mode: the golden binary is not run")
else
  gpu_check=("$repo/scripts/run-gpu.sh" --"${gpu_check[@]}")
  golden=("$repo/scripts/run-gpu.sh" --"${golden[@]}")
fi

# stage LABEL MAX_SECONDS COMMAND...: runs COMMAND with the smaller of MAX_SECONDS and the budget
# left; keeps its RESULT lines and its status.
stage() {
  local label=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - started)))
  if [ "$left" -lt 20 ]; then
    echo "STAGE $label SKIPPED (time budget spent)" | tee -a "$results"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$label (limit ${limit}s)"
  local output=$work/$label.log begin status
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$output" 2>&1
  status=$?
  cat "$output"
  grep '^RESULT' "$output" | sed "s/^RESULT /RESULT $label /" >> "$results"
  case $status in
    0) echo "STAGE $label OK $(( $(date +%s) - begin ))s" | tee -a "$results" ;;
    124|137) echo "STAGE $label TIMEOUT after ${limit}s" | tee -a "$results" ;;
    *) echo "STAGE $label FAILED status $status" | tee -a "$results" ;;
  esac
}

log "machine"
echo "python: $python"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
cat "$repo/dist/flux2-tuner-cuda-sm${CUDA_COMPUTE_CAP:-90}/BUILD_INFO" 2>/dev/null
have_torch=0
if "$python" -c 'import torch, diffusers, peft; print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)'; then
  have_torch=1
else
  echo "PyTorch side unavailable: $python cannot import torch, diffusers and peft; running the Rust parts only"
fi

dit=$work/dit-$config.safetensors
rust_check=(--device "$device" --warmup "$warmup" --iterations "$iterations")
torch_check=(--device "$device" --config "$config" --size "$size" --warmup "$warmup" --iterations "$iterations")

stage attention 60 "${gpu_check[@]}" attention --device "$device"
stage golden_cuda 90 env FLUX2_DEVICE="$device" FLUX2_GOLDEN_DIR="$repo/fixtures/golden" "${golden[@]}"
stage golden_cuda_flash 60 env FLUX2_DEVICE="$device" FLUX2_ATTN_MODE=flash \
  FLUX2_GOLDEN_DIR="$repo/fixtures/golden" "${golden[@]}"
[ -f "$dit" ] || stage write_dit 90 "${gpu_check[@]}" write-dit "$dit" --config "$config"
stage rust_generate 90 "${gpu_check[@]}" generate --dit "$dit" --size "$size" --steps "$steps" \
  --attn flash "${rust_check[@]}"
[ "$have_torch" = 1 ] && stage torch_generate 120 "$python" "$repo/tools/gpu/torch_reference.py" \
  generate --steps "$steps" "${torch_check[@]}"
stage rust_train_checkpointing 90 "${gpu_check[@]}" train --dit "$dit" --size "$size" --checkpointing \
  --attn flash "${rust_check[@]}"
[ "$have_torch" = 1 ] && stage torch_train_checkpointing 120 "$python" \
  "$repo/tools/gpu/torch_reference.py" train --checkpointing "${torch_check[@]}"
stage rust_train 90 "${gpu_check[@]}" train --dit "$dit" --size "$size" --attn flash "${rust_check[@]}"
[ "$have_torch" = 1 ] && stage torch_train 120 "$python" "$repo/tools/gpu/torch_reference.py" \
  train "${torch_check[@]}"
stage rust_generate_composed 60 "${gpu_check[@]}" generate --dit "$dit" --size "$size" \
  --steps "$steps" --attn composed "${rust_check[@]}"

# value STAGE KEY: a RESULT value of a stage.
value() {
  grep "^RESULT $1 " "$results" | head -1 | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}
ratio() {
  if [ -n "$1" ] && [ -n "$2" ]; then
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
  else
    echo "-"
  fi
}

log "summary ($(( $(date +%s) - started ))s; logs in $work)"
grep '^STAGE' "$results"
grep '^RESULT attention' "$results"
printf '\n%-34s %12s %12s %8s\n' "benchmark ($config, ${size}x$size)" "Rust" "PyTorch" "ratio"
row() { # label rust_stage torch_stage key
  local ours theirs
  ours=$(value "$2" "$4")
  theirs=$(value "$3" "$4")
  printf '%-34s %12s %12s %8s\n' "$1" "${ours:--}" "${theirs:--}" "$(ratio "$ours" "$theirs")"
}
row "generate s/image ($steps steps)" rust_generate torch_generate s_per_image
row "generate s/step" rust_generate torch_generate s_per_step
row "generate composed attn s/image" rust_generate_composed torch_generate s_per_image
row "generate peak MiB" rust_generate torch_generate peak_mib
row "train s/step, checkpointing" rust_train_checkpointing torch_train_checkpointing s_per_step
row "train peak MiB, checkpointing" rust_train_checkpointing torch_train_checkpointing peak_mib
row "train s/step" rust_train torch_train s_per_step
row "train peak MiB" rust_train torch_train peak_mib
echo "targets (H100): train s/step ratio <= 0.8 at peak MiB ratio <= 1.0; generate <= 0.5 s/image"
