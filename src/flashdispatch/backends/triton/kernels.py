"""FlashAttention-2 in Triton: the forward (with split-KV for decoding) and the two backward passes.

Every kernel addresses its tensors through (batch, head, token, dim) strides, so the "bhsd",
"bshd" and packed variable-length layouts all run without copies: for a packed batch the batch
stride is 0 and each sequence's first token comes from cu_seqlens.

Masks are bottom-right aligned: query i of a sequence with q_len queries and k_len keys sees key j
when i + shift - left <= j <= i + shift + right, with shift = k_len - q_len and -1 meaning an
unbounded side (causal is right = 0). Scores live in the log2 domain (scale * log2(e) folded in),
so the softmax uses exp2.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _tanh(x):
    # tanh through exp: portable to the CPU interpreter and exact enough in float32.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE: exact float32 products (float32 inputs), not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


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
def _scores(q, kT, scale, softcap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """(BLOCK_M, D) x (D, BLOCK_N) -> scores in the log2 domain, float32."""
    qk = _dot(q, kT, IEEE)
    if SOFTCAP:
        return softcap * _tanh(qk * (scale / softcap)) * 1.4426950408889634
    return qk * (scale * 1.4426950408889634)


@triton.jit
def _visible(rows, cols, q_len, k_len, window_left, window_right):
    """(BLOCK_M, BLOCK_N) bool: key cols in bounds and inside the window of query rows."""
    diag = rows[:, None] + (k_len - q_len)
    # Full (BLOCK_M, BLOCK_N) from the start (rows >= 0 always holds): the compiler wants the
    # same shape in both branches of the ifs below.
    ok = (cols[None, :] < k_len) & (rows[:, None] >= 0)
    if window_right >= 0:
        ok = ok & (cols[None, :] <= diag + window_right)
    if window_left >= 0:
        ok = ok & (cols[None, :] >= diag - window_left)
    return ok


@triton.jit
def _fwd_blocks(acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                start, end, rows, q_len, k_len, window_left, window_right, scale, softcap,
                MASKED: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Online softmax over key blocks [start, end): the running max, sum and unnormalised output."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        # K^T tile (BLOCK_D, BLOCK_N) and V tile (BLOCK_N, BLOCK_DV).
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(cols[None, :] < k_len) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(cols[:, None] < k_len) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        s = _scores(q, kT, scale, softcap, SOFTCAP, IEEE)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(_visible(rows, cols, q_len, k_len, window_left, window_right), s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row that has seen no visible key yet keeps max -inf: shift it by 0 instead.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)  # exp(m_old - m_new); 0 for a row's first keys
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, IEEE)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def attention_forward(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_kv, group, keys_per_split,
    scale, softcap, window_left, window_right,
    VARLEN: tl.constexpr, PACK_GQA: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: BLOCK_M query rows of one sequence against one split of its keys.

    Grid: (row blocks, batch * heads (query heads, or key/value heads with PACK_GQA), key splits).
    With PACK_GQA the rows are (query head of the group, query) pairs, so the queries of a whole
    GQA group share each K/V tile: decoding reads every key once per group, not once per head.
    Writes out (rows, Dv) and lse (rows,), at split index program_id(2) when split.
    """
    pid_m = tl.program_id(0)
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
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + (q_start + rows)[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # Keys any row of the block may see, then this program's split of them.
    shift = k_len - q_len
    row_lo = tl.min(tl.where(row_ok, rows, q_len), 0)
    row_hi = tl.max(tl.where(row_ok, rows, 0), 0)
    lo = k_len * 0
    hi = k_len + 0
    if window_left >= 0:
        lo = tl.maximum(row_lo + shift - window_left, 0)
    if window_right >= 0:
        hi = tl.minimum(row_hi + shift + window_right + 1, k_len)
    # Splits are whole multiples of BLOCK_N, so no key block straddles two programs.
    lo = tl.maximum(lo, pid_s * keys_per_split)
    hi = tl.minimum(hi, (pid_s + 1) * keys_per_split)
    # Key blocks start at `first`; those wholly visible to every row of the block need no mask
    # arithmetic: [full_start, full_end). The partly visible ones on either side are masked.
    first = lo - lo % BLOCK_N
    full_from = first
    full_to = hi
    if window_left >= 0:
        full_from = tl.maximum(full_from, row_hi + shift - window_left)
    if window_right >= 0:
        full_to = tl.minimum(full_to, row_lo + shift + window_right + 1)
    full_start = first + tl.cdiv(full_from - first, BLOCK_N) * BLOCK_N
    full_end = tl.maximum(first + tl.maximum(full_to - first, 0) // BLOCK_N * BLOCK_N, full_start)

    k_base = K + b * stride_kb + head_kv * stride_kh + k_start * stride_kn
    v_base = V + b * stride_vb + head_kv * stride_vh + k_start * stride_vn
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, row_sum, row_max = _fwd_blocks(
        acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        first, tl.minimum(full_start, hi), rows, q_len, k_len, window_left, window_right, scale, softcap,
        True, SOFTCAP, IEEE, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    acc, row_sum, row_max = _fwd_blocks(
        acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        full_start, full_end, rows, q_len, k_len, window_left, window_right, scale, softcap,
        False, SOFTCAP, IEEE, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    acc, row_sum, row_max = _fwd_blocks(
        acc, row_sum, row_max, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        full_end, hi, rows, q_len, k_len, window_left, window_right, scale, softcap,
        True, SOFTCAP, IEEE, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)

    # Rows that saw no key (row_sum 0) give output 0 and LSE -inf.
    seen = row_sum > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, row_sum, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Out + pid_s * stride_os + b * stride_ob + heads[:, None] * stride_oh + (q_start + rows)[:, None] * stride_om
             + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + pid_s * stride_ls + b * stride_lb + heads * stride_lh + q_start + rows, lse, mask=row_ok)


@triton.jit
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
    VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK and dV of one key block of one key/value head, summed over its query heads (no atomics).

    Grid: (key blocks, batch * heads_kv). For each query head of the group and each query block
    that can see these keys: P^T = exp2(S^T - LSE), dV += P^T dO, dS^T = P^T (dP^T - delta),
    dK += dS^T Q.
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
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < k_len
    k = tl.load(K + b * stride_kb + head_kv * stride_kh + (k_start + cols)[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * stride_vb + head_kv * stride_vh + (k_start + cols)[:, None] * stride_vn
                + offs_dv[None, :] * stride_vd, mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # Queries that may see any key of this block.
    shift = k_len - q_len
    m_lo = q_len * 0
    m_hi = q_len + 0
    if window_right >= 0:
        m_lo = tl.maximum(n0 - shift - window_right, 0)
    if window_left >= 0:
        m_hi = tl.minimum(n0 + BLOCK_N - 1 - shift + window_left + 1, q_len)
    m_first = m_lo - m_lo % BLOCK_M
    for g in range(0, group):
        head = head_kv * group + g
        q_base = Q + b * stride_qb + head * stride_qh + q_start * stride_qm
        do_base = DO + b * stride_dob + head * stride_doh + q_start * stride_dom
        l_base = Lse + b * stride_lb + head * stride_lh + q_start
        d_base = Delta + b * stride_lb + head * stride_lh + q_start
        for m0 in range(m_first, m_hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            qT = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                         mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            lse = tl.load(l_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            # A row with LSE -inf saw no key: shift it by +inf so its P is exactly 0.
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(d_base + rows, mask=row_ok, other=0.0)
            qkT = _dot(k, qT, IEEE)  # (BLOCK_N, BLOCK_M)
            if SOFTCAP:
                t = _tanh(qkT * (scale / softcap))
                sT = softcap * t * 1.4426950408889634
            else:
                sT = qkT * (scale * 1.4426950408889634)
            visible = tl.trans(_visible(rows, cols, q_len, k_len, window_left, window_right)) & row_ok[None, :]
            pT = tl.where(visible, tl.exp2(sT - lse[None, :]), 0.0)
            dv += _dot(pT.to(do.dtype), do, IEEE)
            dpT = _dot(v, tl.trans(do), IEEE)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - t * t)
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + head_kv * stride_dkh + (k_start + cols)[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvb + head_kv * stride_dvh + (k_start + cols)[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
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
    VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one query block of one query head: dQ = sum over visible key blocks of dS K.

    Grid: (query blocks, batch * heads_q). P = exp2(S - LSE), dS = P (dO V^T - delta).
    """
    pid_m = tl.program_id(0)
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
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + head * stride_qh + (q_start + rows)[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * stride_dob + head * stride_doh + (q_start + rows)[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse = tl.load(Lse + b * stride_lb + head * stride_lh + q_start + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + b * stride_lb + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    shift = k_len - q_len
    lo = k_len * 0
    hi = k_len + 0
    if window_left >= 0:
        lo = tl.maximum(m0 + shift - window_left, 0)
    if window_right >= 0:
        hi = tl.minimum(m0 + BLOCK_M - 1 + shift + window_right + 1, k_len)
    k_base = K + b * stride_kb + head_kv * stride_kh + k_start * stride_kn
    v_base = V + b * stride_vb + head_kv * stride_vh + k_start * stride_vn
    for n0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(cols[None, :] < k_len) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vT = tl.load(v_base + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=(cols[None, :] < k_len) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        qk = _dot(q, kT, IEEE)
        if SOFTCAP:
            t = _tanh(qk * (scale / softcap))
            s = softcap * t * 1.4426950408889634
        else:
            s = qk * (scale * 1.4426950408889634)
        visible = _visible(rows, cols, q_len, k_len, window_left, window_right) & row_ok[:, None]
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vT, IEEE)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + head * stride_dqh + (q_start + rows)[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
