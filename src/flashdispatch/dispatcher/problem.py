"""The problem description: what one attention call asks for, validated, hashable.

A `Problem` holds everything a backend needs to decide whether it can run a call (shapes, dtype,
device, mask, options) and nothing it must read from device memory. `build_problem` is the one
place where user input is checked; every error it raises is a `ValueError` that names the
argument, what it got and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

LAYOUTS = ("bhsd", "bshd")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPE = torch.float8_e4m3fn  # pre-quantized inputs (precision "fp8")
PRECISIONS = ("native", "fp8")  # native: the inputs' precision; fp8: e4m3 matmuls (changes numerics)


@dataclass(frozen=True)
class Problem:
    """One attention call, as the dispatcher and the backends see it.

    Sequence lengths are the per-sequence maxima for variable-length batches. `window_left` and
    `window_right` already include causality (causal means `window_right == 0`); -1 is unbounded.
    """

    device_type: str  # "cpu" or "cuda"
    device_index: int | None
    dtype: torch.dtype
    batch: int  # number of sequences
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    causal: bool
    window_left: int
    window_right: int
    softcap: float  # 0.0: off
    scale: float
    layout: str  # "bhsd", "bshd" or "varlen"
    total_q: int  # tokens over the batch (batch * seqlen_q when not varlen)
    total_k: int
    score_elements: int  # entries of the full score matrix over the batch and heads
    needs_grad: bool = False
    return_lse: bool = False
    deterministic: bool = False
    mask_dropped: bool = False  # a causal mask or window was given that hides no key, so it was dropped
    precision: str = "native"  # one of PRECISIONS

    @property
    def varlen(self) -> bool:
        return self.layout == "varlen"

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1: plain multi-head attention)."""
        return self.heads_q // self.heads_kv

    @property
    def has_window(self) -> bool:
        """True when some key is masked by the window (sliding window, not causality alone)."""
        return self.window_left >= 0 or (self.window_right >= 0 and not self.causal)

    @property
    def is_empty(self) -> bool:
        return self.total_q == 0 or self.heads_q == 0 or self.head_dim_v == 0

    @property
    def needs_lse(self) -> bool:
        return self.return_lse or self.needs_grad

    def for_backward(self) -> "Problem":
        return replace(self, needs_grad=True)

    def describe(self) -> str:
        """A one-line summary for logs and tables."""
        parts = [
            f"{self.device_type}" + (f":{self.device_index}" if self.device_index is not None else ""),
            str(self.dtype).replace("torch.", ""),
            f"{self.layout}",
            f"B={self.batch}",
            f"H={self.heads_q}/{self.heads_kv}",
            f"N={self.seqlen_q}/{self.seqlen_k}",
            f"D={self.head_dim}" + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim else ""),
        ]
        if self.causal:
            parts.append("causal")
        if self.has_window:
            parts.append(f"window=({self.window_left},{self.window_right})")
        if self.mask_dropped:
            parts.append("(mask hides no key: dropped)")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.precision != "native":
            parts.append(f"precision={self.precision}")
        if self.needs_grad:
            parts.append("grad")
        return " ".join(parts)


