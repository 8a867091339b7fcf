"""Quantization of Q, K and V to float8 e4m3 for the FP8 attention forward, FlashAttention-3 style.

Rotation. H is the D x D Walsh-Hadamard matrix (entries +-1, Sylvester order) and S = diag(s) a
diagonal of random signs; R = S H / sqrt(D) is orthonormal (R R^T = I), so rotating Q and K by the
same R leaves the scores unchanged:

    (Q R)(K R)^T = Q R R^T K^T = Q K^T.

A row's few large entries (outliers) are spread over all D coordinates by R, so the block's
maximum, which sets the quantization step of every entry in the block, drops towards the typical
magnitude and the small entries keep more of their bits. The signs make the rotation random
enough that no fixed input lines up with H. x R is computed by the fast Walsh-Hadamard transform:
log2(D) butterfly stages of sums and differences, O(D log D) instead of a D x D matmul.

Quantization. Per (batch, head) and per block of `block_rows` consecutive rows (the attention
kernel's tile), with y the (rotated) block in float32:

    scale = amax(|y|) / 448      (448: e4m3fn's largest finite value)
    y8    = e4m3(clamp(y / scale, -448, 448))      round to nearest, ties to even

and y ~= float(y8) * scale: the scale is returned as the descale, float32 (B, H, blocks). A block
with scale 0 (all zeros, or too small for amax / 448 to be a normal float32) gets scale 1.0 so
that the descale stays finite and positive; its entries round to 0 (or to e4m3's subnormals).
Rounding to e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 for |y / scale| >= 2^-6,
an absolute one of at most 2^-10 * scale below (e4m3's subnormal steps of 2^-9). Inputs must be
finite: an inf or NaN makes the whole block's scale inf or NaN.

V is not rotated (its rotation would have to be undone on the output) and is written transposed,
(B, H, D, N_pad) with N contiguous: the K-major B operand that Hopper's FP8 wgmma reads for P V.
N_pad is N rounded up to 16 (the FP8 MMA's K step) and the pad columns hold zeros.

`quantize_reference` is the plain-PyTorch statement of all this; `quantize` computes the same
bytes in one fused Triton kernel, one pass over the input.
"""

from __future__ import annotations

import math

