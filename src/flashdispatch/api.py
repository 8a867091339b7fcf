"""The public functions: `attention`, `explain`, and the configuration calls.

Two thin layers: `attention()` looks the call up in the decision cache (a dictionary keyed by
shapes, dtypes, devices and options; validation and selection happen only on a miss) and, when a
gradient is needed, runs the chosen backends inside `_AttentionFunction`, whose backward calls the
backward backend on the standard saved state `(q, k, v, out, lse)`.
"""

from __future__ import annotations

import os

import torch

from .dispatcher import policy as _policy
from .dispatcher.capabilities import capabilities
from .dispatcher.problem import build_problem
from .dispatcher.registry import REGISTRY
from .dispatcher.registry import register_backend as _register_backend
from .dispatcher.selection import Explanation, decide, explain_problem
from .timing import median_time

BACKEND_ENV = "FLASHDISPATCH_BACKEND"

# (call signature) -> Decision. Cleared whenever the registry or the policy changes, and when it
# reaches MAX_DECISIONS entries (a decoding loop makes a new key each step as its cache grows).
_decisions: dict = {}
MAX_DECISIONS = 4096


def clear_decisions() -> None:
    """Forget cached decisions (done for you when backends or the policy change)."""
    _decisions.clear()


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, decision):
        out, lse = decision.forward.backend.forward(q, k, v, decision.problem, cu_seqlens_q, cu_seqlens_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu_seqlens = (cu_seqlens_q, cu_seqlens_k)
        ctx.decision = decision
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        decision = ctx.decision
        dq, dk, dv = decision.backward.backend.backward(dout, q, k, v, out, lse, decision.problem, *ctx.cu_seqlens)
        return dq, dk, dv, None, None, None


def _forced(backend) -> tuple[tuple[str | None, str | None], str]:
    """((forward name, backward name), who forced them) from the argument or the environment."""
    source = "the backend= argument"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV) or None, f"{BACKEND_ENV}"
        if backend is None:
            return (None, None), ""
        if "," in backend:
            backend = tuple(part.strip() or None for part in backend.split(",", 1))
    if isinstance(backend, str):
        backend = (backend, None)
    if isinstance(backend, tuple) and len(backend) == 2 and all(b is None or isinstance(b, str) for b in backend):
        known = REGISTRY.backends()
        for name in backend:
            if name is not None and name not in known:
                raise ValueError(f"{source} names backend {name!r}, which is not registered; "
                                 f"expected one of {sorted(known)}")
        return backend, source
    raise ValueError(f"backend must be a backend name or a (forward, backward) pair of names, got {backend!r}")


