"""`reference`: the oracle. Plain math on the full score matrix, in float64, every feature.

It is the definition the other backends are measured against (the conformance suite calls
`attention_math` directly), so it is written for obviousness, not speed. It refuses problems whose
score matrix would not fit in memory instead of running out of it.
"""

from __future__ import annotations

import math

import torch

from ..dispatcher.capabilities import Capabilities
from ..dispatcher.problem import Problem
from .base import Backend, Support, bhsd_to_packed, from_bhsd, packed_to_bhsd, sequences, to_bhsd, visible_keys

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    devices=("cpu", "cuda"),
    causal=True,
    window=True,
    softcap=True,
    gqa=True,
    varlen=True,
    backward=True,
    deterministic_backward=True,
)

# Bytes of float64 score-sized buffers alive at once in forward + backward (scores, probabilities,
# their gradients), per score element.
BYTES_PER_SCORE = 4 * 8
# Fraction of free memory the score matrices may take.
MEMORY_FRACTION = 0.5


def free_memory(caps: Capabilities, device_index) -> int | None:
    """Free bytes on the problem's device, or None where unknown."""
    if caps.device_type == "cuda":
        return torch.cuda.mem_get_info(device_index)[0]
    return caps.total_memory


def attention_math(q, k, v, *, scale, window_left=-1, window_right=-1, softcap=0.0, compute_dtype=torch.float64):
    """Exact attention on (B, H, N, D) tensors, every step in `compute_dtype`.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in
    `compute_dtype`, lse (B, Hq, Nq) in `compute_dtype`. Rows with no visible key give 0 and
    LSE -inf, with zero gradients (never NaN). Differentiable by autograd.
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    # Query heads of one group share a key/value head: (B, Hkv, G, Nq, D) against (B, Hkv, 1, Nk, D).
    qg = q.to(compute_dtype).reshape(batch, heads_kv, group, seqlen_q, head_dim)
    kg = k.to(compute_dtype).unsqueeze(2)
    vg = v.to(compute_dtype).unsqueeze(2)
    scores = (qg @ kg.transpose(-1, -2)) * scale  # (B, Hkv, G, Nq, Nk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_keys(seqlen_q, seqlen_k, window_left, window_right, q.device)
    if visible is not None:
        has_key = visible.any(-1, keepdim=True)  # (Nq, 1)
        scores = scores.masked_fill(~visible, -math.inf)
        # A row with no visible key would make logsumexp -inf and its gradient NaN: give it finite
        # scores here and zero its probabilities below.
        scores = torch.where(has_key, scores, torch.zeros((), dtype=compute_dtype, device=q.device))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    if visible is not None:
        probs = probs * has_key
        lse = lse.masked_fill(~has_key, -math.inf)
    out = probs @ vg  # (B, Hkv, G, Nq, Dv)
    return out.reshape(batch, heads_q, seqlen_q, v.shape[-1]), lse.reshape(batch, heads_q, seqlen_q)


class ReferenceBackend(Backend):
    name = "reference"
    support = SUPPORT
    description = "float64 math on the full score matrix: the oracle, every feature, slow"

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        need = problem.score_elements * BYTES_PER_SCORE
        free = free_memory(caps, problem.device_index)
        if free is not None and need > MEMORY_FRACTION * free:
            return [f"its float64 score matrices need {need / 2**30:.1f} GiB, more than half the free memory "
                    f"({free / 2**30:.1f} GiB)"]
        return []

    def _dense(self, q, k, v, problem: Problem, layout: str):
        out, lse = attention_math(
            to_bhsd(q, layout), to_bhsd(k, layout), to_bhsd(v, layout), scale=problem.scale,
            window_left=problem.window_left, window_right=problem.window_right, softcap=problem.softcap,
        )
        return from_bhsd(out.to(q.dtype), layout), lse.float()

    def _run(self, q, k, v, problem, cu_seqlens_q, cu_seqlens_k):
        if not problem.varlen:
            return self._dense(q, k, v, problem, problem.layout)
        outs, lses = [], []
        for _, sq, sk in sequences(cu_seqlens_q, cu_seqlens_k):
            out, lse = self._dense(*(packed_to_bhsd(t) for t in (q[sq], k[sk], v[sk])), problem, "bhsd")
            outs.append(bhsd_to_packed(out))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        with torch.no_grad():
            return self._run(q, k, v, problem, cu_seqlens_q, cu_seqlens_k)

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        # Recompute by autograd on float64 math; the saved out/lse are not needed by the oracle.
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            recomputed, _ = self._run(*inputs, problem, cu_seqlens_q, cu_seqlens_k)
            grads = torch.autograd.grad(recomputed, inputs, dout)
        return grads
