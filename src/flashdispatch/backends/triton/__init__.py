"""`triton`: FlashAttention-2 forward and backward written in Triton, every feature of the API.

Forward: online softmax in float32 with the scale folded into exp2, bottom-right causal and
sliding windows that skip fully masked key blocks and do no mask arithmetic on fully visible ones,
softcap, GQA by addressing (K and V are never repeated), packed variable-length batches, both
layouts through strides. Decoding (at most 16 queries) packs the query heads of a GQA group into
one block, so each key is read once per group, and splits the keys across programs when the grid
would leave SMs idle; the splits are merged by their LSE.

Backward (FlashAttention-2): delta = rowsum(dO * O), then one kernel for dK/dV per key block (the
query heads of a group summed in the program, no atomics: deterministic) and one for dQ per query
block, both recomputing P from the saved LSE, so it accepts any forward backend's state.

float32 inputs are computed with IEEE float32 dots (not TF32): exact, and slow.
"""

from __future__ import annotations

import os

import torch

from ...dispatcher.capabilities import Capabilities, capabilities
from ...dispatcher.problem import Problem
from ...merge import merge_states
from ..base import Backend, Support

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    devices=("cuda", "cpu"),  # the CPU only under TRITON_INTERPRET=1 (tests)
    min_compute_capability=(8, 0),
    min_head_dim=16,
    max_head_dim=256,
    causal=True,
    window=True,
    softcap=True,
    gqa=True,
    varlen=True,
    backward=True,
    deterministic_backward=True,
)

DECODE_MAX_QUERIES = 16  # forward problems up to this many queries take the decoding path


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a tensor in `layout` (batch stride 0 when packed)."""
    if layout == "bhsd":
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    if layout == "bshd":
        return t.stride(0), t.stride(2), t.stride(1), t.stride(3)
    return 0, t.stride(1), t.stride(0), t.stride(2)  # packed (tokens, heads, dim)


def _lse_strides(problem: Problem) -> tuple[int, int]:
    """(batch, head) strides of the LSE: (B, Hq, Nq) dense, (Hq, total_q) packed."""
    if problem.varlen:
        return 0, problem.total_q
    return problem.heads_q * problem.seqlen_q, problem.seqlen_q


def _block(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def _tiles(problem: Problem, caps: Capabilities) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this problem on this device."""
    if _interpreting():
        return 64, 64, 4, 1  # the tests' sequences (up to 129) still span several blocks
    big = max(problem.head_dim, problem.head_dim_v) > 128
    if problem.dtype == torch.float32:
        return 32, 32, 4, 1
    if caps.compute_capability is not None and caps.compute_capability >= (9, 0):
        return (64, 64, 4, 2) if big else (128, 64, 8, 3)
    return (64, 64, 4, 2) if big else (128, 64, 4, 2)


