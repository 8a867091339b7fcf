"""GPU checks of the `cuda` backend beyond the conformance tier:

    --part exact      forward and decoding against a float64 reference on fresh random inputs
                      (FlashAttention's rule: at most 2x the error of PyTorch's own math in the
                      same dtype, plus a small floor)
    --part speed      forward TFLOP/s (bf16, D = 128, N = 4k and 16k, causal or not) and decoding
                      GB/s (Nq = 1, GQA 32/8, D = 128) against sdpa-flash, sdpa-cudnn and a copy
    --part decode-sweep  decoding GB/s for warps, keys per warp, pipeline depths and resident blocks per SM
    --part forward-sweep forward TFLOP/s for warps per block, 16-row tiles per warp and key-tile sizes
    --part profile    two forward launches (D = 128, N = 4k, bf16), to run under Nsight Compute
    --part decode-profile  one decoding call each of cuda and sdpa-cudnn at B = 8 and 32 (8k keys),
                      to run under Nsight Compute
    --part plot --log L --out P  bar charts of a saved `--part speed` log (needs matplotlib; no GPU)
    --part sanitize   one forward and one split decoding launch, then exit (run it under
                      compute-sanitizer --tool memcheck / racecheck)

    PYTHONPATH=src python3 scripts/check_cuda_gpu.py --part exact
"""

from __future__ import annotations

import argparse
import sys

import torch
from gpu_grid import prefill_cases


