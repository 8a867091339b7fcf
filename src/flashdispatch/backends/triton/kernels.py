"""FlashAttention-2 in Triton: the forward (with split-KV for decoding), the split merge, and the
three backward kernels (delta, dK/dV, dQ).

Every kernel addresses its tensors through (batch, head, token, dim) strides, so the "bhsd",
"bshd" and packed variable-length layouts all run without copies: for a packed batch the batch
stride is 0 and each sequence's first token comes from cu_seqlens.

Masks are bottom-right aligned: query i of a sequence with q_len queries and k_len keys sees key j
when i + shift - left <= j <= i + shift + right, with shift = k_len - q_len and -1 meaning an
unbounded side (causal is right = 0). Each kernel splits its loop into three ranges of blocks:
partly visible, wholly visible, partly visible. Only the partly visible blocks pay for mask
arithmetic and bounds checks; wholly masked blocks are never visited. Scores live in the log2
domain (scale * log2(e) folded in), so the softmax uses exp2.

Sequence lengths, split sizes and window bounds are not specialised on (`NO_SPECIALIZE`): Triton
would otherwise compile a new variant whenever one of them changes divisibility by 16 or equals 1,
which made a mixed workload recompile again and again. Strides stay specialised: a unit stride and
16-element alignment are what let loads vectorise.
"""

import inspect

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NO_SPECIALIZE = ("seqlen_q", "seqlen_k", "keys_per_split", "window_left", "window_right", "splits")


def _kernel(fn):
    """triton.jit for a kernel, not specialised on the `NO_SPECIALIZE` arguments it has."""
    names = [name for name in NO_SPECIALIZE if name in inspect.signature(fn).parameters]
    return triton.jit(fn, do_not_specialize=names)


@triton.jit
def _tanh(x):
    # tanh through exp: portable to the CPU interpreter and exact enough in float32.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _dot(a, b, acc, FLOAT32: tl.constexpr):
    """acc + a @ b in float32. FLOAT32 (float32 inputs): three TF32 tensor-core products per
    product (3xTF32, float32-level accuracy); plain TF32 would lose float32's precision, and IEEE
    float32 dots run on the CUDA cores and took minutes to compile at large head dims."""
    if FLOAT32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _sequence(cu_seqlens_q, cu_seqlens_k, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first query token, query count, first key token, key count) of sequence b."""
    if VARLEN:
        q_start = tl.load(cu_seqlens_q + b)
        q_len = tl.load(cu_seqlens_q + b + 1) - q_start
        k_start = tl.load(cu_seqlens_k + b)
        k_len = tl.load(cu_seqlens_k + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _load_rows(base, rows, stride_row, stride_col, row_bound, COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """(len(rows), BLOCK_COLS) tile of a (token, dim) matrix; rows past row_bound and columns past
    COLS read as 0. Bounds are only checked where they can fail, so full tiles load unmasked."""
    cols = tl.arange(0, BLOCK_COLS)
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        mask = rows[:, None] < row_bound
        if COLS < BLOCK_COLS:
            mask = mask & (cols[None, :] < COLS)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif COLS < BLOCK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < COLS, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(base, tile, rows, stride_row, stride_col, row_ok, COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Store a (len(rows), BLOCK_COLS) tile where row_ok, in the columns below COLS."""
    cols = tl.arange(0, BLOCK_COLS)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, tile.to(base.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < COLS))


@triton.jit
def _visible(qi, kj, q_len, k_len, window_left, window_right):
    """Bool tile, broadcast of qi (query indices) against kj (key indices): in bounds and in the window."""
    diag = qi + (k_len - q_len)
    ok = (kj < k_len) & (qi < q_len)
    if window_right >= 0:
        ok = ok & (kj <= diag + window_right)
    if window_left >= 0:
        ok = ok & (kj >= diag - window_left)
    return ok


