"""Experiment (branch wip/fp8-two-tiles, not the shipped kernel): the Gluon FP8 forward (D = 128 by
default, --head-dim) with longer steps, each two score tiles (128 + 64 or 128 + 128 keys), beside
`hopper.py`'s 128-key steps, on pre-quantized e4m3 inputs with unit descales.

Why: at D = 256 the kernel ran 13-27 % faster with 128-key steps than with 64 (docs/notes/fp8.md,
evening session): the per-step work (O's rescale, the cross-lane reductions, barriers, waits) is
what a longer step saves, and FlashAttention-3 steps 224 keys at D = 128 in FP8. Triton's shapes
are powers of two, so 192 keys are two tiles; S takes 96 registers a thread, P is carried packed
(24, not 96: `_packed`, `_as_operand`, with the byte permute that keeps ptxas from serializing the
wgmma, C7513) and O 64, inside a consumer's 240.

A second variant (config suffix `:sum`) takes the row sums off the CUDA cores: P times a column
of ones on the tensor cores (a 64 x 8 accumulator beside O), in place of 64 FADDs a thread per 128
keys. The sum is then of the e4m3 P that P V multiplies. The loop's SASS loses 102 FADDs and gains
6 QGMMA (n = 8), compiled here for sm_90a.

    PYTHONPATH=src:scripts python3 scripts/exp_fp8_two_tiles.py            # check + time (H100)
    PYTHONPATH=src python3 scripts/exp_fp8_two_tiles.py --compile-only     # sm_90a ptxas -v, no GPU

One line per case: `two-tiles: ...` (the output's relative error and the LSE's largest error
against float64, for each config and the shipped kernel; TFLOP/s of each and of cuDNN bf16)."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

from flashdispatch.backends.fp8_hopper import hopper
from flashdispatch.backends.fp8_hopper.hopper import (FREE_ID, LOG2E, MIN_SCALE, P_SHIFT, _descriptor, _named_arrive,
                                                      _named_sync)
from flashdispatch.backends.triton.hopper import _exp2, _key_blocks, _row_reduce, _write_rows

FMA_SHARE = 4
# keys of tile A : keys of tile B : pipeline stages [: "sum", the row sums on the tensor cores]
CONFIGS = "128:64:2,128:64:2:sum,128:64:3,128:128:2,128:128:2:sum"


class Config(NamedTuple):
    tile_a: int
    tile_b: int
    stages: int
    sum_mma: bool

    @classmethod
    def parse(cls, text: str) -> Config:
        fields = text.split(":")
        return cls(*(int(x) for x in fields[:3]), fields[3:] == ["sum"])

    def __str__(self) -> str:
        return f"{self.tile_a}+{self.tile_b} keys/{self.stages} stages" + (" sums on TC" if self.sum_mma else "")
FREE_THREADS = gl.constexpr(32 * (4 + 4 + 1))


@gluon.jit
def _producer(descs, smem, bars, coords, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, TILE_A: gl.constexpr,
              TILE_B: gl.constexpr, STAGES: gl.constexpr):
    """Q once, then per step K's two tiles and V^T's two tiles, as the consumers hand buffers back."""
    q_desc, ka_desc, kb_desc, va_desc, vb_desc = descs
    q_smem, ka_smem, kb_smem, va_smem, vb_smem, _ones_a, _ones_b = smem
    q_ready, k_ready, v_ready = bars
    b, h, h_kv, m0, seqlen_q, seqlen_k = coords
    BLOCK_N: gl.constexpr = TILE_A + TILE_B
    num_blocks, full_end = _key_blocks(m0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    if num_blocks > 0:
        mbarrier.expect(q_ready, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m0, 0], q_ready, q_smem)
    for i in range(num_blocks):
        slot = i % STAGES
        n0 = i * BLOCK_N
        if i >= STAGES:
            _named_sync(FREE_ID + slot, FREE_THREADS)
        mbarrier.expect(k_ready.index(slot), ka_desc.block_type.nbytes + kb_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(ka_desc, [b, h_kv, n0, 0], k_ready.index(slot), ka_smem.index(slot))
        tma.async_copy_global_to_shared(kb_desc, [b, h_kv, n0 + TILE_A, 0], k_ready.index(slot), kb_smem.index(slot))
        if i >= STAGES:
            _named_sync(FREE_ID + STAGES + slot, FREE_THREADS)
        mbarrier.expect(v_ready.index(slot), va_desc.block_type.nbytes + vb_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(va_desc, [b, h_kv, 0, n0], v_ready.index(slot), va_smem.index(slot))
        tma.async_copy_global_to_shared(vb_desc, [b, h_kv, 0, n0 + TILE_A], v_ready.index(slot), vb_smem.index(slot))
    for i in range(gl.maximum(num_blocks - STAGES, 0), num_blocks):
        _named_sync(FREE_ID + i % STAGES, FREE_THREADS)
        _named_sync(FREE_ID + STAGES + i % STAGES, FREE_THREADS)


@gluon.jit
def _packed(p, ROWS: gl.constexpr, KEYS: gl.constexpr):
    """P (ROWS, KEYS) float32 in the scores' accumulator layout as e4m3, 4 keys an int32 (ROWS,
    KEYS // 4): the registers of P V's A operand (key 8a + 2c + j as byte 2a + j, as
    `hopper._as_operand` takes them), nothing moved between threads."""
    x = p.reshape([ROWS, KEYS // 16, 2, 4, 2]).permute((0, 1, 3, 2, 4))  # (row, g, c, a, j)
    x_j0, x_j1 = x.split()
    b0, b2 = x_j0.split()
    b1, b3 = x_j1.split()
    packed = gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [b0, b1, b2, b3], dtype=gl.int32, is_pure=True, pack=1)
    return packed.reshape([ROWS, KEYS // 4])


@gluon.jit
def _as_operand(packed, identity, ROWS: gl.constexpr, KEYS: gl.constexpr, p_layout: gl.constexpr):
    """`_packed`'s registers as the e4m3 (ROWS, KEYS) A operand in `p_layout`, through a byte
    permute by `identity` (0x3210, a kernel argument) that ptxas cannot drop: fed straight from
    loop-carried registers, ptxas serializes the wgmma (C7513)."""
    x = packed.reshape([ROWS, KEYS // 16, 4])
    x = gl.join(gl.join(x, x), gl.join(x, x)).reshape([ROWS, KEYS])
    x = gl.convert_layout(x, p_layout)
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, $5;", "=r,r,r,r,r,r,r,r,r", [x, identity],
                                     dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _masked(s, n0, rows, seqlen_k, shift, CAUSAL: gl.constexpr, KEYS: gl.constexpr, s_layout: gl.constexpr):
    cols = n0 + gl.arange(0, KEYS, layout=gl.SliceLayout(0, s_layout))
    visible = gl.expand_dims(cols, 0) < seqlen_k
    if CAUSAL:
        visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + shift)
    return gl.where(visible, s, float("-inf"))


@gluon.jit
def _softmax(s_a, s_b, row_max, row_sum, rows, n0, full_end, seqlen_k, shift, qk_scale, CAUSAL: gl.constexpr,
             TILE_A: gl.constexpr, TILE_B: gl.constexpr, a_layout: gl.constexpr, b_layout: gl.constexpr,
             FMA_SHARE: gl.constexpr, SUM_MMA: gl.constexpr):
    """One 192-key step of the online softmax over its two tiles: P_a, P_b (float32, x 2^P_SHIFT),
    the new running max and sum, and O's factor. SUM_MMA: the row sum is left to the tensor cores
    (row_sum comes back unchanged)."""
    a_rows: gl.constexpr = gl.SliceLayout(1, a_layout)
    b_rows: gl.constexpr = gl.SliceLayout(1, b_layout)
    if n0 + TILE_A + TILE_B > full_end:
        s_a = _masked(s_a, n0, rows, seqlen_k, shift, CAUSAL, TILE_A, a_layout)
        s_b = _masked(s_b, n0 + TILE_A, gl.convert_layout(rows, b_rows), seqlen_k, shift, CAUSAL, TILE_B, b_layout)
    step_max = gl.maximum(_row_reduce(s_a, True, True, a_rows),
                          gl.convert_layout(_row_reduce(s_b, True, True, b_rows), a_rows))
    new_max = gl.maximum(row_max, step_max * qk_scale)
    base = gl.where(new_max == float("-inf"), 0.0, new_max) - P_SHIFT
    p_a = gl.convert_layout(_exp2(s_a * qk_scale - gl.expand_dims(base, 1), FMA_SHARE), a_layout)
    p_b = gl.convert_layout(_exp2(s_b * qk_scale - gl.expand_dims(gl.convert_layout(base, b_rows), 1), FMA_SHARE),
                            b_layout)
    alpha = gl.exp2(row_max - (base + P_SHIFT))
    if not SUM_MMA:
        row_sum = row_sum * alpha + _row_reduce(p_a, False, True, a_rows) + gl.convert_layout(
            _row_reduce(p_b, False, True, b_rows), a_rows)
    return p_a, p_b, new_max, row_sum, alpha


@gluon.jit
def _row_sums(l, pk_a, pk_b, ones_a, ones_b, identity, ROWS: gl.constexpr, TILE_A: gl.constexpr,
              TILE_B: gl.constexpr, lp_layout: gl.constexpr):
    """SUM_MMA: the step's P (packed) times columns of ones, into l (ROWS, 8): each column of l
    accumulates the row sums of the e4m3 P that P V multiplies, on the tensor cores instead of
    64 FADDs a thread a step."""
    l = warpgroup_mma(_as_operand(pk_a, identity, ROWS, TILE_A, lp_layout), ones_a.permute((1, 0)), l, is_async=True)
    return warpgroup_mma(_as_operand(pk_b, identity, ROWS, TILE_B, lp_layout), ones_b.permute((1, 0)), l,
                         is_async=True)


@gluon.jit
def _consumer(descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_M: gl.constexpr, TILE_A: gl.constexpr, TILE_B: gl.constexpr, STAGES: gl.constexpr,
              FMA_SHARE: gl.constexpr, SUM_MMA: gl.constexpr, ME: gl.constexpr):
    q_smem, ka_smem, kb_smem, va_smem, vb_smem, ones_a, ones_b = smem
    q_ready, k_ready, v_ready = bars
    b, h, h_kv, m0, seqlen_q, seqlen_k = coords
    Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh = outputs
    ROWS: gl.constexpr = BLOCK_M // 2
    BLOCK_N: gl.constexpr = TILE_A + TILE_B
    a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, TILE_A, 32])
    b_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, TILE_B, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 32])
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    lp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=4)
    a_rows: gl.constexpr = gl.SliceLayout(1, a_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_rows: gl.constexpr = gl.SliceLayout(1, l_layout)
    PENDING: gl.constexpr = 4 if SUM_MMA else 2  # P V's wgmma (and the row sums') left in flight under the softmax

    num_blocks, full_end = _key_blocks(m0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    shift = seqlen_k - seqlen_q
    q = q_smem.reshape([BLOCK_M, HEAD_DIM]).slice(ME * ROWS, ROWS)
    rows = m0 + ME * ROWS + gl.arange(0, ROWS, layout=a_rows)
    row_max = gl.full([ROWS], float("-inf"), gl.float32, layout=a_rows)
    row_sum = gl.zeros([ROWS], gl.float32, layout=a_rows)
    o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    l = gl.zeros([ROWS, 8], gl.float32, layout=l_layout)
    zero_a = gl.zeros([ROWS, TILE_A], gl.float32, layout=a_layout)
    zero_b = gl.zeros([ROWS, TILE_B], gl.float32, layout=b_layout)

    if num_blocks > 0:
        mbarrier.wait(q_ready, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s_a = warpgroup_mma(q, ka_smem.index(0).reshape([TILE_A, HEAD_DIM]).permute((1, 0)), zero_a,
                            use_acc=False, is_async=True)
        s_b = warpgroup_mma(q, kb_smem.index(0).reshape([TILE_B, HEAD_DIM]).permute((1, 0)), zero_b,
                            use_acc=False, is_async=True)
        s_a, s_b = warpgroup_mma_wait(0, deps=(s_a, s_b))
        _named_arrive(FREE_ID, FREE_THREADS)
        p_a, p_b, row_max, row_sum, alpha = _softmax(s_a, s_b, row_max, row_sum, rows, 0, full_end, seqlen_k, shift,
                                                     qk_scale, CAUSAL, TILE_A, TILE_B, a_layout, b_layout, FMA_SHARE,
                                                     SUM_MMA)
        pk_a = _packed(p_a, ROWS, TILE_A)
        pk_b = _packed(p_b, ROWS, TILE_B)

        for j in range(1, num_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            op_a = _as_operand(pk_a, identity, ROWS, TILE_A, p_layout)
            op_b = _as_operand(pk_b, identity, ROWS, TILE_B, p_layout)
            s_a = warpgroup_mma(q, ka_smem.index(slot).reshape([TILE_A, HEAD_DIM]).permute((1, 0)), zero_a,
                                use_acc=False, is_async=True)
            s_b = warpgroup_mma(q, kb_smem.index(slot).reshape([TILE_B, HEAD_DIM]).permute((1, 0)), zero_b,
                                use_acc=False, is_async=True)
            o = warpgroup_mma(op_a, va_smem.index(prev).reshape([HEAD_DIM, TILE_A]).permute((1, 0)), o, is_async=True)
            o = warpgroup_mma(op_b, vb_smem.index(prev).reshape([HEAD_DIM, TILE_B]).permute((1, 0)), o, is_async=True)
            if SUM_MMA:
                l = _row_sums(l, pk_a, pk_b, ones_a, ones_b, identity, ROWS, TILE_A, TILE_B, lp_layout)
            s_a, s_b = warpgroup_mma_wait(PENDING, deps=(s_a, s_b))
            _named_arrive(FREE_ID + slot, FREE_THREADS)
            p_a, p_b, row_max, row_sum, alpha = _softmax(s_a, s_b, row_max, row_sum, rows, j * BLOCK_N, full_end,
                                                         seqlen_k, shift, qk_scale, CAUSAL, TILE_A, TILE_B, a_layout,
                                                         b_layout, FMA_SHARE, SUM_MMA)
            pk_a = _packed(p_a, ROWS, TILE_A)
            pk_b = _packed(p_b, ROWS, TILE_B)
            if SUM_MMA:
                o, l = warpgroup_mma_wait(0, deps=(o, l))
                l = l * gl.expand_dims(gl.convert_layout(alpha, l_rows), 1)
            else:
                o = warpgroup_mma_wait(0, deps=(o,))
            _named_arrive(FREE_ID + STAGES + prev, FREE_THREADS)
            o = o * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)

        last = num_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        op_a = _as_operand(pk_a, identity, ROWS, TILE_A, p_layout)
        op_b = _as_operand(pk_b, identity, ROWS, TILE_B, p_layout)
        o = warpgroup_mma(op_a, va_smem.index(last % STAGES).reshape([HEAD_DIM, TILE_A]).permute((1, 0)), o,
                          is_async=True)
        o = warpgroup_mma(op_b, vb_smem.index(last % STAGES).reshape([HEAD_DIM, TILE_B]).permute((1, 0)), o,
                          is_async=True)
        if SUM_MMA:
            l = _row_sums(l, pk_a, pk_b, ones_a, ones_b, identity, ROWS, TILE_A, TILE_B, lp_layout)
            o, l = warpgroup_mma_wait(0, deps=(o, l))
            row_sum = gl.convert_layout(gl.max(l, 1), a_rows)  # the 8 columns are equal
        else:
            o = warpgroup_mma_wait(0, deps=(o,))
        _named_arrive(FREE_ID + STAGES + last % STAGES, FREE_THREADS)

    _write_rows(o, row_max, row_sum, 1.0, rows, m0 + ME * ROWS, seqlen_q, Out + b * stride_ob + h * stride_oh,
                stride_om, Lse + b * stride_lb + h * stride_lh, P_SHIFT, HEAD_DIM, o_layout)


@gluon.jit
def _first(descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
           BLOCK_M: gl.constexpr, TILE_A: gl.constexpr, TILE_B: gl.constexpr, STAGES: gl.constexpr,
           FMA_SHARE: gl.constexpr, SUM_MMA: gl.constexpr):
    _consumer(descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL, HEAD_DIM, BLOCK_M, TILE_A, TILE_B,
              STAGES, FMA_SHARE, SUM_MMA, 0)


@gluon.jit
def _second(descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
            BLOCK_M: gl.constexpr, TILE_A: gl.constexpr, TILE_B: gl.constexpr, STAGES: gl.constexpr,
            FMA_SHARE: gl.constexpr, SUM_MMA: gl.constexpr):
    _consumer(descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL, HEAD_DIM, BLOCK_M, TILE_A, TILE_B,
              STAGES, FMA_SHARE, SUM_MMA, 1)


@gluon.jit
def two_tile_forward(q_desc, ka_desc, kb_desc, va_desc, vb_desc, Out, Lse,
                     stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                     seqlen_q, seqlen_k, heads, group, qk_scale, identity,
                     CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, TILE_A: gl.constexpr,
                     TILE_B: gl.constexpr, STAGES: gl.constexpr, FMA_SHARE: gl.constexpr, SUM_MMA: gl.constexpr):
    """Grid (query blocks, batch * query heads). qk_scale: scale x log2(e) x the descales' product."""
    m_block = gl.num_programs(0) - 1 - gl.program_id(0)
    m0 = m_block * BLOCK_M
    b = gl.program_id(1) // heads
    h = gl.program_id(1) % heads
    h_kv = h // group
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    ka_smem = gl.allocate_shared_memory(ka_desc.dtype, [STAGES] + ka_desc.block_type.shape, ka_desc.layout)
    kb_smem = gl.allocate_shared_memory(kb_desc.dtype, [STAGES] + kb_desc.block_type.shape, kb_desc.layout)
    va_smem = gl.allocate_shared_memory(va_desc.dtype, [STAGES] + va_desc.block_type.shape, va_desc.layout)
    vb_smem = gl.allocate_shared_memory(vb_desc.dtype, [STAGES] + vb_desc.block_type.shape, vb_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # SUM_MMA: the B operands of the row sums, columns of ones, written before the partitions start.
    ones_a = gl.allocate_shared_memory(gl.float8e4nv, [8, TILE_A], gl.NVMMASharedLayout.get_default_for([8, TILE_A],
                                                                                                      gl.float8e4nv))
    ones_b = gl.allocate_shared_memory(gl.float8e4nv, [8, TILE_B], gl.NVMMASharedLayout.get_default_for([8, TILE_B],
                                                                                                      gl.float8e4nv))
    if SUM_MMA:
        ones_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [1, 4], [1, 0])
        ones_a.store(gl.full([8, TILE_A], 1.0, gl.float32, layout=ones_layout).to(gl.float8e4nv))
        ones_b.store(gl.full([8, TILE_B], 1.0, gl.float32, layout=ones_layout).to(gl.float8e4nv))
        fence_async_shared()
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
    descs = (q_desc, ka_desc, kb_desc, va_desc, vb_desc)
    smem = (q_smem, ka_smem, kb_smem, va_smem, vb_smem, ones_a, ones_b)
    bars = (q_ready, k_ready, v_ready)
    coords = (b, h, h_kv, m0, seqlen_q, seqlen_k)
    outputs = (Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh)
    gl.warp_specialize([
        (_first, (descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL, HEAD_DIM, BLOCK_M, TILE_A, TILE_B,
                  STAGES, FMA_SHARE, SUM_MMA)),
        (_second, (descs, smem, bars, coords, qk_scale, identity, outputs, CAUSAL, HEAD_DIM, BLOCK_M, TILE_A, TILE_B,
                   STAGES, FMA_SHARE, SUM_MMA)),
        (_producer, (descs, smem, bars, coords, CAUSAL, BLOCK_M, TILE_A, TILE_B, STAGES)),
    ], [4, 1], [240, 24])


