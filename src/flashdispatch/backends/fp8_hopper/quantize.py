"""Quantization of Q, K and V to float8 e4m3 for the FP8 attention forward, FlashAttention-3 style.

Rotation. H is the D x D Walsh-Hadamard matrix (entries +-1, Sylvester order) and S = diag(s) a
diagonal of random signs; R = S H / sqrt(D) is orthonormal (R R^T = I), so rotating Q and K by the
same R leaves the scores unchanged:

    (Q R)(K R)^T = Q R R^T K^T = Q K^T.

A row's few large entries (outliers) are spread over all D coordinates by R, so the block's
maximum, which sets the quantization step of every entry in the block, drops towards the typical
magnitude and the small entries keep more of their bits. The signs make the rotation random
enough that no fixed input lines up with H.

Quantization. Per (batch, head) and per block of `block_rows` consecutive rows (the attention
kernel's tile), with y the (rotated) block in float32:

    scale = amax(|y|) / 448      (448: e4m3fn's largest finite value)
    y8    = e4m3(clamp(y x (1 / scale), -448, 448))      round to nearest, ties to even

and y ~= float(y8) * scale: the scale is returned as the descale, float32 (B, H, blocks). A block
with scale 0 (all zeros, or so small that amax / 448 underflows to 0) gets scale 1.0 so that the
descale stays finite and positive; its entries round to 0 (or to e4m3's subnormals).
1 / scale is rounded to float32 once a block, and each entry multiplied by it: a division per
entry cost the kernel more than its memory traffic. A subnormal scale divides instead: the
reciprocals of most of them overflow float32.
Rounding to e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 for |y / scale| >= 2^-6,
an absolute one of at most 2^-10 * scale below (e4m3's subnormal steps of 2^-9). Inputs must be
finite: an inf makes the whole block's scale inf, and a NaN's results are undefined (the kernel's
maximum skips it, the reference's scale becomes 1.0).

V is not rotated (its rotation would have to be undone on the output) and is written transposed,
(B, H, D, N_pad) with N contiguous: the K-major B operand that Hopper's FP8 wgmma reads for P V.
N_pad is N rounded up to 16 (the FP8 MMA's K step) and the pad columns hold zeros. For the
Hopper kernel (`hopper.py`) the keys of each group of 16 come in its P operand's order
(`permute_keys`, `key_order=True`), so that P needs no data moved between threads. An e4m3 V
(pre-quantized inputs) is put in that layout by the same kernel without its scaling
(`rearrange_v`).

Reference and kernel. `quantize_reference` is the plain-PyTorch statement of all this: its
rotation is the fast Walsh-Hadamard transform (log2(D) butterfly stages) in float64, rounded once
to float32, so it is the exact x R up to that rounding. `quantize` computes the same thing in one
fused Triton kernel, one pass over the input, with the rotation as a matmul: x @ M, M = S H built
on the host (entries +-1, so the products are exact in float16/bfloat16), accumulated in float32,
times 1 / sqrt(D); from D = 128 on as two dots of half the width and one butterfly stage. 16-bit
inputs go through the tensor cores; float32 inputs, and everything in Triton's CPU interpreter,
through IEEE float32 dots. The kernel's sums are rounded to float32 as they go, in the order of
its dots, so a rotated y, and with it the descale, can differ from the reference's by a few
float32 ulps, and a value of y x (1 / scale) that lies that close to the midpoint between two e4m3
values can round to the other one: rotated outputs match the reference's to one e4m3 step, and
only now and then (in the interpreter, on random normal data: none in 3.7 million for 16-bit
inputs, whose float32 sums are mostly exact, about 1 in 100,000 for float32 inputs). Without the
rotation the kernel's bytes and descales equal the reference's exactly.
"""

from __future__ import annotations

import math

import torch

from ...dispatcher.capabilities import triton_interpreting
from ..base import MAX_GRID_Y

try:
    import triton
    import triton.language as tl
except ImportError:  # the plain-PyTorch functions need no Triton
    triton = None

FP8_MAX = 448.0  # largest finite torch.float8_e4m3fn
FP8 = torch.float8_e4m3fn
PAD = 16  # the transposed layout's row length is a multiple of this (the FP8 MMA's K step)


