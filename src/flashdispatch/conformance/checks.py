"""Checking one backend on one case: the exactness rule and the contract's edge cases.

What `check_case` does, in order:

1. Builds q, k, v and dout as views into larger NaN-filled buffers: NaN rows past each sequence's
   end (dense: past Nq / Nk in the sequence dim; varlen: past the packed total) and NaN columns
   past the head dim. A backend that reads a single element it does not own turns its output
   into NaN. The views are not contiguous, so strided inputs are exercised too.
2. Describes the problem with `build_problem` and asks the backend. A case it refuses is skipped
   with its own reasons. (A backward case whose backward it refuses but whose forward it runs is
   checked forward-only, with a note saying why.)
3. Fills the views with seeded random normal data (never zeros, which hide bugs: 0 * garbage = 0).
4. Runs the backend's forward, then its backward, inside `poisoned()`: every uninitialised
   allocation is NaN, so memory a backend forgets to write shows up.
5. Compares with the float64 reference under FlashAttention's exactness rule (below), and checks
   the edge cases exactly: rows that see no key give output 0, LSE -inf and dq 0; keys that no
   query sees get dk = dv = 0; nothing is NaN; the inputs are not modified.

The backward is fed the output and LSE of the *reference* forward, because the contract says any
backward consumes any forward's state; it is also run once on the backend's own forward (the
pairing `attention()` uses most), and twice more where the backend declares a deterministic
backward, which must then be bit-identical.

The exactness rule (FlashAttention's own): for each of out, lse, dq, dk, dv,

    max|backend - reference| <= 2 * max|baseline - reference| + floor

where the reference is `attention_math` in float64 on the same inputs, the baseline is the same
plain PyTorch math run in the case's dtype (what a user would get without a fused kernel; for
gradients, the larger error of autograd through it and of FlashAttention-2's backward formula
from the same saved state, see `oracle.py` for why), and the floor is
eps(dtype) * max(1, max|reference|). The factor 2 allows a different accumulation
order; the floor is one unit of rounding at the data's scale (eps is twice the unit roundoff, so
it covers rounding both the baseline and the backend to the output dtype). Without it a case
where the baseline happens to be exact (one key: the output is v itself) would demand
bit-exactness from every backend. LSE has the same rule with the baseline's own LSE, and where
the reference LSE is -inf the backend's must be exactly -inf. float32 inputs, where the kernel
and the baseline work at the same precision, get 8x and 8 ulps instead (see `rule` for why).

FP8 (backends that declare the "fp8" precision; see `cases.py`): the inputs are rounded through
FP8 first, so that the rule measures the kernel, not the quantization. q, k, v are the suite's
random normal data (q times q_scale) clamped to +-448 (torch's cast does not saturate) and
rounded to float8_e4m3fn, with random float32 descales in [0.5, 1.5) per (batch, KV head); the
backend gets descales=(q, k, v descales) and must return a bfloat16 out. The reference is
float64 math on the dequantized inputs (exactly what the kernel sees); the baseline is plain
math in the kernel's precision: float32 scores, P = exp(s - row max) rounded to e4m3 before
P V, float32 product and row sum, out rounded to bfloat16 (`oracle.fp8_baseline`). The rule is
the usual one, 2x the baseline's max error, plus a floor of one bfloat16 eps (2^-7) times
max(1, max|reference|): FP8 outputs are bfloat16, so the floor is one unit of rounding of the
output dtype, as for fp16/bf16 cases (floored in the output dtype's eps, not e4m3's 2^-3, which
would hide real bugs). The 2x is meaningful here because the baseline makes the same dominant
rounding as a correct kernel (P to 3 mantissa bits, a relative 2^-4 per weight), only in another
order: a kernel rounds P against its running maximum rather than the final one, which moves
each weight's rounding but not its size. Quantizing the inputs is not measured (both references
see the same FP8 values); a forgotten descale or another head's, or an error 10x the baseline's,
is. (P rounded to e5m2, twice e4m3's step, is not reliably caught: its error is about twice the
baseline's, the rule's own margin.) The LSE gets the same rule against the float32 baseline's
LSE, with the same floor, one bfloat16 eps times max(1, max|reference LSE|): not float32's rule,
because the FP8 tensor-core product Q K^T, though its e4m3 x e4m3 products are exact, is not
accumulated to float32 precision on Hopper (see `FP8_LSE_FLOOR_ULPS`). On a CPU device FP8 cases
are skipped (see `FP8_CPU_REASON`).
"""

