#!/usr/bin/env python3
"""Reference timing of FLUX.2 klein-style generation on CPU with diffusers' Flux2KleinPipeline.

Builds the mid-size transformer of tools/bench/dit_diffusers.py (hidden 512 = 8 heads x 64, 2 double +
4 single blocks, MLP ratio 3, text width 384, RoPE 4 x 16, no guidance embedding) and a small
AutoencoderKLFlux2 (channels 32, 32, 64, 64, one ResNet block per level, 32 latent channels, 32 groups),
both with random weights, and a pipeline without text encoder: the prompt embeddings are precomputed
random [1, 512, 384] (text encoding is excluded on both sides). One 512x512 image (1024 image tokens),
4 steps, distilled (no CFG), FlowMatchEulerDiscreteScheduler with the FLUX.2 empirical mu.

The pipeline returns the denoised, un-normalised latents (output_type="latent") and the AE decode plus
post-processing to a PIL image run after it in f32, exactly what the pipeline does itself; this keeps
the AE in f32 when the transformer runs in bf16 (as the Rust side does).

Per image: warm-up, then the median of several runs; per step: the time from the pipeline call to
the last step's callback, divided by the steps. Prints one JSON line.

The Rust side is crates/flux2-tuner/examples/bench_generate.rs, which runs this script itself; keep
the two configs and the timing protocol identical.

Usage: python tools/bench/generate_diffusers.py --threads 2 [--warmup 1] [--iterations 3]
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.utils import logging

HIDDEN_SIZE = 512
NUM_HEADS = 8
DOUBLE_BLOCKS = 2
SINGLE_BLOCKS = 4
MLP_RATIO = 3.0
IN_CHANNELS = 128
TEXT_WIDTH = 384
AXES_DIM = (16, 16, 16, 16)
TEXT_TOKENS = 512
IMAGE_SIZE = 512
STEPS = 4
AE_CHANNELS = (32, 32, 64, 64)


def build_transformer() -> Flux2Transformer2DModel:
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


def build_autoencoder() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        block_out_channels=AE_CHANNELS,
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=32,
    ).eval()


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The klein scheduler config: dynamic (mu) shifting, exponential time shift.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )


def time_generation(pipeline: Flux2KleinPipeline, dtype: torch.dtype, warmup: int, iterations: int) -> tuple:
    pipeline.transformer.to(dtype)
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator).to(dtype)
    vae = pipeline.vae
    image_seconds, step_seconds = [], []
    with torch.inference_mode():
        for index in range(warmup + iterations):
            step_ends = []

            def on_step_end(_pipeline, _step, _timestep, kwargs):
                step_ends.append(time.perf_counter())
                return kwargs

            start = time.perf_counter()
            latents = pipeline(
                prompt_embeds=prompt_embeds,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(index),
                output_type="latent",
                return_dict=False,
                callback_on_step_end=on_step_end,
            )[0]
            decoded = vae.decode(latents.to(torch.float32), return_dict=False)[0]
            image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
            elapsed = time.perf_counter() - start
            if not torch.isfinite(latents.float()).all():
                raise SystemExit(f"non-finite latents in {dtype}")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise SystemExit(f"unexpected image size {image.size}")
            if index >= warmup:
                image_seconds.append(elapsed)
                step_seconds.append((step_ends[-1] - start) / STEPS)
    return statistics.median(image_seconds), statistics.median(step_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()

    # Casting a freshly built model with .to() warns about from_pretrained; nothing is kept in f32 here.
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipeline = Flux2KleinPipeline(
        scheduler=build_scheduler(),
        vae=build_autoencoder(),
        text_encoder=None,
        tokenizer=None,
        transformer=build_transformer(),
        is_distilled=True,
    )
    pipeline.set_progress_bar_config(disable=True)
    result = {
        "implementation": "diffusers Flux2KleinPipeline",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_tokens": (IMAGE_SIZE // 16) ** 2,
        "text_tokens": TEXT_TOKENS,
        "steps": STEPS,
    }
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        image, step = time_generation(pipeline, dtype, args.warmup, args.iterations)
        result[f"image_{name}_s"] = image
        result[f"step_{name}_s"] = step
    print(json.dumps(result))


if __name__ == "__main__":
    main()
