"""FP8 quantization for the fp8-hopper backend: random signs, the Hadamard rotation, the
plain-PyTorch reference and the fused Triton kernel.

The kernel runs in Triton's CPU interpreter where there is no GPU (conftest sets TRITON_INTERPRET=1
there), on the GPU where there is a Hopper one. Without the rotation its bytes must equal the
reference's exactly (the same float32 operations: IEEE division, e4m3 rounding to nearest even
like PyTorch's). With it they may not: the kernel's rotation is a float32-accumulated matmul and
the reference's the exact one rounded to float32, so `assert_close_quantization` allows what that
can change and no more: descales a few float32 ulps apart, e4m3 values one step apart, and few of
them. Oracles are float64 math on fresh random data (never zeros, except where a zero block is the
point).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdispatch.backends.fp8_hopper.quantize import (FP8_MAX, _num_warps, hadamard_rotate, permute_keys, quantize,
                                                          quantize_reference, random_signs, rearrange_v,
                                                          rotation_matrix)

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

FP8 = torch.float8_e4m3fn
HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"  # without a GPU the kernel runs in the interpreter, on CPU tensors
needs_kernel = pytest.mark.skipif(
    not HAS_TRITON or (HAS_GPU and torch.cuda.get_device_capability() < (8, 9)),
    reason="needs triton, and (where there is a GPU) one with float8 e4m3 conversions (compute capability 8.9+)")


def sylvester(head_dim: int) -> torch.Tensor:
    """The D x D Walsh-Hadamard matrix, float64, built by Kronecker products (independent of the butterfly)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.kron(step, h)
    return h


def blocks_of(y: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, blocks, block_rows, D), zero rows appended to the last block."""
    batch, heads, seqlen, head_dim = y.shape
    blocks = -(-seqlen // block_rows)
    y = torch.nn.functional.pad(y, (0, 0, 0, blocks * block_rows - seqlen))
    return y.view(batch, heads, blocks, block_rows, head_dim)


def dequantize(x8: torch.Tensor, descale: torch.Tensor, block_rows: int) -> torch.Tensor:
    """float64 x8 * descale of its block, (B, H, N, D)."""
    seqlen = x8.shape[2]
    per_row = descale.double().repeat_interleave(block_rows, dim=2)[:, :, :seqlen]
    return x8.double() * per_row[..., None]


def assert_same_quantization(actual, expected, what=""):
    (x8, descale), (ref8, ref_descale) = actual, expected
    assert x8.dtype == FP8 and x8.shape == ref8.shape and x8.is_contiguous(), what
    bytes_, ref_bytes = x8.cpu().view(torch.uint8), ref8.cpu().view(torch.uint8)
    differ = (bytes_ != ref_bytes).sum().item()
    assert differ == 0, f"{what}: {differ} of {ref_bytes.numel()} fp8 bytes differ from the reference"
    assert descale.dtype == torch.float32 and descale.shape == ref_descale.shape, what
    torch.testing.assert_close(descale.cpu(), ref_descale.cpu(), rtol=1e-6, atol=0, msg=what)


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values at |v|: 2^(floor(log2 |v|) - 3), and 2^-9 (subnormal) below 2^-6."""
    _, exponent = torch.frexp(v.abs().clamp_min(2.0**-6))  # |v| = m 2^exponent, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), exponent - 4)


ROTATED_DIFFER = 1e-3  # largest fraction of rotated e4m3 values allowed to differ from the reference


def assert_close_quantization(actual, expected, what=""):
    """The rotated kernel's rule: descales within a few float32 ulps (rtol 1e-6, or 4 ulps of a
    subnormal), every e4m3 value equal to the reference's or its neighbour, at most ROTATED_DIFFER
    of them not equal."""
    (x8, descale), (ref8, ref_descale) = actual, expected
    assert x8.dtype == FP8 and x8.shape == ref8.shape and x8.is_contiguous(), what
    assert descale.dtype == torch.float32 and descale.shape == ref_descale.shape, what
    torch.testing.assert_close(descale.cpu(), ref_descale.cpu(), rtol=1e-6, atol=4 * 2.0**-149, msg=what)
    got, ref = x8.cpu().float(), ref8.cpu().float()
    gap = (got - ref).abs()
    far = ~(gap <= e4m3_step(torch.minimum(got.abs(), ref.abs())))  # NaN counts as far
    assert not far.any(), f"{what}: {far.sum().item()} e4m3 values more than one step from the reference's, " \
                          f"e.g. {got[far][:4].tolist()} for {ref[far][:4].tolist()}"
    differ = (got != ref).sum().item()
    assert differ <= ROTATED_DIFFER * ref.numel(), f"{what}: {differ} of {ref.numel()} e4m3 values differ"


