"""The forward pass for Hopper (sm90) in Gluon, Triton's lower-level language: TMA loads into a ring
of shared-memory stages, asynchronous wgmma, and the softmax of one key block running on the CUDA
cores while the tensor cores multiply the previous block's P by V (FlashAttention-3's
intra-warpgroup overlap). `tl.dot` cannot express that overlap: Triton waits for every wgmma
before the next instruction that reads its result, so the plain kernel's softmax and matmuls
serialise.

Scope: dense batches (no cu_seqlens), no window, no softcap, float16/bfloat16, head dim 64 or 128,
causal or not. Anything else runs the portable kernel in `kernels.py`. Masks are bottom-right
aligned as everywhere in the library; key blocks wholly visible to a row block skip the mask.

Each operand is addressed through a 2-D tensor-descriptor view of its tensor: row = token, and
(batch, head) pick a row offset or a column offset, whichever the tensor's strides allow (see
`tma_view`). Rows past a sequence in that view belong to the next head or batch; they are masked
(keys) or never stored (queries).

One program: BLOCK_M query rows (two warpgroups of 64 rows with 8 warps) of one (batch, head).
Per key block j (K and V in rings of STAGES buffers, refilled STAGES - 1 blocks ahead):

    S_j = Q K_j^T                issued, not waited for
    O  += P_{j-1} V_{j-1}         issued, not waited for
    wait for S_j                  (O's product still running)
    P_j, new max and sum from S_j on the CUDA cores
    wait for O; O *= exp2(old max - new max)
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
LN2 = gl.constexpr(0.6931471805599453)
BLOCK_M = 128
BLOCK_N = 128
STAGES = 2
NUM_WARPS = 8
HEAD_DIMS = (64, 128)


@gluon.jit
def _softmax(s, row_max, row_sum, rows, n0, seqlen_k, shift, qk_scale,
             MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """One key block of the online softmax in the log2 domain. s: raw scores (BLOCK_M, BLOCK_N).
    Returns P (unnormalised, float32), the new running max and sum, and the factor for the output
    accumulated so far."""
    if MASKED:
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(cols, 0) < seqlen_k
        if CAUSAL:
            visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + shift)
        s = gl.where(visible, s, float("-inf"))
    new_max = gl.maximum(row_max, gl.max(s, 1) * qk_scale)
    # A row that has seen no visible key yet keeps max -inf: shift it by 0 instead.
    base = gl.where(new_max == float("-inf"), 0.0, new_max)
    p = gl.exp2(s * qk_scale - gl.expand_dims(base, 1))
    alpha = gl.exp2(row_max - base)
    return p, new_max, row_sum * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _load_block(desc, ring, bars, block, row, col, pred, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA load of key (or value) block `block` into its ring buffer, if pred."""
    slot = block % STAGES
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row + block * BLOCK_N, col], bars.index(slot), ring.index(slot), pred=pred)


