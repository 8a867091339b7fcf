"""`tiled`: the FlashAttention algorithm itself, in plain PyTorch, on any device.

Forward: for each block of queries, walk the key/value blocks it can see, keeping per row a
running maximum `m`, a running sum `l` of exp(score - m) and an unnormalised output `acc`. When a
block raises the maximum, both `l` and `acc` are rescaled by exp(m_old - m_new) before the block's
terms are added; forgetting to rescale `l` (as a widely copied snippet does) is wrong as soon as
there is more than one block. Only one (block_q, block_k) tile of scores exists at a time, so
memory is O(N), and the log-sum-exp `m + log(l)` is saved for the backward.

Backward (FlashAttention-2): delta = rowsum(dO * O); for each tile, recompute P = exp(S - LSE)
from the saved LSE, then dV += P^T dO, dS = P * (dO V^T - delta), dQ += dS K, dK += dS^T Q.
Everything is accumulated in float32, in a fixed order, so it is deterministic.
"""

from __future__ import annotations

import math

import torch

from ..dispatcher.capabilities import Capabilities, capabilities
from ..dispatcher.problem import Problem
from .base import Backend, Support, bhsd_to_packed, from_bhsd, packed_to_bhsd, sequences, to_bhsd

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

# Block-size limits: tiles smaller than this waste launches, larger ones waste memory.
MIN_BLOCK, MAX_BLOCK_K, MAX_BLOCK_Q = 16, 1024, 8192
# Score-tile budget where the device reports no L2 size (the CPU).
HOST_TILE_BYTES = 8 * 2**20


