"""The FP8 attention forward for Hopper in Gluon: FlashAttention-3's warp-specialized loop with both
matmuls on e4m3 wgmma (QGMMA).

One producer warp issues TMA loads of Q, K_j and V_j^T into rings of shared-memory buffers; two
consumer warpgroups (64 query rows each) issue their matmuls freely (no ping-pong on the tensor
cores: measured faster here), and inside each the softmax of key block j runs on the CUDA cores
while the tensor cores multiply P_{j-1} by V_{j-1}. With FP8 the matmuls take half the time they
take in bf16, so the kernel is bound by the softmax: its exponentials and P's conversion to e4m3
share the special-function unit (MUFU). At D = 64 and 128 the consumers take turns at their
exponentials (`EXP_TURNS`), so that they do not queue at that unit together; at D = 256 a quarter
of the exponentials go to the FMA pipe instead. Also: row reductions as trees, P packed into the
wgmma's A registers without moving data between threads (below), buffers handed back through named
barriers. docs/notes/fp8.md has the measurements.

Operands. Q (B, Hq, Nq, D), K (B, Hkv, Nk, D) and V^T (B, Hkv, D, N_pad) in e4m3, through TMA
descriptors; FP8 wgmma reads both operands K-major, so V arrives transposed and V_j^T's (D,
BLOCK_N) tile is the B operand of P V as it lies, its keys in `quantize.permute_keys`'s order.
P goes from registers: 4 keys of a row to a register, rounded and packed by `_as_operand` (one
score tile a step) or by `_packed` and carried packed to the next step (two tiles: `_carried`).

Scales. q_descale per (batch, head, row block), k_descale and v_descale per (batch, KV head, key
block): block stride 0 for pre-quantized inputs' (B, Hkv) descales. Per key block j:

    S_j = (Q K_j^T) x q_descale x k_descale_j x scale x log2(e)          the softmax's one FFMA
    P_j = 2^8 exp2(S_j - running max), rounded to e4m3                   (`kernel.P_SHIFT`)
    O   = O x exp2(old max - new max) x v_descale_{j-1} / v_descale_j + P_j V_j

so O is kept in units of the current block's V descale; the last one multiplies it out at the
end, with no per-block accumulator. Masks are bottom-right aligned; key blocks wholly visible to
a row block skip the mask.

Scope: dense batches, head dim 64, 128 or 256, causal or not, GQA. The CPU interpreter runs
`kernel.py`.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton.hopper import _block_softmax, _exp2, _key_blocks, _lane_partials, _row_reduce, _write_rows

LOG2E = 1.4426950408889634
P_SHIFT = gl.constexpr(8.0)  # the same 2^8 as kernel.P_SHIFT: small probabilities stay normal in e4m3
BLOCK_M = 128  # also the quantization block of Q
# Keys a step, per head dim, without and with a causal mask, for pre-quantized K and V (one
# descale a head; `QUANTIZED_STEP_KEYS` below for K and V that the backend quantizes). A power of two is one score tile; a sum of two (192 = 128 + 64) two tiles (`step_tiles`):
# Triton's shapes are powers of two. Two tiles carry P packed (`_carried`). H100, 2026-12-06
# (`docs/data/fp8-sweep-pack192-*h100-2026-12-06{s,t}.log`), TFLOP/s at 4k, 4k causal, 16k, 16k
# causal, 128 against 192 keys: D = 128 836 / 703 / 895 / 845 against 850 / 691 / 922 / 887;
# D = 64 519 / 447 / 540 / 534 against 534 / 420 / 572 / 528. Causal keeps 128: its 4k loses.
# D = 256's 192-key loop spills (its O takes 128 registers a thread).
STEP_KEYS = {64: 192, 128: 192, 256: 128}
CAUSAL_STEP_KEYS = {64: 128, 128: 128, 256: 128}
# Keys a step without a causal mask where K and V come with a descale per key block, quantized by
# the backend in blocks of this many keys (with a causal mask: CAUSAL_STEP_KEYS). H100, 2026-12-06
# (`fp8-sweep-quantized-192-h100-2026-12-06aa.log`), the kernel alone, TFLOP/s at 4k, 16k, 128
# against 192 keys: D = 128 794 / 830 against 814 / 874; D = 64 509 / 529 against 508 / 539
# (causal 192 loses: D = 128 687 / 813 against 643 / 824). A 192-row quantization block runs as
# two tiles (128 + 64 rows, `quantize._row_tiles`); one padded tile of 256 rows had cost D = 128
# 240 / 200 us (rotated / transposed) against 165 / 129 at 128 rows (`...-06z.log`).
QUANTIZED_STEP_KEYS = {64: 128, 128: 192, 256: 128}
# With a causal mask and at least this many keys (per head dim; absent: never), steps take the
# keys they take without one. H100, 2026-12-06 (`fp8-sweep-causal-step-keys-h100-2026-12-06ac.log`,
# heads in groups of 4), causal TFLOP/s at 4k / 8k / 16k, 128 against 192 keys: D = 128 701 / 779 /
# 817 against 685 / 794 / 853; D = 64 458 / 513 / 542 against 428 / 495 / 534.
CAUSAL_LONG_KEYS = {128: 8192}
STAGES = 2
# Per head dim: the two consumers take turns at their exponentials (`_take_turn`), so that one's
# run on the special-function unit (MUFU) while the other's matmuls and row statistics run, where
# free-running they fall into step and wait on that unit at once. And 1 / FMA_SHARE of the
# exponentials on the FMA pipe instead (0: none; `_exp2` in ../triton/hopper.py). H100, 2026-12-06
# (`docs/data/fp8-sweep-exp-turns-h100-2026-12-06*.log`, TFLOP/s at 4k, 4k causal, 16k, 16k causal):
# D = 128 free with 1/4 on FMA 775 / 642 / 764 / 767, taking turns with none 811 / 676 / 825 / 811;
# D = 64 480 / 390 / 499 / 468 and 493 / 425 / 517 / 513; D = 256 loses with turns (1,148 against
# 1,084 at 16k), where the tensor cores, not MUFU, are the limit.
EXP_TURNS = {64: True, 128: True, 256: False}
FMA_SHARE = {64: 0, 128: 0, 256: 4}
# Per head dim: the row sums are kept per lane (`_lane_partials`) and the 4 lanes of a row add
# theirs once a tile, not every step: two rounds of shuffles fewer a step, which with EXP_TURNS a
# consumer's hand-over no longer waits for. H100, 2026-12-06, TFLOP/s at 4k, 4k causal, 16k, 16k
# causal, per step against per lane (`docs/data/fp8-sweep-lane-sums-persistent-h100-2026-12-06i.log`,
# `-d256-h100-2026-12-06o.log`): D = 128 828 / 680 / 852 / 781 against 850 / 691 / 882 / 818;
# D = 64 496 / 426 / 523 / 507 against 518 / 445 / 550 / 530; D = 256 1,121 / 889 / 1,206 / 1,172
# against 1,157 / 905 / 1,254 / 1,189.
LANE_SUMS = {64: True, 128: True, 256: True}
# Head dims with one program per SM, each taking tile after tile, not one program per tile (H100,
# 2026-12-06, D = 128 non-causal: 792 against 762 TFLOP/s at 4k keys, 825 against 823 at 16k).
# Not D = 256, whose loop spills with it (312 B at causal, sm_90a). Causal tiles differ in work:
# taken round-robin (program p: tiles p, p + SMs, ...) it piles up (4k keys, 2048 tiles: 288 key
# blocks for programs p = 0 mod 4, 240 for p = 3 mod 4), so they go in pairs (CAUSAL_PERSISTENT) or
# one program per tile, the hardware handing the next tile to whichever SM is free.
PERSISTENT = (64, 128)
# Causal tiles run persistent too where they see fewer keys than this (per head dim; absent:
# never), each program taking pairs of a head's row blocks r and last - r (`_paired_tile`): every
# pair sees about the same number of keys, so round-robin over pairs stays even, and a tile's loads
# overlap the last one's end. With more keys the last round of pairs leaves SMs idle longer than
# the hardware's own order does. H100, 2026-12-06 (`fp8-sweep-causal-pairs-h100-2026-12-06ae.log`),
# causal TFLOP/s at 4k / 8k / 16k, one program per tile against pairs: D = 128 703 / 791 / 841
# against 719 / 752 / 794; D = 64 461 / 500 / 530 against 468 / 495 / 516.
CAUSAL_PERSISTENT = {64: 8192, 128: 8192}
# Causal tiles go this many (batch, head) pairs at a time, row block by row block across them
# (`_tile`); 1: head by head, whose last wave holds the last heads' long tiles alone. A model of 4k
# causal (64 heads of 32 row blocks, 1 to 32 key blocks each, on 132 SMs that take the next tile
# as one finishes) put groups of 4 6 % shorter. H100, 2026-12-06 (`fp8-sweep-head-groups-h100-
# 2026-12-06aa.log`), D = 128 causal TFLOP/s at 4k, 8k, 16k for groups of 1, 2, 4, 8: 685 / 768 /
# 833, 689 / 799 / 833, 715 / 796 / 826, 711 / 797 / 825; D = 64 at 4k, 8k, 1 against 4: 441 /
# 496 against 451 / 503.
CAUSAL_HEAD_GROUP = 4
NUM_WARPS = 4  # the first consumer warpgroup; the second and the producer warp are worker partitions
MAX_REGISTERS = 168
# Scales are kept at or above float32's smallest normal number: a zero descale (FlashAttention-3's
# amax / 448 of an all-zero head) would make a masked score -inf x 0 = NaN, and a subnormal one
# is flushed to zero by the kernel's arithmetic.
MIN_SCALE = gl.constexpr(1.1754943508222875e-38)
HEAD_DIMS = (64, 128, 256)

log = logging.getLogger("flashdispatch")
# Why the kernel stopped being used in this process (it failed to compile or launch), or None.
_failure: str | None = None


# Buffers go back to the producer through hardware named barriers, not mbarriers: each consumer warp
# arrives on its own once its wgmma is done (bar.arrive does not block), and the producer's warp
# waits for all of them (bar.sync). Gluon's mbarrier.arrive is one thread's, behind a barrier over
# the whole warpgroup first, and 3 such barriers a key block kept the warps of a warpgroup in
# lockstep: ncu counted 2.4 of 7.55 cycles between a warp's instructions at them.
# Triton's own barriers use the low ids; K's slots take FREE_ID.., V's FREE_ID + STAGES...
FREE_ID = gl.constexpr(8)
FREE_THREADS = gl.constexpr(32 * (NUM_WARPS + 4 + 1))  # both consumer warpgroups and the producer warp
# Q's buffer goes back the same way, after a tile's last scores, through id FREE_ID + 2 * STAGES
# (`_q_free`; so STAGES is at most 3). With EXP_TURNS, consumer ME's turn at the exponentials is
# id TURN_ID + ME (so STAGES is at most 2 there).
TURN_ID = gl.constexpr(FREE_ID + 5)
TURN_THREADS = gl.constexpr(32 * (NUM_WARPS + 4))  # both consumer warpgroups


@gluon.jit
def _q_free(STAGES: gl.constexpr):
    return FREE_ID + 2 * STAGES


def step_tiles(keys: int) -> tuple[int, int]:
    """The score tiles of a step of `keys` keys: (the largest power of two in it, the rest), the rest
    0 or a smaller power of two. Each tile holds 32 keys or more: an e4m3 product's K is 32 (so 256
    is one tile of 256, not two of 128)."""
    first = 1 << (keys.bit_length() - 1)
    rest = keys - first
    if first < 32 or rest & (rest - 1) or 0 < rest < 32:
        raise ValueError(f"STEP_KEYS: {keys} keys are not one or two powers of two of 32 or more")
    return first, rest


@triton.constexpr_function
def _first_tile(keys):
    """`step_tiles(keys)[0]` inside kernels."""
    return 1 << (keys.bit_length() - 1)


@gluon.jit
def _named_arrive(barrier_id, threads):
    """This warp arrives at hardware named barrier `barrier_id` (int32) of `threads` threads, and
    goes on."""
    gl.inline_asm_elementwise("bar.arrive $1, $2; mov.u32 $0, 0;", "=r,r,r", [barrier_id, threads], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _named_sync(barrier_id, threads):
    """This warp arrives at named barrier `barrier_id` and waits until `threads` threads have."""
    gl.inline_asm_elementwise("bar.sync $1, $2; mov.u32 $0, 0;", "=r,r,r", [barrier_id, threads], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _turn_barrier(rows, barrier_id, SYNC: gl.constexpr):
    """bar.sync (SYNC) or bar.arrive at named barrier `barrier_id` of both consumer warpgroups,
    once a thread, ordered after the arithmetic that gives `rows` (a thread's two rows' values) and,
    for SYNC, before any that uses the result. Returns `rows` as they are.

    ptxas moves barriers across arithmetic, which has no dependency on them. So the id is
    computed from `rows` (min(id, bits | 0xFFFFFFF0) is id, which the ptxas of Triton 3.6 does not
    fold; the sm90 test checks the SASS), and after a bar.sync the result takes a zero made the same
    way from a shared-memory load at address 0 (which ptxas keeps below the barrier; the CTA's first
    1 KB, which nothing here writes)."""
    if SYNC:
        return gl.inline_asm_elementwise(
            "{ .reg .b32 id, z; or.b32 id, $2, $3; or.b32 id, id, 0xFFFFFFF0; min.u32 id, id, $4; "
            "bar.sync id, $6; and.b32 z, id, 0xFFFFFFF0; ld.shared.b32 z, [z]; or.b32 z, z, 0xFFFFFFF0; "
            "min.u32 z, z, $4; sub.u32 z, z, $4; add.u32 $0, $2, z; add.u32 $1, $3, z; }", "=r,=r,r,r,r,r,r,r",
            [rows, barrier_id, TURN_THREADS], dtype=gl.float32, is_pure=False, pack=2)
    else:
        return gl.inline_asm_elementwise(
            "{ .reg .b32 id; or.b32 id, $2, $3; or.b32 id, id, 0xFFFFFFF0; min.u32 id, id, $4; bar.arrive id, $6; } "
            "mov.b32 $0, $2; mov.b32 $1, $3;", "=r,=r,r,r,r,r,r,r", [rows, barrier_id, TURN_THREADS],
            dtype=gl.float32, is_pure=False, pack=2)


@gluon.jit
def _take_turn(base, n, ME: gl.constexpr):
    """Before consumer ME's exponentials of its n-th key step in this program, once its row
    maxima (`base`) are known: wait for the other consumer's to be done (consumer 0's first step
    goes first). Returns base."""
    if ME == 1 or n > 0:
        base = _turn_barrier(base, TURN_ID + ME, True)
    return base


@gluon.jit
def _pass_turn(row_sum, ME: gl.constexpr):
    """After consumer ME's exponentials, once its row sums (`row_sum`) are: the other consumer's
    turn (`_take_turn`). Returns row_sum."""
    return _turn_barrier(row_sum, TURN_ID + 1 - ME, False)


@gluon.jit
def _tile(t, geometry, BLOCK_M: gl.constexpr):
    """Tile t of the grid's: (b, h, h_kv, m_block). Tiles go HEAD_GROUP (batch, head) pairs at a
    time (the programs at work at once share their K and V in L2), within a group row block by row
    block across its pairs, last row block first (with a causal mask the last ones see the most
    keys: longest first). HEAD_GROUP 1: head by head."""
    seqlen_q, seqlen_k, heads, group, tiles, HEAD_GROUP = geometry
    m_blocks = gl.cdiv(seqlen_q, BLOCK_M)
    if HEAD_GROUP > 1:
        first = t // (HEAD_GROUP * m_blocks) * HEAD_GROUP  # the group's first (batch, head)
        size = gl.minimum(tiles // m_blocks - first, HEAD_GROUP)  # the last group may be smaller
        in_group = t - first * m_blocks
        bh = first + in_group % size
        from_last = in_group // size
    else:
        bh = t // m_blocks
        from_last = t % m_blocks
    h = bh % heads
    return bh // heads, h, h // group, m_blocks - 1 - from_last


@gluon.jit
def _paired_tile(k, geometry, BLOCK_M: gl.constexpr):
    """The k-th tile of this program's among persistent causal ones: (b, h, h_kv, m_block, valid).
    Program p takes pairs p, p + programs, ...; pair i holds row blocks r and m_blocks - 1 - r of
    one (batch, head), the longer first. valid: False for the second of a pair that is one row
    block (the middle one where m_blocks is odd)."""
    seqlen_q, seqlen_k, heads, group, tiles, _ = geometry
    m_blocks = gl.cdiv(seqlen_q, BLOCK_M)
    half = gl.cdiv(m_blocks, 2)
    pair = gl.program_id(0) + k // 2 * gl.num_programs(0)
    bh = pair // half
    r = pair % half
    m_block = gl.where(k % 2 == 0, m_blocks - 1 - r, r)
    h = bh % heads
    return bh // heads, h, h // group, m_block, (k % 2 == 0) | (r != m_blocks - 1 - r)


@gluon.jit
def _persistent_range(geometry, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr):
    """(start, stop, step) of a persistent program's tile numbers for `_persistent_tile`: every
    programs-th from program_id, or with a causal mask the k of `_paired_tile`."""
    seqlen_q, seqlen_k, heads, group, tiles, _ = geometry
    if CAUSAL:
        m_blocks = gl.cdiv(seqlen_q, BLOCK_M)
        pairs = tiles // m_blocks * gl.cdiv(m_blocks, 2)
        return 0, 2 * gl.cdiv(gl.maximum(pairs - gl.program_id(0), 0), gl.num_programs(0)), 1
    else:
        return gl.program_id(0), tiles, gl.num_programs(0)


@gluon.jit
def _persistent_tile(t, geometry, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr):
    """Tile number t of `_persistent_range`'s: (b, h, h_kv, m_block, valid) (`_tile`, or with a
    causal mask `_paired_tile`)."""
    if CAUSAL:
        b, h, h_kv, m_block, valid = _paired_tile(t, geometry, BLOCK_M)
    else:
        b, h, h_kv, m_block = _tile(t, geometry, BLOCK_M)
        valid = True
    return b, h, h_kv, m_block, valid


@gluon.jit
def _load_tile(tile, loads, queries, descs, smem, bars, geometry, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The producer's part of tile (b, h, h_kv, m_block): its Q, once the consumers are done with the previous tile's,
    then its K_i and V_i^T into their rings as the consumers hand buffers back. loads: key blocks
    loaded by this program so far (the n-th goes to ring slot n % STAGES); queries: tiles whose Q
    was loaded. Returns both, counting this tile's."""
    q_desc, k_desc, kb_desc, vt_desc, vtb_desc = descs
    q_smem, k_smem, kb_smem, vt_smem, vtb_smem = smem
    q_ready, k_ready, v_ready = bars
    seqlen_q, seqlen_k, heads, group, tiles, _ = geometry
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    K_BYTES: gl.constexpr = k_desc.block_type.nbytes + (kb_desc.block_type.nbytes if TILE_B > 0 else 0)
    V_BYTES: gl.constexpr = vt_desc.block_type.nbytes + (vtb_desc.block_type.nbytes if TILE_B > 0 else 0)
    b, h, h_kv, m_block = tile
    num_blocks, full_end = _key_blocks(m_block * BLOCK_M, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    if num_blocks > 0:
        if queries > 0:
            _named_sync(_q_free(STAGES), FREE_THREADS)
        mbarrier.expect(q_ready, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m_block * BLOCK_M, 0], q_ready, q_smem)
    for i in range(num_blocks):
        n = loads + i
        slot = n % STAGES
        if n >= STAGES:  # the first pass through the ring finds every buffer free
            _named_sync(FREE_ID + slot, FREE_THREADS)
        mbarrier.expect(k_ready.index(slot), K_BYTES)
        tma.async_copy_global_to_shared(k_desc, [b, h_kv, i * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
        if TILE_B > 0:
            tma.async_copy_global_to_shared(kb_desc, [b, h_kv, i * BLOCK_N + TILE_A, 0], k_ready.index(slot),
                                            kb_smem.index(slot))
        if n >= STAGES:
            _named_sync(FREE_ID + STAGES + slot, FREE_THREADS)
        mbarrier.expect(v_ready.index(slot), V_BYTES)
        tma.async_copy_global_to_shared(vt_desc, [b, h_kv, 0, i * BLOCK_N], v_ready.index(slot), vt_smem.index(slot))
        if TILE_B > 0:
            tma.async_copy_global_to_shared(vtb_desc, [b, h_kv, 0, i * BLOCK_N + TILE_A], v_ready.index(slot),
                                            vtb_smem.index(slot))
    return loads + num_blocks, queries + (num_blocks > 0).to(gl.int32)


@gluon.jit
def _producer(descs, smem, bars, geometry, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, PERSISTENT: gl.constexpr):
    """The load warp: the program's tile, or with PERSISTENT tile after tile (`_persistent_tile`),
    each by `_load_tile`."""
    if PERSISTENT:
        loads = 0
        queries = 0
        start, stop, step = _persistent_range(geometry, CAUSAL, BLOCK_M)
        for t in range(start, stop, step):
            b, h, h_kv, m_block, valid = _persistent_tile(t, geometry, CAUSAL, BLOCK_M)
            if valid:
                loads, queries = _load_tile((b, h, h_kv, m_block), loads, queries, descs, smem, bars, geometry,
                                            CAUSAL, BLOCK_M, BLOCK_N, STAGES)
    else:
        loads, queries = _load_tile(_tile(gl.program_id(0), geometry, BLOCK_M), 0, 0, descs, smem, bars, geometry,
                                    CAUSAL, BLOCK_M, BLOCK_N, STAGES)
    # Take the last hand-backs too, so that no named barrier is left part-way at exit.
    for n in range(gl.maximum(loads - STAGES, 0), loads):
        _named_sync(FREE_ID + n % STAGES, FREE_THREADS)
        _named_sync(FREE_ID + STAGES + n % STAGES, FREE_THREADS)
    if queries > 0:
        _named_sync(_q_free(STAGES), FREE_THREADS)


# Rounds 4 float32 keys of a row ($1..$4) to e4m3 and packs them into one 32-bit register ($0).
_E4M3X4 = gl.constexpr("{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
                        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }")


@gluon.jit
def _in_operand_order(p, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
    """P (ROWS, BLOCK_N) float32 in the scores' accumulator layout, its columns renamed into the A
    operand's order without moving data between threads. In each 16-key group a thread holds keys
    2c, 2c+1, 8+2c and 9+2c (c = lane % 4), where the A operand wants 4c .. 4c+3: key 8a + 2c + j
    is taken as operand column 4c + 2a + j (a register renaming), and V^T's columns come in that
    same order (`quantize.permute_keys`)."""
    p = p.reshape([ROWS, BLOCK_N // 16, 2, 4, 2]).permute((0, 1, 3, 2, 4)).reshape([ROWS, BLOCK_N])
    return gl.convert_layout(p, p_layout)


@gluon.jit
def _as_operand(p, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
    """P (ROWS, BLOCK_N) float32 as the e4m3 A operand of P V (`_in_operand_order`), each 4 keys of
    a row rounded and packed into one register."""
    p = _in_operand_order(p, ROWS, BLOCK_N, p_layout)
    return gl.inline_asm_elementwise(_E4M3X4, "=r,r,r,r,r", [p], dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _packed(p, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
    """P packed as `_as_operand` packs it, but as int32 (ROWS, BLOCK_N / 4), 4 keys a word: what a
    loop can carry, where e4m3 values would cross it as separate bytes (`_unpacked` undoes it)."""
    p = _in_operand_order(p, ROWS, BLOCK_N, p_layout)
    x_even, x_odd = p.reshape([ROWS, BLOCK_N // 4, 2, 2]).split()  # keys 4i and 4i + 2, 4i + 1 and 4i + 3
    x0, x2 = x_even.split()
    x1, x3 = x_odd.split()
    return gl.inline_asm_elementwise(_E4M3X4, "=r,r,r,r,r", [x0, x1, x2, x3], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _unpacked(x, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
    """`_packed`'s int32 (ROWS, BLOCK_N / 4) as the e4m3 A operand (ROWS, BLOCK_N) in p_layout: each
    word taken 4 times (the same register) and passed through as the 4 keys it holds."""
    x4 = gl.join(gl.join(x, x), gl.join(x, x)).reshape([ROWS, BLOCK_N])
    p = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [x4], dtype=gl.float8e4nv, is_pure=True, pack=4)
    return gl.convert_layout(p, p_layout)


@gluon.jit
def _carried(p_a, p_b, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
    """What the loop carries of a step's P to the next step's P V: float32 P (one tile: packed at
    use, by `_operands`), or P packed now (two tiles: carried in float32 the loop spills, which
    made 192-key steps 2.5x slower on an H100; packed, none)."""
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    if TILE_B > 0:
        p_a = _packed(p_a, ROWS, TILE_A, p_layout)
        p_b = _packed(p_b, ROWS, TILE_B, p_layout)
    return p_a, p_b


@triton.constexpr_function
def _accumulator_layout(columns):
    """A consumer warpgroup's wgmma accumulator layout for (64, columns) results."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 32])


@gluon.jit
def _scores(q, k_smem, kb_smem, slot, zero_a, zero_b, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """Issue S = Q K^T of the step in ring slot `slot`: tile A, and tile B where the step has one
    (else zero_b comes back as it is)."""
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    s_a = warpgroup_mma(q, k_smem.index(slot).reshape([TILE_A, HEAD_DIM]).permute((1, 0)), zero_a, use_acc=False,
                        is_async=True)
    s_b = zero_b
    if TILE_B > 0:
        s_b = warpgroup_mma(q, kb_smem.index(slot).reshape([TILE_B, HEAD_DIM]).permute((1, 0)), zero_b,
                            use_acc=False, is_async=True)
    return s_a, s_b


@gluon.jit
def _await_scores(s_a, s_b, PENDING: gl.constexpr, BLOCK_N: gl.constexpr):
    """The step's scores, once at most PENDING later products are still in flight."""
    if BLOCK_N - _first_tile(BLOCK_N) > 0:
        s_a, s_b = warpgroup_mma_wait(PENDING, deps=(s_a, s_b))
    else:
        s_a = warpgroup_mma_wait(PENDING, deps=(s_a,))
    return s_a, s_b


@gluon.jit
def _operands(carried_a, carried_b, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
    """The step's P, as `_carried` kept it, as the e4m3 A operands of P V: tile A's and, where it
    has one, B's."""
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    if TILE_B > 0:
        op_a = _unpacked(carried_a, ROWS, TILE_A, p_layout)
        op_b = _unpacked(carried_b, ROWS, TILE_B, p_layout)
    else:
        op_a = _as_operand(carried_a, ROWS, TILE_A, p_layout)
        op_b = op_a
    return op_a, op_b


@gluon.jit
def _products(o, op_a, op_b, vt_smem, vtb_smem, slot, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """Issue O += P V of the step in ring slot `slot`."""
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    o = warpgroup_mma(op_a, vt_smem.index(slot).reshape([HEAD_DIM, TILE_A]).permute((1, 0)), o, is_async=True)
    if TILE_B > 0:
        o = warpgroup_mma(op_b, vtb_smem.index(slot).reshape([HEAD_DIM, TILE_B]).permute((1, 0)), o, is_async=True)
    return o


@gluon.jit
def _masked(s, n0, rows, seqlen_k, shift, CAUSAL: gl.constexpr, layout: gl.constexpr):
    """s (ROWS, keys) of the keys from n0 on, -inf where a row does not see the key."""
    cols = n0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, layout))
    visible = gl.expand_dims(cols, 0) < seqlen_k
    if CAUSAL:
        visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(gl.convert_layout(rows, gl.SliceLayout(
            1, layout)), 1) + shift)
    return gl.where(visible, s, float("-inf"))


@gluon.jit
def _step_softmax(s_a, s_b, row_max, row_sum, rows, n0, full_end, seqlen_k, shift, qk_scale, n, CAUSAL: gl.constexpr,
                  BLOCK_N: gl.constexpr, a_layout: gl.constexpr, b_layout: gl.constexpr, FMA_SHARE: gl.constexpr,
                  EXP_TURNS: gl.constexpr, LANE_SUMS: gl.constexpr, ME: gl.constexpr):
    """The online softmax of the step at key n0 (`_block_softmax`, over both tiles where it has
    two): P_a, P_b (float32, x 2^P_SHIFT), the new running max and sum (LANE_SUMS: per lane,
    (ROWS, 4)), and O's factor. n: the step's count in this program (EXP_TURNS: `_take_turn`)."""
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    if TILE_B == 0 and not EXP_TURNS and not LANE_SUMS:
        p_a, row_max, row_sum, alpha = _block_softmax(s_a, row_max, row_sum, rows, n0, full_end, seqlen_k, shift,
                                                      qk_scale, CAUSAL, TILE_A, a_layout, P_SHIFT, True, FMA_SHARE)
        return p_a, s_b, row_max, row_sum, alpha
    a_rows: gl.constexpr = gl.SliceLayout(1, a_layout)
    b_rows: gl.constexpr = gl.SliceLayout(1, b_layout)
    if n0 + BLOCK_N > full_end:
        s_a = _masked(s_a, n0, rows, seqlen_k, shift, CAUSAL, a_layout)
        if TILE_B > 0:
            s_b = _masked(s_b, n0 + TILE_A, rows, seqlen_k, shift, CAUSAL, b_layout)
    step_max = _row_reduce(s_a, True, True, a_rows)
    if TILE_B > 0:
        step_max = gl.maximum(step_max, gl.convert_layout(_row_reduce(s_b, True, True, b_rows), a_rows))
    new_max = gl.maximum(row_max, step_max * qk_scale)
    # A row that has seen no visible key yet keeps max -inf: shift it by 0 instead.
    base = gl.where(new_max == float("-inf"), 0.0, new_max) - P_SHIFT
    if EXP_TURNS:
        base = _take_turn(base, n, ME)
    p_a = gl.convert_layout(_exp2(s_a * qk_scale - gl.expand_dims(base, 1), FMA_SHARE), a_layout)
    p_b = s_b
    if TILE_B > 0:
        p_b = gl.convert_layout(_exp2(s_b * qk_scale - gl.expand_dims(gl.convert_layout(base, b_rows), 1),
                                      FMA_SHARE), b_layout)
    alpha = gl.exp2(row_max - (base + P_SHIFT))
    if LANE_SUMS:
        lanes: gl.constexpr = row_sum.type.layout
        row_sum = row_sum * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, lanes)), 1) + \
            gl.convert_layout(_lane_partials(p_a, False), lanes)
        if TILE_B > 0:
            row_sum += gl.convert_layout(_lane_partials(p_b, False), lanes)
    else:
        row_sum = row_sum * alpha + _row_reduce(p_a, False, True, a_rows)
        if TILE_B > 0:
            row_sum += gl.convert_layout(_row_reduce(p_b, False, True, b_rows), a_rows)
    if EXP_TURNS:
        row_sum = _pass_turn(row_sum, ME)
    return p_a, p_b, new_max, row_sum, alpha


@gluon.jit
def _compute_tile(tile, uses, queries, smem, bars, geometry, scales, outputs, CAUSAL: gl.constexpr,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  FMA_SHARE: gl.constexpr, KV_BLOCK_SCALES: gl.constexpr, EXP_TURNS: gl.constexpr, LANE_SUMS: gl.constexpr,
                  ME: gl.constexpr):
    """Compute warpgroup ME's part of tile (b, h, h_kv, m_block): rows ME * 64 .. ME * 64 + 63 of its row block, key
    steps of BLOCK_N (one or two score tiles: `step_tiles`). uses: key steps used by this program
    so far (the n-th in ring slot n % STAGES, phase (n // STAGES) & 1); queries: tiles whose Q was
    used. Returns both, counting this tile's. KV_BLOCK_SCALES: K's and V's descales change from step
    to step (quantized here), else one per head (pre-quantized), read once."""
    q_smem, k_smem, kb_smem, vt_smem, vtb_smem = smem
    q_ready, k_ready, v_ready = bars
    seqlen_q, seqlen_k, heads, group, tiles, _ = geometry
    (QDescale, KDescale, VDescale, stride_qsb, stride_qsh, stride_qsm, stride_ksb, stride_ksh, stride_ksn,
     stride_vsb, stride_vsh, stride_vsn, q_scale_group, scale_log2) = scales
    Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh = outputs
    ROWS: gl.constexpr = BLOCK_M // 2
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    a_layout: gl.constexpr = _accumulator_layout(TILE_A)  # S's tiles
    b_layout: gl.constexpr = _accumulator_layout(TILE_B if TILE_B > 0 else TILE_A)
    o_layout: gl.constexpr = _accumulator_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    row_layout: gl.constexpr = gl.SliceLayout(1, a_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    # Products issued after a step's scores, left in flight while they are awaited: P V's
    PENDING: gl.constexpr = 2 if TILE_B > 0 else 1
    shift = seqlen_k - seqlen_q
    q = q_smem.reshape([BLOCK_M, HEAD_DIM]).slice(ME * ROWS, ROWS)
    zero_a = gl.zeros([ROWS, TILE_A], gl.float32, layout=a_layout)
    zero_b = gl.zeros([ROWS, TILE_B if TILE_B > 0 else TILE_A], gl.float32, layout=b_layout)

    b, h, h_kv, m_block = tile
    m0 = m_block * BLOCK_M
    q_scale = gl.load(QDescale + b * stride_qsb + (h // q_scale_group) * stride_qsh + m_block * stride_qsm) \
        * scale_log2
    k_descale = KDescale + b * stride_ksb + h_kv * stride_ksh
    v_descale = VDescale + b * stride_vsb + h_kv * stride_vsh
    num_blocks, full_end = _key_blocks(m0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    rows = m0 + ME * ROWS + gl.arange(0, ROWS, layout=row_layout)
    row_max = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    row_sum = gl.zeros([ROWS], gl.float32, layout=row_layout)
    if LANE_SUMS:
        row_sum = _lane_partials(zero_a, False)  # zeros, in the per-lane sums' layout
    o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    v_scale = 1.0

    if num_blocks > 0:
        # Step 0: scores and softmax, nothing to overlap with yet.
        mbarrier.wait(q_ready, queries & 1)
        mbarrier.wait(k_ready.index(uses % STAGES), (uses // STAGES) & 1)
        s_a, s_b = _scores(q, k_smem, kb_smem, uses % STAGES, zero_a, zero_b, HEAD_DIM, BLOCK_N)
        s_a, s_b = _await_scores(s_a, s_b, 0, BLOCK_N)
        _named_arrive(FREE_ID + uses % STAGES, FREE_THREADS)
        qk_scale = gl.maximum(q_scale * gl.load(k_descale), MIN_SCALE)
        v_scale = gl.maximum(gl.load(v_descale), MIN_SCALE)
        p_a, p_b, row_max, row_sum, alpha = _step_softmax(s_a, s_b, row_max, row_sum, rows, 0, full_end, seqlen_k,
                                                          shift, qk_scale, uses, CAUSAL, BLOCK_N, a_layout, b_layout,
                                                          FMA_SHARE, EXP_TURNS, LANE_SUMS, ME)
        carried_a, carried_b = _carried(p_a, p_b, ROWS, BLOCK_N, p_layout)

        for j in range(1, num_blocks):
            # S_j = Q K_j^T and O += P_{j-1} V_{j-1}, both in flight at once.
            n = uses + j
            slot = n % STAGES
            prev = (n - 1) % STAGES
            if KV_BLOCK_SCALES:  # pointers stepped, not j * stride: that widens the loop's counter to 64 bits
                k_descale += stride_ksn
                v_descale += stride_vsn
                qk_scale = gl.maximum(q_scale * gl.load(k_descale), MIN_SCALE)
                next_v_scale = gl.maximum(gl.load(v_descale), MIN_SCALE)
            mbarrier.wait(k_ready.index(slot), (n // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((n - 1) // STAGES) & 1)
            # P_{j-1}'s operands first (one tile: packed here, so that its float32 registers are free
            # before S_j takes its own; two tiles: packed at the end of step j-1, unpacked here).
            op_a, op_b = _operands(carried_a, carried_b, ROWS, BLOCK_N, p_layout)
            s_a, s_b = _scores(q, k_smem, kb_smem, slot, zero_a, zero_b, HEAD_DIM, BLOCK_N)
            o = _products(o, op_a, op_b, vt_smem, vtb_smem, prev, HEAD_DIM, BLOCK_N)
            s_a, s_b = _await_scores(s_a, s_b, PENDING, BLOCK_N)
            _named_arrive(FREE_ID + slot, FREE_THREADS)

            # Softmax of step j under the running P V product.
            p_a, p_b, row_max, row_sum, alpha = _step_softmax(s_a, s_b, row_max, row_sum, rows, j * BLOCK_N,
                                                              full_end, seqlen_k, shift, qk_scale, n, CAUSAL, BLOCK_N,
                                                              a_layout, b_layout, FMA_SHARE, EXP_TURNS, LANE_SUMS, ME)
            # P's e4m3 operand registers cannot be named in deps (Triton 3.6: "Unexpected bitwidth
            # in WGMMAWaitGroupOp: 8"); the SASS shows ptxas keeps them until this wait. Two tiles
            # pack P_j only now, after the wait, into registers P_{j-1}'s operands no longer hold.
            o = warpgroup_mma_wait(0, deps=(o,))
            carried_a, carried_b = _carried(p_a, p_b, ROWS, BLOCK_N, p_layout)
            _named_arrive(FREE_ID + STAGES + prev, FREE_THREADS)
            if KV_BLOCK_SCALES:  # O moves to step j's max and to step j's V descale in one multiply
                o = o * gl.expand_dims(gl.convert_layout(alpha * (v_scale / next_v_scale), o_rows), 1)
                v_scale = next_v_scale
            else:  # 40 instructions a step fewer (sm_90a SASS): the loads, and the division's
                o = o * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        _named_arrive(_q_free(STAGES), FREE_THREADS)  # every S of the tile is done: the next tile's Q may come

        # The last step's P V.
        last = uses + num_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        op_a, op_b = _operands(carried_a, carried_b, ROWS, BLOCK_N, p_layout)
        o = _products(o, op_a, op_b, vt_smem, vtb_smem, last % STAGES, HEAD_DIM, BLOCK_N)
        o = warpgroup_mma_wait(0, deps=(o,))
        _named_arrive(FREE_ID + STAGES + last % STAGES, FREE_THREADS)

    # int64 offsets: B * H * N * D may pass 2^31 elements (a head's N * D may not: the backend checks).
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    if LANE_SUMS:
        row_sum = gl.convert_layout(gl.sum(row_sum, 1), row_layout)
    _write_rows(o, row_max, row_sum, v_scale, rows, m0 + ME * ROWS, seqlen_q, Out + b64 * stride_ob + h64 * stride_oh,
                stride_om, Lse + b64 * stride_lb + h64 * stride_lh, P_SHIFT, HEAD_DIM, o_layout)
    return uses + num_blocks, queries + (num_blocks > 0).to(gl.int32)


@gluon.jit
def _consumer(descs, smem, bars, geometry, scales, outputs, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FMA_SHARE: gl.constexpr,
              KV_BLOCK_SCALES: gl.constexpr, EXP_TURNS: gl.constexpr, LANE_SUMS: gl.constexpr, PERSISTENT: gl.constexpr, ME: gl.constexpr):
    """Compute warpgroup ME (0 or 1): the program's tile, or with PERSISTENT tile after tile
    (`_persistent_tile`)."""
    if PERSISTENT:
        uses = 0
        queries = 0
        start, stop, step = _persistent_range(geometry, CAUSAL, BLOCK_M)
        for t in range(start, stop, step):
            b, h, h_kv, m_block, valid = _persistent_tile(t, geometry, CAUSAL, BLOCK_M)
            if valid:
                uses, queries = _compute_tile((b, h, h_kv, m_block), uses, queries, smem, bars, geometry, scales,
                                              outputs, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, FMA_SHARE,
                                              KV_BLOCK_SCALES, EXP_TURNS, LANE_SUMS, ME)
    else:
        uses, queries = _compute_tile(_tile(gl.program_id(0), geometry, BLOCK_M), 0, 0, smem, bars, geometry, scales,
                                      outputs, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, FMA_SHARE, KV_BLOCK_SCALES,
                                      EXP_TURNS, LANE_SUMS, ME)
    if EXP_TURNS and ME == 0 and uses > 0:  # take consumer 1's last hand-over: no named barrier left part-way
        _named_sync(TURN_ID, TURN_THREADS)


@gluon.jit
def _first_consumer(descs, smem, bars, geometry, scales, outputs, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FMA_SHARE: gl.constexpr,
                    KV_BLOCK_SCALES: gl.constexpr, EXP_TURNS: gl.constexpr, LANE_SUMS: gl.constexpr, PERSISTENT: gl.constexpr):
    _consumer(descs, smem, bars, geometry, scales, outputs, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, FMA_SHARE,
              KV_BLOCK_SCALES, EXP_TURNS, LANE_SUMS, PERSISTENT, 0)


@gluon.jit
def _second_consumer(descs, smem, bars, geometry, scales, outputs, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FMA_SHARE: gl.constexpr,
                     KV_BLOCK_SCALES: gl.constexpr, EXP_TURNS: gl.constexpr, LANE_SUMS: gl.constexpr, PERSISTENT: gl.constexpr):
    _consumer(descs, smem, bars, geometry, scales, outputs, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, FMA_SHARE,
              KV_BLOCK_SCALES, EXP_TURNS, LANE_SUMS, PERSISTENT, 1)


@gluon.jit
def fp8_hopper_forward(
    q_desc, k_desc, kb_desc, vt_desc, vtb_desc, Out, Lse, QDescale, KDescale, VDescale,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    stride_qsb, stride_qsh, stride_qsm, stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    seqlen_q, seqlen_k, heads, group, q_scale_group, scale_log2, batch_heads,
    CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, FMA_SHARE: gl.constexpr, KV_BLOCK_SCALES: gl.constexpr, EXP_TURNS: gl.constexpr,
    LANE_SUMS: gl.constexpr, PERSISTENT: gl.constexpr, HEAD_GROUP: gl.constexpr,
):
    """Grid: (programs,), each taking tiles (a row block of a (batch, query head)) program_id,
    program_id + programs, ... of the batch_heads x row blocks (`_tile`): as many programs as tiles,
    or fewer (persistent: a program's next tile loads while it finishes one). Out (B, Hq, Nq, D)
    through its strides, Lse (B, Hq, Nq). QDescale is read at (b, h // q_scale_group, row block),
    KDescale and VDescale at (b, h_kv, key block): strides in elements, a block stride of 0 for one
    descale per head. scale_log2: scale x log2(e), positive. A key step of BLOCK_N keys is tile A
    of k_desc's and vt_desc's blocks, and where BLOCK_N is two powers of two (`step_tiles`) tile B
    of kb_desc's and vtb_desc's (else those are k_desc and vt_desc again, unused)."""
    TILE_A: gl.constexpr = _first_tile(BLOCK_N)
    TILE_B: gl.constexpr = BLOCK_N - TILE_A
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    vt_smem = gl.allocate_shared_memory(vt_desc.dtype, [STAGES] + vt_desc.block_type.shape, vt_desc.layout)
    kb_smem = k_smem
    vtb_smem = vt_smem
    if TILE_B > 0:
        kb_smem = gl.allocate_shared_memory(kb_desc.dtype, [STAGES] + kb_desc.block_type.shape, kb_desc.layout)
        vtb_smem = gl.allocate_shared_memory(vtb_desc.dtype, [STAGES] + vtb_desc.block_type.shape, vtb_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    gl.static_assert(FREE_ID + 2 * STAGES < 16, "named barriers: a CTA has 16")
    gl.static_assert(not EXP_TURNS or FREE_ID + 2 * STAGES < TURN_ID, "EXP_TURNS: named barriers for 2 stages at most")
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)

    descs = (q_desc, k_desc, kb_desc, vt_desc, vtb_desc)
    smem = (q_smem, k_smem, kb_smem, vt_smem, vtb_smem)
    bars = (q_ready, k_ready, v_ready)
    geometry = (seqlen_q, seqlen_k, heads, group, gl.cdiv(seqlen_q, BLOCK_M) * batch_heads, HEAD_GROUP)
    scales = (QDescale, KDescale, VDescale, stride_qsb, stride_qsh, stride_qsm, stride_ksb, stride_ksh, stride_ksn,
              stride_vsb, stride_vsh, stride_vsn, q_scale_group, scale_log2)
    outputs = (Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh)
    gl.warp_specialize([
        (_first_consumer, (descs, smem, bars, geometry, scales, outputs, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                           FMA_SHARE, KV_BLOCK_SCALES, EXP_TURNS, LANE_SUMS, PERSISTENT)),
        (_second_consumer, (descs, smem, bars, geometry, scales, outputs, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                            FMA_SHARE, KV_BLOCK_SCALES, EXP_TURNS, LANE_SUMS, PERSISTENT)),
        (_producer, (descs, smem, bars, geometry, CAUSAL, BLOCK_M, BLOCK_N, STAGES, PERSISTENT)),
    ], [4, 1], [240, 24])


# Host side


def problem_reasons(problem) -> list[str]:
    """Why this kernel does not take `problem` (empty: it does); `kernel.py` takes the rest."""
    reasons = [_failure] if _failure else []
    if problem.head_dim not in HEAD_DIMS:
        reasons.append(f"head dims {' or '.join(map(str, HEAD_DIMS))} only")
    if problem.scale <= 0:
        reasons.append("positive scales only (the row max is taken before scaling)")
    return reasons


def unaddressable(t: torch.Tensor) -> str | None:
    """Why TMA cannot address the 4-d e4m3 tensor t, or None where it can."""
    # The stride of a dimension of size 1 never moves the address: any aligned value will do.
    strides = [x if n > 1 else 16 for x, n in zip(t.stride(), t.shape)]
    if 0 in t.shape:
        return "it is empty"
    if strides[3] != 1:
        return "its last dim is not contiguous"
    if t.data_ptr() % 16:
        return "its data does not start at a multiple of 16 bytes"
    if any(x <= 0 or x % 16 for x in strides[:3]):
        return f"its strides {tuple(t.stride())} are not all positive multiples of 16 bytes"
    return None


def _descriptor(t: torch.Tensor, block: list[int]):
    """A descriptor over the 4-d e4m3 tensor t in `block`s, or None where TMA cannot address it
    (`unaddressable`)."""
    if unaddressable(t):
        return None
    strides = [x if n > 1 else 16 for x, n in zip(t.stride(), t.shape)]
    return TensorDescriptor(t, list(t.shape), strides, block, _shared_layout(tuple(block)))


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple[int, ...]):
    """The swizzled shared-memory layout of an e4m3 `block` (built once: it is a third of a
    descriptor's host time)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float8e4nv)


def _block_strides(descale: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, block) strides of a (B, H, blocks) or (B, H) descale (block stride 0)."""
    return (*descale.stride()[:2], descale.stride(2) if descale.dim() == 3 else 0)


def step_keys(head_dim: int, causal: bool, per_block_descales: bool, seqlen_k: int) -> int:
    """Keys a step of the kernel at head dim `head_dim` for seqlen_k keys, with a causal mask or not,
    for K and V with one descale a head or (per_block_descales) one a key block: then also the
    block."""
    if causal and seqlen_k < CAUSAL_LONG_KEYS.get(head_dim, math.inf):
        return CAUSAL_STEP_KEYS[head_dim]
    return (QUANTIZED_STEP_KEYS if per_block_descales else STEP_KEYS)[head_dim]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(q8, k8, vt8, descales, q_scale_group, out_dtype, problem, compile_only: bool = False):
    """(out, lse) of `problem` from e4m3 q8 (B, Hq, Nq, D), k8 (B, Hkv, Nk, D) and vt8 (B, Hkv, D,
    N_pad) with its keys in `quantize.permute_keys`'s order and zero padding, or None where TMA
    cannot address them; compile_only: the compiled kernel, not run.
    descales: float32 (q, k, v), each (B, H, blocks) (one per row block of BLOCK_M or key step of
    `step_keys(D, causal, True, Nk)`) or (B, H) (one per head); q's head index is h // q_scale_group."""
    d = problem.head_dim
    kv_block_scales = descales[1].dim() == 3 or descales[2].dim() == 3
    keys = step_keys(d, problem.causal, kv_block_scales, problem.seqlen_k)
    tile_a, tile_b = step_tiles(keys)
    tile_b = tile_b or tile_a  # one tile: descriptors B are A's again, unused
    descriptors = (_descriptor(q8, [1, 1, BLOCK_M, d]), _descriptor(k8, [1, 1, tile_a, d]),
                   _descriptor(k8, [1, 1, tile_b, d]), _descriptor(vt8, [1, 1, d, tile_a]),
                   _descriptor(vt8, [1, 1, d, tile_b]))
    if None in descriptors:
        return None
    batch, heads_q, seqlen_q = q8.shape[:3]
    out = torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q8.device)
    tiles = triton.cdiv(seqlen_q, BLOCK_M) * batch * heads_q
    persistent = problem.seqlen_k < CAUSAL_PERSISTENT.get(d, 0) if problem.causal else d in PERSISTENT
    # Causal persistent programs take pairs of row blocks (`_paired_tile`).
    work = tiles // triton.cdiv(seqlen_q, BLOCK_M) * triton.cdiv(seqlen_q, 2 * BLOCK_M) if problem.causal else tiles
    grid = (min(work, _sm_count(q8.device)) if persistent else tiles,)
    kernel = fp8_hopper_forward.warmup if compile_only else fp8_hopper_forward[grid]
    extra = dict(grid=grid) if compile_only else {}
    try:
        compiled = kernel(*descriptors, out, lse, *descales, *out.stride()[:3], *lse.stride()[:2],
               *(s for descale in descales for s in _block_strides(descale)),
               seqlen_q, problem.seqlen_k, heads_q, problem.group_size, q_scale_group, problem.scale * LOG2E,
               batch * heads_q, CAUSAL=problem.causal, HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=keys, STAGES=STAGES,
               FMA_SHARE=FMA_SHARE[d], KV_BLOCK_SCALES=kv_block_scales,
               EXP_TURNS=EXP_TURNS[d], LANE_SUMS=LANE_SUMS[d],
               PERSISTENT=persistent, HEAD_GROUP=CAUSAL_HEAD_GROUP if problem.causal else 1, num_warps=NUM_WARPS,
               maxnreg=MAX_REGISTERS, **extra)
    except Exception as exc:  # noqa: BLE001 - fall back to the portable kernel, say so once
        if compile_only:
            raise
        global _failure
        _failure = f"the Gluon FP8 kernel failed in this process ({type(exc).__name__}: {exc})"[:300]
        log.warning("flashdispatch fp8-hopper: %s; using the portable Triton kernel instead", _failure)
        return None
    return compiled if compile_only else (out, lse)
