"""Side-by-side attention benchmark: every backend against PyTorch SDPA's flash and cuDNN kernels.

What it measures, per shape and per backend (see benchmarks/README.md for the conventions):

- forward time and backward time, each the median of CUDA-event-timed runs with the L2 cache
  flushed before each run (`flashdispatch.timing.median_time`), on fresh random inputs;
  the backward is timed alone, from a precomputed `(out, lse)` and a random `dout`;
- TFLOP/s as FlashAttention counts them: forward 4*B*Hq*Nq*Nk*D (times the visible fraction when
  causal: exactly 1/2 when Nq == Nk, the exact count of visible (query, key) pairs otherwise),
  backward 2.5x the forward;
- GB/s for memory-bound shapes (forward FLOP per byte < 64, e.g. decoding): bytes = K and V read
  once + q read once + out written once;
- each backend's speed relative to sdpa-flash and sdpa-cudnn measured in the same run
  ("x flash" = flash's time / this backend's time: above 1 is faster than flash);
- the machine's ceilings: device-to-device copy bandwidth (bytes read + written) always, and with
  `--ceilings` a bf16 8192^3 matrix product.

The forward is the training forward (it saves the LSE) when the backward is timed for that shape,
and the inference forward (no LSE) otherwise (`--fwd-only`, decode shapes). Backends are called
directly (`backend.forward`, `backend.backward`), or through `flashdispatch.attention(...,
backend=name)` with `--through-api`.

Examples:
    PYTHONPATH=src python3 benchmarks/attention.py                       # prefill + decode grids
    PYTHONPATH=src python3 benchmarks/attention.py --grid prefill --json out.json --plot out.png
    PYTHONPATH=src python3 benchmarks/attention.py --backends tiled --shape 4,32,32,4096,4096,64 --causal
    PYTHONPATH=src python3 benchmarks/attention.py --device cpu --shape 1,2,2,64,64,32 --dtype float32
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

import flashdispatch
from flashdispatch.dispatcher.capabilities import capabilities
from flashdispatch.dispatcher.problem import build_problem
from flashdispatch.timing import median_time

BASELINES = ("sdpa-flash", "sdpa-cudnn")  # every ratio is taken against these
# Slow by construction: skipped by default (use --all), so that the default run stays short.
ALWAYS_SLOW = ("reference",)  # float64 oracle
LARGE_SLOW = ("tiled", "sdpa-math")  # Python tile loop / O(N^2) score matrices
LARGE_SCORE_ELEMENTS = 2**31  # B*Hq*Nq*Nk above this counts as large (N = 16384 in the prefill grid)
MEMORY_BOUND_INTENSITY = 64  # forward FLOP per byte below this: also report GB/s
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Shape:
    kind: str  # "prefill", "decode" or "custom"
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool

    def label(self) -> str:
        heads = f"H={self.heads_q}" if self.heads_q == self.heads_kv else f"H={self.heads_q}/{self.heads_kv}"
        seq = f"N={self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"N={self.seqlen_q}/{self.seqlen_k}"
        return f"B={self.batch} {heads} {seq} D={self.head_dim}" + (" causal" if self.causal else "")

    @property
    def score_elements(self) -> int:
        return self.batch * self.heads_q * self.seqlen_q * self.seqlen_k


def prefill_grid() -> list[Shape]:
    """The FlashAttention papers' grid: batch * seqlen = 16k tokens, heads * D = 2048, bf16.

    D=64:  (B, H, N) = (16, 32, 1024), (4, 32, 4096), (1, 32, 16384)
    D=128: (B, H, N) = (16, 16, 1024), (4, 16, 4096), (1, 16, 16384)
    each non-causal and causal: 12 shapes.
    """
    shapes = []
    for head_dim in (64, 128):
        for seqlen in (1024, 4096, 16384):
            for causal in (False, True):
                heads = 2048 // head_dim
                shapes.append(Shape("prefill", 16384 // seqlen, heads, heads, seqlen, seqlen, head_dim, causal))
    return shapes


def decode_grid() -> list[Shape]:
    """One new token against a KV cache: Nq = 1, GQA 32 query / 8 KV heads, D = 128.

    (B, Nk) = (8, 8192), (32, 8192), (8, 65536); non-causal (with Nq = 1, bottom-right causal
    masks nothing). Forward only: decoding is inference.
    """
    return [Shape("decode", b, 32, 8, 1, nk, 128, False) for b, nk in ((8, 8192), (32, 8192), (8, 65536))]


def parse_shape(text: str, causal: bool) -> Shape:
    """"B,Hq,Hkv,Nq,Nk,D" or "B,Hq,Hkv,Nq,Nk,D,causal"; `causal` (--causal) makes every shape causal."""
    fields = text.split(",")
    if len(fields) == 7 and fields[6].strip() == "causal":
        fields, causal = fields[:6], True
    try:
        b, hq, hkv, nq, nk, d = (int(x) for x in fields)
    except ValueError:
        raise SystemExit(f"--shape must be B,Hq,Hkv,Nq,Nk,D[,causal] (six ints), got {text!r}") from None
    return Shape("custom", b, hq, hkv, nq, nk, d, causal)


# FLOP and byte conventions


def visible_fraction(seqlen_q: int, seqlen_k: int, causal: bool) -> float:
    """Fraction of (query, key) pairs the mask lets through (bottom-right causal).

    Nq == Nk: exactly 1/2 (FlashAttention's convention, which the peers table uses); otherwise
    the exact count: query i sees min(Nk, max(0, i + Nk - Nq + 1)) keys (1 for decoding).
    """
    if not causal:
        return 1.0
    if seqlen_q == seqlen_k:
        return 0.5
    if seqlen_q <= seqlen_k:  # every query sees Nk - Nq + 1 + i keys
        visible = seqlen_q * (seqlen_k - seqlen_q + 1) + seqlen_q * (seqlen_q - 1) // 2
    else:  # the first Nq - Nk queries see nothing, the rest 1..Nk keys
        visible = seqlen_k * (seqlen_k + 1) // 2
    return visible / (seqlen_q * seqlen_k)


def forward_flops(s: Shape) -> float:
    return 4.0 * s.batch * s.heads_q * s.seqlen_q * s.seqlen_k * s.head_dim * visible_fraction(s.seqlen_q, s.seqlen_k, s.causal)


def backward_flops(s: Shape) -> float:
    return 2.5 * forward_flops(s)


def forward_bytes(s: Shape, itemsize: int) -> int:
    """K and V read once, q read once, out written once."""
    kv = 2 * s.batch * s.heads_kv * s.seqlen_k * s.head_dim
    q_out = 2 * s.batch * s.heads_q * s.seqlen_q * s.head_dim
    return (kv + q_out) * itemsize


def memory_bound(s: Shape, itemsize: int) -> bool:
    return forward_flops(s) / forward_bytes(s, itemsize) < MEMORY_BOUND_INTENSITY


# Machine ceilings


def copy_bandwidth(device, mib: int) -> float:
    """Bytes per second (read + written) of a large device-to-device copy."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * mib * 2**20 / seconds


def matmul_rate(device, size: int, dtype) -> float:
    """FLOP per second of a size^3 matrix product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    seconds = median_time(lambda: torch.mm(a, b, out=c), device, warmup=3, repeats=20)
    return 2.0 * size**3 / seconds


# One backend on one shape


def random_inputs(s: Shape, device, dtype):
    """Fresh q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), standard normal (never zeros)."""
    q = torch.randn(s.batch, s.heads_q, s.seqlen_q, s.head_dim, device=device, dtype=dtype)
    k = torch.randn(s.batch, s.heads_kv, s.seqlen_k, s.head_dim, device=device, dtype=dtype)
    v = torch.randn(s.batch, s.heads_kv, s.seqlen_k, s.head_dim, device=device, dtype=dtype)
    return q, k, v


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:240]


def all_finite(tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def skip_reason(name: str, s: Shape, run_all: bool) -> str | None:
    if run_all:
        return None
    if name in ALWAYS_SLOW:
        return "too slow (float64 oracle), use --all"
    if name in LARGE_SLOW and s.score_elements > LARGE_SCORE_ELEMENTS:
        return f"too slow at B*H*Nq*Nk = {s.score_elements:.2e} > {LARGE_SCORE_ELEMENTS:.2e}, use --all"
    return None


def measure(name: str, backend, s: Shape, args, caps, train: bool) -> dict:
    """Time one backend on one shape; every failure becomes a status in the returned record."""
    rec = dict(backend=name, status="ok", reason=None, fwd_s=None, bwd_s=None, bwd_status=None, bwd_reason=None)
    slow = name in ALWAYS_SLOW or name in LARGE_SLOW
    warmup, repeats = (1, args.slow_repeats) if slow else (args.warmup, args.repeats)
    rec.update(warmup=warmup, repeats=repeats)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    q, k, v = random_inputs(s, device, dtype)
    problem = build_problem(q, k, v, causal=s.causal, needs_grad=train)
    reasons = backend.not_supported_reasons(problem, caps)
    if reasons:
        rec.update(status="unsupported", reason="; ".join(reasons))
        return rec
    attention = flashdispatch.attention

    # Forward: the training forward (saves the LSE) when the backward is timed, else inference.
    try:
        if args.through_api:
            if train:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                forward = lambda: attention(qg, kg, vg, causal=s.causal, backend=name)  # noqa: E731
            else:
                def forward():
                    with torch.no_grad():
                        return attention(q, k, v, causal=s.causal, backend=name)
            check = [forward()]
        else:
            def forward():
                with torch.no_grad():
                    return backend.forward(q, k, v, problem)
            check = list(forward())
        if not all_finite(check):
            rec.update(status="error", reason="forward output is not finite (NaN or inf)")
            return rec
        del check
        rec["fwd_s"] = median_time(forward, device, warmup=warmup, repeats=repeats)
    except Exception as exc:  # noqa: BLE001 - report it in the table, go on with the next backend
        rec.update(status="OOM" if isinstance(exc, torch.OutOfMemoryError) else "error", reason=short_error(exc))
        return rec
    finally:
        forward = None  # drop the closure's references before the backward allocates

    if not train:
        rec["notes"] = backend.notes(problem, caps)
        return rec
    # Backward alone, from a precomputed (out, lse) and a random dout.
    reasons = backend.backward_not_supported_reasons(problem, caps)
    if reasons and not args.through_api:
        rec.update(bwd_status="unsupported", bwd_reason="; ".join(reasons))
        return rec
    try:
        if args.through_api:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = attention(qg, kg, vg, causal=s.causal, backend=name)
            dout = torch.randn_like(out)
            backward = lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)  # noqa: E731
            if reasons:  # attention() pairs this forward with the policy's backward
                chosen = flashdispatch.explain(q, k, v, causal=s.causal, backend=name).backward
                rec["bwd_reason"] = f"backward ran on {chosen}, the policy's choice: {name} has " + "; ".join(reasons)
        else:
            with torch.no_grad():
                out, lse = backend.forward(q, k, v, problem)
            dout = torch.randn_like(out)
            backward = lambda: backend.backward(dout, q, k, v, out, lse, problem)  # noqa: E731
        if not all_finite(backward()):
            rec.update(bwd_status="error", bwd_reason="gradients are not finite (NaN or inf)")
            return rec
        rec["bwd_s"] = median_time(backward, device, warmup=warmup, repeats=repeats)
        rec["bwd_status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        rec.update(bwd_status="OOM" if isinstance(exc, torch.OutOfMemoryError) else "error", bwd_reason=short_error(exc))
    finally:
        rec["notes"] = backend.notes(problem, caps)  # e.g. the Triton tuner's choices and their cost
    return rec


def free_device_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def add_rates(rec: dict, s: Shape, itemsize: int) -> None:
    f_fwd, f_bwd = forward_flops(s), backward_flops(s)
    rec["fwd_tflops"] = f_fwd / rec["fwd_s"] / 1e12 if rec.get("fwd_s") else None
    rec["fwd_gbps"] = forward_bytes(s, itemsize) / rec["fwd_s"] / 1e9 if rec.get("fwd_s") else None
    rec["bwd_tflops"] = f_bwd / rec["bwd_s"] / 1e12 if rec.get("bwd_s") else None
    both = rec.get("fwd_s") and rec.get("bwd_s")
    rec["fwd_bwd_tflops"] = (f_fwd + f_bwd) / (rec["fwd_s"] + rec["bwd_s"]) / 1e12 if both else None


def add_ratios(records: list[dict]) -> None:
    """x<baseline> = baseline's time / this backend's time, for forward and backward."""
    by_name = {r["backend"]: r for r in records}
    for rec in records:
        for base in BASELINES:
            ref = by_name.get(base)
            for direction in ("fwd", "bwd"):
                t, t_ref = rec.get(f"{direction}_s"), ref.get(f"{direction}_s") if ref else None
                rec[f"{direction}_x_{base}"] = t_ref / t if t and t_ref else None


# Printing


def fmt(x, spec: str, width: int) -> str:
    """`x` right-aligned in `width` characters, always after at least one space ("-" for None)."""
    return " " + (f"{x:>{width - 1}{spec}}" if x is not None else f"{'-':>{width - 1}}")


def rate(x, width: int) -> str:
    """A rate with 4 significant digits: 290.7, 3020, 0.01234."""
    return fmt(x, ".4g", width)


def print_shape_table(s: Shape, records: list[dict], dtype_name: str, train: bool, itemsize: int, out=sys.stdout) -> None:
    bound = memory_bound(s, itemsize)
    header = (f"\n[{s.kind}] {s.label()} {dtype_name}: forward {forward_flops(s) / 1e12:.3f} TFLOP"
              + (f", backward {backward_flops(s) / 1e12:.3f} TFLOP" if train else "")
              + (f", forward bytes {forward_bytes(s, itemsize) / 2**20:.1f} MiB" if bound else ""))
    print(header, file=out)
    cols = f"  {'backend':<16}{'fwd ms':>9}{'TFLOP/s':>9}" + (f"{'GB/s':>8}" if bound else "")
    cols += f"{'x flash':>8}{'x cudnn':>8}"
    if train:
        cols += f" |{'bwd ms':>9}{'TFLOP/s':>9}{'x flash':>8}{'x cudnn':>8} |{'f+b TFLOP/s':>12}"
    print(cols, file=out)
    for r in records:
        line = f"  {r['backend']:<16}"
        if r["status"] != "ok":
            print(line + f"{r['status']}: {r['reason']}", file=out)
            continue
        line += fmt(r["fwd_s"] * 1e3, ".3f", 9) + rate(r["fwd_tflops"], 9)
        if bound:
            line += rate(r["fwd_gbps"], 8)
        line += fmt(r["fwd_x_sdpa-flash"], ".2f", 8) + fmt(r["fwd_x_sdpa-cudnn"], ".2f", 8)
        if train:
            if r["bwd_status"] == "ok":
                line += " |" + fmt(r["bwd_s"] * 1e3, ".3f", 9) + rate(r["bwd_tflops"], 9)
                line += fmt(r["bwd_x_sdpa-flash"], ".2f", 8) + fmt(r["bwd_x_sdpa-cudnn"], ".2f", 8)
                line += " |" + rate(r["fwd_bwd_tflops"], 12)
                if r.get("bwd_reason"):
                    line += f"  ({r['bwd_reason']})"
            else:
                line += f" | backward {r['bwd_status']}: {r['bwd_reason']}"
        print(line, file=out)
        for note in r.get("notes") or ():
            print(f"    {r['backend']}: {note}", file=out)
    out.flush()


def write_plot(path: str, results: list[dict]) -> None:
    """One bar chart per shape: forward (and backward) TFLOP/s per backend; GB/s for memory-bound shapes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"--plot: skipped, matplotlib is not available ({exc})")
        return
    panels = [r for r in results if any(b["status"] == "ok" for b in r["backends"])]
    if not panels:
        print("--plot: skipped, no measurement to plot")
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        ok = [b for b in panel["backends"] if b["status"] == "ok"]
        names = [b["backend"] for b in ok]
        x = range(len(ok))
        if panel["memory_bound"]:
            ax.bar(list(x), [b["fwd_gbps"] for b in ok], color="tab:green", label="forward")
            ax.set_ylabel("GB/s")
        else:
            has_bwd = any(b.get("bwd_tflops") for b in ok)
            width = 0.4 if has_bwd else 0.8
            ax.bar([i - width / 2 * has_bwd for i in x], [b["fwd_tflops"] for b in ok], width, label="forward")
            if has_bwd:
                ax.bar([i + width / 2 for i in x], [b.get("bwd_tflops") or 0 for b in ok], width, label="backward")
            ax.set_ylabel("TFLOP/s")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{panel['shape']['kind']}: {panel['label']}", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(f"flashdispatch attention, {results[0]['dtype']}, {results[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote plot {path}")


# Main


def replay(path: str, plot: str | None) -> int:
    """Print the tables of a saved run (and plot them): e.g. on a machine with matplotlib, after a GPU run."""
    with open(path) as f:
        saved = json.load(f)
    ceilings = saved.get("ceilings", {})
    print(f"from {path}: device {saved['device']} ({saved['device_name']}); torch {saved['torch']}, cuDNN {saved['cudnn']}; "
          f"copy {ceilings.get('copy_gbps', float('nan')):.0f} GB/s"
          + (f", matmul {ceilings['matmul_tflops']:.1f} TFLOP/s" if "matmul_tflops" in ceilings else ""))
    for result in saved["results"]:
        s = Shape(**result["shape"])
        itemsize = DTYPES[result["dtype"]].itemsize
        print_shape_table(s, result["backends"], result["dtype"], result["train"], itemsize)
    if plot:
        write_plot(plot, saved["results"])
    return 0


def choose_backends(requested: list[str] | None, registered: dict, baselines: bool) -> list[str]:
    names = list(registered) if not requested else [n.strip() for item in requested for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; registered: {list(registered)}")
    if baselines:
        names = [b for b in BASELINES if b in registered] + [n for n in names if n not in BASELINES]
    return list(dict.fromkeys(names))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", action="append", help="comma-separated backend names (repeatable; default: all "
                        "registered). sdpa-flash and sdpa-cudnn are always added as baselines")
    parser.add_argument("--no-baselines", action="store_true", help="do not add sdpa-flash and sdpa-cudnn")
    parser.add_argument("--grid", action="append", choices=("prefill", "decode", "all"),
                        help="shape grid (repeatable; default: prefill and decode unless --shape is given)")
    parser.add_argument("--shape", action="append", default=[], help="B,Hq,Hkv,Nq,Nk,D, or B,Hq,Hkv,Nq,Nk,D,causal "
                        "(repeatable)")
    parser.add_argument("--causal", action="store_true", help="make every --shape causal (bottom-right aligned)")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fwd-only", action="store_true", help="time the (inference) forward only")
    parser.add_argument("--through-api", action="store_true", help="time flashdispatch.attention(..., backend=name)")
    parser.add_argument("--all", action="store_true", help="also run the slow backends (reference; tiled and "
                        "sdpa-math on large shapes)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up runs per timing (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per median (default 10)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs for reference/tiled/sdpa-math (default 3)")
    parser.add_argument("--ceilings", action="store_true", help="also measure a bf16 matmul's TFLOP/s")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth tensor size (default 1024 on "
                        "CUDA, 64 on CPU)")
    parser.add_argument("--matmul-size", type=int, default=None, help="matmul size (default 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every result to this JSON file (rewritten after each shape)")
    parser.add_argument("--plot", help="write a PNG bar chart per shape to this file (needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH", help="measure nothing: print the tables of a --json file "
                        "written earlier (and --plot them)")
    args = parser.parse_args(argv)
    if args.from_json:
        return replay(args.from_json, args.plot)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = str(device)
    dtype = DTYPES[args.dtype]
    itemsize = dtype.itemsize
    caps = capabilities(device)
    registered = flashdispatch.backends()
    names = choose_backends(args.backends, registered, not args.no_baselines)

    grids = args.grid or ([] if args.shape else ["prefill", "decode"])
    shapes = []
    if "prefill" in grids or "all" in grids:
        shapes += prefill_grid()
    if "decode" in grids or "all" in grids:
        shapes += decode_grid()
    shapes += [parse_shape(text, args.causal) for text in args.shape]

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    print(f"device {caps.device} ({caps.name}, {caps.arch}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {cudnn}, triton {triton_version}, python {platform.python_version()}")
    print(f"backends {', '.join(names)}; {'through flashdispatch.attention()' if args.through_api else 'backend objects called directly'}; "
          f"{args.dtype}; median of {args.repeats} runs after {args.warmup} warm-up "
          f"({args.slow_repeats} after 1 for reference/tiled/sdpa-math)"
          + ("; L2 flushed before each run" if device.type == "cuda" else ""))

    started = time.perf_counter()
    ceilings = {}
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 64)
    ceilings["copy_gbps"] = copy_bandwidth(device, copy_mib) / 1e9
    ceilings["copy_mib"] = copy_mib
    print(f"ceiling: device-to-device copy {ceilings['copy_gbps']:.0f} GB/s (read + write, {copy_mib} MiB)")
    if args.ceilings:
        size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
        ceilings["matmul_tflops"] = matmul_rate(device, size, dtype) / 1e12
        ceilings["matmul_size"] = size
        print(f"ceiling: {args.dtype} matmul {size}^3 {ceilings['matmul_tflops']:.4g} TFLOP/s")

    results = []

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=caps.device, device_name=caps.name, arch=caps.arch, torch=torch.__version__,
                               cuda=torch.version.cuda, cudnn=cudnn, triton=triton_version, args=vars(args),
                               ceilings=ceilings, conventions=dict(
                                   forward_flops="4*B*Hq*Nq*Nk*D * visible fraction (1/2 causal when Nq == Nk)",
                                   backward_flops="2.5 * forward_flops",
                                   forward_bytes="(K + V read once + q read + out written) * itemsize",
                                   ratio="x_<baseline> = baseline time / backend time"),
                               results=results), f, indent=1)

    for index, s in enumerate(shapes):
        train = not args.fwd_only and s.kind != "decode"
        records = []
        for name in names:
            reason = skip_reason(name, s, args.all)
            if reason:
                records.append(dict(backend=name, status="skipped", reason=reason))
                continue
            torch.manual_seed(args.seed + index)
            try:
                rec = measure(name, registered[name], s, args, caps, train)
            except Exception as exc:  # noqa: BLE001 - e.g. OOM while building the inputs
                rec = dict(backend=name, status="OOM" if isinstance(exc, torch.OutOfMemoryError) else "error",
                           reason=short_error(exc))
            free_device_memory(device)
            if rec["status"] == "ok":
                add_rates(rec, s, itemsize)
            records.append(rec)
        add_ratios(records)
        print_shape_table(s, records, args.dtype, train, itemsize)
        results.append(dict(shape=asdict(s), label=s.label(), dtype=args.dtype, device_name=caps.name, train=train,
                            memory_bound=memory_bound(s, itemsize), forward_flops=forward_flops(s),
                            backward_flops=backward_flops(s) if train else None,
                            forward_bytes=forward_bytes(s, itemsize), backends=records))
        dump()

    elapsed = time.perf_counter() - started
    print(f"\n{len(shapes)} shapes x {len(names)} backends in {elapsed:.1f} s. Ceilings: copy {ceilings['copy_gbps']:.0f} GB/s"
          + (f", matmul {ceilings['matmul_tflops']:.4g} TFLOP/s" if "matmul_tflops" in ceilings else ""))
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
