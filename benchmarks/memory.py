"""Peak device memory of forward + backward beyond inputs, outputs and gradients, as N grows.

The issue's acceptance: "forward + backward at B = 1, H = 8, N = 32k, D = 64 in bf16: the `tiled`
backend's peak memory beyond inputs, outputs and gradients is O(N), while `sdpa-math` needs
O(N^2); record both peaks."

For each backend and each N (default 2048, 4096, 8192, 16384, 32768) on q, k, v of shape
(B=1, H=8, N, D=64), bf16:

    q, k, v, dout allocated (random)            -> baseline = torch.cuda.memory_allocated()
    reset the peak; out, lse = backend.forward(...); dq, dk, dv = backend.backward(...)
    extra = max_memory_allocated() - baseline - bytes(out, lse, dq, dk, dv)

so `extra` is what the backend needs beyond its inputs (q, k, v, dout), its outputs (out and the
LSE it saves) and the gradients. The backend objects are called directly, so that the
dispatcher's memory-fit refusal of sdpa-math does not hide its real peak (its refusal is printed
as a note); running out of memory is reported as OOM with the N attempted, and larger N are then
skipped for that backend. The growth exponent between consecutive N is log(extra2 / extra1) /
log(N2 / N1): about 1 for O(N), about 2 for O(N^2) (a constant term, such as tiled's fixed-size
score tile, pulls it below 1 at small N).

Each backend first runs once at the smallest N, unmeasured, so that one-time allocations (cuBLAS
workspaces) land in the baseline. On a CPU there is no peak counter: the script says so and runs
each computation once as a smoke test (default N 128, 256).

    PYTHONPATH=src python3 benchmarks/memory.py --json memory.json
    PYTHONPATH=src python3 benchmarks/memory.py --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys

import torch

import flashdispatch
from flashdispatch.dispatcher.capabilities import capabilities
from flashdispatch.dispatcher.problem import build_problem

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
MIB = 2**20


def short_error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class CudaPeak:
    """The CUDA caching allocator's counters: bytes allocated now, and the peak since `start`."""

    def __init__(self, device):
        self.device = device

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def stop(self) -> tuple[int, int]:
        """(peak allocated, peak reserved) since `start`."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)


def peak_counter(device) -> CudaPeak | None:
    """The device's peak-memory counter, or None where there is none (the CPU)."""
    return CudaPeak(device) if device.type == "cuda" else None


def run_once(backend, args, seqlen: int, device, caps, counter) -> dict:
    """Forward + backward of one backend at one N; with a counter, the peak beyond inputs, outputs and gradients."""
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, seqlen, args.head_dim)
    rec = dict(backend=backend.name, seqlen=seqlen, status="ok", reason=None, refusal=None)
    q, k, v, dout = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
    problem = build_problem(q, k, v, causal=args.causal, needs_grad=True)
    reasons = backend.backward_not_supported_reasons(problem, caps)
    if reasons:  # the dispatcher would refuse; run anyway to see the real peak
        rec["refusal"] = "; ".join(reasons)
    baseline = counter.start() if counter else None
    try:
        with torch.no_grad():  # as attention()'s autograd.Function runs the forward
            out, lse = backend.forward(q, k, v, problem)
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, problem)
    except torch.OutOfMemoryError as exc:
        # The true need is above both the peak reached and the allocation that failed.
        rec.update(status="OOM", reason=short_error(exc))
        if counter:
            rec.update(baseline=baseline, peak_before_oom=counter.stop()[0])
        return rec
    if counter:
        peak, reserved = counter.stop()
        kept = storage_bytes((out, lse, dq, dk, dv))
        rec.update(baseline=baseline, peak=peak, inputs=storage_bytes((q, k, v, dout)), outputs_and_grads=kept,
                   extra=peak - baseline - kept, peak_reserved=reserved)
    if not all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv)):
        rec.update(status="error", reason="output or gradients not finite (NaN or inf)")
    return rec


def measure(backend, args, seqlen: int, device, caps, counter) -> dict:
    try:
        return run_once(backend, args, seqlen, device, caps, counter)
    except torch.OutOfMemoryError as exc:
        return dict(backend=backend.name, seqlen=seqlen, status="OOM", reason=short_error(exc))
    except Exception as exc:  # noqa: BLE001 - report and go on
        return dict(backend=backend.name, seqlen=seqlen, status="error", reason=short_error(exc))
    finally:
        release(device)