from __future__ import annotations

import functools
import math
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..backends.base import visible_keys
from ..dispatcher.capabilities import capabilities
from ..dispatcher.problem import FP8_DTYPE, build_problem
from .cases import Case
from .oracle import MathResult, attention_by_math, backward_from_state, fp8_baseline, fp8_reference

RULE_FACTOR = 2.0  # the "2x plain PyTorch math" of the exactness rule
# float32 inputs get their own tolerance (the design asks the suite to write down any such rule,
# as for FP8). The rule's premise is that a kernel computing in float32 is far more precise than
# plain math in a 16-bit dtype, so 2x the baseline is a wide margin (on an H100 every fp16/bf16
# error stays under a quarter of its tolerance). With float32 inputs the kernel and the baseline
# work at one precision: their max errors are two samples of the same rounding noise (two plain
# float32 implementations, sdpa-math and attention_math, differ by up to 3x), and fast kernels
# legitimately use cheaper float32 arithmetic than cuBLAS (CUTLASS's 3xTF32 "fast fp32" products
# in PyTorch's memory-efficient kernel measure 3-6x the baseline; exp2 with an approximate ex2).
# So float32 allows 8x the baseline (the rule's 2x, times 4 for 3xTF32 against true float32
# products) plus 8 float32 ulps at the data's scale. Real float32 precision bugs are still far
# outside it: TF32 (10-bit) products are about 1000x the baseline (see tests/test_conformance.py).
FLOAT32_FACTOR, FLOAT32_FLOOR_ULPS = 8.0, 8.0


# FP8 inputs (pre-quantized float8_e4m3fn, bfloat16 output; the module docstring says why): the
# rule's 2x the FP8 baseline, plus one eps of bfloat16, the output dtype, at the data's scale. On
# an H100, fp8-hopper's full tier measured out errors of 0.76-1.16x the baseline's (at most 0.43
# of this tolerance), while an error of 10x the baseline's fails every case (tests).
FP8_FACTOR, FP8_FLOOR_ULPS = RULE_FACTOR, 1.0
FP8_FLOOR_DTYPE = torch.bfloat16
# The FP8 LSE: 2x the float32 baseline's error plus one eps of bfloat16 (2^-7) times
# max(1, max|reference LSE|), the same floor as out. float32's rule (8x + 8 float32 ulps) does not
# hold, because Hopper's FP8 wgmma (QGMMA) does not accumulate Q K^T to float32 precision (about
# 14 bits are kept, as DeepSeek-V3's report also found): on an H100, fp8-hopper's full tier had
# LSE errors of 1e-4 to 7.6e-3, up to 4.5e-4 x max(1, |LSE|) (about 2^-11, 3800 float32 ulps,
# 220x float32's rule), while the scores of exact FP8 products summed in float32 (the baseline)
# are within 1-3 ulps. Already n=1x1 (LSE = one score) is off by 2^-11 relative. One bfloat16
# eps leaves about 16x margin over that and still catches LSE bugs: a log2 LSE (1.44x), a
# forgotten descale (0.5-1.5x), a missing rescale of the running sum are far outside it.
FP8_LSE_FLOOR_ULPS = 1.0  # in eps(FP8_FLOOR_DTYPE), like out
# Why FP8 cases are not run on a CPU device. FP8 kernels run there only in Triton's CPU
# interpreter, whose float32 -> float8e4nv conversion is wrong (Triton 3.6), so a correct kernel
# fails the rule there. `check_case(..., fp8_on_cpu=True)` runs them anyway, for backends that do
# not go through Triton's interpreter (the suite's own tests use it).
FP8_CPU_REASON = ("FP8 cases are not run on a CPU device: FP8 kernels run there in Triton's CPU interpreter, "
                  "whose float32 -> float8e4nv conversion is wrong near powers of two (Triton 3.6: a lost carry, "
                  "e.g. 0.1242 becomes 0.0625 instead of 0.125; about 3% of values in [0, 1], some off by 2x), so P's "
                  "rounding to e4m3, and with it the FP8 rule, cannot hold; they run on CUDA devices")