def _measurer(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """A function timing one backend's forward or forward+backward on the caller's tensors."""

    def measure(backend, problem, direction):
        with torch.no_grad():
            run = lambda: backend.forward(q, k, v, problem, cu_seqlens_q, cu_seqlens_k)  # noqa: E731
            if direction == "forward":
                return median_time(run, q.device, warmup=1, repeats=5)
            out, lse = run()
            dout = torch.randn_like(out)
            return median_time(lambda: backend.backward(dout, q, k, v, out, lse, problem, cu_seqlens_q, cu_seqlens_k),
                               q.device, warmup=1, repeats=5)

    return measure


def _remember(key, decision) -> None:
    if len(_decisions) >= MAX_DECISIONS:
        _decisions.clear()
    _decisions[key] = decision


def _options(causal, window, softcap, scale, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             return_lse) -> dict:
    return dict(causal=causal, window=window, softcap=softcap, scale=scale, layout=layout, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse)


def _plain(v):
    """fp8-hopper's to_kernel_layout() V (a tensor subclass, whose every attribute read costs
    microseconds) as the plain tensor that the backend knows by a mark; anything else as it is."""
    if type(v) is not torch.Tensor and hasattr(v, "_flashdispatch_plain_"):
        return v._flashdispatch_plain_()
    return v


def _precision(precision, q, needs_grad: bool) -> str | None:
    """The argument, else the policy's precision for calls it may apply to (float16/bfloat16
    inputs, no gradient: FP8 is forward only), else None (native, or fp8 for float8 inputs)."""
    if precision is not None:
        return precision
    policy = _policy.active_policy()
    if policy.precision != "native" and not needs_grad and getattr(q, "dtype", None) in (torch.float16, torch.bfloat16):
        return policy.precision
    return None


def _decide(q, k, v, problem, options, backend):
    forced, forced_by = _forced(backend)
    measure = _measurer(q, k, v, options.get("cu_seqlens_q"), options.get("cu_seqlens_k"))
    return decide(problem, capabilities(q.device), forced, forced_by, measure)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    layout: str = "bhsd",
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    backend: str | tuple[str | None, str | None] | None = None,
    precision: str | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
):
    """Exact scaled dot-product attention, softmax(q k^T * scale) v, on the fastest backend that can run it.

    Shapes (B batch, Hq query heads, Hkv key/value heads dividing Hq, N sequence lengths, D head dim):

    - layout="bhsd" (default): q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    - layout="bshd": q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv) -> out (B, Nq, Hq, Dv)
    - variable-length batch (cu_seqlens_q and cu_seqlens_k given): q (total_q, Hq, D),
      k (total_k, Hkv, D), v (total_k, Hkv, Dv) -> out (total_q, Hq, Dv); cu_seqlens_* are int32
      (batch + 1,) offsets starting at 0, as in FlashAttention. They are read on the host.
    - return_lse=True also returns lse, float32 (B, Hq, Nq) or (Hq, total_q): the natural-log
      log-sum-exp of each row's scaled scores (-inf for a row that sees no key). It carries no gradient.

    Semantics: `scale` defaults to 1/sqrt(D). `causal=True` aligns bottom-right: query i sees key
    j <= i + Nk - Nq. `window=(left, right)` keeps keys in [i + Nk - Nq - left, i + Nk - Nq + right]
    (-1: unbounded). `softcap=c` maps scaled scores s to c * tanh(s / c) before the softmax (None
    or 0: off). A row with no visible key gives output 0 and zero gradients.

    `backend` forces a backend by name (or a (forward, backward) pair); so does the environment
    variable FLASHDISPATCH_BACKEND ("name" or "forward,backward"). A forced backend that cannot
    run the problem raises `NoBackendError` with its reasons. Bad arguments raise `ValueError`.

    FP8 (forward only, Hopper): `precision="fp8"` with float16/bfloat16 q, k, v quantizes them to
    float8_e4m3fn (one scale per block of rows, Q and K rotated by a random-sign Hadamard matrix
    first; see the policy's `fp8` key) and runs both matmuls in FP8: faster, and no longer exact,
    so no backend does it unless asked (here, or by the policy's `precision: fp8` for calls that
    need no gradient). Pre-quantized float8_e4m3fn q, k, v imply it; they may come with float32
    (B, Hkv) `q_descale`, `k_descale`, `v_descale` (what each tensor was divided by; None: 1) as
    FlashAttention-3 takes them, and give a bfloat16 output. Descales must be positive or zero (an
    all-zero head's amax / 448); they stay on the device, so a negative one is not checked, and
    gives wrong numbers.
    """
    v = _plain(v)
    needs_grad = torch.is_grad_enabled() and (
        getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False) or getattr(v, "requires_grad", False))
    deterministic = torch.are_deterministic_algorithms_enabled()
    descales = (q_descale, k_descale, v_descale)
    decision = None
    if cu_seqlens_q is None and cu_seqlens_k is None:
        # Hot path: everything that validation and selection depend on, in one hashable key.
        try:
            # Types too: True == 1 == 1.0 hash alike, but validation tells them apart.
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                   causal, type(causal), window if window is None else (tuple(window), tuple(map(type, window))),
                   softcap, type(softcap), scale, type(scale), layout, return_lse, needs_grad, deterministic, backend,
                   os.environ.get(BACKEND_ENV), max_seqlen_q, max_seqlen_k, precision,
                   *(None if d is None else (type(d), getattr(d, "shape", None), getattr(d, "dtype", None),
                                             getattr(d, "device", None)) for d in descales))
            decision = _decisions.get(key)
        except (AttributeError, TypeError):  # not tensors, or unhashable options: validation explains
            key = None
        if decision is None:
            options = _options(causal, window, softcap, scale, layout, None, None, max_seqlen_q, max_seqlen_k, return_lse)
            problem = build_problem(q, k, v, **options, needs_grad=needs_grad, deterministic=deterministic,
                                    precision=_precision(precision, q, needs_grad), descales=descales)
            decision = _decide(q, k, v, problem, options, backend)
            if key is not None:
                _remember(key, decision)
    else:
        # Variable-length batches are validated every call: the offsets change from batch to batch.
        options = _options(causal, window, softcap, scale, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, return_lse)
        problem = build_problem(q, k, v, **options, needs_grad=needs_grad, deterministic=deterministic,
                                precision=_precision(precision, q, needs_grad), descales=descales)
        key = (problem, _forced(backend), os.environ.get(BACKEND_ENV))
        decision = _decisions.get(key)
        if decision is None:
            decision = _decide(q, k, v, problem, options, backend)
            _remember(key, decision)

    if decision.problem.precision == "fp8":  # forward only; the FP8 backend takes the descales
        out, lse = decision.forward.backend.forward(q, k, v, decision.problem, cu_seqlens_q, cu_seqlens_k,
                                                    descales=descales)
    elif decision.backward is None:
        out, lse = decision.forward.backend.forward(q, k, v, decision.problem, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = _AttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, decision)
    return (out, lse) if return_lse else out


