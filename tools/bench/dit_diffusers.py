#!/usr/bin/env python3
"""Reference timing of the FLUX.2 DiT forward pass on CPU with diffusers' Flux2Transformer2DModel.

Builds the mid-size benchmark config with random weights (hidden 512 = 8 heads x 64, 2 double +
4 single blocks, MLP ratio 3, 128 latent channels, RoPE 4 x 16, no guidance embedding), feeds it
1024 image tokens (a 32 x 32 grid) and 128 text tokens, batch 1, and times the forward pass in f32
and in bf16 under torch.inference_mode(). Prints one JSON line with the median seconds of each.

The Rust side is crates/flux2-tuner/examples/bench_dit.rs, which runs this script itself; keep the
two configs and the timing protocol identical.

With --serve f32|bf16 it runs forward passes on demand instead (see serve()): the Rust benchmark
alternates its own passes with these, so that both see the same load of a shared machine.

Usage: python tools/bench/dit_diffusers.py --threads 2 [--warmup 2] [--iterations 5]
       python tools/bench/dit_diffusers.py --threads 2 --serve bf16
"""

import argparse
import json
import statistics
import sys
import time

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.utils import logging

HIDDEN_SIZE = 512
NUM_HEADS = 8
DOUBLE_BLOCKS = 2
SINGLE_BLOCKS = 4
MLP_RATIO = 3.0
IN_CHANNELS = 128
TEXT_WIDTH = 384
AXES_DIM = (16, 16, 16, 16)
GRID_SIDE = 32  # 1024 image tokens
TEXT_TOKENS = 128


def build_model() -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=IN_CHANNELS,
        num_layers=DOUBLE_BLOCKS,
        num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=HIDDEN_SIZE // NUM_HEADS,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=TEXT_WIDTH,
        mlp_ratio=MLP_RATIO,
        axes_dims_rope=AXES_DIM,
        rope_theta=2000,
        guidance_embeds=False,
    ).eval()


def build_inputs(dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    image_tokens = GRID_SIDE * GRID_SIDE
    rows = torch.arange(GRID_SIDE).repeat_interleave(GRID_SIDE)
    cols = torch.arange(GRID_SIDE).repeat(GRID_SIDE)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], dim=-1)
    txt_positions = torch.arange(TEXT_TOKENS)
    zeros = torch.zeros_like(txt_positions)
    txt_ids = torch.stack([zeros, zeros, zeros, txt_positions], dim=-1)
    return {
        "hidden_states": torch.randn(1, image_tokens, IN_CHANNELS, generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator).to(dtype),
        "timestep": torch.tensor([0.7], dtype=dtype),
        "img_ids": img_ids.unsqueeze(0),
        "txt_ids": txt_ids.unsqueeze(0),
        "return_dict": False,
    }


def time_forward(model: Flux2Transformer2DModel, dtype: torch.dtype, warmup: int, iterations: int) -> float:
    model = model.to(dtype)
    inputs = build_inputs(dtype)
    seconds = []
    with torch.inference_mode():
        for index in range(warmup + iterations):
            start = time.perf_counter()
            output = model(**inputs)[0]
            elapsed = time.perf_counter() - start
            if index >= warmup:
                seconds.append(elapsed)
    if not torch.isfinite(output.float()).all():
        raise SystemExit(f"non-finite output in {dtype}")
    return statistics.median(seconds)


def serve(model: Flux2Transformer2DModel, dtype: torch.dtype) -> None:
    """Forward passes on demand, so that the Rust benchmark can alternate its passes with these:
    prints `ready`, then reads one command per line from stdin, `step` (runs one forward pass and
    prints its seconds) or `done` (prints one JSON line with the torch version, then exits)."""
    model = model.to(dtype)
    inputs = build_inputs(dtype)
    print("ready", flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            command = line.strip()
            if command == "step":
                start = time.perf_counter()
                output = model(**inputs)[0]
                elapsed = time.perf_counter() - start
                if not torch.isfinite(output.float()).all():
                    raise SystemExit(f"non-finite output in {dtype}")
                print(elapsed, flush=True)
            elif command == "done":
                print(json.dumps({"torch": torch.__version__}), flush=True)
                return
            else:
                raise SystemExit(f"unknown command {command!r}; expected step or done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--serve", choices=["f32", "bf16"], help="step on demand in this dtype (see serve)")
    args = parser.parse_args()

    # Casting a freshly built model with .to() warns about from_pretrained; nothing is kept in f32 here.
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model()
    if args.serve:
        serve(model, torch.float32 if args.serve == "f32" else torch.bfloat16)
        return
    f32 = time_forward(model, torch.float32, args.warmup, args.iterations)
    bf16 = time_forward(model, torch.bfloat16, args.warmup, args.iterations)
    print(
        json.dumps(
            {
                "implementation": "diffusers",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "image_tokens": GRID_SIDE * GRID_SIDE,
                "text_tokens": TEXT_TOKENS,
                "dit_forward_f32_s": f32,
                "dit_forward_bf16_s": bf16,
            }
        )
    )


if __name__ == "__main__":
    main()
