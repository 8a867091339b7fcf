"""Host time per decoding call through `attention()`, and where it goes (cProfile).

The call: q (8, 32, 1, 128), k and v (8, 8, 8192, 128), GQA 32/8, bf16 on CUDA. On an H100 its
GPU time is ~110 us, so every microsecond of host time above that leaves the GPU idle in a
decoding loop. This times bursts of `--burst` unsynchronized calls, each burst after a synchronize
(so that the launch queue never fills and the GPU's pace does not hide the host's), and, with
`--profile`, prints cProfile's top functions by own time (that loop is not synchronized).

`--stub-launches` (for a machine with no GPU) runs the triton backend in Triton's interpreter mode
(TRITON_INTERPRET=1, so that it accepts CPU tensors) with the two forward kernels replaced by
stubs that launch nothing: what remains is flashdispatch's own Python per call. Triton's launch
path (argument binding, specialization, the driver call) is not in that number. bfloat16 is refused
on the CPU interpreter, so the stubbed run uses float16 (the host path is the same).

    PYTHONPATH=src python3 benchmarks/decode_host.py                       # CUDA, backend=triton and auto
    PYTHONPATH=src python3 benchmarks/decode_host.py --profile 20
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/decode_host.py --stub-launches --profile 20
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stub-launches", action="store_true",
                        help="CPU tensors, TRITON_INTERPRET=1, the Triton kernels replaced by no-op stubs")
    parser.add_argument("--shape", default="8,32,8,1,8192,128", help="B,HQ,HKV,NQ,NK,D")
    parser.add_argument("--backends", default="triton,auto", help="comma-separated; 'auto' lets the dispatcher pick")
    parser.add_argument("--iters", type=int, default=2000, help="calls per timed loop")
    parser.add_argument("--burst", type=int, default=10, help="calls between synchronizations (not timed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops; the median is reported")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N by own time")
    args = parser.parse_args(argv)

    if args.stub_launches:
        os.environ["TRITON_INTERPRET"] = "1"  # before flashdispatch reads it (capabilities are cached)
    import torch

    import flashdispatch
    from flashdispatch.backends.triton import kernels

    if args.stub_launches:
        class _NoLaunch:
            """kernel[grid](*args, **kwargs) that does nothing."""

            def __getitem__(self, grid):
                return lambda *a, **k: None

        kernels.attention_forward = _NoLaunch()
        kernels.merge_splits = _NoLaunch()
        device, dtype = torch.device("cpu"), torch.float16
        # The CPU policy does not rank triton for decoding; rank it first, so that "auto" times the
        # dispatcher's own path to the same backend.
        flashdispatch.configure({"rankings": {"cpu": {"decode": ["triton", "*"]}}})
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16

    b, hq, hkv, nq, nk, d = (int(x) for x in args.shape.split(","))
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    calls = {}
    for name in args.backends.split(","):
        backend = None if name == "auto" else name
        calls[name] = (lambda backend=backend: flashdispatch.attention(q, k, v, backend=backend))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qf = q.transpose(1, 2).contiguous().transpose(1, 2)

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qf, k, v, enable_gqa=True)

        calls["torch sdpa flash (direct)"] = sdpa_flash

    for name, call in calls.items():
        call()  # the decision and the Triton tuning happen here
        for _ in range(20):
            call()
        sync()
        # Bursts of a few calls after a synchronize: the launch queue never fills, so the host's
        # own time is measured, not the GPU's (a long unsynchronized loop runs at the GPU's pace
        # once the queue is full, which for this call is about the host time).
        samples = []
        for _ in range(args.repeats):
            total = 0.0
            for _ in range(args.iters // args.burst):
                sync()
                started = time.perf_counter()
                for _ in range(args.burst):
                    call()
                total += time.perf_counter() - started
            samples.append(total / (args.iters // args.burst * args.burst) * 1e6)
            sync()
        chosen = ""
        if name == "auto":
            chosen = f" (chose {flashdispatch.explain(q, k, v).forward})"
        print(f"{name}{chosen}: {statistics.median(samples):.2f} us host per call "
              f"(min {min(samples):.2f}, max {max(samples):.2f}; {args.iters} calls in bursts of {args.burst}, x {args.repeats})", flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.iters):
                call()
            profiler.disable()
            sync()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
