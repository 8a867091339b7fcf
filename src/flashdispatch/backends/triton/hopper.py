"""The forward pass for Hopper (sm90) in Gluon, Triton's lower-level language: a warp-specialized
FlashAttention-3-style kernel. One producer warp issues TMA loads into rings of shared-memory
buffers; two consumer warpgroups (64 query rows each) issue asynchronous wgmma and run the softmax
of one key block on the CUDA cores while the tensor cores multiply the previous block's P by V
(FlashAttention-3's intra-warpgroup overlap). `tl.dot` cannot express that overlap: Triton waits
for every wgmma before the next instruction that reads its result, so the plain kernel's softmax
and matmuls serialise.

Scope: dense batches (no cu_seqlens), no window, no softcap, float16/bfloat16, head dim 64 or 128,
causal or not. Anything else runs the portable kernel in `kernels.py`. Masks are bottom-right
aligned as everywhere in the library; key blocks wholly visible to a row block skip the mask.

Q, K and V go through (B, H, N, D) tensor descriptors of (1, 1, rows, D) blocks, so any strides
with a unit dim stride and 16-byte alignment work, and rows past a sequence read as zeros.

Consumers, per key block j (buffers handed back to the producer as soon as their wgmma is done):

    S_j = Q K_j^T                issued, not waited for
    O  += P_{j-1} V_{j-1}         issued, not waited for
    wait for S_j                  (O's product still running); K_j's buffer is free
    P_j, new max and sum from S_j on the CUDA cores
    wait for O; V_{j-1}'s buffer is free; O *= exp2(old max - new max)
"""

from __future__ import annotations

import logging

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
NUM_WARPS = 4  # the first consumer warpgroup; the second and the producer warp are worker partitions
MAX_REGISTERS = 168  # per thread, over 12 warps: 64K registers, rebalanced to the consumers
HEAD_DIMS = (64, 128)

log = logging.getLogger("flashdispatch")
# Why the kernel stopped being used in this process (it failed to compile or launch: Gluon is
# experimental and its API moves between Triton releases), or None.
_failure: str | None = None


