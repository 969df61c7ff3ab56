#!/usr/bin/env python3
"""Reference timing of one LoRA training step on CPU with diffusers' Flux2Transformer2DModel + peft.

Builds the mid-size benchmark config of tools/bench/dit_diffusers.py with random weights (hidden
512 = 8 heads x 64, 2 double + 4 single blocks, MLP ratio 3, 128 latent channels, text width 384,
RoPE 4 x 16, no guidance embedding), freezes it and wraps the block linears Musubi trains with peft
LoRA (rank 32, alpha 32). One step, batch 1, 1024 image tokens (a 32 x 32 grid) and 128 text
tokens: noise the latents (x_t = (1 - t) x0 + t noise), forward, MSE against the flow-matching
target (noise - x0), backward, torch.optim.AdamW step on the LoRA parameters.

bf16: the base model is cast to bf16 and peft keeps the LoRA weights in f32
(autocast_adapter_dtype=True, its default), so the adapters compute in f32 on a bf16 input, as on
the Rust side; the optimizer state is f32. No torch.autocast.

Each dtype runs in a fresh process (this script re-runs itself with --dtype) so that the peak RSS
(getrusage ru_maxrss) of one does not hide the other. Prints one JSON line with the median seconds
and peak RSS (MiB) of each.

The Rust side is crates/flux2-tuner/examples/bench_train_step.rs, which runs this script itself;
keep the two configs and the timing protocol identical.

With --dtype NAME --serve it steps on demand instead (one command per stdin line, see serve()):
the Rust benchmark alternates its own steps with these, so that both sides see the same machine
load (other tenants of a shared machine move single timings by up to 40 %).

Usage: python tools/bench/train_step_diffusers.py --threads 2 [--warmup 1] [--iterations 3]
       python tools/bench/train_step_diffusers.py --threads 2 --dtype bf16 --serve
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.utils import logging
from peft import LoraConfig, get_peft_model

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
RANK = 32
ALPHA = 32
LEARNING_RATE = 1e-4

# The diffusers names of the BFL linears Musubi trains: double blocks' img/txt attention qkv
# (split into q, k, v here), attention projections and MLPs; single blocks' linear1 (fused qkv +
# MLP in) and linear2 (attention + MLP out).
DOUBLE_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
]
SINGLE_TARGETS = ["attn.to_qkv_mlp_proj", "attn.to_out"]


def alternatives(names: list) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


# peft fullmatches a string target against each module name; anchoring the block kind keeps the
# double blocks' `attn.to_out` ModuleList out.
TARGET_REGEX = (
    rf"transformer_blocks\.\d+\.({alternatives(DOUBLE_TARGETS)})"
    rf"|single_transformer_blocks\.\d+\.({alternatives(SINGLE_TARGETS)})"
)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def build_model(dtype: torch.dtype):
    model = Flux2Transformer2DModel(
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
    ).to(dtype)
    model.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_REGEX, init_lora_weights=True)
    model = get_peft_model(model, config)
    model.train()
    return model


def build_batch(dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(0)
    image_tokens = GRID_SIDE * GRID_SIDE
    rows = torch.arange(GRID_SIDE).repeat_interleave(GRID_SIDE)
    cols = torch.arange(GRID_SIDE).repeat(GRID_SIDE)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], dim=-1)
    txt_positions = torch.arange(TEXT_TOKENS)
    zeros = torch.zeros_like(txt_positions)
    txt_ids = torch.stack([zeros, zeros, zeros, txt_positions], dim=-1)
    latents = torch.randn(1, image_tokens, IN_CHANNELS, generator=generator)
    noise = torch.randn(1, image_tokens, IN_CHANNELS, generator=generator)
    text = torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator).to(dtype)
    return latents, noise, text, img_ids.unsqueeze(0), txt_ids.unsqueeze(0)


def build_step(name: str, threads: int):
    """The model, optimizer and batch of one dtype; returns (step, info): step() runs one timed
    training step and returns its seconds."""
    dtype = DTYPES[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(dtype)
    parameters = [p for p in model.parameters() if p.requires_grad]
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    latents, noise, text, img_ids, txt_ids = build_batch(dtype)
    sigma = 0.7

    def step() -> float:
        start = time.perf_counter()
        noisy = ((1.0 - sigma) * latents + sigma * noise).to(dtype)
        prediction = model(
            hidden_states=noisy,
            encoder_hidden_states=text,
            timestep=torch.tensor([sigma], dtype=dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        elapsed = time.perf_counter() - start
        if not torch.isfinite(torch.tensor(value)):
            raise SystemExit(f"non-finite loss in {name}")
        return elapsed

    info = {
        "lora_modules": lora_modules,
        "lora_parameters": sum(p.numel() for p in parameters),
        "lora_dtype": str(parameters[0].dtype),
    }
    return step, info


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_dtype(name: str, threads: int, warmup: int, iterations: int) -> dict:
    step, info = build_step(name, threads)
    seconds = []
    for index in range(warmup + iterations):
        elapsed = step()
        if index >= warmup:
            seconds.append(elapsed)
    return {"seconds": statistics.median(seconds), "peak_rss_mib": peak_rss_mib(), **info}


def serve(name: str, threads: int) -> None:
    """Steps on demand, so that the Rust benchmark can alternate its steps with these: reads a
    command per line from stdin, `step` (prints the step's seconds) or `done` (prints one JSON
    line with the peak RSS and the LoRA info, then exits)."""
    step, info = build_step(name, threads)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(step(), flush=True)
        elif command == "done":
            print(json.dumps({"peak_rss_mib": peak_rss_mib(), "torch": torch.__version__, **info}), flush=True)
            return
        else:
            raise SystemExit(f"unknown command {command!r}; expected step or done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="run one dtype in this process")
    parser.add_argument("--serve", action="store_true", help="with --dtype: step on demand (see serve)")
    args = parser.parse_args()

    # Casting a freshly built model with .to() warns about from_pretrained; irrelevant here.
    logging.set_verbosity_error()
    if args.dtype and args.serve:
        serve(args.dtype, args.threads)
        return
    if args.dtype:
        print(json.dumps(run_dtype(args.dtype, args.threads, args.warmup, args.iterations)))
        return
    result = {
        "implementation": "diffusers+peft",
        "torch": torch.__version__,
        "threads": args.threads,
        "image_tokens": GRID_SIDE * GRID_SIDE,
        "text_tokens": TEXT_TOKENS,
        "rank": RANK,
    }
    for name in ("f32", "bf16"):
        child = subprocess.run(
            [sys.executable, __file__, "--threads", str(args.threads), "--warmup", str(args.warmup),
             "--iterations", str(args.iterations), "--dtype", name],
            check=True,
            capture_output=True,
            text=True,
        )
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        result[f"train_step_{name}_s"] = measured["seconds"]
        result[f"peak_rss_{name}_mib"] = measured["peak_rss_mib"]
        result["lora_modules"] = measured["lora_modules"]
        result["lora_parameters"] = measured["lora_parameters"]
        result[f"lora_dtype_{name}"] = measured["lora_dtype"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