def random_signs(head_dim: int, seed: int, device) -> torch.Tensor:
    """(head_dim,) float32 of +1/-1, reproducible from `seed`."""
    # Drawn on the CPU so that every device gets the same signs for a seed.
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (head_dim,), generator=gen)
    return (bits * 2 - 1).to(torch.float32).to(device)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _inv_sqrt(head_dim: int) -> float:
    # One definition for the reference (which multiplies by it in float64) and the kernel (float32).
    return 1.0 / math.sqrt(head_dim)


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x * signs along the last dim, then the orthonormal Walsh-Hadamard transform H / sqrt(D).

    Computed in float64 and returned in float64 for float64 input, else rounded once to float32:
    16-bit inputs come back as float32, since rounding the rotation back to 16 bits would add an
    error before the quantization that it exists to reduce. Float64 holds the sums of D <= 256
    float32 entries exactly while their magnitudes span fewer than 21 binades (more for 16-bit
    ones), so this is the exact rotation rounded to float32, whatever order a kernel sums in.

    Each butterfly stage combines the entries pairwise, (y[2j], y[2j+1]) -> (sum, difference),
    writing sums to the first half and differences to the second (the constant-geometry form of
    the transform): after log2(D) stages every bit of the index has been combined once.
    """
    head_dim = x.shape[-1]
    if not _power_of_two(head_dim):
        raise ValueError(f"x: the Hadamard rotation needs a power-of-two last dim, got shape {tuple(x.shape)}")
    if signs.shape != (head_dim,):
        raise ValueError(f"signs: expected shape ({head_dim},), got {tuple(signs.shape)}")
    y = x.double() * signs.to(device=x.device, dtype=torch.float64)
    for _ in range(head_dim.bit_length() - 1):
        pairs = y.unflatten(-1, (head_dim // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        y = torch.cat([even + odd, even - odd], dim=-1)
    y = y * _inv_sqrt(head_dim)
    return y if x.dtype == torch.float64 else y.float()


def rotation_matrix(signs: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """M = diag(signs) H, (D, D) of +-1 in `dtype` on `device`: x R = (x @ M) / sqrt(D).

    Cached per (signs tensor, its version, dtype, device): the backend passes the same signs tensor
    on every call, so M is built once. The cache holds the signs tensor, so that its id is not
    reused by another tensor while the entry lives.
    """
    key = (id(signs), signs._version, dtype, torch.device(device))
    entry = _matrices.get(key)
    if entry is None:
        head_dim = signs.shape[0]
        index = torch.arange(head_dim)
        parity = torch.zeros(head_dim, head_dim, dtype=torch.long)
        for bit in range(head_dim.bit_length() - 1):  # H[i, j] = (-1)^popcount(i & j), Sylvester's order
            parity ^= ((index[:, None] & index[None, :]) >> bit) & 1
        matrix = signs.detach().cpu().double()[:, None] * (1 - 2 * parity)
        if len(_matrices) >= 64:  # tests make many signs tensors; the backend a few
            _matrices.clear()
        entry = _matrices[key] = (signs, matrix.to(device=device, dtype=dtype))
    return entry[1]


_matrices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _check(x: torch.Tensor, block_rows: int, signs) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, H, N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    if not _power_of_two(x.shape[-1]) or x.shape[-1] < PAD:
        raise ValueError(f"x: head dim must be a power of two >= {PAD}, got shape {tuple(x.shape)}")
    if block_rows < PAD or block_rows % PAD:
        raise ValueError(f"block_rows: expected a positive multiple of {PAD}, got {block_rows}")
    if signs is not None and signs.shape != (x.shape[-1],):
        raise ValueError(f"signs: expected shape ({x.shape[-1]},), got {tuple(signs.shape)}")


def padded_length(seqlen: int) -> int:
    """The transposed layout's row length for seqlen keys: rounded up to a multiple of PAD."""
    return -(-seqlen // PAD) * PAD


def permute_keys(vt: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """V^T (B, H, D, N), N a multiple of 16, with each 16-key group in the order the Hopper kernel
    (`hopper.py`) reads P in as its P V operand: column 4c + 2a + j holds key 8a + 2c + j (c < 4,
    a, j < 2). inverse: back to key order. A copy."""
    b, h, d, n = vt.shape
    groups = (n // 16, 4, 2, 2) if inverse else (n // 16, 2, 4, 2)
    return vt.reshape(b, h, d, *groups).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, h, d, n)


def quantize_reference(x, block_rows: int, signs=None, transpose: bool = False, key_order: bool = False):
    """Plain-PyTorch reference of `quantize`: (x_fp8, descale) as the module docstring defines them.

    x: (B, H, N, D) float16/bfloat16/float32, any strides; rotated first when `signs` is given.
    x_fp8: (B, H, N, D) float8_e4m3fn contiguous, or with transpose=True (B, H, D, N_pad) holding
    it transposed, N_pad = N rounded up to 16, pad columns 0, and with key_order=True too its
    columns in `permute_keys`'s order. descale: float32 (B, H, ceil(N / block_rows)), the scale of
    each block (x ~= x_fp8 * descale). The same bytes on the CPU and on a GPU.
    """
    if key_order and not transpose:
        raise ValueError("key_order: applies to the transposed layout only (transpose=True)")
    _check(x, block_rows, signs)
    batch, heads, seqlen, head_dim = x.shape
    y = x.float() if signs is None else hadamard_rotate(x, signs)
    blocks = -(-seqlen // block_rows)
    tiles = torch.nn.functional.pad(y, (0, 0, 0, blocks * block_rows - seqlen))  # zero rows: no effect on amax
    tiles = tiles.view(batch, heads, blocks, block_rows, head_dim)
    amax = tiles.abs().amax(dim=(-2, -1))
    # Divided by a tensor on amax's device: PyTorch's CUDA division by a Python number multiplies
    # by its reciprocal, which is off by an ulp now and then (and then so are the fp8 bytes).
    scale = amax / amax.new_tensor(FP8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None, None]
    normal = scale >= torch.finfo(torch.float32).tiny
    y = torch.where(normal, tiles * (torch.ones_like(scale) / scale), tiles / scale)
    # torch's float8 conversion rounds to nearest even but turns values beyond 448 into NaN:
    # clamp first (y x (1 / scale) can pass 448 by a float32 rounding at the block's maximum).
    y8 = y.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    scale = scale[..., 0, 0]
    y8 = y8.view(batch, heads, blocks * block_rows, head_dim)[:, :, :seqlen]
    if transpose:
        out = torch.zeros(batch, heads, head_dim, padded_length(seqlen), dtype=FP8, device=x.device)
        out[..., :seqlen] = y8.transpose(2, 3)
        if key_order:
            out = permute_keys(out)
    else:
        out = y8.contiguous()
    return out, scale


if triton is not None:

    @triton.jit
    def _round_to_e4m3(v):
        """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still float32.

        The conversion `.to(tl.float8e4nv)` rounds to nearest even on the GPU, but Triton's CPU
        interpreter (3.6) rounds ties away from zero and can halve a value whose rounding carries
        into the exponent; rounding here first leaves every conversion exact. Adding and taking
        away magic = 1.5 * 2^23 * step, step being e4m3's spacing at |v| (3 mantissa bits, 2^-9
        below 2^-6), rounds |v| to a multiple of step in float32's own round-to-nearest-even.
        """
        bits = v.to(tl.int32, bitcast=True)
        a = tl.abs(v)
        exponent = a.to(tl.int32, bitcast=True) >> 23  # biased; 121 is 2^-6, e4m3's smallest normal
        magic = (((tl.maximum(exponent, 121) + 20) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        r = (a + magic) - magic
        # v's sign bit put back by hand: Triton's -r is 0 - r, which makes -0 of a negative v
        # rounded to 0, where the e4m3 conversion gives -0.
        return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)

    @triton.jit
    def _store_e4m3(out, row0, rows, cols, y, scale, out_rows, SCALE: tl.constexpr, ROUND: tl.constexpr,
                    TRANSPOSE: tl.constexpr, KEY_ORDER: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SCALE_ROWS: tl.constexpr):
        """y x (1 / scale) in e4m3 (y's bytes as they are without SCALE) into rows row0 + rows and
        columns `cols` of one (batch, head)'s output: (out_rows, HEAD_DIM) row-major, or with
        TRANSPOSE (HEAD_DIM, out_rows), with KEY_ORDER its rows in `permute_keys`'s order. Rows >=
        out_rows are not written, nor the tile's rows from SCALE_ROWS on (the next block's)."""
        if SCALE:
            # div_rn: IEEE division, as PyTorch's; Triton's `/` is an approximate one on the GPU.
            if scale >= 1.1754943508222875e-38:  # float32's smallest normal: 1 / scale is finite
                y = y * tl.math.div_rn(1.0, scale)
            else:
                y = tl.math.div_rn(y, scale)
            y = tl.clamp(y, -448.0, 448.0)
            if ROUND:
                y = _round_to_e4m3(y)
            y8 = y.to(tl.float8e4nv)
        else:
            y8 = y
        if KEY_ORDER:  # row 16g + 8a + 2c + j to 16g + 4c + 2a + j: the mask is the same per group of 16
            BLOCK_ROWS: tl.constexpr = y8.shape[0]
            y8 = tl.reshape(tl.permute(tl.reshape(y8, (BLOCK_ROWS // 16, 2, 4, 2, y8.shape[1])), (0, 2, 1, 3, 4)),
                            (BLOCK_ROWS, y8.shape[1]))
        keep = (row0 + rows < out_rows) & (rows < SCALE_ROWS)
        if TRANSPOSE:
            # Runs along the rows. out_rows is a multiple of 16 the compiler can see (n16 * 16), so
            # the mask is constant over aligned runs of 16 rows and the stores can be 16 bytes wide.
            tl.store(out + cols[:, None] * out_rows + (row0 + rows)[None, :], tl.trans(y8), mask=keep[None, :])
        else:
            tl.store(out + (row0 + rows)[:, None] * HEAD_DIM + cols[None, :], y8, mask=keep[:, None])

    @triton.jit
    def _rotate_half(x, m, IEEE: tl.constexpr):
        """x @ m, float32: 16-bit operands on the tensor cores (the +-1 products are exact, the sums
        float32), or float32 ones in IEEE float32 (for float32 inputs, where tf32 would drop bits,
        and in the interpreter, whose bfloat16 dot is wrong in Triton 3.6)."""
        if IEEE:
            return tl.dot(x.to(tl.float32), m, input_precision="ieee")
        return tl.dot(x, m)

    @triton.jit
    def _load_rows(X, M, x_base, stride_xn, stride_xd, row0, rows, seqlen,
                   SCALE: tl.constexpr, ROTATE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                   SCALE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INV_SQRT_D: tl.constexpr):
        """Rows row0 + rows of one (batch, head) (x_base), rotated (ROTATE) and in float32 (SCALE),
        rows past seqlen or the block (SCALE_ROWS) as +0: (y, y_hi), y_hi the right half's where
        SPLIT (`quantize_kernel`), else y again."""
        row_ok = ((row0 + rows < seqlen) & (rows < SCALE_ROWS))[:, None]
        x_rows = x_base + (row0 + rows)[:, None] * stride_xn
        if SPLIT:
            WIDTH: tl.constexpr = HEAD_DIM // 2
        else:
            WIDTH: tl.constexpr = HEAD_DIM
        cols = tl.arange(0, WIDTH)
        y = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok, other=0.0)
        y_hi = y
        if ROTATE:
            # M is read once per tile (from L2 after the first), its top-left WIDTH square here.
            y = _rotate_half(y, tl.load(M + cols[:, None] * HEAD_DIM + cols[None, :]), IEEE)
            if SPLIT:
                q = tl.load(x_rows + (WIDTH + cols)[None, :] * stride_xd, mask=row_ok, other=0.0)
                q = _rotate_half(q, tl.load(M + (WIDTH + cols)[:, None] * HEAD_DIM + cols[None, :]), IEEE)
                y, y_hi = y + q, y - q
                y_hi = tl.where(row_ok, y_hi * INV_SQRT_D, 0.0)
            # Masked rows are zeros, but may be -0 (a sum of -0 products): the transposed layout's
            # padding must be +0.
            y = tl.where(row_ok, y * INV_SQRT_D, 0.0)
            if not SPLIT:
                y_hi = y
        elif SCALE:
            y = y.to(tl.float32)
            y_hi = y
        return y, y_hi

    @triton.jit
    def _amax(y, y_hi, SPLIT: tl.constexpr):
        amax = tl.max(tl.max(tl.abs(y), 1), 0)
        if SPLIT:
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(y_hi), 1), 0))
        return amax

    @triton.jit
    def _store_rows(out, row0, rows, y, y_hi, scale, out_rows, SCALE: tl.constexpr, ROUND: tl.constexpr,
                    SPLIT: tl.constexpr, TRANSPOSE: tl.constexpr, KEY_ORDER: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SCALE_ROWS: tl.constexpr):
        """`_load_rows`'s (y, y_hi) for rows row0 + rows in e4m3 (`_store_e4m3`)."""
        if SPLIT:
            WIDTH: tl.constexpr = HEAD_DIM // 2
        else:
            WIDTH: tl.constexpr = HEAD_DIM
        cols = tl.arange(0, WIDTH)
        _store_e4m3(out, row0, rows, cols, y, scale, out_rows, SCALE, ROUND, TRANSPOSE, KEY_ORDER, HEAD_DIM,
                    SCALE_ROWS)
        if SPLIT:
            _store_e4m3(out, row0, rows, WIDTH + cols, y_hi, scale, out_rows, SCALE, ROUND, TRANSPOSE, KEY_ORDER,
                        HEAD_DIM, SCALE_ROWS)

    # Not specialised on the lengths: Triton would compile a variant per divisibility by 16 of
    # each, and with seqlen == 1 it gave wrong transposed tiles on an H100 (Triton 3.6). n16 (the
    # transposed layout's rows / 16) may be 1 too.
    @triton.jit(do_not_specialize=["seqlen", "n16"])
    def quantize_kernel(
        X, M, Out, Descale,
        stride_xb, stride_xh, stride_xn, stride_xd,
        heads, seqlen, n16,
        SCALE: tl.constexpr, ROTATE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, ROUND: tl.constexpr,
        TRANSPOSE: tl.constexpr, KEY_ORDER: tl.constexpr, BLOCK_ROWS: tl.constexpr, TAIL_ROWS: tl.constexpr,
        SCALE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INV_SQRT_D: tl.constexpr,
    ):
        """One program: SCALE_ROWS rows of one (batch, head), rotated (ROTATE), scaled by their amax
        and written as e4m3 with their descale. Grid: (row blocks, batch * heads). The rows come in
        a tile of BLOCK_ROWS and, where TAIL_ROWS > 0, one of TAIL_ROWS after it (`_row_tiles`:
        192 = 128 + 64). Without SCALE, X's bytes (e4m3 as uint8) are written unchanged, with no
        descale: a layout copy.

        M: the (HEAD_DIM, HEAD_DIM) rotation matrix diag(signs) H (ROTATE only). SPLIT: rotate
        with half of it, as H = [[H', H'], [H', -H']] (H' = H of HEAD_DIM / 2): with x = [a, b]
        and M's left half [[A], [B]] (A, B the HEAD_DIM / 2 square blocks), x @ M = [p + q, p - q]
        where p = a @ A and q = b @ B: two dots of half the width and one butterfly stage in
        float32, half the multiply-adds and half of M in shared memory.
        Out: contiguous (B, H, seqlen, HEAD_DIM), or with TRANSPOSE (B, H, HEAD_DIM, n16 * 16)
        whose rows in [seqlen, n16 * 16) get zeros (that layout's padding), with KEY_ORDER in
        `permute_keys`'s order.
        IEEE: the dot in IEEE float32 (see _rotate_half). ROUND: round to e4m3 in float32 before
        the conversion (for the interpreter).
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 offsets: B * H * N * D may pass 2^31 elements.
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        row0 = pid_m.to(tl.int64) * SCALE_ROWS
        x_base = X + b * stride_xb + h * stride_xh
        if TRANSPOSE:
            out_rows = n16.to(tl.int64) * 16
        else:
            out_rows = seqlen.to(tl.int64)
        out = Out + pid_bh.to(tl.int64) * HEAD_DIM * out_rows
        rows = tl.arange(0, BLOCK_ROWS)
        y, y_hi = _load_rows(X, M, x_base, stride_xn, stride_xd, row0, rows, seqlen, SCALE, ROTATE, SPLIT, IEEE,
                             SCALE_ROWS, HEAD_DIM, INV_SQRT_D)
        if TAIL_ROWS > 0:
            tail = BLOCK_ROWS + tl.arange(0, TAIL_ROWS)
            z, z_hi = _load_rows(X, M, x_base, stride_xn, stride_xd, row0, tail, seqlen, SCALE, ROTATE, SPLIT,
                                 IEEE, SCALE_ROWS, HEAD_DIM, INV_SQRT_D)
        if SCALE:
            amax = _amax(y, y_hi, SPLIT)
            if TAIL_ROWS > 0:
                amax = tl.maximum(amax, _amax(z, z_hi, SPLIT))
            # div_rn: IEEE division, as PyTorch's; Triton's `/` is an approximate one on the GPU.
            scale = tl.math.div_rn(amax, 448.0)
            scale = tl.where(scale > 0, scale, 1.0)
        else:
            scale = 1.0  # unused: the e4m3 bytes are written as they were read
        _store_rows(out, row0, rows, y, y_hi, scale, out_rows, SCALE, ROUND, SPLIT, TRANSPOSE, KEY_ORDER, HEAD_DIM,
                    SCALE_ROWS)
        if TAIL_ROWS > 0:
            _store_rows(out, row0, tail, z, z_hi, scale, out_rows, SCALE, ROUND, SPLIT, TRANSPOSE, KEY_ORDER,
                        HEAD_DIM, SCALE_ROWS)
        if SCALE:
            tl.store(Descale + pid_bh * tl.num_programs(0) + pid_m, scale)


def _row_tiles(block_rows: int) -> tuple[int, int]:
    """The quantization kernel's tiles for a block of `block_rows` rows (a multiple of 16): one of
    block_rows where it is a power of two; else the largest power of two in it and the rest where
    that is one too (192 = 128 + 64); else one of the power of two above, its last rows masked."""
    first = 1 << (block_rows.bit_length() - 1)
    rest = block_rows - first
    if rest == 0 or rest & (rest - 1) == 0:
        return first, rest
    return 1 << block_rows.bit_length(), 0


def _split(head_dim: int, rotate: bool) -> bool:
    # Rotations of 128 and wider as two dots of half the width. The full D x D dot is 2D/3 flops per
    # byte moved (2 bytes read, 1 written an element): 85 at D = 128, 171 at D = 256, near or past
    # what an H100 sustains in Triton's dots per byte of copy bandwidth. Measured on an H100
    # (scripts/bench_fp8_quantize.py, 2026-12-05): D = 128 split 220 us, whole 291 us.
    return rotate and head_dim >= 128


def _num_warps(head_dim: int, block_rows: int, rotate: bool) -> int:
    # Enough warps that the float32 tile takes about 64 registers a thread (8 KiB a warp), 4 to 8.
    # On an H100, 128-row blocks (docs/data/fp8-quantize-reciprocal-h100-2026-12-06z.log, the
    # pass multiplying by 1 / scale): D = 64 rotated 70 us at 4 warps, 77 at 8; D = 256 rotated
    # 499 at 8, 508 at 16, transposed 285 at 8, 371 at 16 (16 had been the fastest for the
    # rotation at D = 256 while the pass divided each entry).
    # A rotated block in two tiles takes 4: over 8 warps the 64-row tile's dot splits its columns
    # between the warpgroups, and its layout conversions go through shared memory (33 barriers in
    # the PTX against 13). H100, D = 128, 192 rows (fp8-quantize-192-rows-h100-2026-12-06ab.log):
    # rotated 185 us at 4 warps, 274 at 8, 300 at 16; transposed 137 / 135 / 138.
    if rotate and _row_tiles(block_rows)[1]:
        return 4
    # Triton takes powers of two only (a 192-row block at D = 64 would ask for 6).
    wanted = sum(_row_tiles(block_rows)) * head_dim // 2048
    return min(8, max(4, 1 << max(wanted, 1).bit_length() - 1))


def head_dim_addressable(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where a row's head-dim offsets, 32-bit in the kernel, would pass 2^31
    (a permuted view whose head-dim stride spans other dims)."""
    return x.contiguous() if (x.shape[3] - 1) * abs(x.stride(3)) >= 2**31 else x


def quantize(x, block_rows: int, signs=None, transpose: bool = False, key_order: bool = False,
             num_warps: int | None = None):
    """The results of `quantize_reference` from one fused Triton kernel: the same bytes and
    descales without `signs`, and with them within the rotation's float32 rounding (module
    docstring: a few ulps in the descales, rarely an e4m3 value one step off).

    Each program loads block_rows rows (any multiple of 16, in one or two tiles: `_row_tiles`) of
    one (batch, head) through x's strides, rotates them by a `tl.dot` with
    `rotation_matrix(signs)` (two of half the width for D >= 128), takes their amax and writes
    them in e4m3, transposed when asked, and their descale. Grid: (ceil(N /
    block_rows), B * H). Ragged last blocks are masked: their missing rows count as zeros for the
    amax and are not written (except as the zero padding of the transposed layout). key_order:
    the transposed layout's keys in `permute_keys`'s order (the Hopper kernel's). num_warps:
    the kernel's, None for `_num_warps`'s choice (for benchmarks).
    """
    _check(x, block_rows, signs)
    if key_order and not transpose:
        raise ValueError("key_order: applies to the transposed layout only (transpose=True)")
    batch, heads, seqlen, head_dim = x.shape
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"x: batch x heads = {batch * heads}: at most {MAX_GRID_Y} (the kernel's second grid axis), "
                         f"got shape {tuple(x.shape)}")
    x = head_dim_addressable(x)
    blocks = triton.cdiv(seqlen, block_rows)
    n16 = padded_length(seqlen) // PAD
    if transpose:
        out = torch.empty(batch, heads, head_dim, n16 * PAD, dtype=FP8, device=x.device)
    else:
        out = torch.empty(batch, heads, seqlen, head_dim, dtype=FP8, device=x.device)
    descale = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
    if blocks == 0 or batch * heads == 0:
        return out, descale
    interpreted = x.device.type == "cpu"  # CPU tensors: the interpreter
    ieee = interpreted or x.dtype == torch.float32
    matrix = x if signs is None else rotation_matrix(signs, torch.float32 if ieee else x.dtype, x.device)
    tile_rows, tail_rows = _row_tiles(block_rows)
    quantize_kernel[(blocks, batch * heads)](
        x, matrix, out, descale, *x.stride(), heads, seqlen, n16, SCALE=True,
        ROTATE=signs is not None, SPLIT=_split(head_dim, signs is not None), IEEE=ieee, ROUND=interpreted,
        TRANSPOSE=transpose, KEY_ORDER=key_order, BLOCK_ROWS=tile_rows, TAIL_ROWS=tail_rows, SCALE_ROWS=block_rows,
        HEAD_DIM=head_dim, INV_SQRT_D=_inv_sqrt(head_dim),
        num_warps=num_warps or _num_warps(head_dim, block_rows, signs is not None))
    return out, descale


def rearrange_v(v: torch.Tensor) -> torch.Tensor:
    """An e4m3 V (B, H, N, D), any strides, in the layout the Hopper kernel reads: (B, H, D, N_pad)
    with N contiguous, keys in `permute_keys`'s order, zero padding, the values unchanged. The
    same bytes as permute_keys(V^T zero-padded), in one pass of the quantization kernel without
    its scaling, where PyTorch's strided copies cost about 0.2 ms a call at (4, 16, 4096, 128) on
    an H100 (the gap between docs/benchmarks.md's two pre-quantized columns); not yet timed.
    PyTorch's copies still do it where the kernel cannot run: other devices, the CPU outside
    Triton's interpreter, more than MAX_GRID_Y (batch, head) pairs."""
    if v.dim() != 4 or v.dtype != FP8:
        raise ValueError(f"v: expected a (B, H, N, D) float8_e4m3fn tensor, got {v.dtype} of shape {tuple(v.shape)}")
    batch, heads, seqlen, head_dim = v.shape
    if not _power_of_two(head_dim) or head_dim < PAD:
        raise ValueError(f"v: head dim must be a power of two >= {PAD}, got shape {tuple(v.shape)}")
    n16 = padded_length(seqlen) // PAD
    kernel_runs = triton is not None and batch * heads <= MAX_GRID_Y and (
        v.is_cuda or (v.device.type == "cpu" and triton_interpreting()))
    if not kernel_runs:
        out = torch.zeros(batch, heads, head_dim, n16 * PAD, dtype=FP8, device=v.device)
        out[..., :seqlen] = v.transpose(2, 3)
        return permute_keys(out)
    out = torch.empty(batch, heads, head_dim, n16 * PAD, dtype=FP8, device=v.device)  # padding included
    block_rows = 128
    blocks = triton.cdiv(seqlen, block_rows)
    if blocks == 0 or batch * heads == 0:
        return out
    raw, raw_out = head_dim_addressable(v).view(torch.uint8), out.view(torch.uint8)  # bytes: no float8 type needed on any GPU
    quantize_kernel[(blocks, batch * heads)](
        raw, raw, raw_out, raw_out, *v.stride(), heads, seqlen, n16,
        SCALE=False, ROTATE=False, SPLIT=False, IEEE=False, ROUND=False, TRANSPOSE=True, KEY_ORDER=True,
        BLOCK_ROWS=block_rows, TAIL_ROWS=0, SCALE_ROWS=block_rows, HEAD_DIM=head_dim, INV_SQRT_D=1.0,
        num_warps=_num_warps(head_dim, block_rows, rotate=False))
    return out