@gluon.jit
def _lane_partials(x, IS_MAX: gl.constexpr):
    """max or sum of x (ROWS, BLOCK_N, in a wgmma accumulator layout) within each thread: (ROWS, 4),
    column c for the columns 8i + 2c + j that lane c of a row's quad holds, paired up in
    log2(BLOCK_N / 4) rounds of independent operations, where a plain reduction chains them one
    after another."""
    ROWS: gl.constexpr = x.shape[0]
    BLOCK_N: gl.constexpr = x.shape[1]
    x = x.reshape([ROWS, BLOCK_N // 8, 4, 2]).permute((0, 2, 1, 3)).reshape([ROWS, 4, BLOCK_N // 4])
    width: gl.constexpr = BLOCK_N // 4
    for _ in gl.static_range(width.bit_length() - 1):
        a, b = x.reshape([ROWS, 4, x.shape[2] // 2, 2]).split()
        x = gl.maximum(a, b) if IS_MAX else a + b
    return x.reshape([ROWS, 4])


@gluon.jit
def _row_reduce(x, IS_MAX: gl.constexpr, TREE: gl.constexpr, layout: gl.constexpr):
    """max or sum over each row of x (ROWS, BLOCK_N), in `layout`. TREE (x in a wgmma accumulator
    layout): each thread's columns first (`_lane_partials`), then the 4 lanes of a row combine
    theirs."""
    if TREE:
        x = _lane_partials(x, IS_MAX)
    return gl.convert_layout(gl.max(x, 1) if IS_MAX else gl.sum(x, 1), layout)


# 2^f on [-1/2, 1/2], relative error 7.5e-5: a cubic fitted for least maximum relative error
# (Lawson's iteration, float32 coefficients).
EXP2_C3 = gl.constexpr(0.05517132207751274)
EXP2_C2 = gl.constexpr(0.24261054396629333)
EXP2_C1 = gl.constexpr(0.6932609677314758)
EXP2_C0 = gl.constexpr(0.9999281167984009)
ROUNDING = gl.constexpr(12582912.0)  # 1.5 x 2^23: adding it rounds to an integer, kept in the low bits


@gluon.jit
def _exp2_on_fma(x):
    """2^x on the FMA and integer pipes, for x <= 127 (FlashAttention-4's trick for the MUFU
    bottleneck): x = j + f with j = round(x), 2^f by a cubic, j added to the exponent bits. Below
    -126 (and for NaN: Triton's maximum drops it) it is about 2^-126, not 0 (an exponent below that
    would wrap into the sign bit): 0 in e4m3, nothing beside a row sum of at least 2^P_SHIFT, and a
    row that sees no key is told by its max, not its sum (`_write_rows`)."""
    x = gl.maximum(x, -126.0)
    rounded = x + ROUNDING
    f = x - (rounded - ROUNDING)
    p = ((EXP2_C3 * f + EXP2_C2) * f + EXP2_C1) * f + EXP2_C0
    bits = p.to(gl.int32, bitcast=True) + (rounded.to(gl.int32, bitcast=True) << 23)
    return bits.to(gl.float32, bitcast=True)


@gluon.jit
def _exp2(x, FMA_SHARE: gl.constexpr):
    """2^x of x (ROWS, BLOCK_N) in a wgmma accumulator layout, with 1 / FMA_SHARE of the
    elements on the FMA pipe (`_exp2_on_fma`) and the rest on MUFU (FMA_SHARE 0: all on MUFU).
    The split is by register: a thread holds columns 16g + 8a + 2c + j (c = lane % 4); j = 1
    goes to the FMA pipe for a half, and j = a = 1 for a quarter."""
    gl.static_assert(FMA_SHARE == 0 or FMA_SHARE == 2 or FMA_SHARE == 4, "FMA_SHARE: 0, 2 or 4")
    if FMA_SHARE == 0:
        p = gl.exp2(x)
    else:
        ROWS: gl.constexpr = x.shape[0]
        BLOCK_N: gl.constexpr = x.shape[1]
        x = x.reshape([ROWS, BLOCK_N // 16, 2, 4, 2]).permute((0, 1, 3, 2, 4))  # (row, g, c, a, j)
        x_j0, x_j1 = x.split()
        if FMA_SHARE == 2:
            p_j1 = _exp2_on_fma(x_j1)
        else:
            x_a0, x_a1 = x_j1.split()
            p_j1 = gl.join(gl.exp2(x_a0), _exp2_on_fma(x_a1))
        p = gl.join(gl.exp2(x_j0), p_j1).permute((0, 1, 3, 2, 4)).reshape([ROWS, BLOCK_N])
    return p


@gluon.jit
def _softmax(s, row_max, row_sum, rows, n0, seqlen_k, shift, qk_scale,
             MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
             P_SHIFT: gl.constexpr, TREE: gl.constexpr, FMA_SHARE: gl.constexpr):
    """One key block of the online softmax in the log2 domain. s: raw scores (BLOCK_M, BLOCK_N).
    Returns P (unnormalised, float32, times 2^P_SHIFT: the FP8 kernel's headroom above e4m3's
    subnormals), the new running max and sum, and the factor for the output accumulated so far.
    TREE: row reductions as trees (`_row_reduce`). FMA_SHARE: see `_exp2`."""
    if MASKED:
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(cols, 0) < seqlen_k
        if CAUSAL:
            visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + shift)
        s = gl.where(visible, s, float("-inf"))
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    new_max = gl.maximum(row_max, _row_reduce(s, True, TREE, row_layout) * qk_scale)
    # A row that has seen no visible key yet keeps max -inf: shift it by 0 instead.
    base = gl.where(new_max == float("-inf"), 0.0, new_max)
    if P_SHIFT == 0.0:
        p = gl.exp2(s * qk_scale - gl.expand_dims(base, 1))
    else:
        p = _exp2(s * qk_scale - gl.expand_dims(base - P_SHIFT, 1), FMA_SHARE)
        p = gl.convert_layout(p, s_layout)
    alpha = gl.exp2(row_max - base)
    return p, new_max, row_sum * alpha + _row_reduce(p, False, TREE, row_layout), alpha


@gluon.jit
def _block_softmax(s, row_max, row_sum, rows, n0, full_end, seqlen_k, shift, qk_scale, CAUSAL: gl.constexpr,
                   BLOCK_N: gl.constexpr, s_layout: gl.constexpr, P_SHIFT: gl.constexpr, TREE: gl.constexpr,
                   FMA_SHARE: gl.constexpr):
    """`_softmax` of the key block at n0, masked only where it reaches keys from full_end on."""
    if n0 < full_end:
        p, row_max, row_sum, alpha = _softmax(s, row_max, row_sum, rows, n0, seqlen_k, shift, qk_scale, False,
                                              CAUSAL, BLOCK_N, s_layout, P_SHIFT, TREE, FMA_SHARE)
    else:
        p, row_max, row_sum, alpha = _softmax(s, row_max, row_sum, rows, n0, seqlen_k, shift, qk_scale, True,
                                              CAUSAL, BLOCK_N, s_layout, P_SHIFT, TREE, FMA_SHARE)
    return p, row_max, row_sum, alpha


@gluon.jit
def _write_rows(o, row_max, row_sum, out_scale, rows, row0, seqlen_q, Out, stride_om, Lse,
                P_SHIFT: gl.constexpr, HEAD_DIM: gl.constexpr, o_layout: gl.constexpr):
    """A consumer's rows of the output, o x out_scale / row_sum, and their LSE (the sums carry
    P's 2^P_SHIFT). Out and Lse point at this (batch, head). Rows that saw no key (row max -inf) give
    output 0 and LSE -inf."""
    seen = row_max != float("-inf")  # not row_sum > 0: `_exp2_on_fma` gives masked scores 2^-126, not 0
    if P_SHIFT == 0.0:
        lse = gl.where(seen, (row_max + gl.log2(gl.where(seen, row_sum, 1.0))) * LN2, float("-inf"))
    else:
        lse = gl.where(seen, (row_max + gl.log2(gl.where(seen, row_sum, 1.0)) - P_SHIFT) * LN2, float("-inf"))
    inv = gl.where(seen, out_scale / gl.where(seen, row_sum, 1.0), 0.0)
    o = o * gl.expand_dims(gl.convert_layout(inv, gl.SliceLayout(1, o_layout)), 1)
    gl.store(Lse + rows, lse, mask=rows < seqlen_q)

    # Stores in 16-byte vectors along the head dim.
    ROWS: gl.constexpr = o.shape[0]
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
    out = gl.convert_layout(o.to(Out.dtype.element_ty), out_layout)
    out_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_layout))
    out_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    ptrs = Out + gl.expand_dims(out_rows, 1) * stride_om + gl.expand_dims(out_cols, 0)
    gl.store(ptrs, out, mask=gl.expand_dims(out_rows < seqlen_q, 1))


@gluon.jit
def _key_blocks(m0, seqlen_q, seqlen_k, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Key blocks [0, num_blocks) are visible to some row of the block at m0; keys from full_end on
    need the mask."""
    shift = seqlen_k - seqlen_q
    end = seqlen_k
    full_end = seqlen_k
    if CAUSAL:
        end = gl.minimum(end, gl.minimum(m0 + BLOCK_M, seqlen_q) + shift)
        full_end = gl.minimum(full_end, m0 + 1 + shift)
    return gl.cdiv(gl.maximum(end, 0), BLOCK_N), gl.maximum(full_end, 0) // BLOCK_N * BLOCK_N


@gluon.jit
def _producer(buffers, scalars, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load warp: Q once, then K_i and V_i into their rings as both consumers hand buffers back."""
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turns = buffers
    b, h, h_kv, m0, seqlen_q, seqlen_k, qk_scale, Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh = \
        scalars
    num_blocks, full_end = _key_blocks(m0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    if num_blocks > 0:
        mbarrier.expect(q_ready, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m0, 0], q_ready, q_smem)
    for i in range(num_blocks):
        slot = i % STAGES
        # A barrier starts in phase 1 complete, so the first pass through the ring does not wait.
        phase = ((i // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, h_kv, i * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, h_kv, i * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _issue_turn(turns, event, ME: gl.constexpr):
    """Ping-pong between the consumers: wait until it is this warpgroup's turn to issue wgmma
    (event-th time); the other warpgroup's turn comes once this one has issued (`_pass_turn`). So
    one warpgroup's softmax runs while the other's matrix products occupy the tensor cores.
    Consumer 0 goes first: a barrier starts in phase 1 complete."""
    mbarrier.wait(turns.index(ME), (event & 1) ^ (1 - ME))


@gluon.jit
def _pass_turn(turns, ME: gl.constexpr):
    mbarrier.arrive(turns.index(1 - ME), count=1)


@gluon.jit
def _consumer(buffers, scalars, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ME: gl.constexpr):
    """Compute warpgroup ME (0 or 1): rows ME * 64 .. ME * 64 + 63 of the program's block. Scores,
    online softmax, P V, and the output."""
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turns = buffers
    b, h, h_kv, m0, seqlen_q, seqlen_k, qk_scale, Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh = \
        scalars
    ROWS: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = Out.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    num_blocks, full_end = _key_blocks(m0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    shift = seqlen_k - seqlen_q
    q = q_smem.reshape([BLOCK_M, HEAD_DIM]).slice(ME * ROWS, ROWS)
    rows = m0 + ME * ROWS + gl.arange(0, ROWS, layout=row_layout)
    row_max = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    row_sum = gl.zeros([ROWS], gl.float32, layout=row_layout)
    o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)

    if num_blocks > 0:
        # Block 0: scores and softmax, nothing to overlap with yet.
        mbarrier.wait(q_ready, 0)
        mbarrier.wait(k_ready.index(0), 0)
        _issue_turn(turns, 0, ME)
        s = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        _pass_turn(turns, ME)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, row_max, row_sum, alpha = _block_softmax(s, row_max, row_sum, rows, 0, full_end, seqlen_k, shift,
                                                    qk_scale, CAUSAL, BLOCK_N, s_layout, 0.0, False, 0)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for j in range(1, num_blocks):
            # S_j = Q K_j^T and O += P_{j-1} V_{j-1}, both in flight at once.
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            _issue_turn(turns, j, ME)
            s = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            o = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
            _pass_turn(turns, ME)
            s = warpgroup_mma_wait(1, deps=(s,))
            mbarrier.arrive(k_empty.index(slot), count=1)

            # Softmax of block j under the running P V product.
            n0 = j * BLOCK_N
            p, row_max, row_sum, alpha = _block_softmax(s, row_max, row_sum, rows, n0, full_end, seqlen_k, shift,
                                                        qk_scale, CAUSAL, BLOCK_N, s_layout, 0.0, False, 0)
            o, p_op = warpgroup_mma_wait(0, deps=(o, p_op))
            mbarrier.arrive(v_empty.index(prev), count=1)
            o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        # The last block's P V.
        last = num_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        _issue_turn(turns, num_blocks, ME)
        o = warpgroup_mma(p_op, v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        _pass_turn(turns, ME)
        o = warpgroup_mma_wait(0, deps=(o,))
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)

    _write_rows(o, row_max, row_sum, 1.0, rows, m0 + ME * ROWS, seqlen_q, Out + b * stride_ob + h * stride_oh,
                stride_om, Lse + b * stride_lb + h * stride_lh, 0.0, HEAD_DIM, o_layout)


@gluon.jit
def _first_consumer(buffers, scalars, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _consumer(buffers, scalars, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, 0)


@gluon.jit
def _second_consumer(buffers, scalars, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _consumer(buffers, scalars, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, 1)


@gluon.jit
def hopper_attention_forward(
    q_desc, k_desc, v_desc, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads, group, qk_scale,
    CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Grid: (query blocks, batch * query heads). Out (B, H, Nq, D) through its strides, Lse (B, H, Nq).
    Launched with 4 warps (the first consumer); the second consumer and the producer are worker
    partitions."""
    # Row blocks in reverse: with a causal mask the last ones see the most keys; longest first.
    m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
    b = gl.program_id(1) // heads
    h = gl.program_id(1) % heads
    h_kv = h // group

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers hand each buffer back
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)

    buffers = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turns)
    scalars = (b, h, h_kv, m0, seqlen_q, seqlen_k, qk_scale, Out, Lse, stride_ob, stride_oh, stride_om, stride_lb,
               stride_lh)
    gl.warp_specialize([
        (_first_consumer, (buffers, scalars, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
        (_second_consumer, (buffers, scalars, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
        (_producer, (buffers, scalars, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])


# Host side


def problem_reasons(problem) -> list[str]:
    """Why this forward does not take `problem` (empty: it does)."""
    reasons = [_failure] if _failure else []
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
    if problem.scale <= 0:
        reasons.append("positive scales only (the row max is taken before scaling)")
    return reasons


def _descriptor(t: torch.Tensor, strides: tuple[int, int, int, int], batch: int, heads: int, seqlen: int,
                head_dim: int, block_rows: int):
    """A (B, H, N, D) tensor descriptor over t, whose (batch, head, token, dim) strides are
    `strides`, in (1, 1, block_rows, D) blocks; None where TMA cannot address t (a non-unit dim
    stride, a base or stride not a multiple of 16 bytes, a broadcast (zero) stride)."""
    size = t.element_size()
    # The stride of a dimension of size 1 never moves the address: any aligned value will do.
    strides = [x if n > 1 else seqlen * head_dim for x, n in zip(strides, (batch, heads, seqlen, head_dim))]
    if strides[3] != 1 or t.data_ptr() % 16 or any(x <= 0 or x * size % 16 for x in strides[:3]):
        return None
    block = [1, 1, block_rows, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, [batch, heads, seqlen, head_dim], strides, block, layout)


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def forward(q, k, v, problem, strides, compile_only: bool = False):
    """(out, lse) of `problem`, or None where the tensors' strides rule TMA out. strides(t) gives a
    tensor's (batch, head, token, dim) strides in the problem's layout."""
    d, b = problem.head_dim, problem.batch
    descriptors = (_descriptor(q, strides(q), b, problem.heads_q, problem.seqlen_q, d, BLOCK_M),
                   _descriptor(k, strides(k), b, problem.heads_kv, problem.seqlen_k, d, BLOCK_N),
                   _descriptor(v, strides(v), b, problem.heads_kv, problem.seqlen_k, d, BLOCK_N))
    if None in descriptors:
        return None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, problem.heads_q, problem.seqlen_q), dtype=torch.float32, device=q.device)
    stride_ob, stride_oh, stride_om, _ = strides(out)
    grid = (triton.cdiv(problem.seqlen_q, BLOCK_M), b * problem.heads_q)
    kernel = hopper_attention_forward.warmup if compile_only else hopper_attention_forward[grid]
    extra = dict(grid=grid) if compile_only else {}
    try:
        kernel(*descriptors, out, lse, stride_ob, stride_oh, stride_om, lse.stride(0), lse.stride(1),
               problem.seqlen_q, problem.seqlen_k, problem.heads_q, problem.group_size, problem.scale * LOG2E,
               CAUSAL=problem.causal, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES,
               num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS, **extra)
    except Exception as exc:  # noqa: BLE001 - fall back to the portable kernel, say so once
        if compile_only:  # compiling ahead is best effort: the first real launch decides
            log.info("flashdispatch triton: compiling the Gluon kernel ahead failed (%s: %s)", type(exc).__name__, exc)
            return None
        global _failure
        _failure = f"the Gluon kernel failed in this process ({type(exc).__name__}: {exc})"[:300]
        log.warning("flashdispatch triton: %s; using the portable Triton kernel instead", _failure)
        return None
    return out, lse