def _descriptors(q8, k8, vt8, tile_a, tile_b):
    d = q8.shape[3]
    return (_descriptor(q8, [1, 1, hopper.BLOCK_M, d]), _descriptor(k8, [1, 1, tile_a, d]),
            _descriptor(k8, [1, 1, tile_b, d]), _descriptor(vt8, [1, 1, d, tile_a]),
            _descriptor(vt8, [1, 1, d, tile_b]))


def forward(q8, k8, vt8, scale, causal, config):
    """(out, lse): q8 (B, Hq, Nq, D), k8 (B, Hkv, Nk, D), vt8 (B, Hkv, D, N_pad) in the Hopper
    kernel's key order (`rearrange_v`), unit descales; config: a `Config`."""
    tile_a, tile_b, stages, sum_mma = config
    batch, heads, seqlen_q, d = q8.shape
    out = torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q8.device)
    grid = (triton.cdiv(seqlen_q, hopper.BLOCK_M), batch * heads)
    two_tile_forward[grid](*_descriptors(q8, k8, vt8, tile_a, tile_b), out, lse, *out.stride()[:3], *lse.stride()[:2],
                           seqlen_q, k8.shape[2], heads, heads // k8.shape[1], scale * LOG2E, 0x3210,
                           CAUSAL=causal, HEAD_DIM=d, BLOCK_M=hopper.BLOCK_M, TILE_A=tile_a, TILE_B=tile_b,
                           STAGES=stages, FMA_SHARE=FMA_SHARE, SUM_MMA=sum_mma, num_warps=4, maxnreg=hopper.MAX_REGISTERS)
    return out, lse


