"""`naive-chunked`: an example flashdispatch backend, packaged as a plugin.

Exact attention on one block of queries at a time: for each block, the (B, Hq, chunk, Nk) scores,
their log-sum-exp, the probabilities and their product with v, all with plain PyTorch operations.
Forward only; it returns the log-sum-exp, so the dispatcher can pair it with any backward backend.

The entry point in pyproject.toml names this module; flashdispatch calls `flashdispatch_backends()`
once, when its registry is first used.
"""

from __future__ import annotations

import math

import torch

import flashdispatch
from flashdispatch import Backend, Support

# What this backend runs. The dispatcher turns every mismatch into a readable reason.
SUPPORT = Support(
    dtypes=(torch.float32, torch.float64),
    devices=("cpu", "cuda"),
    causal=True,
    causal_unequal_lengths=True,  # the mask below is bottom-right aligned, as flashdispatch defines it
    window=False,
    softcap=False,
    gqa=True,
    varlen=False,
    layouts=("bhsd", "bshd"),
    lse=True,
    backward=False,
)

# Bytes one chunk's float scores may take. The chunk size is chosen from it.
CHUNK_BYTES = 64 * 2**20


class NaiveChunkedBackend(Backend):
    name = "naive-chunked"
    support = SUPPORT
    description = "exact attention one query chunk at a time, plain PyTorch (example plugin)"

    def extra_reasons(self, problem, caps):
        # What `Support` cannot say: even a one-query chunk must fit the budget.
        row_bytes = problem.batch * problem.heads_q * problem.seqlen_k * problem.dtype.itemsize
        if row_bytes > CHUNK_BYTES:
            return [f"one query row of scores needs {row_bytes / 2**20:.0f} MiB, more than its "
                    f"{CHUNK_BYTES / 2**20:.0f} MiB chunk budget"]
        return []

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        if problem.layout == "bshd":  # compute in (B, H, N, D); transposes are views, not copies
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        batch, heads_q, seqlen_q, _ = q.shape
        heads_kv, seqlen_k = k.shape[1], k.shape[2]
        group = heads_q // heads_kv
        # Grouped-query attention: the `group` query heads of one key/value head side by side,
        # (B, Hkv, G, Nq, D) against (B, Hkv, 1, Nk, D), so k and v are never repeated.
        qg = q.reshape(batch, heads_kv, group, seqlen_q, q.shape[-1])
        kt, vg = k.unsqueeze(2).transpose(-1, -2), v.unsqueeze(2)
        out = q.new_empty(batch, heads_q, seqlen_q, v.shape[-1])
        lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
        out_g = out.view(batch, heads_kv, group, seqlen_q, -1)
        lse_g = lse.view(batch, heads_kv, group, seqlen_q)
        row_bytes = batch * heads_q * seqlen_k * q.element_size()
        chunk = max(1, CHUNK_BYTES // max(1, row_bytes))
        keys = torch.arange(seqlen_k, device=q.device)
        for start in range(0, seqlen_q, chunk):
            stop = min(start + chunk, seqlen_q)
            scores = (qg[..., start:stop, :] @ kt) * problem.scale  # (B, Hkv, G, chunk, Nk)
            if problem.causal:
                # Bottom-right alignment: query i sees keys j <= i + Nk - Nq.
                queries = torch.arange(start, stop, device=q.device)[:, None] + (seqlen_k - seqlen_q)
                scores = scores.masked_fill(keys[None, :] > queries, -math.inf)
            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            # A row that sees no key has LSE -inf: subtract 0 there, so exp() gives 0, not NaN.
            probs = torch.exp(scores - torch.where(row_lse == -math.inf, 0.0, row_lse))
            out_g[..., start:stop, :] = probs @ vg
            lse_g[..., start:stop] = row_lse.squeeze(-1).float()
        if problem.layout == "bshd":
            out = out.transpose(1, 2)
        return out, lse


@flashdispatch.hookimpl
def flashdispatch_backends():
    return [NaiveChunkedBackend()]
