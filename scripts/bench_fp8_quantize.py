"""Speed of the FP8 quantization kernel (`fp8_hopper/quantize.py`) on the GPU, beside a plain cast
to float8 and a copy, and a check of its results against `quantize_reference`.

    PYTHONPATH=src python scripts/bench_fp8_quantize.py [--block-rows 128] [--warps 4,8,16] [--head-dims 64,128,256]

bfloat16 (B, H, N) = (4, 32, 8192) at D = 64, 128 and 256. First `quant-check: ok` or `quant-check:
FAILED ...`: the kernel against the reference on random data, bit for bit without the rotation (and
`rearrange_v` against PyTorch's copies), with it by the tests' rule (descales within rtol 1e-6, e4m3
values at most one step apart, at most 1e-3 of them different). Then one line per case, `quant:
...`, with the median time (CUDA events, L2 flushed: `flashdispatch.timing.median_time`) and the
bandwidth (bytes read + bytes written: 2 + 1 an element for the quantization and the cast, 2 + 2 for
the copy, 1 + 1 for an e4m3 V rearranged into the Hopper kernel's layout: `rearrange_v`, and
PyTorch's strided copy that it replaced, N being a multiple of 16). Each mode is timed at every
count of --warps and at the kernel's own choice (marked *, not yet measured).
About 40 s on an H100, mostly compiling (3 head dims x 3 modes x 3 warp counts).
"""

from __future__ import annotations

import argparse

import torch

from flashdispatch.backends.fp8_hopper.quantize import (FP8, _num_warps, permute_keys, quantize, quantize_reference,
                                                          random_signs, rearrange_v)
from flashdispatch.timing import median_time

SHAPE = (4, 32, 8192)
HEAD_DIMS = (64, 128, 256)
MODES = ("plain", "rotated", "transposed")


def _args(mode: str, signs):
    return dict(signs=signs if mode == "rotated" else None, transpose=mode == "transposed")


def _line(case: str, seconds: float, nbytes: int) -> None:
    print(f"quant: {case:36s} {seconds * 1e6:8.1f} us {nbytes / seconds / 1e9:7.0f} GB/s", flush=True)


def bench(block_rows: int, warps: list[int], head_dims: list[int]) -> None:
    device = torch.device("cuda")
    for head_dim in head_dims:
        x = torch.randn(*SHAPE, head_dim, device=device).to(torch.bfloat16)
        signs = random_signs(head_dim, 0, device)
        elements = x.numel()
        _line(f"D={head_dim} clone", median_time(x.clone, device), 4 * elements)
        _line(f"D={head_dim} .to(float8_e4m3fn)", median_time(lambda: x.to(FP8), device), 3 * elements)
        for mode in MODES:
            default = _num_warps(head_dim, block_rows, mode == "rotated")
            for count in sorted(set(warps) | {default}):
                seconds = median_time(lambda: quantize(x, block_rows, num_warps=count, **_args(mode, signs)), device)
                mark = "*" if count == default else " "  # the kernel's own choice
                _line(f"D={head_dim} {mode} rows={block_rows} warps={count}{mark}", seconds, 3 * elements)
        v8 = x.to(FP8)
        _line(f"D={head_dim} e4m3 V rearranged", median_time(lambda: rearrange_v(v8), device), 2 * elements)
        _line(f"D={head_dim} e4m3 V, PyTorch's copies", median_time(lambda: permute_keys(v8.transpose(2, 3)), device),
              2 * elements)
        del x, v8


def _e4m3_step(v: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(v.abs().clamp_min(2.0**-6))  # 2^(floor(log2 |v|) - 3), 2^-9 below 2^-6
    return torch.ldexp(torch.ones_like(v), exponent - 4)


def mismatch(x, block_rows: int, signs, transpose: bool) -> str | None:
    """What is wrong with quantize's results against quantize_reference's, or None."""
    (x8, descale), (ref8, ref_descale) = (f(x, block_rows, signs, transpose) for f in (quantize, quantize_reference))
    if x8.shape != ref8.shape or descale.shape != ref_descale.shape:
        return f"shapes {tuple(x8.shape)} {tuple(descale.shape)}"
    off = (descale - ref_descale).abs() > 1e-6 * ref_descale.abs() + 4 * 2.0**-149
    if off.any():
        return f"{off.sum().item()} descales off"
    if transpose and (x8[..., x.shape[2]:].view(torch.uint8) != 0).any():
        return "nonzero padding"
    if signs is None:
        differ = (x8.view(torch.uint8) != ref8.view(torch.uint8)).sum().item()
        return f"{differ} bytes differ (no rotation: must be 0)" if differ else None
    got, ref = x8.float(), ref8.float()
    far = ~((got - ref).abs() <= _e4m3_step(torch.minimum(got.abs(), ref.abs())))
    differ = (got != ref).sum().item()
    if far.any():
        return f"{far.sum().item()} values more than one e4m3 step off"
    return f"{differ} of {ref.numel()} values differ" if differ > 1e-3 * ref.numel() else None


def check(block_rows: int, head_dims: list[int]) -> bool:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    failures = []
    for head_dim in head_dims:
        signs = random_signs(head_dim, 1, device)
        full = torch.randn(*SHAPE, head_dim, device=device, generator=gen).to(torch.bfloat16) * 3
        ragged = torch.randn(2, 1000, 3, head_dim, device=device, generator=gen).to(torch.float16).transpose(1, 2)
        for name, x in (("bf16 full", full), ("fp16 bshd N=1000", ragged)):
            for mode in MODES:
                args = _args(mode, signs)
                problem = mismatch(x, block_rows, args["signs"], args["transpose"])
                if problem:
                    failures.append(f"D={head_dim} {name} {mode}: {problem}")
            v8 = x.to(FP8)
            padded = torch.zeros(*v8.shape[:2], head_dim, -(-v8.shape[2] // 16) * 16, dtype=FP8, device=device)
            padded[..., :v8.shape[2]] = v8.transpose(2, 3)
            if not torch.equal(rearrange_v(v8).view(torch.uint8), permute_keys(padded).view(torch.uint8)):
                failures.append(f"D={head_dim} {name} e4m3 V rearranged: bytes differ")
        del full
    for failure in failures:
        print(f"quant-check: {failure}", flush=True)
    print("quant-check: ok" if not failures else f"quant-check: FAILED ({len(failures)} cases)", flush=True)
    return not failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-rows", type=int, default=128)
    parser.add_argument("--warps", default="4,8,16", help="warp counts to time, comma-separated")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma-separated")
    args = parser.parse_args()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    print(f"quant: {torch.cuda.get_device_name()}, bfloat16 (B, H, N) = {SHAPE}", flush=True)
    ok = check(args.block_rows, head_dims)
    bench(args.block_rows, [int(w) for w in args.warps.split(",")], head_dims)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
