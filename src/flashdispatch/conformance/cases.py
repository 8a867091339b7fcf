"""The conformance cases: which problems each backend is checked on.

Cases come from a backend's declared `Support`, not from a fixed list: a dtype, head dim, layout
or feature the backend does not declare is not generated at all, while finer limits that the
declaration cannot express (top-left-only causal masks, memory limits, a kernel's own exceptions)
are left to the backend's `not_supported_reasons`, so that the case is skipped with the backend's
own words.

The plan is a covering design, not a cross-product: every head dim once on a plain setting, every
sequence-length pair (1, 17, 127, 128, 129, 1000 and both Nq < Nk and Nq > Nk) with and without
causality, every feature on its own, and the combinations where bugs hide (causal with GQA 8,
window with softcap, variable-length causal batches with empty and one-token sequences). Cases
that leave query rows with no visible key exist on purpose: causal with Nq > Nk, small windows,
variable-length sequences with no keys.

Two tiers: "fast" keeps every shape small (N <= 129, D <= 64) so that the CPU backends run it in
CI; "full" adds every head dim, sequence length 1000 and larger varlen batches, for GPUs.

Precisions. A backend's `Support.precisions` says which calls it runs: "native" (the inputs' own
precision: every dtype case above) and "fp8" (FP8 matmuls, run only when a call asks for them).
A backend that declares "fp8" and the dtype float8_e4m3fn gets the same plan once more with
pre-quantized inputs: dtype float8_e4m3fn (ids start with "fp8"), random (batch, KV head)
descales, the problem built with precision="fp8", forward only (the contract has no FP8
backward). A backend without "native" gets no native-dtype cases (it would refuse them all), and
one without "fp8" gets no FP8 case. How FP8 cases are filled and checked: `checks.py`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import torch

from ..dispatcher.problem import FP8_DTYPE

# Head dims that real models use (and 40, 72: not powers of two, where padded kernels slip).
HEAD_DIMS = (32, 40, 64, 72, 96, 128, 160, 192, 256)
TIERS = ("fast", "full")
# Dtypes checked unless others are asked for. float64 is left out: its baseline would be the
# reference itself, so the exactness rule would degenerate to "bit-equal to float64 math".
DEFAULT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
               FP8_DTYPE: "fp8"}


@dataclass(frozen=True)
class Case:
    """One problem to check a backend on, with everything needed to rebuild its inputs.

    Dense layouts: q (B, Hq, Nq, D) for "bhsd" or (B, Nq, Hq, D) for "bshd", k (.., Nk, .., D),
    v (.., Nk, .., Dv). "varlen": q (sum(seqlens_q), Hq, D), k and v (sum(seqlens_k), Hkv, D or Dv),
    with one length per sequence in `seqlens_q` and `seqlens_k` (then `batch`, `seqlen_q` and
    `seqlen_k` are derived: the number of sequences and the longest ones).
    """

    dtype: torch.dtype
    head_dim: int
    seqlen_q: int = 0
    seqlen_k: int = 0
    head_dim_v: int = 0  # 0: same as head_dim
    batch: int = 2
    heads_q: int = 2
    heads_kv: int = 2
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    layout: str = "bhsd"
    seqlens_q: tuple[int, ...] | None = None
    seqlens_k: tuple[int, ...] | None = None
    # q is multiplied by this: > 1 gives peaked softmax rows (scores with a standard deviation of
    # about q_scale), where an online softmax that forgets to rescale, or a softcap that is
    # ignored, is far off instead of slightly off.
    q_scale: float = 1.0
    # The softmax scale passed to attention(); None: the default 1/sqrt(D).
    scale: float | None = None
    backward: bool = False
    seed: int = field(default=0, compare=False)  # derived from the case's id, see `make_case`

    def __post_init__(self):
        if self.head_dim_v == 0:
            object.__setattr__(self, "head_dim_v", self.head_dim)
        if self.layout == "varlen":
            if self.seqlens_q is None or len(self.seqlens_q) != len(self.seqlens_k or ()):
                raise ValueError("a varlen case needs seqlens_q and seqlens_k of equal length")
            object.__setattr__(self, "batch", len(self.seqlens_q))
            object.__setattr__(self, "seqlen_q", max(self.seqlens_q))
            object.__setattr__(self, "seqlen_k", max(self.seqlens_k))

    @property
    def varlen(self) -> bool:
        return self.layout == "varlen"

    @property
    def fp8(self) -> bool:
        """Pre-quantized float8_e4m3fn inputs, run with precision="fp8" (see `checks.py`)."""
        return self.dtype == FP8_DTYPE

    @property
    def out_dtype(self) -> torch.dtype:
        """The dtype of the output (and of dout): the inputs' own, bfloat16 for float8 inputs."""
        return torch.bfloat16 if self.fp8 else self.dtype

    @property
    def lengths(self) -> list[tuple[int, int]]:
        """(Nq, Nk) of every sequence."""
        if self.varlen:
            return list(zip(self.seqlens_q, self.seqlens_k))
        return [(self.seqlen_q, self.seqlen_k)] * self.batch

    @property
    def id(self) -> str:
        """A readable, unique name, e.g. 'fp16-bhsd-b2-h8x1-n129x17-d64-causal-bwd'."""
        if self.varlen:
            seqlens = f"n{','.join(map(str, self.seqlens_q))}x{','.join(map(str, self.seqlens_k))}"
        else:
            seqlens = f"n{self.seqlen_q}x{self.seqlen_k}"
        parts = [DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", "")), self.layout,
                 f"b{self.batch}", f"h{self.heads_q}x{self.heads_kv}", seqlens,
                 f"d{self.head_dim}" + (f"v{self.head_dim_v}" if self.head_dim_v != self.head_dim else "")]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.q_scale != 1.0:
            parts.append(f"qx{self.q_scale:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        parts.append("bwd" if self.backward else "fwd")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id


def make_case(**fields) -> Case:
    """A `Case` whose seed is derived from its id, so that every backend and every run sees the
    same data for the same case."""
    case = Case(**fields)
    return replace(case, seed=zlib.crc32(case.id.encode()))


def select_dtypes(support, dtypes=None) -> list[torch.dtype]:
    """The dtypes to check: those asked for (default fp16, bf16, fp32) that the backend declares,
    if it runs its inputs' own precision ("native" in `support.precisions`); then float8_e4m3fn
    (pre-quantized inputs), unless other dtypes were asked for, if it declares that dtype and the
    "fp8" precision."""
    precisions = getattr(support, "precisions", ("native",))  # a plugin's older Support has none
    wanted = DEFAULT_DTYPES if dtypes is None else tuple(dtypes)
    selected = [d for d in wanted if d != FP8_DTYPE and d in support.dtypes] if "native" in precisions else []
    if "fp8" in precisions and FP8_DTYPE in support.dtypes and (dtypes is None or FP8_DTYPE in wanted):
        selected.append(FP8_DTYPE)
    return selected


def _head_dim_ok(support, dim: int) -> bool:
    top = support.max_head_dim
    return dim >= support.min_head_dim and (top is None or dim <= top) and dim % support.head_dim_multiple == 0


def supported_head_dims(support, tier: str) -> list[int]:
    """Head dims of `HEAD_DIMS` within the declared range (the fast tier stops at 64)."""
    top = 64 if tier == "fast" else max(HEAD_DIMS)
    dims = [d for d in HEAD_DIMS if d <= top and _head_dim_ok(support, d)]
    if not dims:
        # A backend with an unusual range still gets cases: its smallest valid head dim.
        first = -(-max(support.min_head_dim, 1) // support.head_dim_multiple) * support.head_dim_multiple
        if _head_dim_ok(support, first):
            dims = [first]
    return dims


def _nearest(dims: list[int], preferred: int) -> int:
    return min(dims, key=lambda d: (abs(d - preferred), d))


def _plan(support, tier: str) -> list[dict]:
    """The dtype-independent case fields for one backend and tier (see the module docstring)."""
    dims = supported_head_dims(support, tier)
    if not dims:
        return []
    full = tier == "full"
    d = _nearest(dims, 128 if full else 64)  # the head dim of the feature cases
    layout = "bhsd" if "bhsd" in support.layouts else support.layouts[0]
    base = dict(head_dim=d, layout=layout, batch=2, heads_q=2, heads_kv=2)
    plan = []

    def add(**changes):
        plan.append({**base, **changes})

    # Every head dim on a plain problem; 129 spans two key blocks of most tiled kernels and has a
    # ragged tail. The full tier runs each head dim causal as well (kernels specialise per head dim).
    for dim in dims:
        add(head_dim=dim, seqlen_q=129, seqlen_k=129)
        if full and support.causal:
            add(head_dim=dim, seqlen_q=300, seqlen_k=300, causal=True)

    # Sequence lengths around block boundaries, decoding (Nq = 1), Nq < Nk (chunked prefill) and
    # Nq > Nk (which, causal, leaves the first Nq - Nk query rows with no visible key).
    pairs = [(1, 1), (17, 17), (127, 127), (128, 128), (129, 129), (1, 129), (17, 128), (128, 17), (129, 1)]
    if full:
        pairs += [(1000, 1000), (1, 1000), (129, 1000), (1000, 129), (1000, 17)]
    for seqlen_q, seqlen_k in pairs:
        add(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        if support.causal:
            add(seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=True)

    # Peaked softmax rows: large scores stress the running maximum and its rescaling.
    add(seqlen_q=129, seqlen_k=129, q_scale=8.0)
    if support.causal:
        add(seqlen_q=128, seqlen_k=128, q_scale=8.0, causal=True)

    # Other softmax scales: a negative one (each row's largest weight comes from its smallest
    # score) and zero (uniform weights), with a ragged tail whose masked keys must stay out.
    add(seqlen_q=129, seqlen_k=129, scale=-0.25)
    if support.causal:
        add(seqlen_q=129, seqlen_k=129, scale=0.0, causal=True)

    if support.gqa:
        add(heads_q=4, heads_kv=2, seqlen_q=128, seqlen_k=128)  # ratio 2: catches a wrong head mapping
        add(heads_q=8, heads_kv=1, seqlen_q=129, seqlen_k=129)  # ratio 8 (multi-query)
        add(heads_q=8, heads_kv=1, seqlen_q=1, seqlen_k=129)  # decoding with GQA
        if support.causal:
            add(heads_q=8, heads_kv=1, seqlen_q=129, seqlen_k=129, causal=True)
            add(heads_q=8, heads_kv=2, seqlen_q=17, seqlen_k=128, causal=True)
            if full:
                add(heads_q=16, heads_kv=2, seqlen_q=1000, seqlen_k=1000, causal=True)

    if support.window:
        add(seqlen_q=129, seqlen_k=129, window=(16, 16))
        add(seqlen_q=128, seqlen_k=128, window=(32, -1))  # left only
        add(seqlen_q=128, seqlen_k=128, window=(-1, 8))  # right only
        add(seqlen_q=64, seqlen_k=64, window=(0, 0))  # one visible key per query
        add(seqlen_q=129, seqlen_k=17, window=(2, 2))  # rows with no visible key
        add(seqlen_q=17, seqlen_k=129, window=(4, 1))  # keys no query sees (zero dk, dv)
        if support.causal:
            add(seqlen_q=129, seqlen_k=129, causal=True, window=(24, 0))  # sliding-window causal
        if support.gqa:
            add(heads_q=4, heads_kv=2, seqlen_q=128, seqlen_k=128, window=(8, 8))
        if full:
            add(seqlen_q=1000, seqlen_k=1000, window=(128, 0))
            add(seqlen_q=1000, seqlen_k=129, window=(64, 64))

    if support.softcap:
        # softcap 5 on scores of standard deviation 4 bends most of them: ignoring it shows.
        add(seqlen_q=128, seqlen_k=128, softcap=5.0, q_scale=4.0)
        add(seqlen_q=129, seqlen_k=129, softcap=30.0)  # a realistic cap (Gemma uses 30 and 50)
        if support.causal:
            add(seqlen_q=129, seqlen_k=129, softcap=5.0, q_scale=4.0, causal=True)
        if support.window:
            add(seqlen_q=129, seqlen_k=129, softcap=5.0, q_scale=4.0, window=(32, 8))
        if full:
            add(seqlen_q=1000, seqlen_k=1000, softcap=5.0, q_scale=4.0, causal=support.causal)

    if not support.head_dim_v_must_equal:
        dim_v = _nearest(dims, d // 2)
        if dim_v != d:
            add(head_dim_v=dim_v, seqlen_q=129, seqlen_k=129)
        wide = [x for x in dims if x > d]
        if full and wide:
            add(head_dim_v=wide[0], seqlen_q=129, seqlen_k=129, causal=support.causal)

    if "bshd" in support.layouts and layout != "bshd":
        add(layout="bshd", seqlen_q=129, seqlen_k=129)
        if support.causal:
            add(layout="bshd", seqlen_q=17, seqlen_k=128, causal=True)
        if support.gqa:
            add(layout="bshd", heads_q=4, heads_kv=2, seqlen_q=128, seqlen_k=128)
        if support.window:
            add(layout="bshd", seqlen_q=128, seqlen_k=128, window=(16, 4))

    if support.varlen:
        # Uneven lengths, an empty query sequence, one-token sequences, and sequences whose
        # query rows see no key (no keys at all; or causal with more queries than keys).
        add(layout="varlen", seqlens_q=(30, 1, 0, 64, 7), seqlens_k=(30, 17, 4, 64, 0))
        if support.causal:
            add(layout="varlen", seqlens_q=(33, 0, 1, 64, 20), seqlens_k=(33, 5, 1, 100, 9), causal=True)
        if support.gqa and support.window:
            add(layout="varlen", seqlens_q=(50, 17, 1), seqlens_k=(40, 60, 1), heads_q=4, heads_kv=2, window=(8, 8))
        if support.softcap:
            add(layout="varlen", seqlens_q=(65, 3), seqlens_k=(65, 80), softcap=5.0, q_scale=4.0)
        if full:
            add(layout="varlen", seqlens_q=(1000, 1, 0, 129, 300), seqlens_k=(1000, 17, 3, 129, 257),
                causal=support.causal, heads_q=8, heads_kv=2 if support.gqa else 8)
    return plan


def cases(backend, tier: str = "fast", device=None, dtypes=None) -> list[Case]:
    """The cases to check `backend` on, generated from `backend.support`.

    `dtypes`: the dtypes to check (default fp16, bf16, fp32; float64 only when asked), intersected
    with the declared ones; float8_e4m3fn (FP8 cases, forward only) for a backend that declares
    the "fp8" precision, by default or when asked (see `select_dtypes`). `device`: where the
    cases will run; a backend that does not run on that kind of device at all gets one case per
    dtype, which is skipped with its reason, rather than a page of identical skips.
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    support = backend.support
    plan = _plan(support, tier)
    if device is not None and torch.device(device).type not in support.devices:
        plan = plan[:1]
    out, seen = [], set()
    for dtype in select_dtypes(support, dtypes):
        for fields in plan:
            # FP8 is forward only: there is no FP8 backward in the contract.
            case = make_case(dtype=dtype, backward=support.backward and dtype != FP8_DTYPE, **fields)
            if case.id not in seen:  # the covering design overlaps itself here and there
                seen.add(case.id)
                out.append(case)
    return out