def compile_only(configs, d) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    fn = two_tile_forward
    for (tile_a, tile_b, stages, sum_mma), causal in ((c, causal) for c in configs for causal in (False, True)):
        q = torch.empty(2, 4, 1024, d, dtype=torch.float8_e4m3fn)
        vt = torch.empty(2, 4, d, 1024, dtype=torch.float8_e4m3fn)
        descs = dict(zip(("q_desc", "ka_desc", "kb_desc", "va_desc", "vb_desc"), _descriptors(q, q, vt, tile_a, tile_b)))
        constexprs = dict(CAUSAL=causal, HEAD_DIM=d, BLOCK_M=hopper.BLOCK_M, TILE_A=tile_a, TILE_B=tile_b,
                          STAGES=stages, FMA_SHARE=FMA_SHARE, SUM_MMA=sum_mma)
        types = {"Out": "*bf16", "Lse": "*fp32", "qk_scale": "fp32", **{n: mangle_type(x) for n, x in descs.items()}}
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
        src = GluonASTSource(fn=fn, signature=signature,
                             constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
        with tempfile.TemporaryDirectory() as tmp:
            open(f"{tmp}/k.ptx", "w").write(k.asm["ptx"])
            done = subprocess.run(["ptxas", "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                                  capture_output=True, text=True)
        notes = [line for line in done.stderr.splitlines() if "spill" in line or "Used" in line or "warning" in line]
        print(f"two-tiles compile: D={d} {Config(tile_a, tile_b, stages, sum_mma)}, causal={causal}: shared "
              f"{k.metadata.shared} B; " + "; ".join(notes), flush=True)


def check_and_time(configs, d) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from flashdispatch.backends.fp8_hopper.quantize import rearrange_v
    from flashdispatch.dispatcher.problem import build_problem
    from flashdispatch.timing import median_time

    # The baseline, "shipped", is main's kernel: one program per tile, row sums by FADD (this
    # branch's hopper.PERSISTENT and SUM_MMA are measured by scripts/sweep_fp8_gluon.py).
    hopper.PERSISTENT, hopper.SUM_MMA = (), ()
    fp8 = torch.float8_e4m3fn
    for b, h, n, causal in ((1, 4, 1000, False), (2, 4, 1337, True), (1, 2, 200, True)):  # ragged ends, causal
        q8, k8, v8 = (torch.randn(b, h, n, d, device="cuda").to(fp8) for _ in range(3))
        q, k, v = (t.double() for t in (q8, k8, v8))
        ref = scaled_dot_product_attention(q, k, v, is_causal=causal)
        scores = q @ k.transpose(2, 3) * d ** -0.5
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        lse_ref = scores.logsumexp(-1)
        ones = torch.ones(b, h, device="cuda")
        problem = build_problem(q8, k8, v8, causal=causal, descales=(ones, ones, ones))
        vt = rearrange_v(v8)
        errors = []
        runs = [(str(c), lambda c=c: forward(q8, k8, vt, d ** -0.5, causal, c)) for c in configs]
        runs.append(("shipped", lambda: hopper.forward(q8, k8, vt, (ones,) * 3, 1, torch.bfloat16, problem)))
        for name, run in runs:
            out, lse = (t.double() for t in run())
            errors.append(f"{name} rel err {((out - ref).norm() / ref.norm()).item():.2e} "
                          f"lse max err {(lse - lse_ref).abs().max().item():.1e} finite {torch.isfinite(out).all().item()}")
        print(f"two-tiles check: D={d} B={b} H={h} N={n} causal={causal}: " + ", ".join(errors), flush=True)
    for n in (4096, 16384):
        for causal in (False, True):
            b, h = 16384 // n, 2048 // d
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            q8, k8, v8 = (t.to(fp8) for t in (q, k, v))
            ones = torch.ones(b, h, device="cuda")
            problem = build_problem(q8, k8, v8, causal=causal, descales=(ones, ones, ones))
            vt = rearrange_v(v8)
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            rates = []
            runs = [(str(c), lambda c=c: forward(q8, k8, vt, d ** -0.5, causal, c))
                    for c in configs]
            runs.append(("shipped", lambda: hopper.forward(q8, k8, vt, (ones,) * 3, 1, torch.bfloat16, problem)))
            for name, run in runs:
                rates.append(f"{name} {flops / median_time(run, 'cuda', warm_seconds=0.2) / 1e12:.0f}")
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                seconds = median_time(lambda: scaled_dot_product_attention(q, k, v, is_causal=causal), "cuda",
                                      warm_seconds=0.2)
            rates.append(f"cudnn bf16 {flops / seconds / 1e12:.0f}")
            print(f"two-tiles speed: D={d} N={n} causal={causal}: " + ", ".join(rates) + " TFLOP/s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--configs", default=CONFIGS, help="tile A keys:tile B keys:stages[:sum], comma-separated")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    configs = [Config.parse(c) for c in args.configs.split(",")]
    (compile_only if args.compile_only else check_and_time)(configs, args.head_dim)
