"""The prefill grid of ../shared/peers-h100.md (16k tokens, 2048 / D heads, bf16), shared by the GPU
check scripts: yields (D, N, causal, q, k, v, forward FLOPs) with fresh random inputs."""

from __future__ import annotations

import torch


def prefill_cases(head_dims=(64, 128), lengths=(1024, 4096, 16384), causal=(False, True)):
    for d in head_dims:
        for n in lengths:
            for is_causal in causal:
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                yield d, n, is_causal, q, k, v, 4 * b * h * n * n * d / (2 if is_causal else 1)
