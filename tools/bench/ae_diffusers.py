"""Times diffusers' AutoencoderKLFlux2 (real FLUX.2 AE configuration, random weights, float32) on
CPU: encode (distribution mean, 2x2 patchify, BatchNorm) and decode (inverse, then the decoder) of
a SIZE x SIZE image, the same work as `cargo run --release --example bench_ae`.

Usage: python tools/bench/ae_diffusers.py --size 512 --threads N [--repeats R]
Prints `encode_seconds=<best>` and `decode_seconds=<best>`.
"""

import argparse
import time

import torch
from diffusers import AutoencoderKLFlux2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2().eval()  # defaults are the real FLUX.2 AE: 128, 256, 512, 512
    bn = vae.bn
    image = torch.rand(1, 3, args.size, args.size) * 2 - 1

    def encode(x):
        mean = vae.encode(x).latent_dist.mode()
        b, c, h, w = mean.shape
        patched = mean.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return (patched - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)

    def decode(latents):
        z = latents * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) + bn.running_mean.view(1, -1, 1, 1)
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return vae.decode(z).sample

    with torch.inference_mode():
        encode_times, decode_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            latents = encode(image)
            encode_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            decoded = decode(latents)
            decode_times.append(time.perf_counter() - start)
    assert decoded.shape == image.shape, decoded.shape
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"encode_seconds={min(encode_times):.3f}")
    print(f"decode_seconds={min(decode_times):.3f}")


if __name__ == "__main__":
    main()
