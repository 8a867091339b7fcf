"""The suite's plain-math results: the float64 reference and the low-precision baselines.

Everything here runs one problem in one `compute_dtype` with plain PyTorch ops and no tiling:

- `attention_by_math`: `attention_math` (the reference backend's own definition) with gradients by
  autograd. In float64 it is the reference; in the case's dtype it is the baseline of the
  exactness rule ("plain PyTorch math in the same precision").
- `backward_from_state`: FlashAttention-2's backward formula from a saved (out, lse), the other
  plain way to compute the gradients, used as a second baseline for them. Autograd alone
  underestimates the rounding that a correct backward must make in two situations: a row with one
  visible key has a softmax gradient of exactly 0 under autograd (p * (g - p * g) with p = 1),
  whereas delta = rowsum(dO * O) and dO V^T cancel only up to rounding; and a backward given
  another forward's LSE recomputes P = exp(S - LSE) from its own rounded scores, without the
  cancellation that a consistent forward's LSE gives (in float32 with peaked rows that is several
  times the autograd error). Both are inherent to the contract, not bugs, so the rule takes the
  larger of the two baselines' errors for gradients.

FP8 cases (pre-quantized float8_e4m3fn inputs with (batch, KV head) descales) have their own two:

- `fp8_reference`: `attention_math` in float64 on the dequantized inputs, x.double() * descale
  (exact: 4 significant bits times float32's 24 fit in float64), so exactly what the kernel sees.
- `fp8_baseline`: plain math in the kernel's precision: float32 scores of the dequantized inputs,
  P = exp(s - row max) rounded to float8_e4m3fn before its product with V (as FlashAttention-3
  and every FP8 kernel do: the P V matmul takes FP8 operands), that product in float32 divided by
  the float32 row sum of the unrounded P, then rounded to bfloat16, the output dtype; LSE
  = row max + log(row sum) in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..backends.base import bhsd_to_packed, from_bhsd, packed_to_bhsd, sequences, to_bhsd, visible_keys
from ..backends.reference import attention_math
from ..dispatcher.problem import FP8_DTYPE


@dataclass
class MathResult:
    out: torch.Tensor  # in the case's layout, in the compute dtype
    lse: torch.Tensor  # (B, Hq, Nq) or (Hq, total_q), in the compute dtype
    grads: tuple | None  # (dq, dk, dv) shaped like q, k, v; None without backward


def attention_by_math(case, problem, inputs, compute_dtype) -> MathResult:
    """`attention_math` with every step in `compute_dtype`; gradients by autograd (varlen: per sequence)."""
    leaves = [t.detach().to(compute_dtype).requires_grad_(case.backward) for t in (inputs.q, inputs.k, inputs.v)]
    options = dict(scale=problem.scale, window_left=problem.window_left, window_right=problem.window_right,
                   softcap=problem.softcap, compute_dtype=compute_dtype)
    with torch.enable_grad():
        if not case.varlen:
            out, lse = attention_math(*(to_bhsd(t, case.layout) for t in leaves), **options)
            out = from_bhsd(out, case.layout)
        else:
            outs, lses = [], []
            for _, sq, sk in sequences(inputs.cu_seqlens_q, inputs.cu_seqlens_k):
                seq_out, seq_lse = attention_math(
                    *(packed_to_bhsd(t) for t in (leaves[0][sq], leaves[1][sk], leaves[2][sk])), **options)
                outs.append(bhsd_to_packed(seq_out))
                lses.append(seq_lse[0])  # (Hq, n)
            out, lse = torch.cat(outs), torch.cat(lses, dim=-1)
        grads = torch.autograd.grad(out, leaves, inputs.dout.to(compute_dtype)) if case.backward else None
    return MathResult(out.detach(), lse.detach(), grads)


def _backward_bhsd(q, k, v, dout, out, lse, problem, compute_dtype):
    """FlashAttention-2's backward on (B, H, N, D) tensors, untiled, every step in `compute_dtype`.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), dout and out (B, Hq, Nq, Dv),
    lse (B, Hq, Nq) -> dq, dk, dv shaped like q, k, v.
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    group = heads_q // heads_kv
    c = compute_dtype
    # Query heads of a group side by side: (B, Hkv, G, N, D) against (B, Hkv, 1, Nk, D).
    qg = q.to(c).reshape(batch, heads_kv, group, seqlen_q, head_dim)
    dog = dout.to(c).reshape(batch, heads_kv, group, seqlen_q, head_dim_v)
    og = out.to(c).reshape(batch, heads_kv, group, seqlen_q, head_dim_v)
    kg, vg = k.to(c).unsqueeze(2), v.to(c).unsqueeze(2)
    scores = (qg @ kg.transpose(-1, -2)) * problem.scale  # (B, Hkv, G, Nq, Nk)
    capped = None
    if problem.softcap:
        capped = torch.tanh(scores / problem.softcap)
        scores = problem.softcap * capped
    visible = visible_keys(seqlen_q, seqlen_k, problem.window_left, problem.window_right, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    # A row with LSE -inf sees no key: shift it by +inf so that all its P entries are 0.
    lse = lse.to(c).reshape(batch, heads_kv, group, seqlen_q, 1)
    lse = torch.where(lse == -math.inf, math.inf, lse)
    p = torch.exp(scores - lse)
    dv = (p.transpose(-1, -2) @ dog).sum(2)  # (B, Hkv, Nk, Dv)
    delta = (dog * og).sum(-1, keepdim=True)  # rowsum(dO * O): (B, Hkv, G, Nq, 1)
    ds = p * (dog @ vg.transpose(-1, -2) - delta)
    if capped is not None:
        ds = ds * (1 - capped * capped)
    dq = (ds @ kg) * problem.scale
    dk = (ds.transpose(-1, -2) @ qg).sum(2) * problem.scale
    return dq.reshape(batch, heads_q, seqlen_q, head_dim), dk, dv


def backward_from_state(case, problem, inputs, out, lse, compute_dtype) -> tuple:
    """(dq, dk, dv) in the case's layout from the state (out, lse) a backward is given."""
    if not case.varlen:
        views = (to_bhsd(t, case.layout) for t in (inputs.q, inputs.k, inputs.v, inputs.dout, out))
        return tuple(from_bhsd(g, case.layout) for g in _backward_bhsd(*views, lse, problem, compute_dtype))
    grads = []
    for _, sq, sk in sequences(inputs.cu_seqlens_q, inputs.cu_seqlens_k):
        views = (packed_to_bhsd(t) for t in (inputs.q[sq], inputs.k[sk], inputs.v[sk], inputs.dout[sq], out[sq]))
        grads.append(_backward_bhsd(*views, lse[:, sq].unsqueeze(0), problem, compute_dtype))
    return tuple(torch.cat([bhsd_to_packed(g[i]) for g in grads]) for i in range(3))


# FP8


def dequantized(case, inputs, dtype) -> tuple:
    """(q, k, v) of an FP8 case as `dtype`, times their descales: x[b, h] * descale[b, h_kv]
    (for q, h_kv = h // group), in the case's layout; a missing descale (and varlen) is 1."""
    out = []
    for t, descale in zip((inputs.q, inputs.k, inputs.v), inputs.descales):
        t = t.to(dtype)
        if descale is not None:
            group = to_bhsd(t, case.layout).shape[1] // descale.shape[1]
            per_head = descale.to(dtype).repeat_interleave(group, dim=1)[:, :, None, None]  # (B, H, 1, 1)
            t = from_bhsd(to_bhsd(t, case.layout) * per_head, case.layout)
        out.append(t)
    return tuple(out)


def fp8_reference(case, problem, inputs) -> MathResult:
    """float64 attention on the dequantized inputs of an FP8 case (forward only)."""
    q, k, v = dequantized(case, inputs, torch.float64)
    return attention_by_math(replace(case, backward=False), problem, replace(inputs, q=q, k=k, v=v), torch.float64)


def _fp8_baseline_bhsd(q, k, v, problem, out_dtype):
    """The FP8 baseline (see the module docstring) on float32 (B, H, N, D) dequantized tensors."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    qg = q.reshape(batch, heads_kv, group, seqlen_q, head_dim)
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * problem.scale  # (B, Hkv, G, Nq, Nk), float32
    if problem.softcap:
        scores = problem.softcap * torch.tanh(scores / problem.softcap)
    visible = visible_keys(seqlen_q, seqlen_k, problem.window_left, problem.window_right, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    if seqlen_k:
        top = scores.amax(-1, keepdim=True)
    else:
        top = torch.full(scores.shape[:-1] + (1,), -math.inf, dtype=scores.dtype, device=scores.device)
    top = torch.where(top == -math.inf, 0.0, top)  # a row with no visible key: all its P are 0
    p = torch.exp(scores - top)  # float32 in [0, 1]
    total = p.sum(-1, keepdim=True)
    # P rounded to e4m3 for the P V matmul, scaled by 2^8 first as FP8 kernels do so that small
    # probabilities stay normal e4m3 numbers (p <= 1, so 256 p never saturates).
    p8 = (p * 256).to(FP8_DTYPE).float() / 256
    out = (p8 @ v.unsqueeze(2)) / torch.where(total > 0, total, 1.0)
    lse = torch.where(total > 0, top + torch.log(total), -math.inf)
    return (out.reshape(batch, heads_q, seqlen_q, v.shape[-1]).to(out_dtype),
            lse.reshape(batch, heads_q, seqlen_q))


def fp8_baseline(case, problem, inputs) -> MathResult:
    """Plain math in the FP8 kernel's precision on an FP8 case (see the module docstring): out in
    the case's layout in bfloat16, LSE float32 (B, Hq, Nq) or (Hq, total_q)."""
    q, k, v = dequantized(case, inputs, torch.float32)
    if not case.varlen:
        out, lse = _fp8_baseline_bhsd(*(to_bhsd(t, case.layout) for t in (q, k, v)), problem, case.out_dtype)
        return MathResult(from_bhsd(out, case.layout), lse, None)
    outs, lses = [], []
    for _, sq, sk in sequences(inputs.cu_seqlens_q, inputs.cu_seqlens_k):
        out, lse = _fp8_baseline_bhsd(*(packed_to_bhsd(t) for t in (q[sq], k[sk], v[sk])), problem, case.out_dtype)
        outs.append(bhsd_to_packed(out))
        lses.append(lse[0])
    return MathResult(torch.cat(outs), torch.cat(lses, dim=-1), None)