@triton.jit
def _wholly_visible(first, end, full_from, full_to, BLOCK: tl.constexpr):
    """Blocks of BLOCK start at first, first + BLOCK, ... below end. Returns [full_start, full_end):
    the blocks lying wholly inside [full_from, full_to). The blocks before and after it are partly
    visible (masked)."""
    full_start = tl.minimum(first + tl.cdiv(tl.maximum(full_from - first, 0), BLOCK) * BLOCK, end)
    full_end = tl.minimum(first + tl.maximum(tl.minimum(full_to, end) - first, 0) // BLOCK * BLOCK, end)
    return full_start, tl.maximum(full_end, full_start)


@triton.jit
def _key_ranges(row_lo, row_hi, q_len, k_len, window_left, window_right, split_lo, split_hi, BLOCK_N: tl.constexpr):
    """Key blocks for queries row_lo..row_hi (inclusive) within keys [split_lo, split_hi).

    Returns (first, full_start, full_end, end): blocks in [first, full_start) and [full_end, end)
    are partly visible, those in [full_start, full_end) wholly visible to every row.
    """
    shift = k_len - q_len
    lo = tl.maximum(split_lo, 0)
    end = tl.minimum(split_hi, k_len)
    full_from = lo
    full_to = end
    if window_left >= 0:
        lo = tl.maximum(lo, row_lo + shift - window_left)
        full_from = tl.maximum(lo, row_hi + shift - window_left)
    if window_right >= 0:
        end = tl.minimum(end, row_hi + shift + window_right + 1)
        full_to = tl.minimum(end, row_lo + shift + window_right + 1)
    first = lo - lo % BLOCK_N
    full_start, full_end = _wholly_visible(first, end, full_from, full_to, BLOCK_N)
    return first, full_start, full_end, end


@triton.jit
def _query_ranges(col_lo, col_hi, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr):
    """Query blocks that see keys col_lo..col_hi (inclusive), split like `_key_ranges`."""
    shift = k_len - q_len
    lo = q_len * 0
    end = q_len + 0
    full_from = lo
    full_to = end
    if col_hi >= k_len:  # a block reaching past the keys is masked for every query
        full_to = lo
    if window_right >= 0:
        lo = tl.maximum(col_lo - shift - window_right, 0)
        full_from = tl.maximum(lo, col_hi - shift - window_right)
    if window_left >= 0:
        end = tl.minimum(col_hi - shift + window_left + 1, q_len)
        full_to = tl.minimum(full_to, col_lo - shift + window_left + 1)
    first = lo - lo % BLOCK_M
    full_start, full_end = _wholly_visible(first, end, full_from, full_to, BLOCK_M)
    return first, full_start, full_end, end


@triton.jit
def _tile(base, desc, n0, stride_n, stride_d, k_len, tma_batch, tma_head, k_start,
          CHECK_ROWS: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr,
          BLOCK_COLS: tl.constexpr):
    """(BLOCK_N, BLOCK_COLS) tile of K or V from key n0. TMA: through a (B, H, N, D) tensor
    descriptor, which zero-fills rows and columns outside the tensor (rows of a packed batch's next
    sequence are masked by the caller)."""
    if TMA:
        tile = desc.load([tma_batch, tma_head, k_start + n0, 0]).reshape(BLOCK_N, BLOCK_COLS)
    else:
        tile = _load_rows(base, n0 + tl.arange(0, BLOCK_N), stride_n, stride_d, k_len, COLS, BLOCK_COLS, CHECK_ROWS)
    return tile


@triton.jit
def _key_block(q, n0, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, k_len,
               desc_k, desc_v, tma_batch, tma_head, k_start,
               CHECK_ROWS: tl.constexpr, TMA: tl.constexpr, FLOAT32: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Key block n0: its key indices, K (BLOCK_N, D), V (BLOCK_N, Dv), and the raw scores q K^T
    (BLOCK_M, BLOCK_N)."""
    k = _tile(k_base, desc_k, n0, stride_kn, stride_kd, k_len, tma_batch, tma_head, k_start,
              CHECK_ROWS, TMA, BLOCK_N, HEAD_DIM, BLOCK_D)
    v = _tile(v_base, desc_v, n0, stride_vn, stride_vd, k_len, tma_batch, tma_head, k_start,
              CHECK_ROWS, TMA, BLOCK_N, HEAD_DIM_V, BLOCK_DV)
    return n0 + tl.arange(0, BLOCK_N), k, v, _dot(q, tl.trans(k), None, FLOAT32)


# Forward


@triton.jit
def _softmax_step(acc, row_sum, row_max, s, v, cols, rows, q_len, k_len, window_left, window_right, qk_scale,
                  softcap, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, SCALE_FIRST: tl.constexpr,
                  FLOAT32: tl.constexpr):
    """Fold one key block into the online softmax: raw scores s (BLOCK_M, BLOCK_N), values v
    (BLOCK_N, Dv). Returns the updated running output, sum and max (log2 domain).

    qk_scale turns a raw score into the log2 domain (scale * log2(e); scale / softcap with softcap).
    The fast path takes the row max of the raw scores and scales it after: right for a positive
    scale only. SCALE_FIRST (a scale <= 0) and softcap scale every score before the max instead.
    """
    if SOFTCAP:
        s = softcap * _tanh(s * qk_scale) * LOG2E  # qk_scale is scale / softcap here
    elif SCALE_FIRST:
        s = s * qk_scale
    if MASKED:
        s = tl.where(_visible(rows[:, None], cols[None, :], q_len, k_len, window_left, window_right),
                     s, float("-inf"))
    if SOFTCAP or SCALE_FIRST:
        new_max = tl.maximum(row_max, tl.max(s, 1))
    else:
        new_max = tl.maximum(row_max, tl.max(s, 1) * qk_scale)
    shift = new_max
    if MASKED:
        # A row that has seen no visible key yet keeps max -inf: shift it by 0 instead.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    if SOFTCAP or SCALE_FIRST:
        p = tl.exp2(s - shift[:, None])
    else:
        p = tl.exp2(s * qk_scale - shift[:, None])
    rescale = tl.exp2(row_max - shift)  # exp(m_old - m_new); 0 for a row's first keys
    row_sum = row_sum * rescale + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * rescale[:, None], FLOAT32)
    return acc, row_sum, new_max


@triton.jit
def _forward_blocks(acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    desc_k, desc_v, tma_batch, tma_head, k_start,
                    start, end, rows, q_len, k_len, window_left, window_right, qk_scale, softcap,
                    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, SCALE_FIRST: tl.constexpr, FLOAT32: tl.constexpr,
                    TMA: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Online softmax over the key blocks in [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        cols, k, v, s = _key_block(q, n0, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, k_len,
                                   desc_k, desc_v, tma_batch, tma_head, k_start,
                                   MASKED, TMA, FLOAT32, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        acc, row_sum, row_max = _softmax_step(acc, row_sum, row_max, s, v, cols, rows, q_len, k_len,
                                              window_left, window_right, qk_scale, softcap, MASKED, SOFTCAP,
                                              SCALE_FIRST, FLOAT32)
    return acc, row_sum, row_max


@_kernel
def attention_forward(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, desc_k, desc_v,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_kv, group, keys_per_split,
    scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, PACK_GQA: tl.constexpr, SOFTCAP: tl.constexpr, SCALE_FIRST: tl.constexpr,
    FLOAT32: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: BLOCK_M query rows of one sequence against one split of its keys.

    Grid: (row blocks, batch * heads (query heads, or key/value heads with PACK_GQA), key splits).
    With PACK_GQA the rows are (query head of the group, query) pairs, so the queries of a whole
    GQA group share each K/V tile: decoding reads every key once per group, not once per head.
    Writes out (rows, Dv) and lse (rows,), at split index program_id(2) when split.
    TMA: K and V come through desc_k and desc_v, (B, Hkv, N, D) tensor descriptors (B = 1 and N
    the packed tokens for a variable-length batch).
    """
    # Row blocks in reverse: with a causal mask the last ones see the most keys, and starting the
    # longest programs first leaves the short ones to fill the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    if PACK_GQA:
        b = pid_bh // heads_kv
        head_kv = pid_bh % heads_kv
        first_head = head_kv * group
    else:
        b = pid_bh // (heads_kv * group)
        first_head = pid_bh % (heads_kv * group)
        head_kv = first_head // group
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q, cu_seqlens_k, b, seqlen_q, seqlen_k, VARLEN)
    num_rows = q_len * group if PACK_GQA else q_len
    if pid_m * BLOCK_M >= num_rows:
        return

    # Rows of this block: query index and query head of each.
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < num_rows
    if PACK_GQA:
        rows = r % q_len
        heads = first_head + r // q_len
    else:
        rows = r
        heads = first_head + 0 * r
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + (q_start + rows)[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # Key blocks any valid row may see, within this program's split (splits are whole multiples
    # of BLOCK_N, so no key block straddles two programs).
    row_lo = tl.min(tl.where(row_ok, rows, q_len), 0)
    row_hi = tl.max(tl.where(row_ok, rows, 0), 0)
    first, full_start, full_end, end = _key_ranges(row_lo, row_hi, q_len, k_len, window_left, window_right,
                                                   pid_s * keys_per_split, (pid_s + 1) * keys_per_split, BLOCK_N)

    k_base = K + b * stride_kb + head_kv * stride_kh + k_start * stride_kn
    v_base = V + b * stride_vb + head_kv * stride_vh + k_start * stride_vn
    tma_batch = b
    if VARLEN:
        tma_batch = 0  # the packed batch is one (1, H, tokens, D) descriptor
    if SOFTCAP:
        qk_scale = scale / softcap
    else:
        qk_scale = scale * LOG2E
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, row_sum, row_max = _forward_blocks(
        acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        desc_k, desc_v, tma_batch, head_kv, k_start,
        first, full_start, rows, q_len, k_len, window_left, window_right, qk_scale, softcap,
        True, SOFTCAP, SCALE_FIRST, FLOAT32, TMA, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    acc, row_sum, row_max = _forward_blocks(
        acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        desc_k, desc_v, tma_batch, head_kv, k_start,
        full_start, full_end, rows, q_len, k_len, window_left, window_right, qk_scale, softcap,
        False, SOFTCAP, SCALE_FIRST, FLOAT32, TMA, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    acc, row_sum, row_max = _forward_blocks(
        acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        desc_k, desc_v, tma_batch, head_kv, k_start,
        full_end, end, rows, q_len, k_len, window_left, window_right, qk_scale, softcap,
        True, SOFTCAP, SCALE_FIRST, FLOAT32, TMA, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)

    # Rows that saw no key (row_sum 0) give output 0 and LSE -inf.
    seen = row_sum > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, row_sum, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(Out + pid_s * stride_os + b * stride_ob + heads[:, None] * stride_oh + (q_start + rows)[:, None] * stride_om
             + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + pid_s * stride_ls + b * stride_lb + heads * stride_lh + q_start + rows, lse, mask=row_ok)


@_kernel
def merge_splits(
    Partial, PartialLse, Out, Lse,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_ls,
    stride_ob, stride_oh, stride_om, stride_od,
    splits, heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the split-KV partial results of one query row by their LSE (one pass, in registers).

    Grid: (queries, batch * heads). Partial is (splits, B, H, Nq, Dv) float32 with normalised
    partial outputs, PartialLse (splits, B, H, Nq) with (B, H, Nq) contiguous; Out and Lse (B, H, Nq)
    take the merged row.
    """
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_DV)
    row = b * stride_pb + h * stride_ph + i * stride_pm
    lse = tl.load(PartialLse + s * stride_ls + (b * heads + h) * seqlen_q + i, mask=s < splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2((lse - top) * LOG2E)  # 0 for empty splits
    total = tl.sum(weight, 0)
    parts = tl.load(Partial + s[:, None] * stride_ps + row + d[None, :], mask=(s[:, None] < splits) & (d[None, :] < HEAD_DIM_V),
                    other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + d * stride_od, out.to(Out.dtype.element_ty),
             mask=d < HEAD_DIM_V)
    tl.store(Lse + (b * heads + h) * seqlen_q + i, tl.where(total > 0, top + tl.log(total), float("-inf")))


# Backward


@_kernel
def attention_backward_delta(
    Out, DO, Delta, cu_seqlens_q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh,
    seqlen_q, heads,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32, in the LSE's layout. Grid: (query blocks, batch * heads)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    q_start, q_len, _, _ = _sequence(cu_seqlens_q, cu_seqlens_q, b, seqlen_q, seqlen_q, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if pid_m * BLOCK_M >= q_len:
        return
    o = _load_rows(Out + b * stride_ob + h * stride_oh + q_start * stride_om, rows, stride_om, stride_od, q_len,
                   HEAD_DIM_V, BLOCK_DV, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + q_start * stride_dom, rows, stride_dom, stride_dod, q_len,
                    HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * stride_lb + h * stride_lh + q_start + rows, delta, mask=rows < q_len)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qm, stride_qd, stride_dom, stride_dod,
                 start, end, cols, q_len, k_len, window_left, window_right, scale, softcap,
                 MASKED: tl.constexpr, SOFTCAP: tl.constexpr, FLOAT32: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over the query blocks in [start, end).

    Works on transposed scores (keys x queries) so that dV = P^T dO and dK = dS^T Q need no transposes.
    """
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, stride_qm, stride_qd, q_len, HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_M, D)
        do = _load_rows(do_base, rows, stride_dom, stride_dod, q_len, HEAD_DIM_V, BLOCK_DV, MASKED)  # (BLOCK_M, Dv)
        if MASKED:
            lse = tl.load(l_base + rows, mask=rows < q_len, other=0.0) * LOG2E
            # A row with LSE -inf saw no key: shift it by +inf so its P is exactly 0.
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(d_base + rows, mask=rows < q_len, other=0.0)
        else:
            lse = tl.load(l_base + rows) * LOG2E
            delta = tl.load(d_base + rows)
        s_t = _dot(k, tl.trans(q), None, FLOAT32)  # (BLOCK_N, BLOCK_M)
        if SOFTCAP:
            t = _tanh(s_t * (scale / softcap))
            p_t = tl.exp2(softcap * t * LOG2E - lse[None, :])
        else:
            p_t = tl.exp2(s_t * (scale * LOG2E) - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(rows[None, :], cols[:, None], q_len, k_len, window_left, window_right), p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, FLOAT32)
        dp_t = _dot(v, tl.trans(do), None, FLOAT32)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t * t)
        dk = _dot(ds_t.to(q.dtype), q, dk, FLOAT32)
    return dk, dv


@_kernel
def attention_backward_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_kv, group,
    scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, FLOAT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK and dV of one key block of one key/value head, summed over its query heads (no atomics).

    Grid: (key blocks, batch * heads_kv). For each query head of the group and each query block
    that sees these keys: P^T = exp2(S^T - LSE), dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_kv
    head_kv = pid_bh % heads_kv
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q, cu_seqlens_k, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b * stride_kb + head_kv * stride_kh + k_start * stride_kn, cols, stride_kn, stride_kd,
                   k_len, HEAD_DIM, BLOCK_D, True)  # (BLOCK_N, D)
    v = _load_rows(V + b * stride_vb + head_kv * stride_vh + k_start * stride_vn, cols, stride_vn, stride_vd,
                   k_len, HEAD_DIM_V, BLOCK_DV, True)  # (BLOCK_N, Dv)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first, full_start, full_end, end = _query_ranges(n0, n0 + BLOCK_N - 1, q_len, k_len, window_left, window_right,
                                                     BLOCK_M)
    for g in range(0, group):
        head = head_kv * group + g
        q_base = Q + b * stride_qb + head * stride_qh + q_start * stride_qm
        do_base = DO + b * stride_dob + head * stride_doh + q_start * stride_dom
        l_base = Lse + b * stride_lb + head * stride_lh + q_start
        d_base = Delta + b * stride_lb + head * stride_lh + q_start
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qm, stride_qd, stride_dom,
                              stride_dod, first, full_start, cols, q_len, k_len, window_left, window_right, scale,
                              softcap, True, SOFTCAP, FLOAT32, BLOCK_M, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qm, stride_qd, stride_dom,
                              stride_dod, full_start, full_end, cols, q_len, k_len, window_left, window_right, scale,
                              softcap, False, SOFTCAP, FLOAT32, BLOCK_M, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qm, stride_qd, stride_dom,
                              stride_dod, full_end, end, cols, q_len, k_len, window_left, window_right, scale,
                              softcap, True, SOFTCAP, FLOAT32, BLOCK_M, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    col_ok = cols < k_len
    _store_rows(DK + b * stride_dkb + head_kv * stride_dkh + k_start * stride_dkn, dk * scale, cols, stride_dkn,
                stride_dkd, col_ok, HEAD_DIM, BLOCK_D)
    _store_rows(DV + b * stride_dvb + head_kv * stride_dvh + k_start * stride_dvn, dv, cols, stride_dvn,
                stride_dvd, col_ok, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               start, end, rows, q_len, k_len, window_left, window_right, scale, softcap,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr, FLOAT32: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over the key blocks in [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        cols, k, v, s = _key_block(q, n0, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, k_len,
                                   None, None, 0, 0, 0,
                                   MASKED, False, FLOAT32, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        if SOFTCAP:
            t = _tanh(s * (scale / softcap))
            p = tl.exp2(softcap * t * LOG2E - lse[:, None])
        else:
            p = tl.exp2(s * (scale * LOG2E) - lse[:, None])
        if MASKED:
            p = tl.where(_visible(rows[:, None], cols[None, :], q_len, k_len, window_left, window_right), p, 0.0)
        dp = _dot(do, tl.trans(v), None, FLOAT32)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, FLOAT32)
    return dq


@_kernel
def attention_backward_dq(
    Q, K, V, DO, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_kv, group,
    scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, FLOAT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one query block of one query head: dQ = sum over visible key blocks of dS K.

    Grid: (query blocks, batch * heads_q). P = exp2(S - LSE), dS = P (dO V^T - delta).
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first, as in the forward
    pid_bh = tl.program_id(1)
    b = pid_bh // (heads_kv * group)
    head = pid_bh % (heads_kv * group)
    head_kv = head // group
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q, cu_seqlens_k, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q = _load_rows(Q + b * stride_qb + head * stride_qh + q_start * stride_qm, rows, stride_qm, stride_qd,
                   q_len, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + head * stride_doh + q_start * stride_dom, rows, stride_dom, stride_dod,
                    q_len, HEAD_DIM_V, BLOCK_DV, True)
    lse = tl.load(Lse + b * stride_lb + head * stride_lh + q_start + rows, mask=row_ok, other=0.0) * LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw no key get P = 0
    delta = tl.load(Delta + b * stride_lb + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    row_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1
    first, full_start, full_end, end = _key_ranges(m0, row_hi, q_len, k_len, window_left, window_right, 0, k_len,
                                                   BLOCK_N)
    k_base = K + b * stride_kb + head_kv * stride_kh + k_start * stride_kn
    v_base = V + b * stride_vb + head_kv * stride_vh + k_start * stride_vn
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    first, full_start, rows, q_len, k_len, window_left, window_right, scale, softcap,
                    True, SOFTCAP, FLOAT32, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    full_start, full_end, rows, q_len, k_len, window_left, window_right, scale, softcap,
                    False, SOFTCAP, FLOAT32, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    full_end, end, rows, q_len, k_len, window_left, window_right, scale, softcap,
                    True, SOFTCAP, FLOAT32, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    _store_rows(DQ + b * stride_dqb + head * stride_dqh + q_start * stride_dqm, dq * scale, rows, stride_dqm,
                stride_dqd, row_ok, HEAD_DIM, BLOCK_D)
