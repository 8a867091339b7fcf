"""A KV-cache decoding loop: one query per step against a cache that grows by one key per step.

Each step is a new shape, so a backend that builds a plan per shape (cuDNN) pays for it every step.
This is why the shipped policy ranks sdpa-flash first for decoding. Prints per-backend step time
(median over the steps, host clock around a synchronised call) for the backends given.

    PYTHONPATH=src python3 benchmarks/decode_loop.py [--backends sdpa-flash,sdpa-cudnn,auto] [--steps 32]

"auto" is flashdispatch.attention() choosing for itself.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashdispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sdpa-flash,sdpa-cudnn,auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--start", type=int, default=4096, help="cache length at the first step")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    end = args.start + args.steps
    # The cache (B, Hkv, N, D), allocated once at its final length; step t uses its first start+t keys.
    k_cache = torch.randn(args.batch, args.kv_heads, end, args.head_dim, device=args.device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    print(f"decode loop: B={args.batch} H={args.heads}/{args.kv_heads} D={args.head_dim} {str(dtype)[6:]}, "
          f"cache {args.start} -> {end} keys, one new shape per step")
    for name in args.backends.split(","):
        backend = None if name == "auto" else name
        times = []
        chosen = set()
        for step in range(args.steps):
            n = args.start + step
            q = torch.randn(args.batch, args.heads, 1, args.head_dim, device=args.device, dtype=dtype)
            k, v = k_cache[:, :, :n], v_cache[:, :, :n]
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            flashdispatch.attention(q, k, v, causal=True, backend=backend)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if backend is None:
                chosen.add(flashdispatch.explain(q, k, v, causal=True).forward)
        label = name + (f" (chose {', '.join(sorted(chosen))})" if chosen else "")
        print(f"  {label:<32} median step {statistics.median(times) * 1e3:8.3f} ms, "
              f"first {times[0] * 1e3:8.3f} ms, max {max(times) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