def test_the_rotated_rule_can_fail():
    ref8 = torch.tensor([0.0, 2.0**-9, 0.25, 1.0, 384.0, -3.0] * 500).to(FP8)
    ref = (ref8, torch.ones(3))
    codes = ref8.view(torch.uint8)
    up = (codes + 1).view(FP8)  # each value's next code away from zero: one step
    one = ref8.clone()
    one[3] = up[3]
    assert_close_quantization((one, torch.ones(3)), ref)  # one value a step off: 1 in 3000
    for bad in ((up, torch.ones(3)),  # all of them a step off
                ((codes + 2).view(FP8), torch.ones(3)),  # two steps
                (ref8, torch.ones(3) * (1 + 2e-6))):  # descales 16 ulps off
        with pytest.raises(AssertionError):
            assert_close_quantization(bad, ref)
    tiny = torch.full((3,), 2.0**-140)
    assert_close_quantization((ref8, tiny + 2.0**-148), (ref8, tiny))
    with pytest.raises(AssertionError):
        assert_close_quantization((ref8, tiny + 2.0**-145), (ref8, tiny))
    assert e4m3_step(torch.tensor([2.0**-12, 2.0**-6, 0.3, 1.0, 1.9, -448.0])).tolist() == \
        [2.0**-9, 2.0**-9, 2.0**-5, 2.0**-3, 2.0**-3, 2.0**5]


# Random signs


def test_random_signs_are_plus_minus_one_and_reproducible():
    signs = random_signs(128, seed=7, device="cpu")
    assert signs.shape == (128,) and signs.dtype == torch.float32
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(signs, random_signs(128, seed=7, device=torch.device("cpu")))
    assert not torch.equal(signs, random_signs(128, seed=8, device="cpu"))
    # Drawn from their own generator: the global RNG neither changes them nor is advanced.
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    assert torch.equal(signs, random_signs(128, seed=7, device="cpu"))
    torch.set_rng_state(state)


# The Hadamard rotation


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_rotation_is_the_orthonormal_walsh_hadamard_transform(head_dim):
    signs = random_signs(head_dim, seed=head_dim, device="cpu")
    rotation = hadamard_rotate(torch.eye(head_dim, dtype=torch.float64), signs)  # row i = e_i R
    assert rotation.dtype == torch.float64
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    expected = torch.diag(signs.double()) @ sylvester(head_dim) / math.sqrt(head_dim)
    torch.testing.assert_close(rotation, expected, rtol=0, atol=1e-12)
    x = torch.randn(3, 5, head_dim, dtype=torch.float64)
    torch.testing.assert_close(hadamard_rotate(x, signs).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_rotating_q_and_k_keeps_their_scores(head_dim):
    signs = random_signs(head_dim, seed=3, device="cpu")
    q = torch.randn(2, 3, 40, head_dim, dtype=torch.float64)
    k = torch.randn(2, 3, 56, head_dim, dtype=torch.float64)
    scores = hadamard_rotate(q, signs) @ hadamard_rotate(k, signs).transpose(-1, -2)
    torch.testing.assert_close(scores, q @ k.transpose(-1, -2), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotation_of_low_precision_input_is_float32(dtype):
    signs = random_signs(64, seed=0, device="cpu")
    x = torch.randn(4, 64).to(dtype)
    y = hadamard_rotate(x, signs)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), hadamard_rotate(x.double(), signs), rtol=0, atol=1e-5)


def test_rotation_rejects_a_head_dim_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotate(torch.randn(2, 96), torch.ones(96))


