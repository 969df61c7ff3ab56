"""Times diffusers' AutoencoderKLFlux2 (real FLUX.2 AE configuration, random weights, float32) on
CPU: encode (distribution mean, 2x2 patchify, BatchNorm) and decode (inverse, then the decoder) of
a SIZE x SIZE image, the same work as `cargo run --release --example bench_ae`.

Usage: python tools/bench/ae_diffusers.py --size 512 --threads N [--repeats R]
Prints `encode_seconds=<best>` and `decode_seconds=<best>`.

With --serve it works on demand instead, so that the Rust benchmark can alternate its passes with
these (both then see the same load of a shared machine): prints `ready`, then reads one command per
line from stdin, `encode` or `decode` (runs it, prints its seconds) or `done` (prints the torch
version and exits).
"""

import argparse
import sys
import time

import torch
from diffusers import AutoencoderKLFlux2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help="work on demand (see above)")
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

    if args.serve:
        with torch.inference_mode():
            latents = encode(image)
            print("ready", flush=True)
            for line in sys.stdin:
                command = line.strip()
                start = time.perf_counter()
                if command == "encode":
                    latents = encode(image)
                elif command == "decode":
                    decoded = decode(latents)
                    assert decoded.shape == image.shape, decoded.shape
                elif command == "done":
                    print(f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
                    return
                else:
                    raise SystemExit(f"unknown command {command!r}; expected encode, decode or done")
                print(time.perf_counter() - start, flush=True)
        return

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
