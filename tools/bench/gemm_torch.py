"""f32 matrix products in PyTorch on the CPU (MKL), the reference of examples/bench_gemm_f32.rs.

Usage: python tools/bench/gemm_torch.py --threads N --shapes M,K,N[,ta,tb];...
For each shape (ta / tb: 1 when that operand is read transposed) prints one line
`M K N ta tb seconds` with the median of several runs after a warm-up.
"""

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", required=True)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.shapes.split(";"):
        m, k, n, ta, tb = (int(v) for v in spec.split(","))
        a = torch.randn(k, m).t() if ta else torch.randn(m, k)
        b = torch.randn(n, k).t() if tb else torch.randn(k, n)
        out = torch.empty(m, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds.append(time.perf_counter() - start)
        print(m, k, n, ta, tb, statistics.median(seconds))


if __name__ == "__main__":
    main()