def add_growth(records: list[dict], args) -> None:
    """Per-token and per-score-element bytes, and the growth exponent from the previous N."""
    previous = None
    for rec in records:
        extra = rec.get("extra")
        if rec["status"] != "ok" or extra is None:
            previous = None
            continue
        heads = args.batch * args.heads
        rec["bytes_per_head_token"] = extra / (heads * rec["seqlen"])
        rec["bytes_per_score"] = extra / (heads * rec["seqlen"] ** 2)
        if previous is not None and previous["extra"] > 0 and extra > 0:
            rec["exponent"] = math.log(extra / previous["extra"]) / math.log(rec["seqlen"] / previous["seqlen"])
        previous = rec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tiled,sdpa-math", help="comma-separated (default tiled,sdpa-math)")
    parser.add_argument("--seqlens", default=None, help="comma-separated N (default 2048,4096,8192,16384,32768 on "
                        "CUDA; 128,256 on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the records to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    default_seqlens = "2048,4096,8192,16384,32768" if cuda else "128,256"
    seqlens = sorted(int(n) for n in (args.seqlens or default_seqlens).split(","))
    registered = flashdispatch.backends()
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; registered: {list(registered)}")
    caps = capabilities(device)
    print(f"device {caps.device} ({caps.name}); torch {torch.__version__}; B={args.batch} H={args.heads} "
          f"D={args.head_dim} {args.dtype}{' causal' if args.causal else ''}; forward + backward, backends called directly")
    counter = peak_counter(device)
    if counter is None:
        print("peak memory measurement needs CUDA (torch.cuda.max_memory_allocated); on this device each "
              "backend runs forward + backward once per N as a smoke test")

    records = []
    for name in names:
        backend = registered[name]
        measure(backend, args, seqlens[0], device, caps, counter)  # warm-up: one-time allocations go into the baseline
        mine = []
        oom_at = None
        for seqlen in seqlens:
            if oom_at is not None:
                mine.append(dict(backend=name, seqlen=seqlen, status="skipped", reason=f"OOM at N={oom_at}"))
                continue
            rec = measure(backend, args, seqlen, device, caps, counter)
            if rec["status"] == "OOM":
                oom_at = seqlen
            mine.append(rec)
            print(f"  {name} N={seqlen}: {rec['status']}", flush=True)
        add_growth(mine, args)
        records += mine

    print(f"\n{'N':>6}  {'backend':<12}{'extra MiB':>11}{'B/(head*tok)':>14}{'B/score':>9}{'exponent':>10}"
          f"{'peak MiB':>10}{'in MiB':>8}{'out+grad MiB':>14}  note")
    for rec in records:
        line = f"{rec['seqlen']:>6}  {rec['backend']:<12}"
        if rec["status"] != "ok":
            if "peak_before_oom" in rec:
                line += f"OOM after reaching {(rec['peak_before_oom'] - rec['baseline']) / MIB:.0f} MiB beyond the inputs; "
                print(line + rec["reason"])
            else:
                print(line + f"{rec['status']}: {rec['reason']}")
            continue
        if "extra" not in rec:  # no counter: CPU smoke test
            print(line + "ran (no peak counter on this device)" + (f"; note: {rec['refusal']}" if rec["refusal"] else ""))
            continue
        exponent = f"{rec['exponent']:10.2f}" if "exponent" in rec else f"{'-':>10}"
        line += (f"{rec['extra'] / MIB:11.1f}{rec['bytes_per_head_token']:14.1f}{rec['bytes_per_score']:9.3f}{exponent}"
                 f"{rec['peak'] / MIB:10.1f}{rec['inputs'] / MIB:8.1f}{rec['outputs_and_grads'] / MIB:14.1f}")
        if rec["refusal"]:
            line += f"  dispatcher would refuse: {rec['refusal']}"
        print(line)
    if counter:
        print()
        for name in names:  # the acceptance: growth at the largest N each backend reached
            done = [r for r in records if r["backend"] == name and r.get("exponent") is not None]
            if done:
                last = done[-1]
                kind = "O(N) or less" if last["exponent"] < 1.3 else "O(N^2)" if last["exponent"] > 1.7 else "between O(N) and O(N^2)"
                print(f"{name}: extra {last['extra'] / MIB:.1f} MiB at N={last['seqlen']}, growth exponent "
                      f"{last['exponent']:.2f} from the previous N: {kind}")
        print("extra = peak - (q, k, v, dout) - (out, lse, dq, dk, dv); exponent = growth of extra from the previous N "
              "(1: O(N), 2: O(N^2))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=caps.device, device_name=caps.name, torch=torch.__version__, args=vars(args),
                           records=records), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