def _floor_pow2(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def block_sizes(problem: Problem, caps: Capabilities) -> tuple[int, int]:
    """(block_q, block_k) from the device's on-chip memory.

    block_k: a K tile and a V tile in float32 fit the shared memory one GPU block may use, as they
    would in a FlashAttention kernel. block_q: the (B, Hq, block_q, block_k) float32 score tile fits
    the L2 cache, so the tile that each step writes is read back from L2, not from memory.
    """
    row_bytes = 4 * (problem.head_dim + problem.head_dim_v)
    smem = caps.smem_per_block_optin or 48 * 2**10
    block_k = min(MAX_BLOCK_K, max(MIN_BLOCK, _floor_pow2(smem / row_bytes)))
    tile_budget = caps.l2_bytes or HOST_TILE_BYTES
    heads = max(1, (1 if problem.varlen else problem.batch) * problem.heads_q)
    block_q = min(MAX_BLOCK_Q, max(MIN_BLOCK, _floor_pow2(tile_budget / (heads * block_k * 4))))
    return block_q, block_k


def _key_range(q_start: int, q_end: int, seqlen_q: int, seqlen_k: int, left: int, right: int) -> tuple[int, int]:
    """Keys [lo, hi) that any query in [q_start, q_end) can see (bottom-right aligned)."""
    shift = seqlen_k - seqlen_q
    lo = max(0, q_start + shift - left) if left >= 0 else 0
    hi = min(seqlen_k, q_end - 1 + shift + right + 1) if right >= 0 else seqlen_k
    return lo, max(lo, hi)


def _tile_mask(q_start, q_end, k_start, k_end, seqlen_q, seqlen_k, left, right, device):
    """(bq, bk) bool visibility of a tile, or None when every key of the tile is visible to every query."""
    shift = seqlen_k - seqlen_q
    fully_visible = (right < 0 or k_end - 1 <= q_start + shift + right) and (left < 0 or k_start >= q_end - 1 + shift - left)
    if fully_visible:
        return None
    query = torch.arange(q_start, q_end, device=device)[:, None] + shift
    key = torch.arange(k_start, k_end, device=device)[None, :]
    visible = torch.ones(q_end - q_start, k_end - k_start, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= key <= query + right
    if left >= 0:
        visible &= key >= query - left
    return visible


class _Tiles:
    """Walks the (query block, key block) tiles of one dense (B, H, N, D) problem."""

    def __init__(self, problem: Problem, seqlen_q: int, seqlen_k: int, block_q: int, block_k: int):
        self.p, self.seqlen_q, self.seqlen_k = problem, seqlen_q, seqlen_k
        self.block_q, self.block_k = block_q, block_k

    def query_blocks(self):
        for q_start in range(0, self.seqlen_q, self.block_q):
            yield q_start, min(q_start + self.block_q, self.seqlen_q)

    def key_blocks(self, q_start, q_end):
        lo, hi = _key_range(q_start, q_end, self.seqlen_q, self.seqlen_k, self.p.window_left, self.p.window_right)
        for k_start in range(lo - lo % self.block_k, hi, self.block_k):
            yield k_start, min(k_start + self.block_k, hi)

    def scores(self, qb, kb, q_start, q_end, k_start, k_end):
        """Scaled (and capped, masked) float32 scores of a tile; also tanh for softcap's gradient."""
        s = (qb @ kb.transpose(-1, -2)) * self.p.scale  # (B, Hkv, G, bq, bk)
        t = None
        if self.p.softcap:
            t = torch.tanh(s / self.p.softcap)
            s = self.p.softcap * t
        mask = _tile_mask(q_start, q_end, k_start, k_end, self.seqlen_q, self.seqlen_k,
                          self.p.window_left, self.p.window_right, s.device)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        return s, t


def _grouped(t: torch.Tensor, heads_kv: int, dtype=torch.float32) -> torch.Tensor:
    """(B, Hq, N, D) -> (B, Hkv, G, N, D) in `dtype`: the query heads of a group side by side."""
    batch, heads, seqlen, dim = t.shape
    return t.to(dtype).reshape(batch, heads_kv, heads // heads_kv, seqlen, dim)


def tiled_forward(q, k, v, problem: Problem, block_q: int, block_k: int):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv), lse (B, Hq, Nq) f32."""
    batch, heads_q, seqlen_q, _ = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    tiles = _Tiles(problem, seqlen_q, seqlen_k, block_q, block_k)
    cdt = torch.promote_types(q.dtype, torch.float32)
    qg = _grouped(q, heads_kv, cdt)  # (B, Hkv, G, Nq, D)
    kf, vf = k.to(cdt).unsqueeze(2), v.to(cdt).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    out = torch.empty(batch, heads_q, seqlen_q, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    out_g = out.view(batch, heads_kv, heads_q // heads_kv, seqlen_q, v.shape[-1])
    lse_g = lse.view(batch, heads_kv, heads_q // heads_kv, seqlen_q)
    for q_start, q_end in tiles.query_blocks():
        qb = qg[..., q_start:q_end, :]
        row_max = torch.full(qb.shape[:-1] + (1,), -math.inf, dtype=cdt, device=q.device)  # m
        row_sum = torch.zeros_like(row_max)  # l
        acc = torch.zeros(qb.shape[:-1] + (v.shape[-1],), dtype=cdt, device=q.device)  # unnormalised output
        for k_start, k_end in tiles.key_blocks(q_start, q_end):
            s, _ = tiles.scores(qb, kf[..., k_start:k_end, :], q_start, q_end, k_start, k_end)
            new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
            # Rows that have seen no visible key yet keep max -inf; shift them by 0 instead.
            shift = torch.where(new_max == -math.inf, 0.0, new_max)
            p = torch.exp(s - shift)
            rescale = torch.exp(row_max - shift)  # exp(m_old - m_new): 0 for a row's first keys
            row_sum = row_sum * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ vf[..., k_start:k_end, :]
            row_max = new_max
        # Rows with no visible key have l = 0: output 0 and LSE -inf.
        out_g[..., q_start:q_end, :] = torch.where(row_sum > 0, acc / row_sum, 0.0).to(q.dtype)
        lse_g[..., q_start:q_end] = (row_max + torch.log(row_sum)).squeeze(-1)
    return out, lse


def tiled_backward(dout, q, k, v, out, lse, problem: Problem, block_q: int, block_k: int):
    """Gradients (dq, dk, dv) of the (B, H, N, D) problem from the saved out and lse."""
    batch, heads_q, seqlen_q, _ = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    tiles = _Tiles(problem, seqlen_q, seqlen_k, block_q, block_k)
    cdt = torch.promote_types(q.dtype, torch.float32)
    qg, dog = _grouped(q, heads_kv, cdt), _grouped(dout, heads_kv, cdt)  # (B, Hkv, G, Nq, D)
    kf, vf = k.to(cdt).unsqueeze(2), v.to(cdt).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1).reshape(batch, heads_kv, heads_q // heads_kv, seqlen_q, 1)
    # Rows with LSE -inf saw no key: shift them by +inf so that every P entry is exactly 0.
    lse_g = torch.where(lse == -math.inf, math.inf, lse.to(cdt)).reshape(batch, heads_kv, heads_q // heads_kv, seqlen_q, 1)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(batch, heads_kv, seqlen_k, k.shape[-1], dtype=cdt, device=q.device)
    dv = torch.zeros(batch, heads_kv, seqlen_k, v.shape[-1], dtype=cdt, device=q.device)
    for q_start, q_end in tiles.query_blocks():
        rows = slice(q_start, q_end)
        qb, dob = qg[..., rows, :], dog[..., rows, :]
        for k_start, k_end in tiles.key_blocks(q_start, q_end):
            cols = slice(k_start, k_end)
            s, t = tiles.scores(qb, kf[..., cols, :], q_start, q_end, k_start, k_end)
            p = torch.exp(s - lse_g[..., rows, :])  # (B, Hkv, G, bq, bk)
            dv[..., cols, :] += (p.transpose(-1, -2) @ dob).sum(2)
            ds = p * (dob @ vf[..., cols, :].transpose(-1, -2) - delta[..., rows, :])
            if t is not None:
                ds = ds * (1 - t * t)  # d(c * tanh(s / c)) / ds
            dq[..., rows, :] += (ds @ kf[..., cols, :]) * problem.scale
            dk[..., cols, :] += (ds.transpose(-1, -2) @ qb).sum(2) * problem.scale
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TiledBackend(Backend):
    name = "tiled"
    support = SUPPORT
    description = "FlashAttention's tiled online softmax in plain PyTorch: O(N) memory, any device"

    def __init__(self, block_q: int | None = None, block_k: int | None = None):
        self.block_q, self.block_k = block_q, block_k  # fixed sizes, for tests; None: from the device

    def _blocks(self, problem: Problem, device) -> tuple[int, int]:
        block_q, block_k = block_sizes(problem, capabilities(device))
        return self.block_q or block_q, self.block_k or block_k

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        block_q, block_k = self._blocks(problem, q.device)
        if not problem.varlen:
            layout = problem.layout
            out, lse = tiled_forward(*(to_bhsd(t, layout) for t in (q, k, v)), problem, block_q, block_k)
            return from_bhsd(out, layout), lse
        outs, lses = [], []
        for _, sq, sk in sequences(cu_seqlens_q, cu_seqlens_k):
            out, lse = tiled_forward(*(packed_to_bhsd(t) for t in (q[sq], k[sk], v[sk])), problem, block_q, block_k)
            outs.append(bhsd_to_packed(out))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        block_q, block_k = self._blocks(problem, q.device)
        if not problem.varlen:
            layout = problem.layout
            views = (to_bhsd(t, layout) for t in (dout, q, k, v, out))
            return tuple(from_bhsd(g, layout) for g in tiled_backward(*views, lse, problem, block_q, block_k))
        grads = []
        for _, sq, sk in sequences(cu_seqlens_q, cu_seqlens_k):
            views = (packed_to_bhsd(t) for t in (dout[sq], q[sq], k[sk], v[sk], out[sq]))
            grads.append(tiled_backward(*views, lse[:, sq].unsqueeze(0), problem, block_q, block_k))
        return tuple(torch.cat([bhsd_to_packed(g[i]) for g in grads]) for i in range(3))