def _describe_tensor(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def _check_tensor(name: str, t, rank: int, rank_text: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES + (FP8_DTYPE,):
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64, or float8_e4m3fn "
            f"with precision='fp8'), got {_describe_tensor(t)}"
        )
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {rank_text}, got {_describe_tensor(t)}")


def _check_window(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (left, right) of ints >= -1, got {window!r}") from None
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(
                f"window {side} bound must be an int >= -1 (-1 means unbounded), got {value!r} in window={window!r}"
            )
    return left, right


def _check_cu_seqlens(name: str, cu, total: int, device: torch.device) -> list[int]:
    """Validate a cumulative sequence-length tensor; returns its values (reads them to the host)."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D int32 tensor of batch+1 offsets starting at 0, got {_describe_tensor(cu)}"
        )
    if cu.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {cu.device}")
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values[:16]}{'...' if len(values) > 16 else ''}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {values[-1]}")
    return values


def build_problem(
    q,
    k,
    v,
    *,
    causal: bool = False,
    window=None,
    softcap=None,
    scale=None,
    layout: str = "bhsd",
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    return_lse: bool = False,
    needs_grad: bool = False,
    deterministic: bool = False,
    precision: str | None = None,
    descales=(None, None, None),
) -> Problem:
    """Check an attention call's arguments and describe it. Raises `ValueError` on bad input.

    `precision` None means "native", or "fp8" when q, k and v are float8_e4m3fn; `descales` are
    the (q, k, v) descale tensors that pre-quantized inputs may come with."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together for a variable-length batch")
        shape_text = "(total_tokens, heads, head_dim) for a variable-length batch"
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, t, 3, shape_text)
        (total_q, heads_q, head_dim), (total_k, heads_kv, head_dim_k) = q.shape, k.shape
        total_v, heads_v, head_dim_v = v.shape
    else:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        shape_text = "(batch, heads, seqlen, head_dim)" if layout == "bhsd" else "(batch, seqlen, heads, head_dim)"
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, t, 4, shape_text + f" for layout={layout!r}")
        if layout == "bhsd":
            (batch, heads_q, seqlen_q, head_dim) = q.shape
            (batch_k, heads_kv, seqlen_k, head_dim_k) = k.shape
            (batch_v, heads_v, seqlen_v, head_dim_v) = v.shape
        else:
            (batch, seqlen_q, heads_q, head_dim) = q.shape
            (batch_k, seqlen_k, heads_kv, head_dim_k) = k.shape
            (batch_v, seqlen_v, heads_v, head_dim_v) = v.shape
        if batch_k != batch or batch_v != batch:
            raise ValueError(
                f"q, k and v must have the same batch size, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if seqlen_v != seqlen_k:
            raise ValueError(f"k and v must have the same sequence length, got k {tuple(k.shape)}, v {tuple(v.shape)}")

    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if head_dim_k != head_dim:
        raise ValueError(f"q and k must have the same head_dim, got q {_describe_tensor(q)}, k {_describe_tensor(k)}")
    if heads_v != heads_kv:
        raise ValueError(f"k and v must have the same number of heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (heads_kv == 0 and heads_q != 0) or (heads_kv != 0 and heads_q % heads_kv != 0):
        raise ValueError(
            f"the number of query heads ({heads_q}) must be a multiple of the number of key/value heads ({heads_kv})"
        )
    if head_dim == 0:
        raise ValueError(f"head_dim must be at least 1, got q {_describe_tensor(q)}")
    precision = _check_precision(precision, q.dtype, descales, batch if not varlen else None, heads_kv, q.device)

    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    window_left, window_right = _check_window(window)
    if causal:
        window_right = 0
    if softcap is None:
        softcap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a positive finite float (or None / 0 for no cap), got {softcap!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")

    if varlen:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if total_v != total_k:
            raise ValueError(f"k and v must have the same packed length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        offsets_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q.device)
        offsets_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, q.device)
        if len(offsets_q) != len(offsets_k):
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                f"got {len(offsets_q) - 1} and {len(offsets_k) - 1}"
            )
        lens_q = [b - a for a, b in zip(offsets_q, offsets_q[1:])]
        lens_k = [b - a for a, b in zip(offsets_k, offsets_k[1:])]
        batch = len(lens_q)
        seqlen_q, seqlen_k = max(lens_q), max(lens_k)
        for name, given, actual in (("max_seqlen_q", max_seqlen_q, seqlen_q), ("max_seqlen_k", max_seqlen_k, seqlen_k)):
            if given is not None and given < actual:
                raise ValueError(f"{name} must be at least the longest sequence ({actual}), got {given}")
        score_elements = heads_q * sum(a * b for a, b in zip(lens_q, lens_k))
        layout = "varlen"
    else:
        for side, given in (("q", max_seqlen_q), ("k", max_seqlen_k)):
            if given is not None:
                raise ValueError(f"max_seqlen_{side} is only meaningful with cu_seqlens_{side} (a variable-length batch)")
        total_q, total_k = batch * seqlen_q, batch * seqlen_k
        score_elements = batch * heads_q * seqlen_q * seqlen_k

    # A mask that hides no key (causal decoding with one query, a window wider than the sequences)
    # is no mask: dropping it lets kernels whose causal alignment differs (top-left) run the problem.
    mask_dropped = (window_left >= 0 or window_right >= 0) and (
        (window_right < 0 or window_right >= seqlen_q - 1) and (window_left < 0 or window_left >= seqlen_k - 1))
    if mask_dropped:
        causal, window_left, window_right = False, -1, -1

    return Problem(
        device_type=q.device.type,
        device_index=q.device.index,
        dtype=q.dtype,
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        softcap=float(softcap),
        scale=float(scale),
        layout=layout,
        total_q=total_q,
        total_k=total_k,
        score_elements=score_elements,
        needs_grad=needs_grad,
        return_lse=return_lse,
        deterministic=deterministic,
        mask_dropped=mask_dropped,
        precision=precision,
    )


def _check_precision(precision, dtype: torch.dtype, descales, batch: int | None, heads_kv: int,
                     device: torch.device) -> str:
    """The call's precision; pre-quantized inputs imply "fp8", and only they take descales,
    float32 (batch, KV heads) as FlashAttention-3 takes them."""
    if precision is None:
        precision = "fp8" if dtype == FP8_DTYPE else "native"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None), got {precision!r}")
    if dtype == FP8_DTYPE and precision != "fp8":
        raise ValueError(f"q, k and v are float8_e4m3fn, which needs precision='fp8', got precision={precision!r}")
    for name, t in zip(("q_descale", "k_descale", "v_descale"), descales):
        if t is None:
            continue
        if dtype != FP8_DTYPE:
            raise ValueError(f"{name} goes with pre-quantized float8_e4m3fn inputs; q, k and v are {dtype}")
        if batch is None:
            raise ValueError(f"{name}: pre-quantized inputs are not supported with a variable-length batch")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (batch, heads_kv) \
                or t.device != device:
            got = _describe_tensor(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float32 tensor of shape (batch, KV heads) = ({batch}, {heads_kv}) "
                             f"on {device}, got {got}")
    return precision
