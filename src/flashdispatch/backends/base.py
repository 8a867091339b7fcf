"""What every backend is: a name, a declared `Support`, reasons, a forward and (maybe) a backward.

A backend module declares its support as a `Support` constant at its top, then subclasses
`Backend`. The generic checks of `Support.reasons` cover devices, compute capability, dtypes,
head dims and features; a backend adds its own checks in `extra_reasons`. Reasons are readable
sentences: the dispatcher shows them to users verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatcher.capabilities import Capabilities
from ..dispatcher.problem import Problem

MAX_GRID_Y = 65535  # CUDA's limit on a grid's second (and third) axis, where kernels put batch x heads


def triton_grid_reasons(problem: Problem, per_head_offsets: bool = False) -> list[str]:
    """The limits shared by the Triton kernels: batch x query heads on the grid's second axis, and
    32-bit element offsets: into a whole tensor (2^31 elements or more would wrap them), or with
    per_head_offsets (kernels that take a (batch, head)'s start in 64 bits) into one head's rows."""
    reasons = []
    if problem.batch * problem.heads_q > MAX_GRID_Y:
        reasons.append(f"batch x query heads = {problem.batch * problem.heads_q}: at most {MAX_GRID_Y} "
                       f"(the kernels' second grid axis)")
    width = max(problem.head_dim, problem.head_dim_v)
    if per_head_offsets:
        elements = max(problem.seqlen_q, problem.seqlen_k) * width
        if elements >= 2**31:
            reasons.append(f"a head of {elements} elements: under 2^31 only (the kernels' offsets within a head "
                           f"are 32-bit)")
    else:
        elements = max(problem.total_q * problem.heads_q, problem.total_k * problem.heads_kv) * width
        if elements >= 2**31:
            reasons.append(f"a tensor of {elements} elements: under 2^31 only (the kernels' offsets are 32-bit)")
    return reasons


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Support:
    """What a backend can run. Head dims are an inclusive range with an optional multiple."""

    dtypes: tuple[torch.dtype, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")
    min_compute_capability: tuple[int, int] | None = None
    max_compute_capability: tuple[int, int] | None = None
    min_head_dim: int = 1
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    head_dim_v_must_equal: bool = False  # v's head dim must equal q's and k's
    causal: bool = True
    causal_unequal_lengths: bool = True  # bottom-right causal when seqlen_q != seqlen_k
    window: bool = False
    softcap: bool = False
    gqa: bool = False
    varlen: bool = False
    layouts: tuple[str, ...] = ("bhsd", "bshd")
    lse: bool = True  # can return the log-sum-exp (needed to pair with any backward)
    backward: bool = False
    deterministic_forward: bool = True
    deterministic_backward: bool = False
    precisions: tuple[str, ...] = ("native",)  # "fp8": FP8 matmuls, run only when a call asks for them

    def reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        """Why this declared support does not cover `problem` on `caps`' device (empty: it does)."""
        out = []
        if problem.device_type not in self.devices:
            out.append(f"runs on {', '.join(self.devices)}, not {problem.device_type}")
        elif problem.device_type == "cuda" and caps.compute_capability is not None:
            cc = caps.compute_capability
            if self.min_compute_capability and cc < self.min_compute_capability:
                need = self.min_compute_capability
                out.append(f"needs compute capability >= {need[0]}.{need[1]}, this GPU is {cc[0]}.{cc[1]}")
            if self.max_compute_capability and cc > self.max_compute_capability:
                top = self.max_compute_capability
                out.append(f"supports compute capability <= {top[0]}.{top[1]}, this GPU is {cc[0]}.{cc[1]}")
        if problem.precision not in self.precisions:
            if problem.precision == "native":
                out.append("computes in FP8, which changes the numerics: runs only when precision='fp8' is asked for "
                           "(the precision= argument or the policy's precision key)")
            else:
                out.append(f"precision={problem.precision!r} not supported (computes in the inputs' own precision)")
        if problem.dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            out.append(f"dtype {_dtype_name(problem.dtype)} not supported (supports {names})")
        top = self.max_head_dim
        for label, dim in (("head_dim", problem.head_dim), ("head_dim of v", problem.head_dim_v)):
            if dim < self.min_head_dim or (top is not None and dim > top) or dim % self.head_dim_multiple:
                bounds = f"{self.min_head_dim}..{top}" if top is not None else f">= {self.min_head_dim}"
                multiple = f", a multiple of {self.head_dim_multiple}" if self.head_dim_multiple > 1 else ""
                out.append(f"{label} {dim} not supported (supports {bounds}{multiple})")
        if self.head_dim_v_must_equal and problem.head_dim_v != problem.head_dim:
            out.append(f"v's head_dim ({problem.head_dim_v}) must equal q's ({problem.head_dim})")
        if problem.causal and not self.causal:
            out.append("no causal masking")
        if problem.causal and problem.seqlen_q != problem.seqlen_k and not self.causal_unequal_lengths:
            out.append(
                f"its causal mask is aligned top-left, so it cannot run causal attention with "
                f"seqlen_q != seqlen_k ({problem.seqlen_q} vs {problem.seqlen_k}; flashdispatch aligns bottom-right)"
            )
        if problem.has_window and not self.window:
            out.append("no sliding-window (local) attention")
        if problem.softcap and not self.softcap:
            out.append("no softcap")
        if problem.group_size > 1 and not self.gqa:
            out.append(f"no grouped-query attention (heads {problem.heads_q} query / {problem.heads_kv} key-value)")
        if problem.varlen and not self.varlen:
            out.append("no variable-length batches (cu_seqlens)")
        if not problem.varlen and problem.layout not in self.layouts:
            out.append(f"layout {problem.layout!r} not supported (supports {', '.join(self.layouts)})")
        if problem.needs_lse and not self.lse:
            out.append("cannot return the log-sum-exp, which return_lse and any backward pass need")
        if problem.deterministic and not self.deterministic_forward:
            out.append("forward is not deterministic and torch.use_deterministic_algorithms(True) is on")
        return out

    def backward_reasons(self, problem: Problem) -> list[str]:
        """Backward-only checks, on top of `reasons`."""
        if not self.backward:
            return ["no backward pass (forward only)"]
        if problem.deterministic and not self.deterministic_backward:
            return ["backward is not deterministic and torch.use_deterministic_algorithms(True) is on"]
        return []


class Backend:
    """Base class of every backend, built-in or plugin.

    Subclasses set `name`, `support` and `description`, and implement `forward` (and `backward`
    when `support.backward`). Tensors arrive in the caller's layout: `(B, H, N, D)` for "bhsd",
    `(B, N, H, D)` for "bshd", `(total, H, D)` for variable-length batches; outputs go back in
    the same layout. LSE is float32 `(B, Hq, Nq)`, or `(Hq, total_q)` for variable-length batches.
    """

    name: str = ""
    support: Support
    description: str = ""

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (a missing package, say)."""
        return []

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        """Problem-specific constraints that `Support` cannot express."""
        return []

    def not_supported_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        """Why this backend cannot run the forward of `problem` (empty: it can)."""
        return self.unavailable_reasons() + self.support.reasons(problem, caps) + self.extra_reasons(problem, caps)

    def backward_not_supported_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        """Why this backend cannot run the backward of `problem` (empty: it can)."""
        return self.support.backward_reasons(problem) + self.not_supported_reasons(problem, caps)

    def notes(self, problem: Problem, caps: Capabilities) -> list[str]:
        """What `explain()` should add when this backend is chosen (tuning state, compile times)."""
        return []

    def forward(self, q, k, v, problem: Problem, cu_seqlens_q=None, cu_seqlens_k=None):
        """Return `(out, lse)`; `lse` may be None when `problem.needs_lse` is False."""
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, problem: Problem, cu_seqlens_q=None, cu_seqlens_k=None):
        """Return `(dq, dk, dv)` from the saved forward state of any backend."""
        raise NotImplementedError(f"backend {self.name!r} has no backward pass")

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


# Layout helpers shared by backends that compute in (B, H, N, D).


def to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, H, N, D) view of a tensor in `layout` (no copy)."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def from_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Back from (B, H, N, D) to `layout` (a view, no copy)."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def packed_to_bhsd(t: torch.Tensor) -> torch.Tensor:
    """One packed sequence (N, H, D) as a (1, H, N, D) view."""
    return t.unsqueeze(0).transpose(1, 2)


def bhsd_to_packed(t: torch.Tensor) -> torch.Tensor:
    """(1, H, N, D) back to a packed (N, H, D) view."""
    return t[0].transpose(0, 1)


def sequences(cu_seqlens_q, cu_seqlens_k):
    """(index, q slice, k slice) for each sequence of a variable-length batch."""
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(offsets_q) - 1):
        yield i, slice(offsets_q[i], offsets_q[i + 1]), slice(offsets_k[i], offsets_k[i + 1])


def visible_keys(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int, device) -> torch.Tensor | None:
    """(Nq, Nk) bool: which keys each query sees under bottom-right alignment; None when all do."""
    if window_left < 0 and window_right < 0:
        return None
    query = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_right >= 0:
        visible &= key <= query + window_right
    if window_left >= 0:
        visible &= key >= query - window_left
    return visible
