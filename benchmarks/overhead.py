"""Host time per call that `flashdispatch.attention()` adds over calling the chosen backend directly.

The issue's acceptance: "with a cached decision, `attention()` adds at most 10 microseconds of host
time over calling the chosen backend directly."

On a tiny problem (q, k, v of shape (B=1, H=1, N=16, D=64), bf16 on CUDA, float32 on CPU), where
the GPU finishes each kernel long before the host issues the next one, this times loops of many
calls with no synchronization inside (time.perf_counter around the loop, one synchronize before
reading the clock at the end) and reports microseconds per call, the median of several repeats:

  (a) api      flashdispatch.attention(q, k, v), decision cached
  (b) direct   the chosen backend's forward(q, k, v, problem), same Problem, on tensors that need no grad
  (b') direct+autograd   (gradient mode only) (b) inside a minimal torch.autograd.Function, as
                attention() runs it, so that (a) - (b') is the dispatcher's own cost
  (c) torch    torch.nn.functional.scaled_dot_product_attention(q, k, v), for scale

once with inputs that need no gradient and once with requires_grad=True inputs (where (a) builds
the autograd graph). The verdict compares (a) - (b) without gradient and (a) - (b') with gradient
to 10 us. It also reports the first call of the process (plugin loading, capability probe,
decision, first kernel; synchronized) and the median uncached call (decision cache cleared before
each call; synchronized).

    PYTHONPATH=src python3 benchmarks/overhead.py
    PYTHONPATH=src python3 benchmarks/overhead.py --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flashdispatch
from flashdispatch import api
from flashdispatch.dispatcher.problem import build_problem

BUDGET_US = 10.0  # the acceptance's limit on the dispatcher's added host time
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(fn, device, iters: int) -> float:
    """Microseconds per call of a loop of `iters` unsynchronized calls (synchronized once at the end)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters * 1e6


def cached_decision(problem):
    """The decision attention() cached for `problem` (so that (b) calls exactly the backend (a) runs)."""
    for decision in api._decisions.values():
        if decision.problem == problem:
            return decision
    raise RuntimeError(f"no cached decision for {problem.describe()}; attention()'s cache may have changed shape")


class _Direct(torch.autograd.Function):
    """The least an autograd wrapper around one backend can do: attention()'s Function without the look-up."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, problem):
        out, lse = fwd.forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.problem = bwd, problem
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd.backward(dout, q, k, v, out, lse, ctx.problem)
        return dq, dk, dv, None, None, None


def compare(label: str, calls: dict, device, iters: int, repeats: int, warmup: int) -> dict:
    """Median microseconds per call of each function, the repeats interleaved so that drift hits all alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = {name: [] for name in calls}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one loop would land on one variant only
    try:
        for _ in range(repeats):
            for name, fn in calls.items():
                samples[name].append(per_call_us(fn, device, iters))
    finally:
        if gc_was_enabled:
            gc.enable()
    result = {name: dict(median_us=statistics.median(s), min_us=min(s), max_us=max(s)) for name, s in samples.items()}
    print(f"\n{label}")
    for name, r in result.items():
        print(f"  {name:<34}{r['median_us']:9.2f} us/call  (min {r['min_us']:.2f}, max {r['max_us']:.2f})")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shape", default="1,1,16,64", help="B,H,N,D (default 1,1,16,64)")
    parser.add_argument("--iters", type=int, default=None, help="calls per timed loop (default 2000 on CUDA, 500 on CPU)")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per variant; the median is reported")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls per variant first")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    iters = args.iters or (2000 if device.type == "cuda" else 500)
    b, h, n, d = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    results = dict(device=str(device), dtype=str(dtype), shape=[b, h, n, d], iters=iters, repeats=args.repeats)

    # The process's first call: plugin loading, the capability probe, the decision, the first kernel.
    synchronize(device)
    start = time.perf_counter()
    flashdispatch.attention(q, k, v)
    synchronize(device)
    results["first_call_us"] = (time.perf_counter() - start) * 1e6
    caps = flashdispatch.capabilities(device)
    print(f"device {caps.device} ({caps.name}); torch {torch.__version__}; q, k, v {(b, h, n, d)} {dtype}; "
          f"{iters} calls per loop, median of {args.repeats} loops")
    print(f"first call of the process (registry load, capability probe, decision, first kernel): "
          f"{results['first_call_us']:.0f} us")

    # Uncached: the decision cache cleared before each call (validation + selection every time).
    times = []
    for _ in range(max(5, args.repeats)):
        flashdispatch.clear_decisions()
        synchronize(device)
        start = time.perf_counter()
        flashdispatch.attention(q, k, v)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e6)
    results["uncached_call_us"] = statistics.median(times)
    print(f"uncached call (cache cleared, synchronized), median: {results['uncached_call_us']:.1f} us")

    deterministic = torch.are_deterministic_algorithms_enabled()
    verdicts = []
    for needs_grad in (False, True):
        qa, ka, va = (t.detach().requires_grad_(needs_grad) for t in (q, k, v))
        flashdispatch.attention(qa, ka, va)  # caches the decision
        problem = build_problem(qa, ka, va, needs_grad=needs_grad, deterministic=deterministic)
        decision = cached_decision(problem)
        fwd = decision.forward.backend
        bwd = decision.backward.backend if decision.backward else None
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # direct calls record no autograd graph
        calls = {
            "(a) flashdispatch.attention": lambda: flashdispatch.attention(qa, ka, va),
            f"(b) {fwd.name}.forward": lambda: fwd.forward(qd, kd, vd, problem),
        }
        if needs_grad:
            calls[f"(b') {fwd.name} in autograd.Function"] = lambda: _Direct.apply(qa, ka, va, fwd, bwd, problem)
        calls["(c) F.scaled_dot_product_attention"] = lambda: F.scaled_dot_product_attention(qa, ka, va)
        label = (f"{'with' if needs_grad else 'without'} gradient: forward {fwd.name}"
                 + (f", backward {bwd.name}" if bwd else ""))
        timed = compare(label, calls, device, iters, args.repeats, args.warmup)
        names = list(timed)
        base = names[2] if needs_grad else names[1]  # what attention() is compared with
        if needs_grad:
            print(f"  attention() - direct forward: {timed[names[0]]['median_us'] - timed[names[1]]['median_us']:+.2f} us "
                  f"(includes building the autograd graph)")
        added = timed[names[0]]["median_us"] - timed[base]["median_us"]
        added_min = timed[names[0]]["min_us"] - timed[base]["min_us"]
        what = "direct forward in an autograd.Function" if needs_grad else "direct forward"
        print(f"  attention() - {what}: {added:+.2f} us (medians), {added_min:+.2f} us (minima)")
        noisy = [n for n in (names[0], base) if timed[n]["max_us"] > 1.5 * timed[n]["min_us"]]
        if noisy:
            print(f"  warning: noisy host (max > 1.5x min for {', '.join(noisy)}); rerun with more --repeats")
        verdict = "PASS" if added <= BUDGET_US else "FAIL"
        verdicts.append(f"{'with' if needs_grad else 'without'} gradient: {added:+.2f} us added, {verdict} (limit {BUDGET_US:g} us)")
        results["grad" if needs_grad else "no_grad"] = dict(forward=fwd.name, backward=bwd.name if bwd else None,
                                                            calls=timed, compared_with=base, added_us=added,
                                                            added_us_minima=added_min, noisy=bool(noisy), verdict=verdict)

    print("\nacceptance (cached decision, at most 10 us over the chosen backend):")
    for line in verdicts:
        print(f"  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