import torch

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
    # One definition for the reference and the kernel: both round this same value to float32.
    return 1.0 / math.sqrt(head_dim)


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x * signs along the last dim, then the orthonormal Walsh-Hadamard transform H / sqrt(D).

    Computed in float64 for float64 input, else in float32, and returned in that dtype: 16-bit
    inputs come back as float32, since rounding the rotation back to 16 bits would add an error
    before the quantization that it exists to reduce.

    Each butterfly stage combines the entries pairwise, (y[2j], y[2j+1]) -> (sum, difference),
    writing sums to the first half and differences to the second (the constant-geometry form of
    the transform): after log2(D) stages every bit of the index has been combined once. The fused
    kernel runs the same stages in the same order, so both round identically in float32.
    """
    head_dim = x.shape[-1]
    if not _power_of_two(head_dim):
        raise ValueError(f"x: the Hadamard rotation needs a power-of-two last dim, got shape {tuple(x.shape)}")
    if signs.shape != (head_dim,):
        raise ValueError(f"signs: expected shape ({head_dim},), got {tuple(signs.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dtype) * signs.to(device=x.device, dtype=dtype)
    for _ in range(head_dim.bit_length() - 1):
        pairs = y.unflatten(-1, (head_dim // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        y = torch.cat([even + odd, even - odd], dim=-1)
    return y * torch.tensor(_inv_sqrt(head_dim), dtype=dtype, device=x.device)


def _check(x: torch.Tensor, block_rows: int, signs) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, H, N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    if not _power_of_two(x.shape[-1]) or x.shape[-1] < PAD:
        raise ValueError(f"x: head dim must be a power of two >= {PAD}, got shape {tuple(x.shape)}")
    if not _power_of_two(block_rows) or block_rows < PAD:
        raise ValueError(f"block_rows: expected a power of two >= {PAD}, got {block_rows}")
    if signs is not None and signs.shape != (x.shape[-1],):
        raise ValueError(f"signs: expected shape ({x.shape[-1]},), got {tuple(signs.shape)}")


def _padded(seqlen: int) -> int:
    return -(-seqlen // PAD) * PAD


def quantize_reference(x, block_rows: int, signs=None, transpose: bool = False):
    """Plain-PyTorch reference of `quantize`: (x_fp8, descale) as the module docstring defines them.

    x: (B, H, N, D) float16/bfloat16/float32, any strides; rotated first when `signs` is given.
    x_fp8: (B, H, N, D) float8_e4m3fn contiguous, or with transpose=True (B, H, D, N_pad) holding
    it transposed, N_pad = N rounded up to 16, pad columns 0. descale: float32 (B, H, ceil(N /
    block_rows)), the scale of each block (x ~= x_fp8 * descale). The same bytes on the CPU and
    on a GPU.
    """
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
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # torch's float8 conversion rounds to nearest even but turns values beyond 448 into NaN:
    # clamp first (y / scale can pass 448 by a float32 rounding at the block's maximum).
    y8 = (tiles / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    y8 = y8.view(batch, heads, blocks * block_rows, head_dim)[:, :, :seqlen]
    if transpose:
        out = torch.zeros(batch, heads, head_dim, _padded(seqlen), dtype=FP8, device=x.device)
        out[..., :seqlen] = y8.transpose(2, 3)
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

    # Not specialised on the lengths: Triton would compile a variant per divisibility by 16 of
    # each, and with seqlen == 1 it gave wrong transposed tiles on an H100 (Triton 3.6).
    @triton.jit(do_not_specialize=["seqlen", "out_rows"])
    def quantize_kernel(
        X, Signs, Out, Descale,
        stride_xb, stride_xh, stride_xn, stride_xd,
        stride_ob, stride_oh, stride_on, stride_od,
        heads, seqlen, out_rows,
        ROTATE: tl.constexpr, ROUND: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, STAGES: tl.constexpr, INV_SQRT_D: tl.constexpr,
    ):
        """One program: BLOCK_ROWS rows of one (batch, head), rotated (ROTATE), scaled by their
        amax and written as e4m3 with their descale. Grid: (row blocks, batch * heads).

        Out is addressed by (batch, head, row, dim) strides. TRANSPOSE: Out is (D, N_pad) per head
        and the tile is transposed in registers so that its stores run along N; rows in
        [seqlen, out_rows) are written as zeros (that layout's padding). STAGES = log2(HEAD_DIM).
        ROUND: round to e4m3 in float32 before the conversion (for the interpreter).
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 offsets: B * H * N * D may pass 2^31 elements.
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        row0 = pid_m.to(tl.int64) * BLOCK_ROWS
        rows = tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, HEAD_DIM)
        row_ok = row0 + rows < seqlen
        x_base = X + b * stride_xb + h * stride_xh + row0 * stride_xn
        y = tl.load(x_base + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        if ROTATE:
            y = y * tl.load(Signs + cols)[None, :]
            # The butterfly stages of `hadamard_rotate`, in registers: pair up neighbours, put the
            # sums in the first half of the row and the differences in the second.
            for _ in tl.static_range(STAGES):
                even, odd = tl.split(tl.reshape(y, (BLOCK_ROWS, HEAD_DIM // 2, 2)))
                y = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), (BLOCK_ROWS, HEAD_DIM))
            y = y * INV_SQRT_D
            y = tl.where(row_ok[:, None], y, 0.0)  # masked rows may have become -0: pad columns must be +0
        # div_rn: IEEE division, as PyTorch's; Triton's `/` is an approximate one on the GPU.
        scale = tl.math.div_rn(tl.max(tl.max(tl.abs(y), 1), 0), 448.0)
        scale = tl.where(scale > 0, scale, 1.0)
        y = tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0)
        if ROUND:
            y = _round_to_e4m3(y)
        out_base = Out + b * stride_ob + h * stride_oh + row0 * stride_on
        if TRANSPOSE:
            tl.store(out_base + cols[:, None] * stride_od + rows[None, :] * stride_on,
                     tl.trans(y.to(tl.float8e4nv)), mask=(row0 + rows < out_rows)[None, :])
        else:
            tl.store(out_base + rows[:, None] * stride_on + cols[None, :] * stride_od, y.to(tl.float8e4nv),
                     mask=(row0 + rows < out_rows)[:, None])
        tl.store(Descale + pid_bh * tl.num_programs(0) + pid_m, scale)


# Warps per program for the rotation, by (head dim, block_rows): the fastest of 4, 8 and 16 on an
# H100 (bfloat16, B=4, H=32, N=8192). The butterfly's permutes move data between threads, and
# which count moves it best varies with the tile. Without a rotation the kernel is bound by memory
# (the plain path runs at the speed of a cast to fp8) and the count matters little.
ROTATION_WARPS = {(64, 64): 8, (64, 128): 16, (128, 64): 8, (128, 128): 16, (256, 64): 4, (256, 128): 16}


def _num_warps(head_dim: int, block_rows: int, rotate: bool, transpose: bool) -> int:
    if rotate:
        return ROTATION_WARPS.get((head_dim, block_rows), 8)
    return 4 if transpose or block_rows * head_dim <= 8192 else 8


def quantize(x, block_rows: int, signs=None, transpose: bool = False):
    """The results of `quantize_reference`, bit for bit, from one fused Triton kernel.

    Each program loads a (block_rows, D) tile of one (batch, head) through x's strides, applies
    the signs and the fast Walsh-Hadamard transform in registers (log2(D) butterfly stages, each
    a reshape to (block_rows, D/2, 2), a split into neighbours, a join of their sums and
    differences and a permute that puts the sums first: no matmul), takes the tile's amax and
    writes the e4m3 tile, transposed when asked, and its descale. Grid: (ceil(N / block_rows),
    B * H). Ragged last blocks are masked: their missing rows count as zeros for the amax and
    are not written (except as the zero padding of the transposed layout).
    """
    _check(x, block_rows, signs)
    batch, heads, seqlen, head_dim = x.shape
    blocks = triton.cdiv(seqlen, block_rows)
    if transpose:
        out = torch.empty(batch, heads, head_dim, _padded(seqlen), dtype=FP8, device=x.device)
        out_strides = out.stride(0), out.stride(1), out.stride(3), out.stride(2)  # (b, h, row, dim)
        out_rows = out.shape[3]
    else:
        out = torch.empty(batch, heads, seqlen, head_dim, dtype=FP8, device=x.device)
        out_strides = out.stride()
        out_rows = seqlen
    descale = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
    if blocks == 0 or batch * heads == 0:
        return out, descale
    if signs is not None:
        signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
    quantize_kernel[(blocks, batch * heads)](
        x, x if signs is None else signs, out, descale, *x.stride(), *out_strides, heads, seqlen, out_rows,
        ROTATE=signs is not None, ROUND=x.device.type == "cpu",  # CPU tensors: the interpreter
        TRANSPOSE=transpose, BLOCK_ROWS=block_rows, HEAD_DIM=head_dim, STAGES=head_dim.bit_length() - 1,
        INV_SQRT_D=_inv_sqrt(head_dim), num_warps=_num_warps(head_dim, block_rows, signs is not None, transpose))
    return out, descale