# The reference quantizer


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("block_rows", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_scales_by_the_block_amax_and_round_trips_within_half_an_ulp(dtype, block_rows, rotate):
    head_dim, seqlen = 128, 200  # a ragged last block
    x = (torch.randn(2, 3, seqlen, head_dim) * 5).to(dtype)
    signs = random_signs(head_dim, seed=11, device="cpu") if rotate else None
    x8, descale = quantize_reference(x, block_rows, signs)
    assert x8.shape == x.shape and x8.dtype == FP8 and x8.is_contiguous()
    assert descale.shape == (2, 3, -(-seqlen // block_rows)) and descale.dtype == torch.float32

    # What was quantized: x, or its rotation in float32 (the reference checked against float64 above).
    y = x.double() if signs is None else hadamard_rotate(x, signs).double()
    if signs is not None:
        torch.testing.assert_close(y, hadamard_rotate(x.double(), signs), rtol=0, atol=1e-5)
    amax = blocks_of(y, block_rows).abs().amax(dim=(-2, -1))
    torch.testing.assert_close(descale.double(), amax / FP8_MAX, rtol=1e-6, atol=0)

    # Round to nearest in e4m3: at most 2^-4 relative where y / scale is normal (>= 2^-6), at most
    # half the subnormal step 2^-9 (times the scale) below it; 1e-6 for float32's own roundings.
    scale = descale.double().repeat_interleave(block_rows, dim=2)[:, :, :seqlen, None]
    error = (dequantize(x8, descale, block_rows) - y).abs()
    bound = (2.0**-4 * y.abs() + 2.0**-10 * scale) * (1 + 1e-6)
    assert (error <= bound).all(), f"max error over bound {(error / bound).max().item():.4f}"
    # The block's largest entry lands on 448 (saturated, never NaN: no 0x7F / 0xFF bytes).
    assert ((x8.view(torch.uint8) & 0x7F) != 0x7F).all()
    assert (blocks_of(x8.float(), block_rows).abs().amax(dim=(-2, -1)) == FP8_MAX).all()


@pytest.mark.parametrize("seqlen", [5, 64, 200])
def test_reference_transposed_layout_is_the_plain_one_transposed_and_zero_padded(seqlen):
    x = torch.randn(2, 2, seqlen, 64, dtype=torch.float16)
    x8, descale = quantize_reference(x, 64)
    xt, descale_t = quantize_reference(x, 64, transpose=True)
    padded = -(-seqlen // 16) * 16
    assert xt.shape == (2, 2, 64, padded) and xt.dtype == FP8 and xt.is_contiguous()
    assert torch.equal(xt[..., :seqlen].view(torch.uint8), x8.transpose(2, 3).view(torch.uint8))
    assert (xt[..., seqlen:].view(torch.uint8) == 0).all()
    assert torch.equal(descale_t, descale)


def test_reference_ragged_last_block_is_scaled_by_its_own_rows():
    x = torch.randn(1, 2, 130, 64)  # blocks of 64: 64, 64, 2 rows
    x[:, :, 128:] *= 1e-3
    _, descale = quantize_reference(x, 64)
    assert descale.shape == (1, 2, 3)
    torch.testing.assert_close(descale[:, :, 2], x[:, :, 128:].abs().amax(dim=(-2, -1)) / FP8_MAX, rtol=1e-6, atol=0)


def test_reference_zero_and_underflowing_blocks_get_a_finite_positive_descale():
    x = torch.randn(1, 2, 200, 64)
    x[:, :, 64:128] = 0.0
    x[:, 1, 128:192] = 1e-44  # amax / 448 underflows float32 to 0
    for signs in (None, random_signs(64, seed=5, device="cpu")):
        x8, descale = quantize_reference(x, 64, signs)
        assert torch.isfinite(descale).all() and (descale > 0).all()
        assert (descale[:, :, 1] == 1.0).all() and descale[0, 1, 2] == 1.0
        assert (x8[:, :, 64:128].float() == 0).all() and (x8[:, 1, 128:192].float() == 0).all()
        assert (x8[:, :, :64].float() != 0).any()


def test_reference_rejects_bad_arguments():
    x = torch.randn(1, 1, 32, 64)
    with pytest.raises(ValueError, match="block_rows: expected a positive multiple of 16, got 40"):
        quantize_reference(x, 40)
    with pytest.raises(ValueError, match="signs"):
        quantize_reference(x, 64, torch.ones(32))
    with pytest.raises(ValueError, match="x: expected float16"):
        quantize_reference(x.double(), 64)
    with pytest.raises(ValueError, match="head dim"):
        quantize_reference(torch.randn(1, 1, 32, 96), 64)


# The fused kernel


def test_rotation_matrix_is_the_signed_hadamard_matrix_and_cached():
    signs = random_signs(64, seed=4, device="cpu")
    matrix = rotation_matrix(signs, torch.bfloat16, "cpu")
    assert matrix.dtype == torch.bfloat16 and matrix.shape == (64, 64)
    assert torch.equal(matrix.double(), torch.diag(signs.double()) @ sylvester(64))
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(x @ matrix.double() / 8, hadamard_rotate(x, signs), rtol=0, atol=1e-12)
    assert rotation_matrix(signs, torch.bfloat16, "cpu") is matrix  # built once
    assert rotation_matrix(signs, torch.float32, "cpu").dtype == torch.float32
    signs[0] = -signs[0]  # changed in place: built anew
    assert torch.equal(rotation_matrix(signs, torch.bfloat16, "cpu").double(),
                       torch.diag(signs.double()) @ sylvester(64))


def assert_kernel_matches(x, block_rows, signs, transpose, what):
    """quantize against quantize_reference: bit for bit without signs, by the rotated rule with."""
    actual = quantize(x, block_rows, signs, transpose)
    expected = quantize_reference(x.cpu(), block_rows, None if signs is None else signs.cpu(), transpose)
    (assert_same_quantization if signs is None else assert_close_quantization)(actual, expected, what)
    if transpose:  # the padding is +0 bytes (the rotated rule compares values: -0 == +0)
        assert (actual[0][..., x.shape[2]:].cpu().view(torch.uint8) == 0).all(), what
    return actual


@needs_kernel
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("transpose", [False, True], ids=["nd", "dn"])
# 192: a tile of 128 rows and one of 64; 112: not two powers of two, a 128-row tile with its last 16 masked
@pytest.mark.parametrize("block_rows", [64, 112, 128, 192])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_kernel_matches_the_reference(head_dim, block_rows, transpose, rotate):
    dtype = (torch.float16, torch.bfloat16, torch.float32)[(head_dim // 64 + block_rows // 64 + transpose) % 3]
    x = (torch.randn(2, 3, 200, head_dim) * 4).to(dtype).to(DEVICE)  # 200: a ragged last block
    signs = random_signs(head_dim, seed=head_dim, device=DEVICE) if rotate else None
    assert_kernel_matches(x, block_rows, signs, transpose, f"{dtype} D={head_dim} block_rows={block_rows}")


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("block_rows", [16, 64, 112, 128, 192, 256, 1024])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_kernel_launches_a_power_of_two_warps(head_dim, block_rows, rotate):
    # The interpreter takes any count; the GPU compiler refuses 6 (D = 64, 192-row blocks once asked for it).
    warps = _num_warps(head_dim, block_rows, rotate)
    assert warps in (4, 8), (head_dim, block_rows, warps)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seqlen", [1, 17, 128, 129])
def test_kernel_matches_the_reference_for_each_dtype_and_length(dtype, seqlen):
    x = torch.randn(1, 2, seqlen, 64).to(dtype).to(DEVICE)
    signs = random_signs(64, seed=1, device=DEVICE)
    for rotation in (None, signs):
        for transpose in (False, True):
            assert_kernel_matches(x, 64, rotation, transpose, f"{dtype} N={seqlen}")


@needs_kernel
@pytest.mark.parametrize("seqlen", [1, 40, 200])
def test_kernel_writes_v_in_the_hopper_kernels_key_order(seqlen):
    x = (torch.randn(2, 3, seqlen, 64) * 3).to(torch.float16).to(DEVICE)
    got, got_descale = quantize(x, 128, None, transpose=True, key_order=True)
    want, want_descale = quantize_reference(x, 128, None, transpose=True, key_order=True)
    plain, _ = quantize_reference(x, 128, None, transpose=True)
    assert torch.equal(want.view(torch.uint8), permute_keys(plain).view(torch.uint8))
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(got_descale, want_descale)
    with pytest.raises(ValueError, match="key_order: applies to the transposed layout only"):
        quantize(x, 128, None, key_order=True)


def _hopper_layout(v8: torch.Tensor) -> torch.Tensor:
    """The Hopper kernel's V layout spelled out key by key: (B, H, D, N_pad) uint8, column 16g +
    4c + 2a + j holding key 16g + 8a + 2c + j, columns past N zero."""
    batch, heads, seqlen, head_dim = v8.shape
    n_pad = -(-seqlen // 16) * 16
    out = torch.zeros(batch, heads, head_dim, n_pad, dtype=torch.uint8)
    raw = v8.cpu().view(torch.uint8)
    for g in range(n_pad // 16):
        for c, a, j in itertools.product(range(4), range(2), range(2)):
            key = 16 * g + 8 * a + 2 * c + j
            if key < seqlen:
                out[..., 16 * g + 4 * c + 2 * a + j] = raw[:, :, key, :]
    return out


def test_quantize_refuses_more_batch_x_heads_than_its_grid_takes():
    x = torch.empty(2, 40000, 1, 64, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"x: batch x heads = 80000: at most 65535"):
        quantize(x, 128)


@needs_kernel
@pytest.mark.parametrize("interpret", [True, False])
def test_rearrange_v_copies_e4m3_bytes_into_the_hopper_kernels_layout(monkeypatch, interpret):
    # The kernel's copy mode (no scaling) and, on a CPU without the interpreter, PyTorch's copies,
    # against the layout spelled out key by key: NaN bytes kept, padding written as zeros even
    # into memory that was not.
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    elif not interpret:
        pytest.skip("the PyTorch path is the CPU's without the interpreter")
    empty = torch.empty
    def poisoned_empty(*args, **kwargs):  # byte 0x5A (e4m3 208.0) wherever nothing is written
        t = empty(*args, **kwargs)
        if kwargs.get("dtype") in (FP8, torch.uint8):
            t.view(torch.uint8).fill_(0x5A)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    g = torch.Generator().manual_seed(3)
    bshd = (torch.randn(2, 37, 3, 64, generator=g) * 3).to(FP8)
    bshd.view(torch.uint8)[:, 0, :, 1] = 0xFF  # a NaN in every head
    d_strided = (torch.randn(1, 2, 128, 300, generator=g) * 3).to(FP8).transpose(2, 3)  # D not contiguous
    expanded = (torch.randn(2, 1, 16, 256, generator=g) * 3).to(FP8).expand(2, 3, 16, 256)  # head stride 0
    for name, v8 in (("bshd", bshd.transpose(1, 2)), ("D strided", d_strided), ("expanded", expanded),
                     ("one key", bshd[:, :1].transpose(1, 2)), ("contiguous", bshd.transpose(1, 2).contiguous())):
        got = rearrange_v(v8.to(DEVICE))
        assert got.dtype == FP8 and got.stride(3) == 1, name
        assert torch.equal(got.cpu().view(torch.uint8), _hopper_layout(v8)), name
    assert rearrange_v(torch.empty(1, 2, 0, 64, dtype=FP8, device=DEVICE)).shape == (1, 2, 64, 0)
    assert rearrange_v(torch.empty(1, 2, 40, 64, dtype=FP8, device="meta")).shape == (1, 2, 64, 48)
    with pytest.raises(ValueError, match="v: expected a \\(B, H, N, D\\) float8_e4m3fn tensor"):
        rearrange_v(torch.randn(1, 2, 8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="v: head dim must be a power of two >= 16"):
        rearrange_v(torch.zeros(1, 2, 8, 48, device=DEVICE).to(FP8))


@needs_kernel
def test_kernel_takes_strided_inputs():
    bshd = torch.randn(2, 150, 4, 128, dtype=torch.float16, device=DEVICE)
    x = bshd.transpose(1, 2)  # bhsd view: N stride 4 * 128, H stride 128
    signs = random_signs(128, seed=2, device=DEVICE)
    for rotation in (None, signs):
        for transpose in (False, True):
            assert_kernel_matches(x, 128, rotation, transpose, "bshd")
    wide = torch.randn(1, 2, 70, 128, device=DEVICE)[..., ::2]  # head-dim stride 2
    for rotation in (None, signs[:64]):
        assert_kernel_matches(wide, 64, rotation, False, "head-dim stride 2")


@needs_kernel
def test_rotated_kernel_is_within_e4m3_rounding_of_the_exact_rotation():
    # Against float64 math rather than the reference: the error bound of the reference's test.
    x = (torch.randn(1, 2, 96, 256) * 3).to(torch.bfloat16)
    signs = random_signs(256, seed=9, device="cpu")
    x8, descale = quantize(x.to(DEVICE), 64, signs.to(DEVICE))
    y = x.double() @ (torch.diag(signs.double()) @ sylvester(256)) / 16
    torch.testing.assert_close(descale.cpu().double(), blocks_of(y, 64).abs().amax(dim=(-2, -1)) / FP8_MAX,
                               rtol=1e-6, atol=0)
    descale = descale.cpu()
    scale = descale.double().repeat_interleave(64, dim=2)[:, :, :96, None]
    error = (dequantize(x8.cpu(), descale, 64) - y).abs()
    assert (error <= (2.0**-4 * y.abs() + 2.0**-10 * scale) * (1 + 1e-6)).all()


@needs_kernel
def test_kernel_rounds_to_nearest_even_and_saturates_like_torch():
    # Scale 1 (each block's amax is 448), so the kernel rounds these values themselves: every e4m3
    # value, every midpoint between neighbours (ties: to even; Triton's interpreter alone rounds
    # them away from zero and loses the carry into the exponent), points just off the midpoints,
    # and subnormals.
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()  # 0 .. 448
    mids = (codes[:-1] + codes[1:]) / 2
    values = torch.cat([codes, mids, mids * (1 + 2.0**-20), mids * (1 - 2.0**-20), torch.rand(1000) * 2.0**-6])
    values = torch.cat([values, -values])
    rows = -(-values.numel() // 64)
    x = torch.nn.functional.pad(values, (0, rows * 64 - values.numel()), value=FP8_MAX).view(1, 1, rows, 64)
    x[..., 0] = FP8_MAX
    x8, descale = quantize(x.to(DEVICE), 64)
    assert (descale == 1.0).all()
    expected = x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(x8.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert_same_quantization((x8, descale), quantize_reference(x, 64))


@needs_kernel
def test_kernel_zero_underflowing_and_tiny_blocks():
    x = torch.randn(1, 2, 256, 64)
    x[:, :, 64:128] = 0.0
    x[:, 1, 128:192] = 1e-44  # scale underflows to 0: replaced by 1
    x[:, 0, 192:256] *= 1e-38  # subnormal float32 scale
    for signs in (None, random_signs(64, seed=5, device="cpu")):
        for transpose in (False, True):
            out = assert_kernel_matches(x.to(DEVICE), 64, None if signs is None else signs.to(DEVICE), transpose,
                                        f"signs={signs is not None}")
            assert (out[1][:, :, 1] == 1.0).all()
            zero_block = out[0][..., 64:128] if transpose else out[0][:, :, 64:128]
            assert (zero_block.float() == 0).all()  # exactly: the rotated rule alone would allow 2^-9


@needs_kernel
def test_kernel_on_an_empty_sequence():
    x8, descale = quantize(torch.randn(1, 2, 0, 64, device=DEVICE), 64, transpose=True)
    assert x8.shape == (1, 2, 64, 0) and descale.shape == (1, 2, 0)


SM90_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashdispatch.backends.fp8_hopper import quantize

fn = quantize.quantize_kernel
# What the launcher specialises for contiguous tensors: a unit head-dim stride, 16-byte aligned
# pointers, strides that are multiples of 16.
aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
           for name in ("X", "M", "Out", "Descale", "stride_xb", "stride_xh", "stride_xn")}
for dtype, head_dim, block_rows, rotate, transpose, key_order in (
        ("bf16", 128, 128, True, False, False), ("fp16", 256, 64, True, True, False),
        ("bf16", 128, 128, False, True, True), ("fp32", 64, 64, False, False, False),
        ("bf16", 128, 192, False, True, True), ("bf16", 128, 192, True, False, False),  # tiles of 128 and 64 rows
        ("bf16", 64, 192, False, True, True),  # 6 warps' worth of rows: 4 (Triton takes powers of two)
        ("u8", 128, 128, False, True, True)):  # u8: `rearrange_v`'s copy of e4m3 bytes, no scaling
    scale = dtype != "u8"
    constexprs = dict(stride_xd=1, SCALE=scale, ROTATE=rotate, SPLIT=quantize._split(head_dim, rotate),
                      IEEE=dtype == "fp32", ROUND=False, TRANSPOSE=transpose, KEY_ORDER=key_order,
                      BLOCK_ROWS=quantize._row_tiles(block_rows)[0], TAIL_ROWS=quantize._row_tiles(block_rows)[1],
                      SCALE_ROWS=block_rows, HEAD_DIM=head_dim,
                      INV_SQRT_D=quantize._inv_sqrt(head_dim))
    types = {"X": "*" + dtype, "M": "*" + dtype, "Out": "*fp8e4nv" if scale else "*u8", "Descale": "*fp32"}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned)
    options = dict(num_warps=quantize._num_warps(head_dim, block_rows, rotate))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    case = (dtype, head_dim, block_rows, rotate, transpose)
    # Round to nearest even, saturating, in hardware; IEEE division (as PyTorch's). The copy converts nothing.
    assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == scale, case
    assert ("div.rn.f32" in ptx) == scale and "div.full.f32" not in ptx, case
    # 16-byte loads and fp8 stores (the transposed ones too), beside the descale's one b32 store.
    loads, stores = re.findall(r"ld\.global\S*", ptx), re.findall(r"st\.global\S*", ptx)
    assert loads and all(".v4." in op for op in loads), (case, sorted(set(loads)))
    assert stores.count("st.global.b32") == int(scale) and len(stores) > 1, (case, sorted(set(stores)))
    assert all(".v4." in op for op in stores if op != "st.global.b32"), (case, sorted(set(stores)))
    # The rotation on the tensor cores.
    assert ("wgmma.mma_async" in ptx) == rotate, case
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_compiles_for_sm90_with_vector_accesses_and_round_to_nearest_conversions(tmp_path):
    # In a subprocess: the test session sets TRITON_INTERPRET=1, under which nothing is compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]


# Why rotate: outliers
#
# e4m3 is a floating-point format: with the scale set by the block's amax, an entry's rounding
# error is relative to the entry itself (2^-4 at most) wherever it stays above e4m3's subnormals,
# however large the block's outliers. A score's error then varies as sum_d q_d^2 k_d^2, and
# rotating both vectors changes that to about |q|^2 |k|^2 / D: lower when q's and k's large
# entries share channels (as in LLM activations, which have outlier channels), a little higher
# when they are scattered independently (FlashAttention-3's synthetic outliers).


def _score_rmse(q, k, signs, block_rows=128):
    exact = q.double() @ k.double().transpose(-1, -2)
    q8, q_descale = quantize_reference(q, block_rows, signs)
    k8, k_descale = quantize_reference(k, block_rows, signs)
    scores = dequantize(q8, q_descale, block_rows) @ dequantize(k8, k_descale, block_rows).transpose(-1, -2)
    return (scores - exact).pow(2).mean().sqrt().item()


def test_rotation_lowers_the_score_error_on_outlier_channels(capsys):
    q, k = torch.randn(1, 4, 256, 128), torch.randn(1, 4, 256, 128)
    channels = torch.randperm(128)[:2]
    q[..., channels] *= 10
    k[..., channels] *= 10
    signs = random_signs(128, seed=0, device="cpu")
    plain, rotated = _score_rmse(q, k, None), _score_rmse(q, k, signs)
    with capsys.disabled():
        print(f"\nscore RMSE, 2 outlier channels x10 (D=128, N=256): plain {plain:.4f}, rotated {rotated:.4f} "
              f"({plain / rotated:.2f}x lower)")
    assert rotated < plain / 2  # about 4.7x here


def test_rotation_on_scattered_outliers_changes_the_score_error_little(capsys):
    # FlashAttention-3's test inputs: N(0, 1) plus, with probability 0.001, N(0, 100). Measured
    # over 20 seeds and blocks of 64, 128 and 256 rows, the rotated error was 0.3% lower to 2.6% higher.
    def outliers(*shape):
        return torch.randn(*shape) + 10 * torch.randn(*shape) * torch.bernoulli(torch.full(shape, 0.001))

    q, k = outliers(1, 4, 256, 128), outliers(1, 4, 256, 128)
    signs = random_signs(128, seed=0, device="cpu")
    plain, rotated = _score_rmse(q, k, None), _score_rmse(q, k, signs)
    with capsys.disabled():
        print(f"\nscore RMSE, FlashAttention-3's scattered outliers (D=128, N=256): plain {plain:.4f}, "
              f"rotated {rotated:.4f} (ratio {rotated / plain:.3f})")
    assert rotated < 1.1 * plain
