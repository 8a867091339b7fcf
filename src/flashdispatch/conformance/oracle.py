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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.base import bhsd_to_packed, from_bhsd, packed_to_bhsd, sequences, to_bhsd, visible_keys
from ..backends.reference import attention_math


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
