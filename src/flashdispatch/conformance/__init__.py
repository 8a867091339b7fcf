"""flashdispatch's shared exactness suite: every backend, built-in or plugin, must pass it.

Three ways to run it:

    flashdispatch verify [--backend NAME] [--device cpu|cuda] [--tier fast|full]   # command line

    pytest --pyargs flashdispatch.conformance                       # pytest, one test per case

    from flashdispatch import conformance                          # from Python, e.g. on a
    report = conformance.run(backends=[MyBackend()], tier="fast")  # backend not registered yet
    print(report.summary()); assert report.ok

Cases are generated from each backend's declared `Support` (see `cases.py`), checked against a
float64 reference under FlashAttention's exactness rule, with poisoned allocations and NaN
padding past every sequence's end (see `checks.py`; float32 inputs have their own tolerance,
written down and argued in `checks.rule`). A case a backend refuses is skipped with the
backend's own reasons.

Backends that declare the "fp8" precision are checked on pre-quantized float8_e4m3fn inputs
(case ids "fp8-..."; forward only) under the FP8 rule written down in `checks.py`: the inputs are
rounded through FP8 first, so the rule measures the kernel, not the quantization. On a CPU device
those cases are skipped, with the reason (Triton's CPU interpreter converts to FP8 wrongly).

Selection for the pytest front end is by environment variable, because pytest's own options do
not reach a test module run with --pyargs:

    FLASHDISPATCH_VERIFY_BACKENDS  comma-separated backend names (default: every registered backend)
    FLASHDISPATCH_VERIFY_DEVICE    cpu, cuda or cuda:N (default: cuda if available, else cpu)
    FLASHDISPATCH_VERIFY_TIER      fast (default; small shapes, CPU CI) or full (every head dim,
                                   sequence length 1000; meant for GPUs)
    FLASHDISPATCH_VERIFY_DTYPES    comma-separated: float16, bfloat16, float32, float64, float8_e4m3fn
                                   (or fp16, bf16, fp32, fp64, fp8); default fp16, bf16, fp32, and
                                   fp8 for backends that declare the "fp8" precision. float64 is
                                   only checked when asked for.

`run()` reads no environment variable; `settings_from_env()` turns them into its arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .cases import DEFAULT_DTYPES, HEAD_DIMS, TIERS, Case, cases
from .checks import FP8_CPU_REASON, CaseResult, Measurement, check_case, default_device, poisoned, resolve_device

ENV_BACKENDS = "FLASHDISPATCH_VERIFY_BACKENDS"
ENV_DEVICE = "FLASHDISPATCH_VERIFY_DEVICE"
ENV_TIER = "FLASHDISPATCH_VERIFY_TIER"
ENV_DTYPES = "FLASHDISPATCH_VERIFY_DTYPES"

_DTYPES_BY_NAME = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    # Not "float8": e4m3 or e5m2 would be a guess. FP8 cases are pre-quantized float8_e4m3fn inputs.
    "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "e4m3": torch.float8_e4m3fn,
}

__all__ = [
    "Case", "CaseResult", "DEFAULT_DTYPES", "ENV_BACKENDS", "ENV_DEVICE", "ENV_DTYPES", "ENV_TIER", "FP8_CPU_REASON",
    "HEAD_DIMS",
    "Measurement", "Report", "TIERS", "cases", "check_case", "default_device", "parse_dtypes", "poisoned",
    "resolve_backends", "resolve_device", "run", "settings_from_env",
]


def parse_dtypes(text) -> tuple[torch.dtype, ...] | None:
    """'fp16,bf16' or ['float16', torch.bfloat16] -> dtypes; None or '' -> None (the default)."""
    if text is None or text == "":
        return None
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    dtypes = []
    for item in items:
        if isinstance(item, torch.dtype):
            dtypes.append(item)
        elif item.lower().replace("torch.", "") in _DTYPES_BY_NAME:
            dtypes.append(_DTYPES_BY_NAME[item.lower().replace("torch.", "")])
        elif item:
            raise ValueError(f"dtype must be one of {', '.join(sorted(_DTYPES_BY_NAME))}, got {item!r}")
    return tuple(dtypes)


def resolve_backends(backends=None) -> list:
    """Backend objects from names and/or objects (None: every registered backend)."""
    from ..dispatcher.registry import REGISTRY

    if backends is None:
        return list(REGISTRY.backends().values())
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    return [REGISTRY.get(b) if isinstance(b, str) else b for b in backends]


def settings_from_env(environ=None) -> dict:
    """`run()` keyword arguments (backends, device, tier, dtypes) from the FLASHDISPATCH_VERIFY_* variables."""
    environ = os.environ if environ is None else environ
    tier = environ.get(ENV_TIER, "").strip() or "fast"
    if tier not in TIERS:
        raise ValueError(f"{ENV_TIER} must be one of {', '.join(TIERS)}, got {tier!r}")
    backends = environ.get(ENV_BACKENDS, "").strip() or None
    device = environ.get(ENV_DEVICE, "").strip() or None
    return dict(backends=backends, device=device, tier=tier, dtypes=parse_dtypes(environ.get(ENV_DTYPES, "").strip()))


@dataclass
class Report:
    """The results of one run, with per-backend counts and a printable summary."""

    results: list[CaseResult] = field(default_factory=list)
    device: str = ""
    tier: str = "fast"

    @property
    def ok(self) -> bool:
        """No case failed (skipped cases are not failures)."""
        return not any(r.failed for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.failed]

    def counts(self) -> dict[str, dict[str, int]]:
        """{backend: {"passed": n, "failed": n, "skipped": n}} in the order backends were run."""
        counts: dict[str, dict[str, int]] = {}
        for r in self.results:
            counts.setdefault(r.backend, {"passed": 0, "failed": 0, "skipped": 0})[r.status] += 1
        return counts

    def summary(self) -> str:
        """A table of passed / failed / skipped per backend, the worst error / tolerance ratio and
        where it was measured, then the details of every failure."""
        header = ("backend", "passed", "failed", "skipped", "fwd only", "worst err/tol", "seconds", "worst case")
        rows = []
        for name, count in self.counts().items():
            mine = [r for r in self.results if r.backend == name]
            worst = max(((r.worst, r) for r in mine if r.worst is not None), key=lambda x: x[0].ratio, default=None)
            forward_only = sum(1 for r in mine if any(n.startswith("backward not checked") for n in r.notes))
            rows.append((name, str(count["passed"]), str(count["failed"]), str(count["skipped"]), str(forward_only),
                         f"{worst[0].ratio:.3f} ({worst[0].name})" if worst else "-",
                         f"{sum(r.seconds for r in mine):.1f}", worst[1].case.id if worst else "-"))
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        lines = [f"flashdispatch conformance: tier {self.tier}, device {self.device}"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
        total = {s: sum(1 for r in self.results if r.status == s) for s in ("passed", "failed", "skipped")}
        lines.append(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped: "
                     f"{'OK' if self.ok else 'FAILED'}")
        skips = {}  # (backend, reason) -> count: why cases were skipped, in the backends' own words
        for r in self.results:
            if r.skipped:
                reason = r.reason if r.skipped_by == "backend" else f"(by the suite) {r.reason}"
                skips[(r.backend, reason)] = skips.get((r.backend, reason), 0) + 1
        if skips:
            lines += ["", "skipped, in the backends' words (or the suite's):"]
            lines += [f"  {name}: {count} x {reason}" for (name, reason), count in skips.items()]
        for r in self.failures:
            lines += ["", r.message()]
        return "\n".join(lines)


def shard_of(selected: list[Case], shard: tuple[int, int] | None) -> list[Case]:
    """The cases of shard (index, count): whole (dtype, head dims) groups, dealt round-robin, so
    that processes running different shards share no kernel compilations."""
    if shard is None:
        return selected
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    groups: dict[tuple, int] = {}
    for case in selected:
        groups.setdefault((case.dtype, case.head_dim, case.head_dim_v), len(groups))
    return [c for c in selected if groups[(c.dtype, c.head_dim, c.head_dim_v)] % count == index]


def run(backends=None, device=None, tier: str = "fast", dtypes=None, on_result=None, shard=None,
        fp8_on_cpu: bool = False) -> Report:
    """Check `backends` (names or objects; default every registered backend) on `device` (default
    cuda if available, else cpu) with the cases of `tier`; `dtypes` as for `cases()`.

    `on_result(result)` is called after each case (for progress output). `shard=(index, count)`
    runs one of `count` disjoint parts of the cases, for parallel processes. `fp8_on_cpu`: run FP8
    cases on a CPU device too (see `check_case`; by default they are skipped there). Raises ValueError for
    an unknown backend, tier or dtype, or a cuda device on a machine without one.
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    device = resolve_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this machine has no CUDA GPU that torch can use")
    dtypes = parse_dtypes(dtypes)
    report = Report(device=str(device), tier=tier)
    for backend in resolve_backends(backends):
        for case in shard_of(cases(backend, tier, device, dtypes), shard):
            result = check_case(backend, case, device, fp8_on_cpu=fp8_on_cpu)
            report.results.append(result)
            if on_result is not None:
                on_result(result)
    return report
