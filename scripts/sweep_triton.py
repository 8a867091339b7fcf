"""Sweep launch configurations of the Triton kernels on the GPU; the source of `configs.CANDIDATES`.

Compiles every configuration first in parallel worker processes (filling Triton's disk cache),
then times them one at a time in this process: median of CUDA-event-timed runs with the L2
flushed, on random inputs, next to sdpa-flash and sdpa-cudnn on the same shapes. The backward of
one kernel is timed as the whole backward with the other kernel at its first candidate.

    PYTHONPATH=src python3 scripts/sweep_triton.py --json sweep.json [--kernels forward,dkdv,dq,decode]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import torch

FORWARD = {  # ",tma": K and V through tensor descriptors (sm90)
    64: ["128,64,4,3", "128,64,4,4", "128,128,8,3", "128,64,8,3", "64,64,4,3", "128,32,4,4", "64,128,4,3",
         "128,64,4,4,tma", "128,128,8,3,tma", "64,64,4,3,tma"],
    128: ["128,64,8,3", "128,64,8,4", "128,128,8,2", "128,128,8,3", "128,64,4,3", "128,32,4,4", "64,64,4,3",
          "128,128,8,3,tma", "128,64,8,3,tma", "128,128,8,2,tma", "64,64,4,3,tma"],
}
DKDV = {
    64: ["64,128,8,2", "64,128,8,3", "32,128,4,3", "64,64,4,3", "32,64,4,4", "128,128,8,2", "64,128,4,3"],
    128: ["64,128,8,2", "64,128,8,3", "32,128,4,3", "32,128,8,3", "64,64,4,3", "32,64,4,3", "64,128,4,2"],
}
DQ = {
    64: ["128,64,8,2", "128,64,8,3", "64,64,4,3", "128,32,4,3", "64,128,4,3", "128,128,8,2"],
    128: ["128,64,8,2", "128,64,8,3", "64,64,4,3", "128,32,8,3", "64,32,4,3", "64,128,8,2"],
}
DECODE = ["16,128,4,2,tma", "16,128,8,3", "16,128,4,3,tma", "16,128,8,3,tma", "16,64,4,3", "16,128,4,3"]
DECODE_PROGRAMS_PER_SM = (1, 2, 4, 8)


def prefill_shapes():
    for d in (64, 128):
        for n in (1024, 4096, 16384):
            for causal in (False, True):
                yield (16384 // n, 2048 // d, 2048 // d, n, n, d, causal)


def decode_shapes():
    for b, nk in ((8, 8192), (32, 8192), (8, 65536)):
        yield (b, 32, 8, 1, nk, 128, False)


def make_inputs(shape, grad: bool):
    b, hq, hkv, nq, nk, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def problem_of(q, k, v, causal, grad):
    from flashdispatch.dispatcher.problem import build_problem
    return build_problem(q, k, v, causal=causal, needs_grad=grad, return_lse=grad)


def kernel_env(kernel: str, config: str, defaults: dict[str, str]) -> str:
    parts = {kernel: config}
    if kernel in ("dkdv", "dq"):
        other = "dq" if kernel == "dkdv" else "dkdv"
        parts[other] = defaults[other]
    return ";".join(f"{k}={v}" for k, v in parts.items())


def runner(kernel: str, shape):
    """A no-argument function that runs `kernel` on `shape` through the backend."""
    from flashdispatch.backends.triton import TritonBackend

    backend = TritonBackend()
    causal = shape[6]
    grad = kernel in ("dkdv", "dq")
    q, k, v = make_inputs(shape, grad)
    problem = problem_of(q, k, v, causal, grad)
    if not grad:
        return lambda: backend.forward(q, k, v, problem)
    out, lse = backend.forward(q, k, v, problem)
    dout = torch.randn_like(out)
    return lambda: backend.backward(dout, q, k, v, out, lse, problem)


def tasks(kernels):
    for kernel in kernels:
        if kernel == "decode":
            for config in DECODE:
                yield kernel, config, next(decode_shapes())
            continue
        table = {"forward": FORWARD, "dkdv": DKDV, "dq": DQ}[kernel]
        for d, configs in table.items():
            shape = (16, 2048 // d, 2048 // d, 1024, 1024, d, False)
            for config in configs:
                yield kernel, config, shape


def compile_one(task):
    kernel, config, shape = task
    os.environ["FLASHDISPATCH_TRITON_CONFIG"] = kernel_env(kernel, config, defaults_for(shape[5]))
    started = time.perf_counter()
    try:
        runner(kernel, shape)()
        torch.cuda.synchronize()
        return kernel, config, shape[5], time.perf_counter() - started, None
    except Exception as exc:  # noqa: BLE001
        return kernel, config, shape[5], time.perf_counter() - started, f"{type(exc).__name__}: {str(exc)[:300]}"


def defaults_for(d: int) -> dict[str, str]:
    return {"dkdv": DKDV[d][0], "dq": DQ[d][0]}


def flops(shape, backward: bool) -> float:
    b, hq, _, nq, nk, d, causal = shape
    f = 4 * b * hq * nq * nk * d * (0.5 if causal else 1.0)
    return f * (2.5 if backward else 1.0)


def kv_bytes(shape) -> float:
    b, hq, hkv, nq, nk, d, _ = shape
    return 2 * (2 * b * hkv * nk * d + 2 * b * hq * nq * d)


def sdpa_times(shape):
    from flashdispatch.backends.sdpa.cudnn import CudnnBackend
    from flashdispatch.backends.sdpa.flash import FlashBackend
    from flashdispatch.timing import median_time

    times = {}
    for backend in (FlashBackend(), CudnnBackend()):
        q, k, v = make_inputs(shape, True)
        problem = problem_of(q, k, v, shape[6], True)
        fwd = median_time(lambda: backend.forward(q, k, v, problem), "cuda", warmup=2, repeats=15)
        out, lse = backend.forward(q, k, v, problem)
        dout = torch.randn_like(out)
        bwd = median_time(lambda: backend.backward(dout, q, k, v, out, lse, problem), "cuda", warmup=2, repeats=15)
        times[backend.name] = (fwd, bwd)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernels", default="forward,dkdv,dq,decode")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--json", default=None)
    parser.add_argument("--phase", choices=("compile", "time", "both"), default="both",
                        help="compile only (parallel, fills the cache), time only (after a compile phase), or both")
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    from flashdispatch.timing import median_time

    broken = {}
    if args.phase in ("compile", "both"):
        started = time.perf_counter()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            compiled = pool.map(compile_one, list(tasks(kernels)), chunksize=1)
        broken = {(k, c, d): err for k, c, d, _, err in compiled if err}
        print(f"compiled {len(compiled)} variants in {time.perf_counter() - started:.0f} s; {len(broken)} failed",
              flush=True)
        for key, err in broken.items():
            print("  failed:", key, err)
        if args.phase == "compile":
            return 0

    results = []
    for shape in prefill_shapes() if set(kernels) - {"decode"} else ():
        d = shape[5]
        base = sdpa_times(shape)
        line = (f"\n{shape}: flash fwd {flops(shape, False) / base['sdpa-flash'][0] / 1e12:.0f} "
                f"bwd {flops(shape, True) / base['sdpa-flash'][1] / 1e12:.0f} | cudnn fwd "
                f"{flops(shape, False) / base['sdpa-cudnn'][0] / 1e12:.0f} bwd {flops(shape, True) / base['sdpa-cudnn'][1] / 1e12:.0f}")
        print(line, flush=True)
        for kernel in kernels:
            if kernel == "decode":
                continue
            table = {"forward": FORWARD, "dkdv": DKDV, "dq": DQ}[kernel]
            for config in table[d]:
                if (kernel, config, d) in broken:
                    continue
                os.environ["FLASHDISPATCH_TRITON_CONFIG"] = kernel_env(kernel, config, defaults_for(d))
                try:
                    seconds = median_time(runner(kernel, shape), "cuda", warmup=2, repeats=15)
                except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the sweep
                    print(f"  {kernel:7s} {config:12s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                backward = kernel != "forward"
                tflops = flops(shape, backward) / seconds / 1e12
                ref = base["sdpa-flash"][1 if backward else 0]
                results.append(dict(kernel=kernel, config=config, shape=shape, seconds=seconds, tflops=tflops,
                                    x_flash=ref / seconds, x_cudnn=base["sdpa-cudnn"][1 if backward else 0] / seconds))
                print(f"  {kernel:7s} {config:12s} {seconds * 1e3:8.3f} ms {tflops:6.1f} TFLOP/s  "
                      f"{ref / seconds:.2f}x flash", flush=True)
    if "decode" in kernels:
        import importlib

        triton_backend = importlib.import_module("flashdispatch.backends.triton")

        copy_src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        copy = 2 * copy_src.numel() / median_time(lambda: copy_dst.copy_(copy_src), "cuda", repeats=15) / 1e9
        print(f"\ncopy bandwidth {copy:.0f} GB/s", flush=True)
        for shape in decode_shapes():
            base = sdpa_times(shape)
            print(f"\n{shape}: flash {kv_bytes(shape) / base['sdpa-flash'][0] / 1e9:.0f} GB/s, "
                  f"cudnn {kv_bytes(shape) / base['sdpa-cudnn'][0] / 1e9:.0f} GB/s", flush=True)
            for config in DECODE:
                if ("decode", config, 128) in broken:
                    continue
                for per_sm in DECODE_PROGRAMS_PER_SM:
                    triton_backend.DECODE_PROGRAMS_PER_SM = per_sm
                    triton_backend._plans.clear()  # the plans hold the split counts
                    os.environ["FLASHDISPATCH_TRITON_CONFIG"] = f"decode={config}"
                    try:
                        run = runner("decode", shape)
                        seconds = median_time(run, "cuda", warmup=2, repeats=15)
                        # The GPU time alone: a slow launch path would otherwise show up here.
                        gpu_seconds = median_time(run, "cuda", warmup=0, repeats=15, hide_host=True)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  decode {config:12s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        continue
                    gbs = kv_bytes(shape) / seconds / 1e9
                    splits = next(iter(triton_backend._plans.values())).splits
                    results.append(dict(kernel="decode", config=config, per_sm=per_sm, splits=splits, shape=shape,
                                        seconds=seconds, gpu_seconds=gpu_seconds, gbs=gbs, of_copy=gbs / copy))
                    print(f"  decode {config:12s} x{per_sm:<2d} {splits:3d} splits {seconds * 1e6:8.1f} us {gbs:6.0f} GB/s "
                          f"({gbs / copy:.0%} of copy); GPU alone {gpu_seconds * 1e6:6.1f} us "
                          f"({kv_bytes(shape) / gpu_seconds / 1e9 / copy:.0%})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