@gluon.jit
def hopper_attention_forward(
    q_desc, k_desc, v_desc, Out, Lse,
    q_row_b, q_row_h, q_col_h, k_row_b, k_row_h, k_col_h,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads, group, qk_scale,
    CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    # Row blocks in reverse: with a causal mask the last ones see the most keys; longest first.
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    h_kv = h // group
    m0 = pid_m * BLOCK_M
    q_row = b * q_row_b + h * q_row_h + m0
    q_col = h * q_col_h
    k_row = b * k_row_b + h_kv * k_row_h
    k_col = h_kv * k_col_h

    # Key blocks [0, num_blocks) are visible to some row; those from full_end on need the mask.
    shift = seqlen_k - seqlen_q
    end = seqlen_k
    full_end = seqlen_k
    if CAUSAL:
        end = gl.minimum(end, gl.minimum(m0 + BLOCK_M, seqlen_q) + shift)
        full_end = gl.minimum(full_end, m0 + 1 + shift)
    num_blocks = gl.cdiv(gl.maximum(end, 0), BLOCK_N)
    full_end = gl.maximum(full_end, 0) // BLOCK_N * BLOCK_N

    # Shared memory: Q once, K and V in rings of STAGES blocks, one barrier per buffer.
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    # Prologue: Q, key blocks 0 .. STAGES-1 and value blocks 0 .. STAGES-2.
    any_keys = num_blocks > 0
    mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=any_keys)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem, pred=any_keys)
    for i in gl.static_range(STAGES):
        _load_block(k_desc, k_smem, k_bars, i, k_row, k_col, i < num_blocks, BLOCK_N, STAGES)
    for i in gl.static_range(STAGES - 1):
        _load_block(v_desc, v_smem, v_bars, i, k_row, k_col, i < num_blocks, BLOCK_N, STAGES)

    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=row_layout)
    o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    if num_blocks > 0:
        # Block 0: scores and softmax, nothing to overlap with yet.
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        if full_end > 0:
            p, row_max, row_sum, alpha = _softmax(s, row_max, row_sum, rows, 0, seqlen_k, shift, qk_scale,
                                                  False, CAUSAL, BLOCK_N, s_layout)
        else:
            p, row_max, row_sum, alpha = _softmax(s, row_max, row_sum, rows, 0, seqlen_k, shift, qk_scale,
                                                  True, CAUSAL, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for j in range(1, num_blocks):
            # Every warp is done with K_{j-1} (S_{j-1} was waited for) and V_{j-2} (so was the O
            # product that read it): refill their buffers STAGES - 1 blocks ahead.
            gl.thread_barrier()
            ahead = j + STAGES - 1
            _load_block(k_desc, k_smem, k_bars, ahead, k_row, k_col, ahead < num_blocks, BLOCK_N, STAGES)
            _load_block(v_desc, v_smem, v_bars, ahead - 1, k_row, k_col, ahead - 1 < num_blocks, BLOCK_N, STAGES)

            # S_j = Q K_j^T and O += P_{j-1} V_{j-1}, both in flight at once.
            mbarrier.wait(k_bars.index(j % STAGES), (j // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            mbarrier.wait(v_bars.index((j - 1) % STAGES), ((j - 1) // STAGES) & 1)
            o = warpgroup_mma(p_op, v_smem.index((j - 1) % STAGES), o, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))

            # Softmax of block j under the running P V product.
            n0 = j * BLOCK_N
            if n0 < full_end:
                p, row_max, row_sum, alpha = _softmax(s, row_max, row_sum, rows, n0, seqlen_k, shift, qk_scale,
                                                      False, CAUSAL, BLOCK_N, s_layout)
            else:
                p, row_max, row_sum, alpha = _softmax(s, row_max, row_sum, rows, n0, seqlen_k, shift, qk_scale,
                                                      True, CAUSAL, BLOCK_N, s_layout)
            o, p_op = warpgroup_mma_wait(0, deps=(o, p_op))
            o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        # The last block's P V.
        last = num_blocks - 1
        mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
        o = warpgroup_mma(p_op, v_smem.index(last % STAGES), o, is_async=True)
        o = warpgroup_mma_wait(0, deps=(o,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    # Rows that saw no key (row_sum 0) give output 0 and LSE -inf.
    seen = row_sum > 0
    lse = gl.where(seen, (row_max + gl.log2(gl.where(seen, row_sum, 1.0))) * LN2, float("-inf"))
    inv = gl.where(seen, 1.0 / gl.where(seen, row_sum, 1.0), 0.0)
    o = o * gl.expand_dims(gl.convert_layout(inv, gl.SliceLayout(1, o_layout)), 1)
    gl.store(Lse + b * stride_lb + h * stride_lh + rows, lse, mask=rows < seqlen_q)

    # Stores in 16-byte vectors along the head dim.
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [num_warps, 1], [1, 0])
    out = gl.convert_layout(o.to(dtype), out_layout)
    out_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    out_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    ptrs = (Out + b * stride_ob + h * stride_oh + gl.expand_dims(out_rows, 1) * stride_om
            + gl.expand_dims(out_cols, 0))
    gl.store(ptrs, out, mask=gl.expand_dims(out_rows < seqlen_q, 1))


# Host side


def problem_reasons(problem) -> list[str]:
    """Why this forward does not take `problem` (empty: it does)."""
    reasons = []
    if problem.dtype not in (torch.float16, torch.bfloat16):
        reasons.append("float16 or bfloat16 only")
    if problem.head_dim != problem.head_dim_v or problem.head_dim not in HEAD_DIMS:
        reasons.append(f"head dims {' or '.join(map(str, HEAD_DIMS))} only (K and V alike)")
    if problem.varlen:
        reasons.append("no cu_seqlens")
    if problem.has_window:
        reasons.append("no sliding window")
    if problem.softcap:
        reasons.append("no softcap")
    return reasons


def _tma_view(t: torch.Tensor, strides: tuple[int, int, int, int], batch: int, heads: int, seqlen: int,
              head_dim: int, block_rows: int):
    """A 2-D (token rows, columns) tensor descriptor over t, whose (batch, head, token, dim) strides are
    `strides`, and the (row per batch, row per head, column per head) offsets that address it; None
    where TMA cannot: a non-unit dim stride, a misaligned base or row stride, or a head or batch
    stride that is neither whole rows nor a column offset within a row."""
    stride_b, stride_h, stride_n, stride_d = strides
    size = t.element_size()
    if stride_d != 1 or t.data_ptr() % 16 or stride_n * size % 16 or stride_n < head_dim:
        return None
    row_b = row_h = col_h = 0
    width = head_dim
    if heads > 1:
        if stride_h % stride_n == 0:
            row_h = stride_h // stride_n
        elif (heads - 1) * stride_h + head_dim <= stride_n:
            col_h, width = stride_h, (heads - 1) * stride_h + head_dim
        else:
            return None
    if batch > 1:
        if stride_b % stride_n:
            return None
        row_b = stride_b // stride_n
    rows = (batch - 1) * row_b + (heads - 1) * row_h + seqlen
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], _GL_DTYPES[t.dtype])
    descriptor = TensorDescriptor(t, [rows, width], [stride_n, 1], [block_rows, head_dim], layout)
    return descriptor, row_b, row_h, col_h


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def forward(q, k, v, problem, strides, compile_only: bool = False):
    """(out, lse) of `problem`, or None where the tensors' strides rule TMA out. strides(t) gives a
    tensor's (batch, head, token, dim) strides in the problem's layout."""
    d = problem.head_dim
    q_view = _tma_view(q, strides(q), problem.batch, problem.heads_q, problem.seqlen_q, d, BLOCK_M)
    k_view = _tma_view(k, strides(k), problem.batch, problem.heads_kv, problem.seqlen_k, d, BLOCK_N)
    v_view = _tma_view(v, strides(v), problem.batch, problem.heads_kv, problem.seqlen_k, d, BLOCK_N)
    if q_view is None or k_view is None or v_view is None:
        return None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((problem.batch, problem.heads_q, problem.seqlen_q), dtype=torch.float32, device=q.device)
    stride_ob, stride_oh, stride_om, _ = strides(out)
    grid = (triton.cdiv(problem.seqlen_q, BLOCK_M), problem.batch * problem.heads_q)
    kernel = hopper_attention_forward.warmup if compile_only else hopper_attention_forward[grid]
    extra = dict(grid=grid) if compile_only else {}
    kernel(q_view[0], k_view[0], v_view[0], out, lse, *q_view[1:], *k_view[1:],
           stride_ob, stride_oh, stride_om, lse.stride(0), lse.stride(1),
           problem.seqlen_q, problem.seqlen_k, problem.heads_q, problem.group_size, problem.scale * LOG2E,
           CAUSAL=problem.causal, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES,
           num_warps=NUM_WARPS, **extra)
    return out, lse
