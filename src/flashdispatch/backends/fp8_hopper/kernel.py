"""The FP8 attention forward in Triton: FlashAttention-2's loop with both matmuls in float8 e4m3.

Per program: BLOCK_M query rows of one (batch, query head). Q and K arrive as e4m3 with one
descale per block of rows (the quantization kernel's tile, or one per (batch, KV head) for
pre-quantized inputs: a stride of 0 across blocks). V arrives transposed, (D, N) per head with N
contiguous: the B operand of P V is then K-major, the layout Hopper's FP8 wgmma reads from shared
memory. Per key block j:

    S_j = (Q K_j^T) x q_descale x k_descale_j x scale x log2(e)    e4m3 x e4m3 -> float32
    P_j = exp2(S_j - running max + 8)                               float32, in [0, 256]
    O   = O x exp2(old max - new max) x v_descale_{j-1} / v_descale_j + e4m3(P_j) V_j

so O is kept in units of the current block's V descale (the last one multiplies it out at the
end) and the product accumulates in place: one (BLOCK_M, D) float32 tile, where a product
scaled apart from O took a second one (at D = 256 the with-quantization path ran at half the
pre-quantized one's speed, 2026-12-05). P is rounded to e4m3 for the second matmul as
FlashAttention-3 does, scaled by 2^8 so that small probabilities stay normal numbers (P_SHIFT);
the row sums use the float32 P. Causal masks are bottom-right aligned; key blocks wholly
visible to the row block skip the mask, wholly masked ones are never visited.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# P is computed as 2^P_SHIFT x exp2(S - max), in [0, 256], before its rounding to e4m3: below 2^-6
# e4m3 is subnormal (fixed steps of 2^-9), so the many small probabilities of a long row would
# lose most of their digits; shifted, every P above 2^-14 keeps e4m3's 3 mantissa bits. The row
# sums carry the same factor, so the normalisation cancels it, and the LSE subtracts it.
P_SHIFT = tl.constexpr(8.0)
# V descales are kept at or above float32's smallest normal number, so that the ratio of two
# blocks' is finite (a zero descale: an all-zero V from a caller's amax / 448).
MIN_SCALE = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _key_block(acc, row_max, row_sum, v_scale, q, k_ptrs, v_ptrs, k_descale, v_descale, start_n, q_scale,
               rows, seqlen_k, shift, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block: loads K_j (BLOCK_N, D) and V_j^T (D, BLOCK_N), updates (acc, max, sum) and
    v_scale, the V descale acc is in units of."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if MASK:  # the last block may pass the end of the keys: read zeros there
        k = tl.load(k_ptrs, mask=cols[:, None] < seqlen_k, other=0.0)
        vt = tl.load(v_ptrs, mask=cols[None, :] < seqlen_k, other=0.0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(v_ptrs)
    block = start_n // BLOCK_N
    # Scores in the log2 domain, every scale folded into one scalar.
    s = tl.dot(q, tl.trans(k)) * (q_scale * tl.load(k_descale + block))
    if MASK:
        visible = cols[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, 1))
    # A row that has seen no visible key yet keeps max -inf: shift it by 0, not by -inf.
    base = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.math.exp2(s - (base[:, None] - P_SHIFT))
    alpha = tl.math.exp2(row_max - base)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    p8 = p.to(vt.dtype)
    next_v_scale = tl.maximum(tl.load(v_descale + block), MIN_SCALE)
    acc = tl.dot(p8, tl.trans(vt), acc * (alpha * (v_scale / next_v_scale))[:, None])
    return acc, new_max, row_sum, next_v_scale


@triton.jit
def fp8_attention_forward(
        Q, K, Vt, Out, Lse, QDescale, KDescale, VDescale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vd, stride_vn,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_qsb, stride_qsh, stride_qsm,
        stride_ksb, stride_ksh,
        stride_vsb, stride_vsh,
        heads_q, group, seqlen_q, seqlen_k, scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, WIDE: tl.constexpr):
    # Grid: (query blocks, batch x query heads).
    m_block = tl.program_id(0)
    # Where a (batch, head) starts is a 64-bit offset: B * H * N * D may pass 2^31 elements. So may
    # a row's offset in a (B, N, H, D) view (N * H * D): with WIDE, rows and key blocks are 64-bit
    # too, in the tiles and across key blocks. Not always: tiles of 64-bit offsets spilled (D = 128,
    # sm_90a: 7 KB) and the kernel ran 10x slower (H100, 2026-12-06). Head-dim offsets stay 32-bit: the host copies a view
    # whose head-dim offsets would pass 2^31 (`quantize.head_dim_addressable`).
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads_q
    h = bh % heads_q
    h_kv = h // group
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_offsets = rows[:, None]
    keys = tl.arange(0, BLOCK_N)
    if WIDE:
        row_offsets = row_offsets.to(tl.int64)
        keys = keys.to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)

    # Q tile (BLOCK_M, D), e4m3, and this row block's descale.
    q = tl.load(Q + b * stride_qb + h * stride_qh + row_offsets * stride_qm + dims[None, :] * stride_qd,
                mask=rows[:, None] < seqlen_q, other=0.0)
    q_scale = tl.load(QDescale + b * stride_qsb + h * stride_qsh + m_block * stride_qsm) * scale * LOG2E
    # Descales are float32 (B, H, blocks) with unit block stride: key block j's is k_descale + j.
    k_descale = KDescale + b * stride_ksb + h_kv * stride_ksh
    v_descale = VDescale + b * stride_vsb + h_kv * stride_vsh
    # The first key block's K (BLOCK_N, D) and V^T (D, BLOCK_N); block j's are j * BLOCK_N keys on.
    k_ptrs = K + b * stride_kb + h_kv * stride_kh + keys[:, None] * stride_kn + dims[None, :] * stride_kd
    v_ptrs = Vt + b * stride_vb + h_kv * stride_vh + dims[:, None] * stride_vd + keys[None, :] * stride_vn

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_scale = 1.0  # acc's units: the V descale of the last key block multiplied in

    # Key blocks: [0, full_end) are visible to every row of the block (no mask), [full_end, end)
    # partly (causal diagonal, or the ragged end of the keys).
    shift = seqlen_k - seqlen_q
    end = seqlen_k
    if CAUSAL:
        end = tl.minimum(end, tl.minimum(m_block * BLOCK_M + BLOCK_M, seqlen_q) + shift)
        full_end = tl.maximum(tl.minimum(m_block * BLOCK_M + 1 + shift, end), 0) // BLOCK_N * BLOCK_N
    else:
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    end = tl.maximum(end, 0)
    for start_n in range(0, full_end, BLOCK_N):
        n0 = tl.cast(start_n, tl.int64) if WIDE else start_n
        acc, row_max, row_sum, v_scale = _key_block(acc, row_max, row_sum, v_scale, q, k_ptrs + n0 * stride_kn,
                                                    v_ptrs + n0 * stride_vn, k_descale, v_descale, start_n, q_scale,
                                                    rows, seqlen_k, shift, False, CAUSAL, BLOCK_N)
    for start_n in range(full_end, end, BLOCK_N):
        n0 = tl.cast(start_n, tl.int64) if WIDE else start_n
        acc, row_max, row_sum, v_scale = _key_block(acc, row_max, row_sum, v_scale, q, k_ptrs + n0 * stride_kn,
                                                    v_ptrs + n0 * stride_vn, k_descale, v_descale, start_n, q_scale,
                                                    rows, seqlen_k, shift, True, CAUSAL, BLOCK_N)

    # Normalise; a row that saw no key gets 0 and LSE -inf.
    acc = acc * v_scale
    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, row_sum, 1.0)) - P_SHIFT) * LN2, float("-inf"))
    row_ok = rows < seqlen_q
    tl.store(Out + b * stride_ob + h * stride_oh + row_offsets * stride_om + dims[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + bh * seqlen_q + rows, lse, mask=row_ok)
