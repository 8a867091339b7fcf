"""The `tiled` backend with small explicit blocks (many tiles) against float64 math, the
online-softmax rescale, and `block_sizes` from a fake device."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import flashdispatch
from flashdispatch import attention
from flashdispatch.backends import tiled as tiled_module
from flashdispatch.backends.tiled import TiledBackend, block_sizes
from flashdispatch.dispatcher.capabilities import capabilities
from flashdispatch.dispatcher.problem import build_problem

from conftest import assert_close, naive_attention, rand, reference_grads

F32 = torch.float32
ATOL, RTOL = 3e-5, 1e-5  # tiled accumulates in float32; inputs are float32

# (id, options, Nq, Nk, Hq, Hkv): every case spans several 16-row and 16-column blocks.
CASES = [
    ("plain", {}, 70, 90, 2, 2),
    ("unaligned", {}, 37, 53, 2, 2),
    ("causal-square", {"causal": True}, 64, 64, 2, 2),
    ("causal-nq<nk", {"causal": True}, 40, 100, 2, 2),
    ("causal-nq>nk", {"causal": True}, 100, 40, 2, 2),
    ("window", {"window": (20, 5)}, 80, 80, 2, 2),
    ("window-narrow", {"window": (3, 0)}, 50, 70, 2, 2),
    ("window-left", {"window": (17, -1)}, 60, 45, 2, 2),
    ("window-right", {"window": (-1, 17)}, 45, 60, 2, 2),
    ("window-causal-nq>nk", {"window": (10, 3), "causal": True}, 70, 30, 2, 2),
    ("softcap", {"softcap": 1.5}, 48, 66, 2, 2),
    ("softcap-causal", {"softcap": 4.0, "causal": True}, 66, 48, 2, 2),
    ("gqa", {"causal": True}, 50, 50, 6, 2),
    ("mqa-window-softcap", {"window": (8, 8), "softcap": 2.0}, 50, 70, 4, 1),
    ("scale", {"scale": 0.37}, 33, 47, 2, 2),
]


def problem_for(q, k, v, needs_grad=True, **options):
    return build_problem(q, k, v, needs_grad=needs_grad, **options)


def run_tiled(backend, q, k, v, dout, **options):
    problem = problem_for(q, k, v, **options)
    out, lse = backend.forward(q, k, v, problem)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, problem)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("block_q, block_k", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("name, options, nq, nk, hq, hkv", CASES, ids=[c[0] for c in CASES])
def test_tiled_matches_float64_reference(name, options, nq, nk, hq, hkv, block_q, block_k):
    backend = TiledBackend(block_q=block_q, block_k=block_k)
    q, k, v = rand(2, hq, nq, 16, dtype=F32), rand(2, hkv, nk, 16, dtype=F32), rand(2, hkv, nk, 8, dtype=F32)
    dout = rand(2, hq, nq, 8, dtype=F32)
    got = run_tiled(backend, q, k, v, dout, **options)
    want = reference_grads(q, k, v, dout, **options)
    for g, w, what in zip(got, want, ("out", "lse", "dq", "dk", "dv")):
        assert g.dtype == (F32 if what != "lse" else torch.float32)
        assert_close(g, w, ATOL, RTOL, what=what)
    assert got[1].shape == (2, hq, nq)


def test_the_reference_itself_on_a_multiblock_case():
    # reference_grads uses attention_math; check it once at this size against the loop oracle.
    q, k, v = rand(1, 2, 40, 8), rand(1, 1, 25, 8), rand(1, 1, 25, 8)
    out, lse, *_ = reference_grads(q, k, v, rand(1, 2, 40, 8), causal=True, window=(6, 2))
    expected, expected_lse = naive_attention(q, k, v, causal=True, window=(6, 2))
    assert_close(out, expected, 1e-12)
    assert_close(lse, expected_lse, 1e-12)


def test_rows_without_keys():
    backend = TiledBackend(block_q=16, block_k=16)
    q, k, v = rand(1, 2, 50, 8, dtype=F32), rand(1, 2, 20, 8, dtype=F32), rand(1, 2, 20, 8, dtype=F32)
    dout = rand(1, 2, 50, 8, dtype=F32)
    out, lse, dq, dk, dv = run_tiled(backend, q, k, v, dout, causal=True)
    assert torch.all(out[:, :, :30] == 0)
    assert torch.all(lse[:, :, :30] == -math.inf)
    assert torch.all(dq[:, :, :30] == 0)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    want = reference_grads(q, k, v, dout, causal=True)
    for g, w in zip((out, lse, dq, dk, dv), want):
        assert_close(g, w, ATOL, RTOL)


def test_bshd_layout_multiblock():
    backend = TiledBackend(block_q=16, block_k=16)
    q, k, v = rand(2, 4, 45, 8, dtype=F32), rand(2, 2, 55, 8, dtype=F32), rand(2, 2, 55, 8, dtype=F32)
    dout = rand(2, 4, 45, 8, dtype=F32)
    s = lambda t: t.transpose(1, 2)  # noqa: E731  strided bshd views
    problem = build_problem(s(q), s(k), s(v), layout="bshd", causal=True, needs_grad=True)
    out, lse = backend.forward(s(q), s(k), s(v), problem)
    grads = backend.backward(s(dout), s(q), s(k), s(v), out, lse, problem)
    want = reference_grads(q, k, v, dout, causal=True)
    assert out.shape == (2, 45, 4, 8)
    for g, w in zip((s(out), lse, *(s(g) for g in grads)), want):
        assert_close(g, w, ATOL, RTOL)


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": (9, 2), "softcap": 2.0}],
                         ids=["plain", "causal", "window-softcap"])
def test_varlen_multiblock(options):
    backend = TiledBackend(block_q=16, block_k=16)
    lens_q, lens_k = [37, 5, 50, 18], [20, 33, 50, 41]
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    cq, ck = cu(lens_q), cu(lens_k)
    q, k, v = rand(sum(lens_q), 4, 8, dtype=F32), rand(sum(lens_k), 2, 8, dtype=F32), rand(sum(lens_k), 2, 8, dtype=F32)
    dout = rand(*q.shape, dtype=F32)
    problem = build_problem(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, needs_grad=True, **options)
    out, lse = backend.forward(q, k, v, problem, cq, ck)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, problem, cq, ck)
    assert lse.shape == (4, sum(lens_q))
    dense = lambda t, s: t[s].transpose(0, 1)[None]  # noqa: E731
    for i in range(len(lens_q)):
        sq, sk = slice(cq[i].item(), cq[i + 1].item()), slice(ck[i].item(), ck[i + 1].item())
        want = reference_grads(dense(q, sq), dense(k, sk), dense(v, sk), dense(dout, sq), **options)
        got = (dense(out, sq), lse[:, sq][None], dense(dq, sq), dense(dk, sk), dense(dv, sk))
        for g, w, what in zip(got, want, ("out", "lse", "dq", "dk", "dv")):
            assert_close(g, w, ATOL, RTOL, what=f"{what} of sequence {i}")


def test_block_size_does_not_change_the_result():
    q, k, v = rand(1, 2, 90, 16, dtype=F32), rand(1, 2, 110, 16, dtype=F32), rand(1, 2, 110, 16, dtype=F32)
    problem = problem_for(q, k, v, causal=True, window=(30, 0))
    one_block, lse_one = TiledBackend(block_q=128, block_k=128).forward(q, k, v, problem)
    many, lse_many = TiledBackend(block_q=16, block_k=16).forward(q, k, v, problem)
    assert_close(many, one_block, 1e-5)
    assert_close(lse_many, lse_one, 1e-5)


def test_backward_is_deterministic():
    backend = TiledBackend(block_q=16, block_k=16)
    q, k, v, dout = (rand(2, 4, 40, 8, dtype=F32) for _ in range(4))
    first = run_tiled(backend, q, k, v, dout, causal=True)
    second = run_tiled(backend, q, k, v, dout, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_registered_small_block_tiled_through_attention():
    class SmallTiled(TiledBackend):
        name = "test-tiled-16"

    flashdispatch.register_backend(SmallTiled(block_q=16, block_k=16))
    q, k, v = (rand(2, 2, 50, 8, dtype=F32, requires_grad=True) for _ in range(3))
    dout = rand(2, 2, 50, 8, dtype=F32)
    out = attention(q, k, v, causal=True, softcap=3.0, backend="test-tiled-16")
    out.backward(dout)
    want = reference_grads(q, k, v, dout, causal=True, softcap=3.0)
    for g, w in zip((out, q.grad, k.grad, v.grad), (want[0], *want[2:])):
        assert_close(g, w, ATOL, RTOL)
    # And as the backward of another backend's forward, from that forward's saved LSE.
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v, causal=True, backend=("sdpa-math", "test-tiled-16")).backward(dout)
    want = reference_grads(q, k, v, dout, causal=True)  # sdpa-math has no softcap
    for g, w in zip((q.grad, k.grad, v.grad), want[2:]):
        assert_close(g, w, ATOL, RTOL)


# The online-softmax rescale


def forward_without_rescaling_the_sum(q, k, v, scale, block_k):
    """The widely copied mistake: the running sum `l` is not rescaled when the running max grows
    (the accumulator is). Independent of flashdispatch; used to show the test data catches it."""
    row_max = torch.full(q.shape[:-1] + (1,), -math.inf, dtype=torch.float64)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    for start in range(0, k.shape[-2], block_k):
        s = q.double() @ k[..., start : start + block_k, :].double().transpose(-1, -2) * scale
        new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
        p = torch.exp(s - new_max)
        row_sum = row_sum + p.sum(-1, keepdim=True)  # BUG: missing * exp(row_max - new_max)
        acc = acc * torch.exp(row_max - new_max) + p @ v[..., start : start + block_k, :].double()
        row_max = new_max
    return acc / row_sum


def test_online_softmax_rescales_the_running_sum():
    # Keys grow in norm along the sequence, so the running maximum rises block after block.
    q = rand(1, 2, 20, 16, dtype=F32)
    k = rand(1, 2, 96, 16, dtype=F32) * torch.linspace(0.2, 3.0, 96)[:, None]
    v = rand(1, 2, 96, 16, dtype=F32)
    scale = 1 / 4
    expected, _ = naive_attention(q, k, v)
    wrong = forward_without_rescaling_the_sum(q, k, v, scale, block_k=16)
    assert (wrong - expected).abs().max() > 1e-2, "the data must expose a missing rescale"
    problem = problem_for(q, k, v, needs_grad=False)
    out, _ = TiledBackend(block_q=16, block_k=16).forward(q, k, v, problem)
    assert_close(out, expected, ATOL, RTOL)
    # The same data in one block is immune to the mistake: it is the multi-block walk that matters.
    single = forward_without_rescaling_the_sum(q, k, v, scale, block_k=96)
    assert_close(single, expected, 1e-10)


def test_tiled_forward_walks_several_key_blocks(monkeypatch):
    """With block_k=16 and 90 keys, each query block is reduced over 6 key tiles."""
    seen = []
    original = tiled_module._Tiles.key_blocks

    def spy(self, q_start, q_end):
        blocks = list(original(self, q_start, q_end))
        seen.append(len(blocks))
        return iter(blocks)

    monkeypatch.setattr(tiled_module._Tiles, "key_blocks", spy)
    q, k, v = rand(1, 1, 32, 8, dtype=F32), rand(1, 1, 90, 8, dtype=F32), rand(1, 1, 90, 8, dtype=F32)
    TiledBackend(block_q=16, block_k=16).forward(q, k, v, problem_for(q, k, v, needs_grad=False))
    assert seen == [6, 6]


# block_sizes from a fake device


def fake_caps(smem, l2):
    return dataclasses.replace(capabilities("cpu"), device="cuda:0", device_type="cuda", compute_capability=(9, 0),
                               smem_per_block_optin=smem, l2_bytes=l2)


def is_pow2(n):
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("smem", [48 * 2**10, 99 * 2**10, 227 * 2**10, 2**10, None])
@pytest.mark.parametrize("l2", [50 * 2**20, 4 * 2**20, 2**16, None])
@pytest.mark.parametrize("batch, heads, head_dim, head_dim_v", [(1, 1, 64, 64), (4, 16, 128, 128), (2, 8, 32, 96),
                                                                (64, 64, 256, 256), (1, 2, 8, 8)])
def test_block_sizes_are_powers_of_two_within_limits_and_budgets(smem, l2, batch, heads, head_dim, head_dim_v):
    q = torch.empty(batch, heads, 4, head_dim, device="meta")
    k = torch.empty(batch, heads, 4, head_dim, device="meta")
    v = torch.empty(batch, heads, 4, head_dim_v, device="meta")
    problem = build_problem(q, k, v)
    block_q, block_k = block_sizes(problem, fake_caps(smem, l2))
    assert is_pow2(block_q) and is_pow2(block_k)
    assert 16 <= block_k <= 1024
    assert 16 <= block_q <= 8192
    smem_budget = smem or 48 * 2**10
    tile_budget = l2 or 8 * 2**20
    row_bytes = 4 * (head_dim + head_dim_v)
    # K and V tiles in float32 fit the shared memory (unless the floor of 16 rows forbids it) ...
    if block_k > 16:
        assert block_k * row_bytes <= smem_budget
    # ... and are the largest power of two that does (up to the cap).
    if block_k < 1024:
        assert 2 * block_k * row_bytes > smem_budget
    # The (B, H, block_q, block_k) float32 score tile fits the L2 budget, and is the largest that does.
    tile = batch * heads * block_k * 4
    if block_q > 16:
        assert block_q * tile <= tile_budget
    if block_q < 8192:
        assert 2 * block_q * tile > tile_budget


def test_block_sizes_varlen_counts_heads_only():
    cu = torch.tensor([0, 50, 100], dtype=torch.int32)
    q, k = torch.empty(100, 8, 64), torch.empty(100, 8, 64)
    problem = build_problem(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu)
    block_q, block_k = block_sizes(problem, fake_caps(48 * 2**10, 2**20))
    assert block_k == 64  # 48 KiB / (4 * 128 bytes) = 96 -> 64
    assert block_q == 512  # 1 MiB / (8 heads * 64 * 4 bytes) = 512
