"""Combining partial attention results by their log-sum-exp (split-KV decoding, ring attention)."""

from __future__ import annotations

import math

import torch


def merge_states(outs, lses):
    """Merge attention over disjoint key sets into attention over their union.

    outs: sequence of (..., N, Dv) partial outputs, each normalised over its own keys;
    lses: sequence of matching (..., N) float32 log-sum-exps. Returns (out, lse) with
    out = sum_i exp(lse_i - lse) * out_i and lse = logsumexp_i(lse_i). Parts with LSE -inf (no
    keys) weigh nothing; rows with no keys anywhere give 0 and -inf.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if out.shape[:-1] != lse.shape or out.shape != outs[0].shape:
            raise ValueError(
                f"outs[{i}] must be (..., N, Dv) with lses[{i}] (..., N), all alike, got {tuple(out.shape)} and "
                f"{tuple(lse.shape)}; for layout='bshd' outputs pass lse.transpose(1, 2), for packed ones lse.T")
    lse_stack = torch.stack([lse.float() for lse in lses])  # (P, ..., N)
    lse = torch.logsumexp(lse_stack, dim=0)
    finite = torch.where(lse == -math.inf, 0.0, lse)
    weights = torch.exp(lse_stack - finite)  # (P, ..., N); 0 for parts with no keys
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse
