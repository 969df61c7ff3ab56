#!/usr/bin/env python3
"""PyTorch side of scripts/gpu-check.sh: the same work as crates/flux2-tuner/examples/gpu_check.rs
with diffusers (SDPA attention) on the machine's own torch, random weights.

  generate: Flux2KleinPipeline without text encoder, klein-4B transformer (hidden 3072 = 24 heads x
            128, 5 double + 20 single blocks, text width 7680) in bf16, precomputed random prompt
            embeddings [1, 512, 7680], `--steps` steps at `--size` x `--size`, distilled (no CFG),
            the real-size AutoencoderKLFlux2 (random weights) decoding in f32 to a PIL image.
            Seconds per image and per step (median after warm-up).
  train:    one LoRA step (peft, rank 32, alpha 32, Musubi's targets, f32 adapters on the bf16
            base) at `--size` x `--size` with 512 text tokens: x_t = (1 - s) x0 + s noise,
            s = 0.7, MSE against noise - x0, backward, torch AdamW; `--checkpointing` turns on
            diffusers' gradient checkpointing. Seconds per step (median).

Peak memory: the largest `total - free` (torch.cuda.mem_get_info) seen by a sampling thread,
less its value after CUDA start-up (the measure gpu_check.rs uses), plus torch's own
max_memory_allocated. Prints one line: RESULT key=value ...

Usage: python tools/gpu/torch_reference.py generate|train [--device cuda] [--config klein-4b|tiny]
       [--size 1024] [--steps 4] [--checkpointing] [--warmup 1] [--iterations 3]
"""

import argparse
import statistics
import threading
import time

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.utils import logging

TEXT_TOKENS = 512
RANK = 32
LEARNING_RATE = 1e-4
SIGMA = 0.7

CONFIGS = {
    # klein-4B and klein-base-4B share this architecture.
    "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    # The small model of gpu_check.rs --config tiny (for CPU runs of this script).
    "tiny": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=7680),
}

DOUBLE_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
]
SINGLE_TARGETS = ["attn.to_qkv_mlp_proj", "attn.to_out"]


def alternatives(names: list) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


TARGET_REGEX = (
    rf"transformer_blocks\.\d+\.({alternatives(DOUBLE_TARGETS)})"
    rf"|single_transformer_blocks\.\d+\.({alternatives(SINGLE_TARGETS)})"
)


class MemoryPeak:
    """Samples total - free of the device every 2 ms in a thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        self.baseline = self.used()
        self.peak = self.baseline
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def used(self) -> int:
        if not self.enabled:
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.used())
            time.sleep(0.002)

    def peak_mib(self) -> float:
        self.running = False
        self.thread.join()
        return (self.peak - self.baseline) / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_transformer(config: str, device: torch.device) -> Flux2Transformer2DModel:
    # Built directly on the device: random initialisation of 4B parameters on the CPU is slow.
    with device:
        model = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=128,
            attention_head_dim=128,
            mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
            rope_theta=2000,
            guidance_embeds=False,
            **CONFIGS[config],
        )
    return model.to(torch.bfloat16)


def generate(args, device: torch.device) -> str:
    memory = MemoryPeak(device)
    with device:
        vae = AutoencoderKLFlux2().eval()
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
        ),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=build_transformer(args.config, device).eval(),
        is_distilled=True,
    )
    pipeline.set_progress_bar_config(disable=True)
    width = CONFIGS[args.config]["joint_attention_dim"]
    prompt_embeds = torch.randn(1, TEXT_TOKENS, width, generator=torch.Generator().manual_seed(1))
    prompt_embeds = prompt_embeds.to(device=device, dtype=torch.bfloat16)
    image_seconds, step_seconds = [], []
    with torch.inference_mode():
        for index in range(args.warmup + args.iterations):
            synchronize(device)
            start = time.perf_counter()
            latents = pipeline(
                prompt_embeds=prompt_embeds,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                generator=torch.Generator(device=device).manual_seed(index),
                output_type="latent",
                return_dict=False,
            )[0]
            synchronize(device)
            sampled = time.perf_counter() - start
            decoded = vae.decode(latents.to(torch.float32), return_dict=False)[0]
            image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
            elapsed = time.perf_counter() - start
            if image.size != (args.size, args.size):
                raise SystemExit(f"unexpected image size {image.size}")
            if index >= args.warmup:
                image_seconds.append(elapsed)
                step_seconds.append(sampled / args.steps)
    allocated = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return (
        f"RESULT generate attn=sdpa size={args.size} steps={args.steps} "
        f"s_per_image={statistics.median(image_seconds):.4f} s_per_step={statistics.median(step_seconds):.4f} "
        f"peak_mib={memory.peak_mib():.0f} torch_max_allocated_mib={allocated:.0f}"
    )


def train(args, device: torch.device) -> str:
    from peft import LoraConfig, get_peft_model

    memory = MemoryPeak(device)
    model = build_transformer(args.config, device)
    model.requires_grad_(False)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGET_REGEX, init_lora_weights=True)
    )
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    side = args.size // 16
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], dim=-1)
    positions = torch.arange(TEXT_TOKENS)
    zeros = torch.zeros_like(positions)
    txt_ids = torch.stack([zeros, zeros, zeros, positions], dim=-1)
    width = CONFIGS[args.config]["joint_attention_dim"]
    latents = torch.randn(1, side * side, 128, generator=generator).to(device)
    noise = torch.randn(1, side * side, 128, generator=generator).to(device)
    text = torch.randn(1, TEXT_TOKENS, width, generator=generator).to(device=device, dtype=torch.bfloat16)
    img_ids, txt_ids = img_ids.unsqueeze(0).to(device), txt_ids.unsqueeze(0).to(device)
    seconds = []
    for index in range(args.warmup + args.iterations):
        synchronize(device)
        start = time.perf_counter()
        noisy = ((1.0 - SIGMA) * latents + SIGMA * noise).to(torch.bfloat16)
        prediction = model(
            hidden_states=noisy,
            encoder_hidden_states=text,
            timestep=torch.tensor([SIGMA], dtype=torch.bfloat16, device=device),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        synchronize(device)
        if value != value:
            raise SystemExit("non-finite loss")
        if index >= args.warmup:
            seconds.append(time.perf_counter() - start)
    allocated = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return (
        f"RESULT train attn=sdpa size={args.size} checkpointing={str(args.checkpointing).lower()} "
        f"s_per_step={statistics.median(seconds):.4f} peak_mib={memory.peak_mib():.0f} "
        f"torch_max_allocated_mib={allocated:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["generate", "train"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", default="klein-4b", choices=sorted(CONFIGS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA start-up before the memory baseline
    line = generate(args, device) if args.job == "generate" else train(args, device)
    print(f"{line} torch={torch.__version__}")


if __name__ == "__main__":
    main()