def rule(dtype) -> tuple[float, float]:
    """(factor, floor in units of eps(floor_dtype(dtype))) of the exactness rule for inputs of `dtype`."""
    if dtype == FP8_DTYPE:
        return FP8_FACTOR, FP8_FLOOR_ULPS
    return (FLOAT32_FACTOR, FLOAT32_FLOOR_ULPS) if dtype == torch.float32 else (RULE_FACTOR, 1.0)


def floor_dtype(dtype) -> torch.dtype:
    """The dtype whose eps is the floor's unit: the inputs' own, bfloat16 (the output's) for FP8."""
    return FP8_FLOOR_DTYPE if dtype == FP8_DTYPE else dtype


PAD_ROWS = 3  # NaN rows past each sequence's end
# NaN columns past the head dim. 8 elements keep every row stride a multiple of 8, the 16-byte
# alignment fused kernels require of fp16 rows; a backend may insist on that, not on contiguity.
PAD_COLS = 8
# On CUDA, this much memory is filled with NaN and handed back to the caching allocator before
# each call, so that blocks the backend gets from the cache are poisoned too (see `poisoned`).
CUDA_POISON_BYTES = 256 * 2**20
CUDA_POISON_SMALL_BLOCKS = 32  # 256 KiB blocks: the allocator's small-block pool (<= 1 MiB)


@dataclass(frozen=True)
class Measurement:
    """One application of the exactness rule."""

    name: str  # "out", "lse", "dq", "dk", "dv"; "dq (own forward)" for the backend's own pairing
    error: float  # max |backend - reference|
    baseline: float  # max |baseline - reference|
    floor: float
    factor: float = RULE_FACTOR

    @property
    def tolerance(self) -> float:
        return self.factor * self.baseline + self.floor

    @property
    def ratio(self) -> float:
        """error / tolerance: <= 1 passes."""
        return self.error / self.tolerance

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def __str__(self) -> str:
        return (f"{self.name}: max error {self.error:.3g} {'<=' if self.ok else '>'} tolerance {self.tolerance:.3g} "
                f"({self.factor:g} x baseline {self.baseline:.3g} + floor {self.floor:.3g})")


@dataclass
class CaseResult:
    """The outcome of one (backend, case): passed, failed (with `failures`) or skipped (with `reasons`)."""

    backend: str
    case: Case
    device: str
    status: str = "passed"  # "passed", "failed" or "skipped"
    problem: str = ""  # Problem.describe()
    reasons: list[str] = field(default_factory=list)  # why the backend (or the suite) skipped the case
    skipped_by: str = "backend"  # "backend": it refused the case; "suite": the suite does not run it here
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "backward not checked: ..."
    measurements: list[Measurement] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def worst(self) -> Measurement | None:
        """The measurement closest to (or furthest past) its tolerance."""
        return max(self.measurements, key=lambda m: m.ratio, default=None)

    def __str__(self) -> str:
        """One line: status, backend, case, and the first failure or the skip reason."""
        line = f"{self.status.upper():7} {self.backend} {self.case.id}"
        if self.failed:
            first = self.failures[0].splitlines()[0]
            more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            return f"{line}: {first}{more}"
        if self.skipped:
            return f"{line}: {self.reason}"
        worst = self.worst
        return f"{line}" + (f" (worst {worst.name} at {worst.ratio:.2f} of its tolerance; {self.seconds:.1f} s)" if worst else "")

    def message(self) -> str:
        """A readable report of this result, with every measured number."""
        head = f"{self.backend} {self.case.id} on {self.device}: {self.status.upper()}"
        lines = [head] + ([f"  problem: {self.problem}"] if self.problem else [])
        if self.skipped:
            lines.append(f"  skipped: {self.reason}")
        lines += [f"  FAIL {f}" for f in self.failures]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  {m}" for m in self.measurements]
        return "\n".join(lines)