def reference(q, k, v, causal, scale):
    """float64 attention, bottom-right causal, GQA by repetition, (B, H, N, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        visible = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def low_precision_math(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)).float() * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        visible = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
        s = s.masked_fill(~visible, float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype) @ v)


def exact() -> int:
    from flashdispatch.backends.cuda import CudaBackend
    from flashdispatch.dispatcher.problem import build_problem

    backend = CudaBackend()
    failures = checks = 0
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            cases += [(dtype, 2, 8, 2, 300, 300, d, True), (dtype, 2, 8, 8, 257, 513, d, False),
                      (dtype, 1, 4, 1, 700, 200, d, True), (dtype, 3, 4, 4, 130, 1030, d, True),
                      (dtype, 4, 32, 8, 1, 8192, d, False), (dtype, 2, 8, 2, 5, 3000, d, True),
                      (dtype, 2, 16, 2, 16, 1000, d, False), (dtype, 1, 8, 8, 1, 77, d, False)]
    for dtype, b, hq, hkv, nq, nk, d, causal in cases:
        for layout in ("bhsd", "bshd"):
            gen = torch.Generator(device="cuda").manual_seed(checks)
            q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, generator=gen)
            k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=gen)
            args = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
            problem = build_problem(*args, causal=causal, layout=layout, return_lse=True)
            reasons = backend.not_supported_reasons(problem, __import__("flashdispatch").capabilities())
            if reasons:
                print(f"exact: {dtype} {(b, hq, hkv, nq, nk, d)} causal={causal} refused: {reasons}")
                failures += 1
                continue
            torch.cuda.synchronize()
            out, lse = backend.forward(*args, problem)
            if layout == "bshd":
                out = out.transpose(1, 2)
            ref, ref_lse = reference(q, k, v, causal, problem.scale)
            err = (out.double() - ref).abs().max().item()
            base = (low_precision_math(q, k, v, causal, problem.scale).double() - ref).abs().max().item()
            lse_err = (lse.double() - ref_lse).abs().nan_to_num(0.0).max().item()
            finite = torch.isfinite(out).all().item() and not torch.isnan(lse).any().item()
            ok = finite and err <= 2 * base + 1e-3 and lse_err < 1e-3
            checks += 1
            failures += not ok
            print(f"exact: {'ok  ' if ok else 'FAIL'} {str(dtype):15s} B={b} H={hq}/{hkv} N={nq}/{nk} D={d} "
                  f"causal={causal} {layout}: err {err:.2e} (math {base:.2e}), lse err {lse_err:.1e}", flush=True)
    print(f"exact: {checks} checks, {failures} failed", flush=True)
    return 1 if failures else 0


def speed() -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashdispatch.backends.cuda import CudaBackend
    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import host_seconds, median_time

    backend = CudaBackend()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), "cuda") / 1e9
    del src, dst
    print(f"speed: copy {copy:.0f} GB/s", flush=True)
    for d, n, causal, q, k, v, flops in prefill_cases():
        problem = build_problem(q, k, v, causal=causal)
        rates = {"cuda": flops / median_time(lambda: backend.forward(q, k, v, problem), "cuda") / 1e12}
        for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(kind):
                rates[name] = flops / median_time(lambda: sdpa(q, k, v, is_causal=causal), "cuda") / 1e12
        print(f"speed: D={d} N={n} causal={causal}: " + ", ".join(f"{k} {r:.0f}" for k, r in rates.items())
              + f" TFLOP/s; cuda/flash {rates['cuda'] / rates['flash']:.2f}", flush=True)
    for b, nk in ((8, 8192), (32, 8192), (8, 65536)):
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 8, nk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        problem = build_problem(q, k, v)
        size = 2 * k.numel() * 2
        rates = {"cuda": size / median_time(lambda: backend.forward(q, k, v, problem), "cuda") / 1e9,
                 "cuda (host hidden)": size / median_time(lambda: backend.forward(q, k, v, problem), "cuda",
                                                          hide_host=True) / 1e9}
        for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(kind):
                rates[name] = size / median_time(lambda: sdpa(q, k, v, enable_gqa=True), "cuda") / 1e9
        print(f"speed: decode B={b} Nk={nk}: " + ", ".join(f"{k} {r:.0f}" for k, r in rates.items())
              + f" GB/s; cuda {rates['cuda'] / copy:.0%} of copy, {rates['cuda'] / rates['cudnn']:.2f}x cudnn", flush=True)
        if b == 8 and nk == 8192:
            hosts = {"cuda": host_seconds(lambda: backend.forward(q, k, v, problem))}
            for name, kind in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                with sdpa_kernel(kind):
                    hosts[name] = host_seconds(lambda: sdpa(q, k, v, enable_gqa=True))
            print("speed: host time per decoding call (B=8, 8k keys): "
                  + ", ".join(f"{name} {t * 1e6:.1f} us" for name, t in hosts.items()), flush=True)
    return 0


def decode_sweep() -> int:
    import importlib

    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import median_time

    cuda_backend = importlib.import_module("flashdispatch.backends.cuda")  # flashdispatch.backends is also a function
    backend = cuda_backend.CudaBackend()
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), "cuda") / 1e9
    del src, dst
    shapes = []
    for b, nk in ((8, 8192), (32, 8192), (8, 65536)):
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 8, nk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        shapes.append((b, nk, q, k, v, build_problem(q, k, v)))
    for warps, warp_keys, stages, per_sm in ((8, 16, 2, 1), (4, 32, 1, 2), (4, 32, 1, 3), (4, 16, 1, 4), (4, 32, 2, 1),
                                             (8, 16, 1, 2), (8, 16, 3, 1), (8, 16, 2, 1)):
        cuda_backend.DECODE_WARPS, cuda_backend.DECODE_WARP_KEYS = warps, warp_keys
        cuda_backend.DECODE_STAGES, cuda_backend.DECODE_BLOCKS_PER_SM = stages, per_sm
        rates = []
        for b, nk, q, k, v, problem in shapes:
            seconds = median_time(lambda: backend.forward(q, k, v, problem), "cuda", hide_host=True)
            rates.append(f"B={b} Nk={nk} {seconds * 1e6:.1f} us {2 * k.numel() * 2 / seconds / 1e9 / copy:.1%}")
        print(f"decode-sweep: {warps} warps x {warp_keys} keys, {stages} stages, {per_sm} blocks/SM: " + "; ".join(rates),
              flush=True)
    return 0


def forward_sweep() -> int:
    import importlib

    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import median_time

    cuda_backend = importlib.import_module("flashdispatch.backends.cuda")
    backend = cuda_backend.CudaBackend()
    shapes = []
    for d, n, causal in ((128, 4096, False), (128, 4096, True), (128, 16384, False), (64, 4096, False)):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        shapes.append((d, n, causal, q, k, v, build_problem(q, k, v, causal=causal),
                       4 * b * h * n * n * d / (2 if causal else 1)))
    for warps, m_tiles, block_n in ((4, 2, 64), (8, 2, 64), (4, 2, 32), (8, 1, 64), (4, 1, 64), (2, 2, 64)):
        cuda_backend.FORWARD_WARPS, cuda_backend.FORWARD_M_TILES, cuda_backend.FORWARD_BLOCK_N = warps, m_tiles, block_n
        rates = []
        for d, n, causal, q, k, v, problem, flops in shapes:
            try:
                rate = flops / median_time(lambda: backend.forward(q, k, v, problem), "cuda") / 1e12
                rates.append(f"D={d} N={n}{' causal' if causal else ''} {rate:.0f}")
            except Exception as exc:  # noqa: BLE001 - a variant that does not fit is a result too
                rates.append(f"D={d}: {type(exc).__name__}: {str(exc)[:80]}")
        print(f"forward-sweep: {warps} warps x {m_tiles} row tiles, {block_n} keys: " + "; ".join(rates), flush=True)
    return 0


def profile() -> int:
    from flashdispatch.backends.cuda import CudaBackend
    from flashdispatch.dispatcher.problem import build_problem

    q, k, v = (torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(2):
        CudaBackend().forward(q, k, v, build_problem(q, k, v))
    torch.cuda.synchronize()
    return 0


def decode_profile() -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashdispatch.backends.cuda import CudaBackend
    from flashdispatch.dispatcher.problem import build_problem

    for b in (8, 32):
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        CudaBackend().forward(q, k, v, build_problem(q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.cuda.synchronize()
    return 0


def sanitize() -> int:
    from flashdispatch.backends.cuda import CudaBackend
    from flashdispatch.dispatcher.problem import build_problem

    backend = CudaBackend()
    q, k, v = (torch.randn(1, 4, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    backend.forward(q, k, v, build_problem(q, k, v, causal=True))
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 2000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    backend.forward(q, k, v, build_problem(q, k, v))
    torch.cuda.synchronize()
    print("sanitize: one forward and one split decoding launch done", flush=True)
    return 0


def plot(log: str, out: str) -> int:
    """Forward TFLOP/s and decoding GB/s of a `--part speed` log, per backend, side by side."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = open(log).read()
    forward = re.findall(r"D=(\d+) N=(\d+) causal=(\w+): cuda (\d+), flash (\d+), cudnn (\d+)", text)
    decode = re.findall(r"decode B=(\d+) Nk=(\d+): cuda (\d+), cuda \(host hidden\) \d+, flash (\d+), cudnn (\d+)", text)
    copy = float(re.search(r"copy (\d+) GB/s", text).group(1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for axis, rows, labels, unit in (
            (left, forward, [f"D={d}\nN={int(n) // 1024}k{' c' if c == 'True' else ''}" for d, n, c, *_ in forward],
             "forward TFLOP/s"),
            (right, decode, [f"B={b}\n{int(n) // 1024}k keys" for b, n, *_ in decode], "decoding GB/s")):
        values = [[float(x) for x in row[-3:]] for row in rows]
        for i, name in enumerate(("cuda", "sdpa-flash", "sdpa-cudnn")):
            axis.bar([j + (i - 1) * 0.27 for j in range(len(rows))], [v[i] for v in values], 0.27, label=name)
        axis.set_xticks(range(len(rows)), labels, fontsize=8)
        axis.set_ylabel(unit)
    right.axhline(copy, color="gray", linestyle="--", linewidth=1, label="device copy")
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"cuda backend on the H100, bf16 ({log.rsplit('/', 1)[-1]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", help="--part plot: the speed log to read")
    parser.add_argument("--out", help="--part plot: the PNG to write")
    parser.add_argument("--part", required=True, choices=("exact", "speed", "decode-sweep", "forward-sweep", "profile", "decode-profile",
                                                            "sanitize", "plot"))
    parts = {"exact": exact, "speed": speed, "decode-sweep": decode_sweep, "forward-sweep": forward_sweep,
             "profile": profile, "decode-profile": decode_profile, "sanitize": sanitize}
    args = parser.parse_args()
    if args.part == "plot":
        return plot(args.log, args.out)
    return parts[args.part]()


if __name__ == "__main__":
    sys.exit(main())