class TritonBackend(Backend):
    name = "triton"
    support = SUPPORT
    description = "FlashAttention-2 in Triton: every feature, forward and deterministic backward"

    def unavailable_reasons(self) -> list[str]:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return [f"triton does not import: {type(exc).__name__}: {exc}"]
        return []

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        if problem.device_type == "cpu" and not _interpreting():
            return ["runs on the CPU only in Triton's interpreter (TRITON_INTERPRET=1), for tests"]
        if problem.device_type == "cpu" and problem.dtype == torch.bfloat16:
            return ["bfloat16 dots are wrong in Triton's CPU interpreter (3.4-3.9)"]
        return []

    # Forward

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        from . import kernels

        caps = capabilities(q.device)
        layout = problem.layout
        block_m, block_n, warps, stages = _tiles(problem, caps)
        decoding = problem.seqlen_q <= DECODE_MAX_QUERIES and not problem.varlen
        pack = decoding and problem.group_size > 1
        rows = problem.seqlen_q * (problem.group_size if pack else 1)
        if decoding:
            block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
        row_blocks = triton_cdiv(rows, block_m)
        programs = row_blocks * problem.batch * (problem.heads_kv if pack else problem.heads_q)
        splits = 1
        if decoding and not _interpreting():
            # Enough programs to fill every SM twice, each with at least four key blocks.
            splits = max(1, min(triton_cdiv(2 * (caps.sm_count or 1), programs), problem.seqlen_k // (4 * block_n)))
        keys_per_split = triton_cdiv(triton_cdiv(problem.seqlen_k, splits), block_n) * block_n
        splits = triton_cdiv(problem.seqlen_k, keys_per_split) if problem.seqlen_k else 1

        out_shape = q.shape[:-1] + (v.shape[-1],)
        lse_shape = (problem.heads_q, problem.total_q) if problem.varlen else (problem.batch, problem.heads_q, problem.seqlen_q)
        if splits == 1:
            out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
            lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
            out_strides = (0,) + _strides(out, layout)
            lse_strides = (0,) + _lse_strides(problem)
        else:
            # Partial results per split, (S, B, Hq, Nq, Dv) float32, merged by LSE below.
            out = torch.empty((splits, problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim_v),
                              dtype=torch.float32, device=q.device)
            lse = torch.empty((splits,) + lse_shape, dtype=torch.float32, device=q.device)
            out_strides = (out.stride(0),) + _strides(out[0], "bhsd")
            lse_strides = (lse.stride(0),) + _lse_strides(problem)
        dummy = q.new_empty(0, dtype=torch.int32)
        grid = (row_blocks, problem.batch * (problem.heads_kv if pack else problem.heads_q), splits)
        kernels.attention_forward[grid](
            q, k, v, out, lse,
            cu_seqlens_q if problem.varlen else dummy, cu_seqlens_k if problem.varlen else dummy,
            *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *out_strides, *lse_strides,
            problem.seqlen_q, problem.seqlen_k, problem.heads_kv, problem.group_size, keys_per_split,
            problem.scale, problem.softcap or 1.0, problem.window_left, problem.window_right,
            VARLEN=problem.varlen, PACK_GQA=pack, SOFTCAP=bool(problem.softcap), IEEE=q.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=problem.head_dim, HEAD_DIM_V=problem.head_dim_v,
            BLOCK_D=_block(problem.head_dim), BLOCK_DV=_block(problem.head_dim_v),
            num_warps=warps, num_stages=stages,
        )
        if splits == 1:
            return out, lse
        merged, merged_lse = merge_states(list(out), list(lse))
        merged = merged.to(q.dtype)
        return (merged if layout == "bhsd" else merged.transpose(1, 2)), merged_lse

    # Backward

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        from . import kernels

        caps = capabilities(q.device)
        layout = problem.layout
        block_m, block_n, warps, stages = _tiles(problem, caps)
        block_m = min(block_m, 64)  # the backward holds more tiles per program
        # delta = rowsum(dO * O) in the LSE's layout, float32.
        delta = (dout.float() * out.float()).sum(-1)
        if layout == "bshd":
            delta = delta.transpose(1, 2)
        elif layout == "varlen":
            delta = delta.transpose(0, 1)
        delta = delta.contiguous()
        lse = lse.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dummy = q.new_empty(0, dtype=torch.int32)
        cu_q = cu_seqlens_q if problem.varlen else dummy
        cu_k = cu_seqlens_k if problem.varlen else dummy
        common = dict(
            VARLEN=problem.varlen, SOFTCAP=bool(problem.softcap), IEEE=q.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=problem.head_dim, HEAD_DIM_V=problem.head_dim_v,
            BLOCK_D=_block(problem.head_dim), BLOCK_DV=_block(problem.head_dim_v), num_warps=warps,
            num_stages=stages,
        )
        scalars = (problem.seqlen_q, problem.seqlen_k, problem.heads_kv, problem.group_size,
                   problem.scale, problem.softcap or 1.0, problem.window_left, problem.window_right)
        tensors = (*_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout))
        kernels.attention_backward_dkdv[(triton_cdiv(problem.seqlen_k, block_n), problem.batch * problem.heads_kv)](
            q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *tensors,
            *_strides(dk, layout), *_strides(dv, layout), *_lse_strides(problem), *scalars, **common)
        kernels.attention_backward_dq[(triton_cdiv(problem.seqlen_q, block_m), problem.batch * problem.heads_q)](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k, *tensors,
            *_strides(dq, layout), *_lse_strides(problem), *scalars, **common)
        return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

