"""The answer to a problem with nothing to compute (no queries, no keys, or empty heads).

Not a registered backend: the dispatcher uses it for empty problems, so that every backend need not
special-case them. With no keys every query row is fully masked: output 0, LSE -inf, zero gradients.
"""

from __future__ import annotations

import math

import torch

from ..dispatcher.problem import FP8_DTYPE
from .base import Backend, Support


def _output_shape(q, v):
    """The output's shape in the caller's layout: q's shape with v's head dim."""
    return q.shape[:-1] + (v.shape[-1],)


def _lse_shape(problem):
    if problem.varlen:
        return (problem.heads_q, problem.total_q)
    return (problem.batch, problem.heads_q, problem.seqlen_q)


class EmptyBackend(Backend):
    name = "empty"
    support = Support(dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), causal=True, window=True,
                      softcap=True, gqa=True, varlen=True, backward=True, deterministic_backward=True)
    description = "zeros for problems with nothing to compute"

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=None):
        # Pre-quantized float8 inputs give a bfloat16 output, as the FP8 backend's does.
        out = q.new_zeros(_output_shape(q, v), dtype=torch.bfloat16 if q.dtype == FP8_DTYPE else q.dtype)
        lse = torch.full(_lse_shape(problem), -math.inf, dtype=torch.float32, device=q.device)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


EMPTY = EmptyBackend()