def explain(q, k, v, *, causal=False, window=None, softcap=None, scale=None, layout="bhsd", cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False, backend=None, precision=None,
            q_descale=None, k_descale=None, v_descale=None) -> Explanation:
    """Report every registered backend against this call: supported or why not, and which backends
    would run the forward and the backward (as if a gradient were needed), and why.

    Takes the same arguments as `attention`; `print()` the result for a table.
    """
    v = _plain(v)
    options = _options(causal, window, softcap, scale, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       return_lse)
    problem = build_problem(q, k, v, **options, needs_grad=True, deterministic=torch.are_deterministic_algorithms_enabled(),
                            precision=_precision(precision, q, needs_grad=False), descales=(q_descale, k_descale, v_descale))
    forced, forced_by = _forced(backend)
    measure = _measurer(q, k, v, options.get("cu_seqlens_q"), options.get("cu_seqlens_k"))
    return explain_problem(problem, capabilities(q.device), forced, forced_by, measure)


def backends() -> dict:
    """The registered backends, by name."""
    return REGISTRY.backends()


def plugins() -> list:
    """Every plugin, loaded or disabled, with its backends or its error."""
    return REGISTRY.plugins()


def register_backend(backend) -> None:
    """Register a backend object at run time. Raises ValueError if it is malformed or its name is taken."""
    _register_backend(backend)
    clear_decisions()


def register_plugin(plugin, name: str | None = None) -> None:
    """Register a pluggy plugin (an object or module with `flashdispatch_backends`) at run time."""
    REGISTRY.register_plugin(plugin, name)
    clear_decisions()


def unregister(name: str) -> None:
    """Remove the plugin `name` with its backends, or else the one backend `name` (a run-time
    plugin left with no backend is removed too, so the backend can be registered again)."""
    REGISTRY.unregister(name)
    clear_decisions()


def configure(config=None):
    """Set the user policy: a path to a YAML file, a dict of the same form, or None to reset.

    Returns the active policy. Raises ValueError for a malformed policy, naming the file and line.
    """
    active = _policy.set_policy(config)
    clear_decisions()
    return active
