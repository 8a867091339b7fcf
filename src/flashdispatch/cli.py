"""The command line: `flashdispatch info | explain | verify | demo`."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
VERIFY_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn}  # fp8: pre-quantized inputs, for FP8 backends


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    import flashdispatch
    from flashdispatch.dispatcher.capabilities import capabilities

    caps = capabilities(args.device)
    print(f"flashdispatch {flashdispatch.__version__}")
    print(caps)
    print()
    print("versions: " + ", ".join(f"{d} {_version(d)}" for d in ("torch", "pluggy", "PyYAML", "triton")))
    print()
    print("plugins:")
    for record in flashdispatch.plugins():
        state = f"disabled: {record.error}" if record.error else f"backends: {', '.join(record.backends) or '-'}"
        print(f"  {record.name} ({record.source}): {state}")
    print()
    print("backends:")
    width = max(len(n) for n in flashdispatch.backends())
    for name, backend in flashdispatch.backends().items():
        unavailable = backend.unavailable_reasons()
        device_ok = caps.device_type in backend.support.devices
        state = ("unavailable: " + "; ".join(unavailable)) if unavailable else (
            "available" if device_ok else f"not for this device (runs on {', '.join(backend.support.devices)})")
        print(f"  {name:<{width}}  {state}  - {backend.description}")
    return 0


def _problem_tensors(args):
    """Random q, k, v for the shapes on the command line (random, so autotuning times real data)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    dim_v = args.head_dim_v or args.head_dim
    if args.layout == "bhsd":
        shapes = [(args.batch, args.heads, args.seqlen_q, args.head_dim), (args.batch, args.kv_heads, args.seqlen_k, args.head_dim),
                  (args.batch, args.kv_heads, args.seqlen_k, dim_v)]
    else:
        shapes = [(args.batch, args.seqlen_q, args.heads, args.head_dim), (args.batch, args.seqlen_k, args.kv_heads, args.head_dim),
                  (args.batch, args.seqlen_k, args.kv_heads, dim_v)]
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def cmd_explain(args) -> int:
    import flashdispatch

    if args.shape:
        args.batch, args.heads, args.kv_heads, args.seqlen_q, args.seqlen_k, args.head_dim = args.shape
    args.kv_heads = args.kv_heads or args.heads
    args.seqlen_k = args.seqlen_k or args.seqlen_q
    q, k, v = _problem_tensors(args)
    backend = tuple(args.backend.split(",", 1)) if args.backend and "," in args.backend else args.backend
    explanation = flashdispatch.explain(q, k, v, causal=args.causal, window=args.window, softcap=args.softcap,
                                        layout=args.layout, backend=backend)
    print(explanation)
    return 0 if explanation.decision is not None else 1


def cmd_verify(args) -> int:
    from flashdispatch import conformance

    dtypes = [VERIFY_DTYPES[d] for d in args.dtype] if args.dtype else None

    def progress(result):
        if args.verbose or not result.passed and not result.skipped:
            print(result)

    report = conformance.run(backends=args.backend or None, device=args.device, tier=args.tier, dtypes=dtypes,
                             on_result=progress, shard=args.shard)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_demo(args) -> int:
    """The main job: what this machine has, then one attention call on it, and what ran and why."""
    import flashdispatch
    from flashdispatch.backends.reference import attention_math

    cmd_info(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, heads, kv_heads, seqlen, dim = (4, 16, 4, 2048, 128) if device.type == "cuda" else (2, 8, 2, 512, 64)
    print(f"\nsample problem: causal grouped-query attention, q ({batch}, {heads}, {seqlen}, {dim}), "
          f"k/v ({batch}, {kv_heads}, {seqlen}, {dim}), {str(dtype)[6:]} on {device}, forward and backward")
    q = torch.randn(batch, heads, seqlen, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seqlen, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seqlen, dim, device=device, dtype=dtype, requires_grad=True)
    print(flashdispatch.explain(q, k, v, causal=True))
    start = time.perf_counter()
    out = flashdispatch.attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ref, _ = attention_math(q.detach(), k.detach(), v.detach(), scale=dim**-0.5, window_right=0)
    error = (out.detach().double() - ref).abs().max().item()
    print(f"\nran forward + backward in {elapsed * 1e3:.1f} ms (first call: includes selection and warm-up); "
          f"max |out - float64 reference| = {error:.2e}; grads finite: "
          f"{all(bool(t.grad.isfinite().all()) for t in (q, k, v))}")
    return 0


def _window(text: str):
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT (ints, -1 = unbounded), got {text!r}") from None
    return left, right


def _shard(text: str):
    try:
        index, count = (int(x) for x in text.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}") from None
    return index, count


def _shape(text: str):
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"expected B,HQ,HKV,NQ,NK,D (six ints), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashdispatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="capabilities of this device, plugins and backends")
    info.add_argument("--device", default=_default_device())
    info.set_defaults(func=cmd_info)

    explain = sub.add_parser("explain", help="which backend would run a problem, and why the others would not")
    explain.add_argument("--shape", type=_shape, help="B,HQ,HKV,NQ,NK,D in one go")
    explain.add_argument("--batch", "-b", type=int, default=1)
    explain.add_argument("--heads", type=int, default=8, help="query heads")
    explain.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    explain.add_argument("--seqlen-q", type=int, default=1024)
    explain.add_argument("--seqlen-k", type=int, default=None, help="default: --seqlen-q")
    explain.add_argument("--head-dim", type=int, default=64)
    explain.add_argument("--head-dim-v", type=int, default=None)
    explain.add_argument("--causal", action="store_true")
    explain.add_argument("--window", type=_window, default=None, help="LEFT,RIGHT")
    explain.add_argument("--softcap", type=float, default=None)
    explain.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    explain.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    explain.add_argument("--device", default=_default_device())
    explain.add_argument("--backend", default=None, help="force NAME or FORWARD,BACKWARD")
    explain.set_defaults(func=cmd_explain)

    verify = sub.add_parser("verify", help="run the conformance (exactness) suite against backends")
    verify.add_argument("--backend", action="append", help="backend name (repeatable; default: all registered)")
    verify.add_argument("--device", default=_default_device())
    verify.add_argument("--tier", choices=("fast", "full"), default="fast")
    verify.add_argument("--dtype", action="append", choices=sorted(VERIFY_DTYPES), help="repeatable; default: each backend's")
    verify.add_argument("--shard", type=_shard, default=None,
                        help="I/N: run part I (0-based) of N disjoint parts, for parallel processes")
    verify.add_argument("--verbose", "-v", action="store_true", help="print every case, not only failures")
    verify.set_defaults(func=cmd_verify)

    demo = sub.add_parser("demo", help="info, then one attention call on the best device, and what ran and why")
    demo.add_argument("--device", default=_default_device())
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"flashdispatch {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