class _Failures(list):
    """Failure messages of one case; `add` returns False so checks can stop early."""

    def add(self, message: str) -> bool:
        self.append(message)
        return False


# Poisoning


def _poison_cuda_cache(device: torch.device) -> None:
    """Fill blocks of the CUDA caching allocator with 0xFF bytes (NaN in every float dtype) and
    free them: the backend's next allocations are likely to be served from them."""
    free, _ = torch.cuda.mem_get_info(device)
    size = min(CUDA_POISON_BYTES, free // 4)
    blocks = [torch.full((size,), 255, dtype=torch.uint8, device=device)]
    blocks += [torch.full((2**18,), 255, dtype=torch.uint8, device=device) for _ in range(CUDA_POISON_SMALL_BLOCKS)]
    del blocks


@contextmanager
def poisoned(device):
    """Make every uninitialised allocation NaN while the backend runs.

    `torch.utils.deterministic.fill_uninitialized_memory` fills `torch.empty` and friends with NaN,
    but only while deterministic algorithms are on; `warn_only=True` keeps the ops' default
    (possibly nondeterministic) algorithms, so the backend runs the code it runs in production
    (PyTorch's flash and memory-efficient backward only switch algorithms with warn_only=False),
    and its Python warnings are silenced (a C++ TORCH_WARN_ONCE still prints once per process).
    On CUDA, memory recycled by the caching allocator inside a kernel library is not covered by
    that flag, so the cache is poisoned first as well.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _poison_cuda_cache(device)
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*determinis")
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


# Inputs


@dataclass
class Inputs:
    """A case's tensors: views of NaN-padded buffers, in the case's layout."""

    q: torch.Tensor  # (B, Hq, Nq, D) | (B, Nq, Hq, D) | (total_q, Hq, D)
    k: torch.Tensor  # (B, Hkv, Nk, D) | (B, Nk, Hkv, D) | (total_k, Hkv, D)
    v: torch.Tensor  # like k, with Dv
    dout: torch.Tensor  # like q, with Dv, in the output dtype
    cu_seqlens_q: torch.Tensor | None  # int32 (B + 1,) for varlen
    cu_seqlens_k: torch.Tensor | None
    buffers: dict[str, torch.Tensor]  # the whole buffers (views and NaN padding), by name
    # FP8 cases: float32 (B, Hkv) descales of q, k, v (None: 1.0; always None for varlen, which
    # takes no descales). The dequantized tensor is x.float() * descale[b, h_kv].
    descales: tuple = (None, None, None)


def _shape(case: Case, role: str) -> tuple[tuple[int, ...], int]:
    """(shape, sequence dim) of q, k, v or out (dout) in the case's layout."""
    heads = case.heads_q if role in ("q", "out") else case.heads_kv
    dim = case.head_dim if role in ("q", "k") else case.head_dim_v
    if case.varlen:
        lengths = case.seqlens_q if role in ("q", "out") else case.seqlens_k
        return (sum(lengths), heads, dim), 0
    seqlen = case.seqlen_q if role in ("q", "out") else case.seqlen_k
    if case.layout == "bhsd":
        return (case.batch, heads, seqlen, dim), 2
    return (case.batch, seqlen, heads, dim), 1


def padded_view(shape, seq_dim: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a NaN buffer PAD_ROWS longer in `seq_dim` and PAD_COLS wider in the last dim,
    and the `shape` view at its start."""
    big = list(shape)
    big[seq_dim] += PAD_ROWS
    big[-1] += PAD_COLS
    buffer = torch.full(big, math.nan, dtype=dtype, device=device)
    return buffer, buffer.narrow(seq_dim, 0, shape[seq_dim]).narrow(-1, 0, shape[-1])


def make_inputs(case: Case, device) -> Inputs:
    """NaN buffers and their views for q, k, v and dout; fill them with `fill_inputs`."""
    views, buffers = {}, {}
    for name, role in (("q", "q"), ("k", "k"), ("v", "v"), ("dout", "out")):
        dtype = case.out_dtype if role == "out" else case.dtype
        buffers[name], views[name] = padded_view(*_shape(case, role), dtype, device)
    cu_q = cu_k = None
    if case.varlen:
        cu_q, cu_k = (torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
                      for lengths in (case.seqlens_q, case.seqlens_k))
    descales = (None, None, None)
    if case.fp8 and not case.varlen:
        descales = tuple(torch.full((case.batch, case.heads_kv), math.nan, dtype=torch.float32, device=device)
                         for _ in range(3))
        buffers.update(zip(("q_descale", "k_descale", "v_descale"), descales))
    return Inputs(views["q"], views["k"], views["v"], views["dout"], cu_q, cu_k, buffers, descales)


def fill_inputs(inputs: Inputs, case: Case) -> None:
    """Random normal data from the case's seed, q scaled by `case.q_scale`; padding stays NaN.

    FP8 cases: q, k, v are that data clamped to +-448 (e4m3fn's largest finite value: torch's
    cast does not saturate) and rounded to float8_e4m3fn; descales are uniform in [0.5, 1.5)."""
    generator = torch.Generator(device=inputs.q.device).manual_seed(case.seed)
    for name, scale in (("q", case.q_scale), ("k", 1.0), ("v", 1.0), ("dout", 1.0)):
        view = getattr(inputs, name)
        data = torch.randn(view.shape, generator=generator, device=view.device, dtype=torch.float32) * scale
        if view.dtype == FP8_DTYPE:
            data = data.clamp(-torch.finfo(FP8_DTYPE).max, torch.finfo(FP8_DTYPE).max)
        view.copy_(data)
    for descale in inputs.descales:
        if descale is not None:
            descale.copy_(torch.rand(descale.shape, generator=generator, device=descale.device) + 0.5)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that NaN compares equal to the same NaN."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()]) if t.is_floating_point() else t


# Expected structure


def visibility(case: Case, problem, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_has_key, key_is_seen): bool per query and per key, token-major: (B, Nq) and (B, Nk),
    or (total_q,) and (total_k,) for varlen."""
    rows, keys = [], []
    for seqlen_q, seqlen_k in case.lengths:
        visible = visible_keys(seqlen_q, seqlen_k, problem.window_left, problem.window_right, device)
        if visible is None:
            visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
        rows.append(visible.any(-1))  # a row with no key (none visible, or Nk = 0) is False
        keys.append(visible.any(0))
    if case.varlen:
        return torch.cat(rows), torch.cat(keys)
    return torch.stack(rows), torch.stack(keys)


def token_major(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of q, k, v, out or a gradient with tokens first: (B, N, H, D) or (total, H, D)."""
    return t.transpose(1, 2) if layout == "bhsd" else t


# Comparisons


def _where(index, shape) -> str:
    """A flat index as a readable position."""
    if not shape:
        return "()"
    return str(tuple(int(i) for i in torch.unravel_index(torch.tensor(index), tuple(shape))))


def _check_tensor(name: str, t, shape, dtype, device, failures: _Failures) -> bool:
    """The tensor a backend returned has the contract's shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        return failures.add(f"{name}: expected a tensor, got {type(t).__name__}")
    problems = []
    if tuple(t.shape) != tuple(shape):
        problems.append(f"shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        problems.append(f"dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        problems.append(f"device {t.device}, expected {device}")
    return failures.add(f"{name}: " + "; ".join(problems)) if problems else True


def _compare(name: str, got, ref, baselines, dtype, failures: _Failures, measurements: list) -> None:
    """Apply the exactness rule to `got` against `ref` (float64); the baseline error is the largest
    of `baselines`' errors (one tensor, or several plain formulations of the same quantity).

    Positions where the reference is -inf (LSE of rows with no key) are excluded here and must be
    exactly -inf in `got`.
    """
    got, ref = got.double(), ref.double()
    minus_inf = ref == -math.inf
    if minus_inf.any():
        wrong = minus_inf & (got != -math.inf)
        if wrong.any():
            first = int(wrong.flatten().nonzero()[0])
            failures.add(f"{name}: {int(wrong.sum())} rows that see no key are not -inf "
                         f"(first at {_where(first, got.shape)}: {got.flatten()[first].item()})")
    compared = ~minus_inf
    bad = compared & ~torch.isfinite(got)
    if bad.any():
        first = int(bad.flatten().nonzero()[0])
        failures.add(f"{name}: {int(bad.sum())} non-finite values (first at {_where(first, got.shape)}: "
                     f"{got.flatten()[first].item()})")
        return

    def max_error(t):
        diff = torch.where(compared, (t.double() - ref).abs(), 0.0)  # NaN stays NaN: max() is then NaN
        return diff, (diff.max().item() if diff.numel() else 0.0)

    diff, error = max_error(got)
    baseline = max(max_error(b)[1] for b in (baselines if isinstance(baselines, (tuple, list)) else [baselines]))
    magnitude = torch.where(compared, ref.abs(), 0.0).max().item() if ref.numel() else 0.0
    if not math.isfinite(baseline):
        failures.add(f"{name}: the baseline (plain math in {dtype}) is not finite on this case, so the rule "
                     f"cannot be applied: the case is ill-posed for this dtype (a conformance-suite bug)")
        return
    factor, floor_ulps = rule(dtype)
    if dtype == FP8_DTYPE and name.startswith("lse"):
        floor_ulps = FP8_LSE_FLOOR_ULPS
    floor = floor_ulps * torch.finfo(floor_dtype(dtype)).eps * max(1.0, magnitude)
    measured = Measurement(name, error, baseline, floor, factor)
    measurements.append(measured)
    if not measured.ok:
        failures.add(f"{measured}; worst at {_where(int(diff.flatten().argmax()), diff.shape)}")


def _check_zero(name: str, t, keep, layout: str, failures: _Failures) -> None:
    """`t` must be exactly 0 at the tokens where `keep` (token-major bool) is False."""
    masked = token_major(t, layout)[~keep]
    if masked.numel() and not (masked == 0).all():
        count = int((masked != 0).any(-1).any(-1).sum()) if masked.dim() > 2 else int((masked != 0).sum())
        failures.add(f"{name}: {count} of {masked.shape[0]} tokens that must be exactly 0 are not "
                     f"(largest {masked.double().abs().nan_to_num(math.inf).max().item():.3g}; NaN counts as inf)")


def _call(what: str, fn, failures: _Failures, *args):
    """Call a backend, turning an exception into a failure (None)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any exception from a backend that accepted the case is a failure
        frames = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {frames[0].filename}:{frames[0].lineno}" if frames else ""
        failures.add(f"{what} raised {type(exc).__name__}: {exc}{where}")
        return None


def _check_grads(label: str, grads, case: Case, problem, inputs: Inputs, state, ref: MathResult, base: MathResult,
                 seen: tuple[torch.Tensor, torch.Tensor], failures: _Failures, measurements: list) -> bool:
    """Shapes, exactness and exact zeros of the (dq, dk, dv) a backward returned from `state`
    (out, lse); False if they could not be compared."""
    row_has_key, key_is_seen = seen
    if not isinstance(grads, (tuple, list)) or len(grads) != 3:
        return failures.add(f"backward{label} must return (dq, dk, dv), got {type(grads).__name__}")
    # The second baseline: FlashAttention-2's formula from the same state, in the case's dtype.
    from_state = backward_from_state(case, problem, inputs, *state, case.dtype)
    ok = True
    for i, (name, grad, like) in enumerate(zip(("dq", "dk", "dv"), grads, (inputs.q, inputs.k, inputs.v))):
        if not _check_tensor(name + label, grad, like.shape, case.dtype, like.device, failures):
            ok = False
            continue
        _compare(name + label, grad, ref.grads[i], (base.grads[i], from_state[i]), case.dtype, failures, measurements)
        # A row with no visible key has no gradient; a key no query sees gets none either.
        keep = row_has_key if name == "dq" else key_is_seen
        _check_zero(f"{name}{label} of {'rows that see no key' if name == 'dq' else 'keys no query sees'}",
                    grad, keep, case.layout, failures)
    return ok


# The check


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None) -> torch.device:
    """`device` as tensors report it: "cuda" becomes "cuda:N" (the current device); None the default."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_case(backend, case: Case, device=None, *, fp8_on_cpu: bool = False) -> CaseResult:
    """Check `backend` on `case` (see the module docstring); never raises for a backend's fault.

    FP8 cases on a CPU device are skipped (`FP8_CPU_REASON`) unless `fp8_on_cpu` is true: for a
    backend whose CPU path does not go through Triton's interpreter (the suite's own tests)."""
    device = resolve_device(device)
    result = CaseResult(backend=backend.name, case=case, device=str(device))
    start = time.perf_counter()
    if device.type == "cuda" and not torch.cuda.is_available():
        result.status, result.reasons = "skipped", ["no CUDA GPU on this machine"]
        return result
    failures = _Failures()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The cases are small, and OpenMP threads that spin-wait make small ops a hundred times
        # slower as soon as the cores are shared (pytest-xdist workers, a busy CI machine).
        torch.set_num_threads(1)
    try:
        _check(backend, case, device, result, failures, fp8_on_cpu)
    except Exception:  # noqa: BLE001 - e.g. a plugin's not_supported_reasons() raising
        failures.add("the check raised:\n" + traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
    result.failures = list(failures)
    if result.status != "skipped":
        result.status = "failed" if failures else "passed"
    result.seconds = time.perf_counter() - start
    return result


def _check(backend, case: Case, device: torch.device, result: CaseResult, failures: _Failures,
           fp8_on_cpu: bool = False) -> None:
    inputs = make_inputs(case, device)
    problem = build_problem(
        inputs.q, inputs.k, inputs.v, causal=case.causal, window=case.window, softcap=case.softcap or None,
        scale=case.scale, layout="bhsd" if case.varlen else case.layout, cu_seqlens_q=inputs.cu_seqlens_q,
        cu_seqlens_k=inputs.cu_seqlens_k, return_lse=True, needs_grad=case.backward,
        precision="fp8" if case.fp8 else None, descales=inputs.descales)
    result.problem = problem.describe()
    if case.fp8 and device.type == "cpu" and not fp8_on_cpu:
        result.status, result.reasons, result.skipped_by = "skipped", [FP8_CPU_REASON], "suite"
        return
    caps = capabilities(device)

    backward = case.backward
    if backward:
        reasons = list(backend.backward_not_supported_reasons(problem, caps))
        if reasons:
            # Still check the forward, which is most of the work, if the backend runs it.
            forward_problem = replace(problem, needs_grad=False)
            forward_reasons = list(backend.not_supported_reasons(forward_problem, caps))
            if forward_reasons:
                result.status, result.reasons = "skipped", forward_reasons
                return
            result.notes.append(f"backward not checked: {'; '.join(reasons)}")
            problem, backward = forward_problem, False
    else:
        reasons = list(backend.not_supported_reasons(problem, caps))
        if reasons:
            result.status, result.reasons = "skipped", reasons
            return
    if backward != case.backward:
        case = replace(case, backward=False)

    fill_inputs(inputs, case)
    if case.fp8:
        ref, base = fp8_reference(case, problem, inputs), fp8_baseline(case, problem, inputs)
    else:
        ref = attention_by_math(case, problem, inputs, torch.float64)
        base = attention_by_math(case, problem, inputs, case.dtype)
    seen = visibility(case, problem, device)
    row_has_key = seen[0]
    cu = (inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    lse_shape = (case.heads_q, problem.total_q) if case.varlen else (case.batch, case.heads_q, case.seqlen_q)
    measurements = result.measurements
    snapshot = {name: _bits(buffer).clone() for name, buffer in inputs.buffers.items()}

    # Forward.
    forward = backend.forward
    if case.fp8:  # FP8 backends take the descales (as FlashAttention-3 does); None means 1.0
        forward = functools.partial(backend.forward, descales=inputs.descales)
    with poisoned(device):
        returned = _call("forward", forward, failures, inputs.q, inputs.k, inputs.v, problem, *cu)
    own = None
    if returned is not None:
        if not isinstance(returned, (tuple, list)) or len(returned) != 2:
            failures.add(f"forward must return (out, lse), got {type(returned).__name__}")
        else:
            out, lse = returned
            out_ok = _check_tensor("out", out, ref.out.shape, case.out_dtype, device, failures)
            lse_ok = _check_tensor("lse", lse, lse_shape, torch.float32, device, failures)
            if out_ok:
                _compare("out", out, ref.out, base.out, case.dtype, failures, measurements)
                _check_zero("out of rows that see no key", out, row_has_key, case.layout, failures)
            if lse_ok:
                _compare("lse", lse, ref.lse, base.lse, case.dtype, failures, measurements)
            if not failures:  # a forward that failed is no state to check a backward on
                own = (out, lse)

    if backward:
        # The reference forward's state: what `ReferenceBackend.forward` returns (float64 math, out
        # rounded to the case's dtype, LSE to float32), taken from the suite's own float64 run so
        # that a bug in the reference backend cannot break every other backend's check. out is
        # placed in a NaN-padded buffer like every input.
        ref_lse = ref.lse.float()
        out_buffer, out_view = padded_view(*_shape(case, "out"), case.dtype, device)
        out_view.copy_(ref.out)
        snapshot["reference out"], snapshot["reference lse"] = _bits(out_buffer).clone(), _bits(ref_lse).clone()
        state = (inputs.dout, inputs.q, inputs.k, inputs.v, out_view, ref_lse, problem, *cu)
        with poisoned(device):
            grads = _call("backward", backend.backward, failures, *state)
        if grads is not None and _check_grads("", grads, case, problem, inputs, (out_view, ref_lse), ref, base, seen,
                                              failures, measurements) \
                and backend.support.deterministic_backward:
            with poisoned(device):
                again = _call("backward (second run)", backend.backward, failures, *state)
            if again is not None:
                again = list(again) if isinstance(again, (tuple, list)) and len(again) == 3 else [None] * 3
                for name, first, second in zip(("dq", "dk", "dv"), grads, again):
                    if not (isinstance(second, torch.Tensor) and second.shape == first.shape
                            and second.dtype == first.dtype and torch.equal(_bits(first), _bits(second))):
                        failures.add(f"{name}: a second backward run on the same inputs differs bitwise, but the "
                                     f"backend declares a deterministic backward")
        if own is not None:
            # The pairing attention() uses most: the backend's backward on its own forward's state.
            with poisoned(device):
                own_grads = _call("backward on its own forward", backend.backward, failures,
                                  inputs.dout, inputs.q, inputs.k, inputs.v, *own, problem, *cu)
            if own_grads is not None:
                _check_grads(" (own forward)", own_grads, case, problem, inputs, own, ref, base, seen, failures,
                             measurements)
        buffers = dict(inputs.buffers, **{"reference out": out_buffer, "reference lse": ref_lse})
    else:
        buffers = inputs.buffers

    for name, buffer in buffers.items():
        if not torch.equal(_bits(buffer), snapshot[name]):
            failures.add(f"the backend modified its input {name}")
