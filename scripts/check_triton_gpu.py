"""GPU checks of the Triton backend beyond the conformance tier (one process per part, for parallel runs):

    --part candidates:I/N   every candidate configuration the tuner may pick on this GPU is exact:
                            conformance cases (bf16 and fp16, each head-dim class, causal GQA, window
                            with softcap, varlen, decoding) with configuration i of each kernel's list
                            forced, for the i of this part
    --part determinism      repeated forward and backward runs give bit-identical results
    --part gluon            the Gluon Hopper forward (hopper.py) is exact where it runs, and runs
                            where it should: conformance cases at head dims 64 and 128, both layouts,
                            causal or not, GQA, ragged lengths, more queries than keys
    --part gluon-speed      forward TFLOP/s of the Gluon kernel, the plain Triton kernel, sdpa-flash
                            and sdpa-cudnn on the prefill grid (bf16), same process
    --part host             host time per decoding call (B=8, 8k keys) against its GPU time: whether
                            the launch path, not the kernel, limits short calls
    --part launch           host time of one launch of the decoding kernels through Triton's JIT entry
                            (kernel[grid](...)) against a direct launch of the compiled kernel, and
                            cProfile's view of a decoding call through attention()
    --part flush            decoding times of triton, sdpa-flash and sdpa-cudnn and the copy ceiling with
                            the L2 flushed by writing a buffer (dirty lines) and by reading one (clean
                            lines, `timing.median_time`), host hidden or not
    --part varlen           throughput of a mixed-length packed batch against the equal-length batch
                            with the same token count (forward and backward, bf16, D=128)

    PYTHONPATH=src python3 scripts/check_triton_gpu.py --part determinism
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from gpu_grid import prefill_cases


def candidates_part(index: int, count: int) -> int:
    from flashdispatch.backends.triton import TritonBackend
    from flashdispatch.backends.triton.configs import CANDIDATES
    from flashdispatch.conformance.cases import make_case
    from flashdispatch.conformance.checks import check_case
    from flashdispatch.dispatcher.capabilities import capabilities

    generation = "sm90" if capabilities(torch.device("cuda")).compute_capability >= (9, 0) else "sm80"
    dims = {"64": (64, 40), "128": (128, 96), "256": (256, 192)}
    longest = max(len(v) for v in CANDIDATES.values())
    backend = TritonBackend()
    failures = 0
    checked = 0
    for i in range(index, longest, count):
        for dim_class, head_dims in dims.items():
            forced = []
            for kernel in ("forward", "decode", "dkdv", "dq"):
                options = CANDIDATES[(kernel, generation, dim_class)]
                c = options[i % len(options)]
                forced.append(f"{kernel}={c.block_m},{c.block_n},{c.num_warps},{c.num_stages}")
            os.environ["FLASHDISPATCH_TRITON_CONFIG"] = ";".join(forced)
            for d in head_dims:
                for dtype in (torch.bfloat16, torch.float16):
                    cases = [
                        make_case(dtype=dtype, head_dim=d, seqlen_q=700, seqlen_k=1000, heads_q=8, heads_kv=2,
                                  causal=True, layout="bshd", backward=True),
                        make_case(dtype=dtype, head_dim=d, seqlen_q=513, seqlen_k=513, window=(100, 37), softcap=20.0,
                                  q_scale=4.0, backward=True),
                        make_case(dtype=dtype, head_dim=d, layout="varlen", seqlens_q=(1, 300, 77, 640),
                                  seqlens_k=(90, 300, 500, 640), heads_q=4, heads_kv=1, causal=True, backward=True),
                        make_case(dtype=dtype, head_dim=d, seqlen_q=3, seqlen_k=3000, heads_q=8, heads_kv=2,
                                  causal=True),
                    ]
                    for case in cases:
                        result = check_case(backend, case, "cuda")
                        checked += 1
                        if not result.passed:
                            failures += 1
                            print(f"[{os.environ['FLASHDISPATCH_TRITON_CONFIG']}]\n{result}", flush=True)
    print(f"candidates part {index}/{count}: {checked} checks, {failures} failed", flush=True)
    return 1 if failures else 0


def determinism() -> int:
    from flashdispatch import attention

    torch.manual_seed(0)
    bad = 0
    problems = {
        "bshd causal GQA 32/8 D=128 N=1000": dict(shape_q=(2, 1000, 32, 128), shape_kv=(2, 1000, 8, 128),
                                                 kwargs=dict(causal=True, layout="bshd")),
        "bhsd window+softcap D=64 N=2048": dict(shape_q=(2, 16, 2048, 64), shape_kv=(2, 16, 2048, 64),
                                               kwargs=dict(window=(256, 0), softcap=30.0)),
    }
    for name, p in problems.items():
        q = torch.randn(p["shape_q"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(p["shape_kv"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(p["shape_kv"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn_like(q)
        runs = []
        for _ in range(5):
            q.grad = k.grad = v.grad = None
            out = attention(q, k, v, backend="triton", **p["kwargs"])
            out.backward(dout)
            runs.append((out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
        same = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
        bad += not same
        print(f"determinism {name}: 5 runs of forward+backward {'bit-identical' if same else 'DIFFER'}", flush=True)
    return 1 if bad else 0


def gluon() -> int:
    from flashdispatch.backends.triton import TritonBackend, hopper
    from flashdispatch.conformance.cases import make_case
    from flashdispatch.conformance.checks import check_case

    ran = []
    real_forward = hopper.forward

    def counting_forward(*args, **kwargs):
        result = real_forward(*args, **kwargs)
        ran.append(result is not None)
        return result

    hopper.forward = counting_forward
    os.environ["FLASHDISPATCH_TRITON_AUTOTUNE"] = "0"  # the Gluon kernel is the first candidate
    backend = TritonBackend()
    failures = checked = 0
    for d in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            cases = [
                make_case(dtype=dtype, head_dim=d, seqlen_q=700, seqlen_k=1000, heads_q=8, heads_kv=2, causal=True,
                          layout="bshd", backward=True),
                make_case(dtype=dtype, head_dim=d, seqlen_q=1000, seqlen_k=700, heads_q=4, heads_kv=4, causal=True),
                make_case(dtype=dtype, head_dim=d, seqlen_q=129, seqlen_k=300, heads_q=4, heads_kv=1),
                make_case(dtype=dtype, head_dim=d, seqlen_q=513, seqlen_k=513, heads_q=2, heads_kv=2, causal=True,
                          q_scale=4.0, backward=True),
                make_case(dtype=dtype, head_dim=d, seqlen_q=2048, seqlen_k=2048, heads_q=4, heads_kv=2, batch=3,
                          layout="bshd"),
                make_case(dtype=dtype, head_dim=d, seqlen_q=40, seqlen_k=4000, heads_q=2, heads_kv=2, causal=True),
            ]
            for case in cases:
                before = len(ran)
                result = check_case(backend, case, "cuda")
                checked += 1
                used = any(ran[before:])
                failures += (not result.passed) or not used
                print(f"gluon {'used' if used else 'NOT USED'}: {result}", flush=True)
    print(f"gluon: {checked} checks, {failures} failed or not routed to the Gluon kernel", flush=True)
    return 1 if failures else 0


def gluon_speed() -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from flashdispatch.backends.triton import TritonBackend
    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import median_time

    backend = TritonBackend()
    variants = {"gluon": "forward=128,128,8,2,gluon", "plain": "forward=128,128,8,3", "tma": "forward=128,128,8,2,tma"}
    for d, n, causal, q, k, v, flops in prefill_cases():
        problem = build_problem(q, k, v, causal=causal)
        rates = {}
        for name, forced in variants.items():
            os.environ["FLASHDISPATCH_TRITON_CONFIG"] = forced
            rates[name] = flops / median_time(lambda: backend.forward(q, k, v, problem), "cuda") / 1e12
        for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(kind):
                rates[name] = flops / median_time(lambda: sdpa(q, k, v, is_causal=causal), "cuda") / 1e12
        print(f"D={d} N={n} causal={causal}: " + ", ".join(f"{k} {r:.0f}" for k, r in rates.items())
              + f" TFLOP/s; gluon/cudnn {rates['gluon'] / rates['cudnn']:.2f}, gluon/flash "
              f"{rates['gluon'] / rates['flash']:.2f}", flush=True)
    os.environ.pop("FLASHDISPATCH_TRITON_CONFIG")
    return 0


def host() -> int:
    import time

    from flashdispatch import attention
    from flashdispatch.timing import median_time

    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    call = lambda: attention(q, k, v, backend="triton")  # noqa: E731
    gpu = median_time(call, "cuda")
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(200):
        call()
    enqueue = (time.perf_counter() - started) / 200
    torch.cuda.synchronize()
    print(f"host: decode B=8 8k through attention(): GPU {gpu * 1e6:.1f} us (events, L2 flushed), host enqueue "
          f"{enqueue * 1e6:.1f} us per call", flush=True)
    return 0


def launch() -> int:
    import cProfile
    import pstats

    from flashdispatch import attention
    from flashdispatch.backends.triton import TritonBackend, _forward_plan, _strides, kernels
    from flashdispatch.backends.triton.configs import Config
    from flashdispatch.dispatcher.capabilities import capabilities
    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import host_seconds

    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    problem = build_problem(q, k, v)
    plan = _forward_plan(problem, Config(16, 128, 8, 3), capabilities(q.device).sm_count, False)
    out = torch.empty(plan.out_shape, dtype=torch.float32, device="cuda")
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device="cuda")
    none = torch.empty(0, dtype=torch.int32, device="cuda")
    args = (q, k, v, out, lse, none, none, None, None, *_strides(q, "bhsd"), *_strides(k, "bhsd"),
            *_strides(v, "bhsd"), *plan.out_strides, *plan.lse_strides, problem.seqlen_q, problem.seqlen_k,
            problem.heads_kv, problem.group_size, plan.keys_per_split, problem.scale, 1.0, problem.window_left,
            problem.window_right)
    constants = dict(plan.constants)
    options = dict(num_warps=constants.pop("num_warps"), num_stages=constants.pop("num_stages"))
    compiled = kernels.attention_forward[plan.grid](*args, TMA=False, **constants, **options)
    names = [p.name for p in kernels.attention_forward.params if p.is_constexpr]
    full = args + tuple(dict(TMA=False, **constants)[n] for n in names)

    def per_call(fn):
        return host_seconds(fn, calls=2000) * 1e6

    jit = per_call(lambda: kernels.attention_forward[plan.grid](*args, TMA=False, **constants, **options))
    direct = per_call(lambda: compiled[plan.grid](*full))
    empty = per_call(lambda: torch.empty(plan.out_shape, dtype=torch.float32, device="cuda"))
    backend = TritonBackend()
    backend.forward(q, k, v, problem)  # tunes
    attention(q, k, v, backend="triton")
    forward = per_call(lambda: backend.forward(q, k, v, problem))
    call = per_call(lambda: attention(q, k, v, backend="triton"))
    print(f"launch: decode split kernel through kernel[grid](...) {jit:.1f} us host, direct compiled[grid](...) "
          f"{direct:.1f} us; torch.empty {empty:.1f} us; backend.forward {forward:.1f} us; whole attention() call "
          f"{call:.1f} us", flush=True)
    for hide in (False, True):
        from flashdispatch.timing import median_time
        gpu = median_time(lambda: backend.forward(q, k, v, problem), "cuda", hide_host=hide)
        print(f"launch: backend.forward GPU time {gpu * 1e6:.1f} us (hide_host={hide})", flush=True)
    flush = torch.empty(2**26, dtype=torch.int32, device="cuda")
    print(f"launch: the L2 flush itself {median_time(flush.zero_, 'cuda', flush_l2=False) * 1e6:.1f} us", flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        attention(q, k, v, backend="triton")
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    return 0


def flush() -> int:
    import statistics

    from flashdispatch.backends.sdpa.cudnn import CudnnBackend
    from flashdispatch.backends.sdpa.flash import FlashBackend
    from flashdispatch.backends.triton import TritonBackend
    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import L2_FLUSH_BYTES, median_time

    buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def write_flushed(fn, repeats=20):
        """median_time as it was: the flush overwrites the buffer, leaving the L2 dirty."""
        for _ in range(3):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in events:
            buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3

    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    for name, timer in (("write", write_flushed), ("read", lambda fn: median_time(fn, "cuda"))):
        print(f"flush: copy ceiling, {name} flush: {2 * src.numel() * 4 / timer(lambda: dst.copy_(src)) / 1e9:.0f} GB/s",
              flush=True)
    del src, dst
    for b, nk in ((8, 8192), (32, 8192), (8, 65536)):
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 8, nk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        problem = build_problem(q, k, v)
        bytes_ = 2 * k.numel() * 2
        for backend in (TritonBackend(), FlashBackend(), CudnnBackend()):
            fn = lambda: backend.forward(q, k, v, problem)  # noqa: E731
            fn()
            times = dict(write=write_flushed(fn), read=median_time(fn, "cuda"),
                         read_gpu_only=median_time(fn, "cuda", hide_host=True))
            print(f"flush: B={b} Nk={nk} {backend.name:10s} " + ", ".join(
                f"{k} {t * 1e6:.1f} us ({bytes_ / t / 1e9:.0f} GB/s)" for k, t in times.items()), flush=True)
    return 0


def varlen() -> int:
    from flashdispatch.backends.triton import TritonBackend
    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import median_time

    backend = TritonBackend()
    heads, d, tokens = 16, 128, 16384
    mixed = [7000, 3000, 2500, 1800, 1100, 500, 300, 184]  # sums to 16384
    assert sum(mixed) == tokens
    for causal in (False, True):
        rates = {}
        for name, lengths in (("equal 4x4096", [4096] * 4), ("mixed " + "/".join(map(str, mixed)), mixed)):
            cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
            q, k, v = (torch.randn(tokens, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            problem = build_problem(q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                                    max_seqlen_k=max(lengths), needs_grad=True, return_lse=True)
            pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lengths)
            flops = 4 * heads * d * pairs
            fwd = median_time(lambda: backend.forward(q, k, v, problem, cu, cu), "cuda")
            out, lse = backend.forward(q, k, v, problem, cu, cu)
            dout = torch.randn_like(out)
            bwd = median_time(lambda: backend.backward(dout, q, k, v, out, lse, problem, cu, cu), "cuda")
            rates[name] = (flops / fwd / 1e12, 2.5 * flops / bwd / 1e12)
            print(f"varlen {'causal' if causal else 'non-causal'} {name}: forward {fwd * 1e3:.3f} ms "
                  f"{rates[name][0]:.0f} TFLOP/s, backward {bwd * 1e3:.3f} ms {rates[name][1]:.0f} TFLOP/s", flush=True)
        (ef, eb), (mf, mb) = rates.values()
        print(f"varlen {'causal' if causal else 'non-causal'}: mixed/equal throughput forward {mf / ef:.2f}, "
              f"backward {mb / eb:.2f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", required=True)
    args = parser.parse_args()
    if args.part.startswith("candidates:"):
        index, count = (int(x) for x in args.part.split(":")[1].split("/"))
        return candidates_part(index, count)
    return {"determinism": determinism, "varlen": varlen, "gluon": gluon, "gluon-speed": gluon_speed, "host": host,
            "launch": launch, "flush": flush}[args.part]()


if __name__ == "__main__":
    sys.exit(main())
