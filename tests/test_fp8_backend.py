"""The `fp8-hopper` backend: who may select it, its argument checks, the policy keys, and its kernel
(under Triton's CPU interpreter, and GPU-marked on a Hopper GPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdispatch import attention, configure, explain
from flashdispatch.backends.fp8_hopper import to_kernel_layout
from flashdispatch.backends.fp8_hopper.quantize import permute_keys
from flashdispatch.dispatcher.problem import build_problem
from flashdispatch.dispatcher.registry import REGISTRY
from flashdispatch.dispatcher.selection import NoBackendError

FP8 = torch.float8_e4m3fn


def _fp8_inputs(b=1, hq=4, hkv=2, nq=40, nk=70, d=64, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device=device) * 2 for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    descales = [torch.rand(b, hkv, generator=gen, device=device) + 0.5 for _ in range(3)]
    return (q.to(FP8), k.to(FP8), v.to(FP8)), descales


def _reference(q8, k8, v8, descales, causal):
    """float64 attention of the dequantized inputs, and plain math in FP8's precision (P rounded to e4m3)."""
    group = q8.shape[1] // k8.shape[1]
    q = q8.double() * descales[0].double().repeat_interleave(group, 1)[:, :, None, None]
    k, v = ((t.double() * d.double()[:, :, None, None]).repeat_interleave(group, 1) for t, d in ((k8, descales[1]),
                                                                                             (v8, descales[2])))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        s = s.masked_fill(torch.arange(nk, device=q.device)[None, :] > torch.arange(nq, device=q.device)[:, None] + nk - nq,
                          float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v
    p = torch.exp(s.float() - s.float().amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0))
    plain = (((p * 256).to(FP8).float() / 256 @ v.float()) / p.sum(-1, keepdim=True)).nan_to_num(0.0)  # rows that see no key: 0
    return ref, torch.logsumexp(s, -1), plain.bfloat16()


def test_a_plain_bfloat16_call_never_runs_fp8():
    q = torch.randn(1, 2, 16, 64, dtype=torch.bfloat16)
    report = explain(q, q, q)
    reasons = " ".join(report.reasons["fp8-hopper"]["forward"])
    assert "changes the numerics" in reasons and "precision='fp8'" in reasons
    assert report.decision.forward.backend.name != "fp8-hopper"


def test_fp8_arguments_are_checked():
    (q8, k8, v8), (qd, kd, vd) = _fp8_inputs()
    with pytest.raises(ValueError, match="precision='fp8'"):
        build_problem(q8, k8, v8, precision="native")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_problem(q8, k8, v8, precision="fp4")
    with pytest.raises(ValueError, match=r"k_descale must be a float32 tensor of shape \(batch, KV heads\) = \(1, 2\)"):
        build_problem(q8, k8, v8, descales=(qd, kd[:, :1], vd))
    with pytest.raises(ValueError, match="v_descale goes with pre-quantized float8_e4m3fn inputs"):
        q = torch.randn(1, 4, 8, 64)
        build_problem(q, q[:, :2], q[:, :2], precision="fp8", descales=(None, None, vd))
    assert build_problem(q8, k8, v8).precision == "fp8"  # float8 inputs imply it


def test_the_policy_opts_calls_without_a_gradient_into_fp8():
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="precision must be 'native' or 'fp8'"):
        configure({"precision": "int8"})
    with pytest.raises(ValueError, match="fp8.seed must be an int"):
        configure({"fp8": {"seed": -1}})
    try:
        active = configure({"precision": "fp8", "fp8": {"rotation": False, "seed": 7}})
        assert (active.precision, active.fp8_rotation, active.fp8_seed) == ("fp8", False, 7)
        assert explain(q, q, q).problem.precision == "fp8"
        assert explain(q, q, q, precision="native").problem.precision == "native"
    finally:
        configure(None)
    assert explain(q, q, q).problem.precision == "native"


def test_a_backward_through_fp8_gets_a_clear_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16, requires_grad=True)
    with pytest.raises(NoBackendError) as error:
        attention(q, q, q, precision="fp8")
    assert "fp8-hopper: no backward pass (forward only)" in str(error.value)


def test_the_key_order_of_the_hopper_kernels_v():
    vt = torch.arange(2 * 3 * 32, dtype=torch.float32).reshape(1, 2, 3, 32)
    permuted = permute_keys(vt)
    # Column 4c + 2a + j of each 16-key group holds key 8a + 2c + j: the keys a thread of the
    # scores' accumulator holds (2c, 2c+1, 8+2c, 9+2c) become its 4 operand columns.
    expected = [16 * g + 8 * a + 2 * c + j for g in range(2) for c in range(4) for a in range(2) for j in range(2)]
    assert permuted[0, 1, 2].tolist() == vt[0, 1, 2, expected].tolist()
    assert sorted(expected) == list(range(32)) and expected != list(range(32))
    assert torch.equal(permute_keys(permuted, inverse=True), vt)


@pytest.mark.parametrize("seqlen", [32, 37])
def test_a_plain_v_is_laid_out_for_the_hopper_kernel_in_the_call(seqlen):
    from flashdispatch.backends.fp8_hopper import _v_transposed

    v8 = (torch.randn(2, seqlen, 3, 64) * 3).to(FP8).transpose(1, 2)  # a (B, H, N, D) view of bshd memory
    vt = _v_transposed(v8, in_kernel_layout=False, warp_specialized=True)
    assert vt.shape == (2, 3, 64, -(-seqlen // 16) * 16) and vt.stride(3) == 1
    back = permute_keys(vt, inverse=True)
    assert torch.equal(back[..., :seqlen].float(), v8.transpose(2, 3).float()) and not back[..., seqlen:].float().any()


def test_to_kernel_layout_checks_and_keeps_its_padding():
    with pytest.raises(ValueError, match="v: expected a \\(B, H, N, D\\) float8_e4m3fn tensor"):
        to_kernel_layout(torch.randn(1, 2, 8, 64))
    (_, _, v8), _ = _fp8_inputs(nk=37)
    view = to_kernel_layout(v8)
    assert view.shape == v8.shape and view.stride(2) == 1  # (B, H, N, D) over N-contiguous memory
    full = view.transpose(2, 3).as_strided((*view.shape[:2], 64, 48), view.transpose(2, 3).stride())
    assert torch.equal(permute_keys(full, inverse=True)[..., :37].float(), v8.transpose(2, 3).float())
    assert not permute_keys(full, inverse=True)[..., 37:].float().any()  # zero padding


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
def test_only_the_kernel_layout_v_itself_is_taken(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (q8, k8, v8), descales = _fp8_inputs(hq=2, hkv=2, nq=16, nk=40)
    scales = dict(q_descale=descales[0], k_descale=descales[1], v_descale=descales[2])
    view = to_kernel_layout(v8)
    out = attention(q8, k8, view, **scales, backend="fp8-hopper")
    assert torch.equal(out, attention(q8, k8, v8, **scales, backend="fp8-hopper"))
    for derived in (view.clone(), view[:, :, :24], view.contiguous()):
        assert isinstance(derived, type(view))
        with pytest.raises(ValueError, match="v: a tensor derived from to_kernel_layout"):
            attention(q8, k8[:, :, :derived.shape[2]], derived, **scales, backend="fp8-hopper")
    view.zero_()  # written into: its layout is no longer what to_kernel_layout made
    with pytest.raises(ValueError, match="v: a tensor derived from to_kernel_layout"):
        attention(q8, k8, view, **scales, backend="fp8-hopper")


def test_attention_reads_a_kernel_layout_v_as_a_plain_tensor_it_marks(monkeypatch):
    # A tensor subclass costs microseconds per attribute read; attention() unwraps it once, and the
    # backend still sees the layout (the mark) on the plain tensor, checked again there.
    from flashdispatch.backends import fp8_hopper

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (q8, k8, v8), descales = _fp8_inputs(hq=2, hkv=2, nq=16, nk=40)
    view = to_kernel_layout(v8)
    plain = view._flashdispatch_plain_()
    assert type(plain) is torch.Tensor and plain.data_ptr() == view.data_ptr() and plain.stride() == view.stride()
    problem = build_problem(q8, k8, plain, descales=tuple(descales))
    assert fp8_hopper._kernel_layout_v(plain, problem) and fp8_hopper._kernel_layout_v(view, problem)
    seen = []
    backend = REGISTRY.get("fp8-hopper")  # the registered instance (other tests may re-import the module)
    monkeypatch.setattr(backend, "forward", lambda q, k, v, *a, **kw: seen.append(v) or (
        torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 16)))
    attention(q8, k8, view, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
              backend="fp8-hopper")
    assert type(seen[0]) is torch.Tensor and fp8_hopper._kernel_layout_v(seen[0], problem)
    with pytest.raises(ValueError, match="v: a tensor derived from to_kernel_layout"):
        view[:, :, :24]._flashdispatch_plain_()
    plain.zero_()  # written into after the unwrap: the backend's check catches it too
    with pytest.raises(ValueError, match="v: a tensor derived from to_kernel_layout"):
        fp8_hopper._kernel_layout_v(plain, problem)


def test_refuses_what_the_grid_or_32_bit_offsets_cannot_hold():
    from flashdispatch.dispatcher.capabilities import capabilities

    def reasons(batch, heads, seqlen, head_dim=64):
        t = torch.empty(batch, heads, seqlen, head_dim, dtype=FP8, device="meta")
        return REGISTRY.get("fp8-hopper").extra_reasons(build_problem(t, t, t), capabilities(torch.device("cpu")))

    assert "batch x query heads = 80000: at most 65535 (the kernels' second grid axis)" in reasons(2, 40000, 1)
    assert not any("grid" in r for r in reasons(3, 21845, 1))  # 65535 exactly
    # Offsets to a (batch, head) are 64-bit, within one 32-bit: (16, 32, 32768, 256) is 2^32 elements.
    assert not any("2^31" in r for r in reasons(16, 32, 32768, 256))
    assert any("a head of 2147483648 elements: under 2^31 only" in r for r in reasons(1, 1, 2**23, 256))
    assert not any("2^31" in r for r in reasons(1, 1, 2**23 - 1, 256))


def test_the_gluon_kernel_takes_every_head_dim_the_backend_does():
    pytest.importorskip("triton.experimental.gluon")
    from flashdispatch.backends.fp8_hopper import HEAD_DIMS, hopper

    for d in HEAD_DIMS:
        (q8, k8, v8), descales = _fp8_inputs(d=d)
        assert hopper.problem_reasons(build_problem(q8, k8, v8, causal=True, descales=descales)) == [], d
    (q8, k8, v8), descales = _fp8_inputs()
    problem = build_problem(q8, k8, v8, scale=-0.5, descales=descales)
    assert hopper.problem_reasons(problem) == ["positive scales only (the row max is taken before scaling)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_after_a_hopper_kernel_failure_the_portable_kernel_gets_its_own_quantization(monkeypatch, causal):
    # The Hopper kernel quantizes Q in 128-row blocks, the portable one (causal) in 64: a fallback
    # must quantize again, not hand the portable kernel the other kernel's descales.
    from flashdispatch.backends import fp8_hopper
    from flashdispatch.backends.fp8_hopper import hopper

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (torch.randn(1, 2, 200, 64).half() for _ in range(3))
    expected = attention(q, k, v, causal=causal, precision="fp8", backend="fp8-hopper")
    monkeypatch.setattr(fp8_hopper, "_warp_specialized", lambda problem: True)
    monkeypatch.setattr(hopper, "forward", lambda *args, **kwargs: None)  # as after a failed launch
    assert torch.equal(attention(q, k, v, causal=causal, precision="fp8", backend="fp8-hopper"), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
def test_q_or_k_that_tma_cannot_read_go_to_the_portable_kernel_before_v_is_rearranged(monkeypatch, caplog):
    # A K broadcast over its heads (head stride 0): the Gluon kernel's TMA cannot read it. The
    # backend finds that out before it rearranges V for that kernel, and says so once in the log.
    from flashdispatch.backends import fp8_hopper
    from flashdispatch.backends.fp8_hopper import hopper

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fp8_hopper, "_gluon_reasons", lambda problem: [])
    calls = []
    monkeypatch.setattr(fp8_hopper, "rearrange_v", lambda v: calls.append("rearrange_v"))
    monkeypatch.setattr(hopper, "forward", lambda *args, **kwargs: calls.append("hopper.forward"))
    (q8, k8, v8), descales = _fp8_inputs(hq=4, hkv=2, nq=40, nk=70)
    k8 = k8[:, :1].expand(1, 2, 70, 64)
    with caplog.at_level("WARNING", logger="flashdispatch"):
        for _ in range(2):
            out = attention(q8, k8, v8, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
                            backend="fp8-hopper")
    assert calls == []
    warnings = [r.getMessage() for r in caplog.records if "TMA cannot read" in r.getMessage()]
    assert warnings == ["fp8-hopper: the portable kernel, slower, runs this call: TMA cannot read k: its strides "
                        "(8960, 0, 64, 1) are not all positive multiples of 16 bytes"]
    ref, _, plain = _reference(q8, k8.contiguous(), v8, descales, False)
    err, base = (out.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= 10 * base + 1e-2, (err, base)  # the interpreter's float8 rounding: see the test above


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_the_portable_kernel_carries_o_across_v_blocks_of_very_different_scales(monkeypatch, causal):
    # The quantized V has one descale per key block; the kernel keeps O in units of the current
    # block's and rescales it by the ratio at each block. Blocks 1000x and 1/1000x the first.
    from flashdispatch.backends import fp8_hopper

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fp8_hopper, "_warp_specialized", lambda problem: False)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 96, 64, generator=g) for _ in range(3))
    v[:, :, 32:64] *= 1000.0
    v[:, :, 64:] *= 1e-3
    monkeypatch.setattr(fp8_hopper, "tiles", lambda head_dim, causal: (32, 32, 4, 1))  # 32-key blocks
    out = attention(q.half(), k.half(), v.half(), causal=causal, precision="fp8", backend="fp8-hopper").double()
    s = q.double() @ k.double().transpose(2, 3) / 8.0
    if causal:
        s = s.masked_fill(torch.ones(96, 96, dtype=torch.bool).tril().logical_not(), -math.inf)
    ref = torch.softmax(s, -1) @ v.double()
    # FP8's own error here is about 8% of the output's norm (the old kernel's too: 0.0799 / 0.0766);
    # a block carried at the wrong scale would be off by 1000x.
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() < 0.12


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
def test_a_zero_v_descale_gives_zeros_not_nan(monkeypatch):
    # The kernels keep descales at float32's smallest normal number (a ratio of two must be
    # finite): a zero V descale gives outputs of that order, not NaN.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (q8, k8, v8), descales = _fp8_inputs(hq=2, hkv=2, nq=16, nk=40)
    out = attention(q8, k8, v8, q_descale=descales[0], k_descale=descales[1], v_descale=torch.zeros_like(descales[2]),
                    backend="fp8-hopper")
    assert torch.isfinite(out).all() and out.float().abs().max() < 1e-30


@pytest.mark.parametrize("nq, nk", [(0, 16), (16, 0)])
def test_an_empty_fp8_call_gives_a_bfloat16_zero_output(nq, nk):
    (q8, k8, v8), descales = _fp8_inputs(nq=nq, nk=nk)
    out, lse = attention(q8, k8, v8, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
                         return_lse=True)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, nq, 64) and not out.any()
    assert lse.shape == (1, 4, nq) and (lse == -math.inf).all()


def test_a_kernel_layout_v_needs_the_bhsd_layout(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (q8, k8, v8), descales = _fp8_inputs(hq=2, hkv=2, nq=16, nk=16)
    view = to_kernel_layout(v8.transpose(1, 2))  # a (B, N, H, D) V taken as (B, H, N, D): keys and heads mixed
    with pytest.raises(ValueError, match="v: a to_kernel_layout\\(\\) V is \\(B, Hkv, N, D\\): pass layout='bhsd'"):
        attention(q8.transpose(1, 2), k8.transpose(1, 2), view, layout="bshd", q_descale=descales[0],
                  k_descale=descales[1], v_descale=descales[2], backend="fp8-hopper")


# The interpreter is the test suite's way to run kernels where there is no GPU: tests/conftest.py
# sets TRITON_INTERPRET only there, and Triton reads it when a kernel is defined, so on a GPU
# machine setting it here comes too late for kernels imported before (this test failed on the lent
# H100 beside the GPU tests). There the GPU-marked tests below cover the kernels.
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
@pytest.mark.parametrize("causal, layout, shape", [(False, "bhsd", (1, 4, 2, 40, 70)), (True, "bhsd", (2, 4, 1, 70, 40)),
                                                   (True, "bshd", (1, 2, 2, 33, 200)), (False, "kernel", (1, 2, 1, 20, 45))])
def test_the_kernel_under_the_interpreter(monkeypatch, causal, layout, shape):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b, hq, hkv, nq, nk = shape
    (q8, k8, v8), descales = _fp8_inputs(b, hq, hkv, nq, nk)
    args = {"bhsd": (q8, k8, v8), "kernel": (q8, k8, to_kernel_layout(v8)),
            "bshd": tuple(t.transpose(1, 2) for t in (q8, k8, v8))}[layout]
    layout = "bshd" if layout == "bshd" else "bhsd"
    out, lse = attention(*args, causal=causal, layout=layout, q_descale=descales[0], k_descale=descales[1],
                         v_descale=descales[2], return_lse=True, backend="fp8-hopper")
    out = out if layout == "bhsd" else out.transpose(1, 2)
    ref, ref_lse, plain = _reference(q8, k8, v8, descales, causal)
    err, base = (out.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # The interpreter rounds float32 -> float8 wrongly near powers of two (Triton 3.6: 0.1242
    # becomes 0.0625), so P's rounding is off for a few percent of its values: 10x here, the FP8
    # rule's 2x on the GPU. A masking or scaling bug gives errors of the outputs' own size.
    assert err <= 10 * base + 1e-2, (err, base)
    assert not lse.isnan().any() and (lse.double() - ref_lse).abs().nan_to_num(0.0).max() < 1e-3


FAR = 2**24 + 2**20  # a stride whose 128th step passes byte 2^31, where 32-bit offsets wrap


def _far_copy(x: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """x copied into a view with `strides`, over storage reaching past 2^31 bytes (the pages the
    view does not touch cost no memory)."""
    span = sum((n - 1) * stride for n, stride in zip(x.shape, strides)) + 1
    far = torch.empty(span, dtype=torch.uint8).view(x.dtype).as_strided(x.shape, strides)
    return far.copy_(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: for machines without a GPU")
@pytest.mark.parametrize("what", ["head-dim stride", "key rows"])
def test_the_portable_kernel_reads_a_view_past_2_to_the_31(monkeypatch, what):
    # K as a view whose columns (a head-dim stride spanning other dims: the host copies it) or rows
    # (as in a (B, N, H, D) view with many heads: the kernel's 64-bit WIDE path) lie FAR apart.
    pytest.importorskip("triton")
    from flashdispatch.backends import fp8_hopper

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if what == "head-dim stride":
        (q8, k8, v8), descales = _fp8_inputs(1, 2, 2, 16, 32, 128)
        far_k = _far_copy(k8, (64, 32, 1, FAR))
    else:
        (q8, k8, v8), descales = _fp8_inputs(1, 2, 1, 16, 140, 64)
        far_k = _far_copy(k8, (0, 0, FAR, 1))
        assert not fp8_hopper._offsets_fit(far_k, 2, 128) and fp8_hopper._offsets_fit(k8, 2, 128)
    kwargs = dict(q_descale=descales[0], k_descale=descales[1], v_descale=descales[2], backend="fp8-hopper")
    assert torch.equal(attention(q8, far_k, v8, **kwargs), attention(q8, k8, v8, **kwargs))


def test_quantize_copies_a_view_whose_head_dim_offsets_pass_2_to_the_31():
    from flashdispatch.backends.fp8_hopper.quantize import head_dim_addressable

    x = torch.empty(2**32, device="meta").as_strided((1, 2, 16, 128), (0, 16, 1, 2**24 + 2**20))
    assert not x.is_contiguous() and head_dim_addressable(x).is_contiguous()
    near = x.as_strided((1, 2, 16, 128), (0, 16, 1, 2**20))
    assert head_dim_addressable(near) is near


gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                         reason="needs a Hopper GPU (compute capability 9.x)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d, causal, kernel_layout", [(64, False, False), (128, True, False), (128, False, True),
                                                      (256, False, True)])
def test_gpu_fp8_meets_the_fp8_rule(d, causal, kernel_layout):
    from flashdispatch.backends.fp8_hopper import hopper
    from flashdispatch.conformance import poisoned

    (q8, k8, v8), descales = _fp8_inputs(2, 8, 2, 300, 517, d, device="cuda", seed=d)
    v = to_kernel_layout(v8) if kernel_layout else v8
    with poisoned("cuda"):  # every allocation starts NaN: rows the kernel misses show
        out, lse = attention(q8, k8, v, causal=causal, q_descale=descales[0], k_descale=descales[1],
                             v_descale=descales[2], return_lse=True)
    assert hopper._failure is None  # the Gluon kernel ran, not the portable one after a failure
    ref, ref_lse, plain = _reference(q8, k8, v8, descales, causal)
    err, base = (out.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (err, base)
    # Hopper's FP8 wgmma accumulates with about 14 mantissa bits: LSE errors grow with the scores.
    top = (ref_lse.masked_fill(ref_lse.isinf(), 0).abs().max().item())
    assert not lse.isnan().any() and (lse.double() - ref_lse).abs().nan_to_num(0.0).max() <= 2e-3 * max(1.0, top)
    notes = " ".join(explain(q8, k8, v8, causal=causal).notes["fp8-hopper"])
    assert "FP8 matmuls" in notes and "forward only" in notes and "kernel: the warp-specialized Gluon one" in notes


@pytest.fixture(params=["gluon", "portable"])
def fp8_kernel(request, monkeypatch):
    """Which FP8 kernel takes the test's calls: the Gluon one, or the portable one (as after a failure)."""
    from flashdispatch.backends.fp8_hopper import hopper

    if request.param == "portable":
        monkeypatch.setattr(hopper, "_failure", "test: the portable kernel")
    return request.param


@pytest.mark.gpu
@gpu
def test_gpu_an_output_past_2_to_the_31_elements_lands_in_place(fp8_kernel):
    # (65, 64, 2048, 256): batch 64 starts at element 2^31 of the output, where 32-bit offsets wrap.
    from flashdispatch.backends.fp8_hopper import hopper
    from flashdispatch.conformance import poisoned

    b, hq, hkv, n, d = 65, 64, 8, 2048, 256
    gen = torch.Generator(device="cuda").manual_seed(5)
    q8 = torch.empty(b, hq, n, d, dtype=FP8, device="cuda")
    for i in range(b):  # a batch at a time: randn of the whole would take 9 GB of float32
        q8[i] = torch.randn(hq, n, d, generator=gen, device="cuda").to(FP8)
    k8, v8 = (torch.randn(b, hkv, n, d, generator=gen, device="cuda").to(FP8) for _ in range(2))
    descales = [torch.ones(b, hkv, device="cuda") for _ in range(3)]
    with poisoned("cuda"):
        out, lse = attention(q8, k8, v8, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
                             return_lse=True)
    assert out.numel() > 2**31 and (hopper._failure is None) == (fp8_kernel == "gluon")
    for i in (0, b - 1):  # the first batch and the one past 2^31
        part = [descale[i:i + 1, :2] for descale in descales]  # (1, Hkv) of the 2 KV heads the 16 query heads read
        ref, ref_lse, plain = _reference(q8[i:i + 1, :16], k8[i:i + 1, :2], v8[i:i + 1, :2], part, False)
        err, base = (out[i:i + 1, :16].double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (i, err, base)
        assert (lse[i:i + 1, :16].double() - ref_lse).abs().max() <= 2e-3 * max(1.0, ref_lse.abs().max().item())


@pytest.mark.gpu
@gpu
def test_gpu_bshd_rows_past_2_to_the_31_elements_land_in_place(fp8_kernel):
    # (1, 2304, 8192, 128) views: a head holds 2304 x 128 elements, but rows from 2048 on start past
    # element 2^31 of q, k, v and out (a row's stride is 8192 x 128 = 2^20), where 32-bit offsets wrap.
    from flashdispatch.backends.fp8_hopper import hopper
    from flashdispatch.conformance import poisoned

    n, h, d = 2304, 8192, 128
    gen = torch.Generator(device="cuda").manual_seed(6)
    q8, k8, v8 = (torch.empty(1, n, h, d, dtype=FP8, device="cuda") for _ in range(3))
    for t in (q8, k8, v8):
        for start in range(0, n, 256):  # a block of rows at a time: randn of the whole would take 9 GB
            t[:, start:start + 256] = (torch.randn(1, 256, h, d, generator=gen, device="cuda") * 2).to(FP8)
    descales = [torch.rand(1, h, generator=gen, device="cuda") + 0.5 for _ in range(3)]
    with poisoned("cuda"):
        out = attention(q8, k8, v8, causal=True, layout="bshd", q_descale=descales[0], k_descale=descales[1],
                        v_descale=descales[2])
    assert q8[0, n - 1].data_ptr() - q8.data_ptr() >= 2**31 and (hopper._failure is None) == (fp8_kernel == "gluon")
    heads = [0, h - 1]
    part = [descale[:, heads] for descale in descales]
    ref, _, plain = _reference(*(t[:, :, heads].transpose(1, 2) for t in (q8, k8, v8)), part, True)
    got = out[:, :, heads].transpose(1, 2).double()
    err, base = (got - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (err, base)


@pytest.mark.gpu
@gpu
def test_gpu_zero_descales_give_finite_uniform_attention():
    # FlashAttention-3's amax / 448 of an all-zero head is a zero descale: the scores are all 0
    # (each row's visible keys weigh the same), never NaN from the masked ones.
    (q8, k8, v8), descales = _fp8_inputs(1, 4, 2, 100, 150, 128, device="cuda", seed=3)
    descales[1] = torch.zeros_like(descales[1])
    out = attention(q8, k8, v8, causal=True, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2])
    ref, _, plain = _reference(q8, k8, v8, descales, True)
    err, base = (out.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert torch.isfinite(out).all() and err <= 2 * base + 1e-3 * ref.abs().max().item(), (err, base)


@pytest.mark.gpu
@gpu
def test_gpu_rows_that_see_no_key_give_zeros_at_any_v_descale():
    # Causal with Nq > Nk: the first Nq - Nk rows see no key. Their P is 0 in e4m3 but about
    # 2^-126 where the FMA pipe takes the exponential: the row max, not the sum, must tell them.
    (q8, k8, v8), descales = _fp8_inputs(1, 4, 2, 300, 100, 128, device="cuda", seed=4)
    descales[2] = torch.full_like(descales[2], 1000.0)
    out, lse = attention(q8, k8, v8, causal=True, q_descale=descales[0], k_descale=descales[1],
                         v_descale=descales[2], return_lse=True)
    assert torch.isfinite(out).all() and not out[:, :, :200].any() and (lse[:, :, :200] == -math.inf).all()
    ref, _, plain = _reference(q8, k8, v8, descales, True)
    err, base = (out.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (err, base)


@pytest.mark.gpu
@gpu
def test_gpu_exp2_on_the_fma_pipe_matches_exp2():
    # The kernel's polynomial 2^x (a quarter of P's exponentials): relative error under 1e-4 where
    # P can land, and a non-negative number below 2^-125 (0 in e4m3) for masked scores (-inf).
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from flashdispatch.backends.triton.hopper import _exp2_on_fma

    @gluon.jit
    def exp2_kernel(X, Y, N: gl.constexpr):
        layout: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
        offsets = gl.arange(0, N, layout=layout)
        gl.store(Y + offsets, _exp2_on_fma(gl.load(X + offsets)))

    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.rand(4000, generator=g) * 134 - 126, torch.tensor([8.0, 0.0, -0.5, 0.5, -125.5]),
                   torch.tensor([-126.4, -127.0, -300.0, -1e30, -math.inf]), torch.zeros(4096 - 4010)]).cuda()
    y = torch.full_like(x, math.nan)
    exp2_kernel[(1,)](x, y, N=4096, num_warps=4)
    ref = torch.exp2(x.double())
    normal = x >= -125
    assert ((y.double()[normal] - ref[normal]).abs() / ref[normal]).max() < 1e-4
    assert torch.isfinite(y).all() and (y[~normal] >= 0).all() and (y[~normal] < 2.0 ** -124).all()


SM90_SCRIPT = r"""
import os, re, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from flashdispatch.backends.fp8_hopper import hopper

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
fn = hopper.fp8_hopper_forward
# (head dim, causal, keys a step (192: two tiles), descales per key step, row sums per lane)
cases = [(128, False, 128, True, True), (64, True, 128, False, True), (64, False, 192, False, True),
         (256, True, 128, True, True), (128, True, 128, False, True), (128, True, 192, True, False),
         (128, False, 192, False, True), (128, False, 128, False, False), (256, False, 128, False, False),
         (128, True, 192, False, True), (128, False, 192, True, True)]  # long causal; quantized non-causal
for head_dim, causal, keys, kv_block_scales, lane_sums in cases:
    tile_a, tile_b = hopper.step_tiles(keys)
    # As the backend runs them: causal tiles persistent at the step of short sequences
    if causal:
        persistent = head_dim in hopper.CAUSAL_PERSISTENT and keys == hopper.CAUSAL_STEP_KEYS[head_dim]
    else:
        persistent = head_dim in hopper.PERSISTENT
    q = torch.empty(2, 4, 256, head_dim, dtype=torch.float8_e4m3fn)
    vt = torch.empty(2, 4, head_dim, 256, dtype=torch.float8_e4m3fn)
    descs = {"q_desc": hopper._descriptor(q, [1, 1, hopper.BLOCK_M, head_dim]),
             "k_desc": hopper._descriptor(q, [1, 1, tile_a, head_dim]),
             "kb_desc": hopper._descriptor(q, [1, 1, tile_b or tile_a, head_dim]),
             "vt_desc": hopper._descriptor(vt, [1, 1, head_dim, tile_a]),
             "vtb_desc": hopper._descriptor(vt, [1, 1, head_dim, tile_b or tile_a])}
    constexprs = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=hopper.BLOCK_M, BLOCK_N=keys,
                      STAGES=hopper.STAGES, FMA_SHARE=hopper.FMA_SHARE[head_dim], KV_BLOCK_SCALES=kv_block_scales,
                      EXP_TURNS=hopper.EXP_TURNS[head_dim], LANE_SUMS=lane_sums,
                      PERSISTENT=persistent,
                      HEAD_GROUP=hopper.CAUSAL_HEAD_GROUP if causal else 1)
    types = {"Out": "*bf16", "Lse": "*fp32", "QDescale": "*fp32", "KDescale": "*fp32", "VDescale": "*fp32",
             "scale_log2": "fp32", **{name: mangle_type(d) for name, d in descs.items()}}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=hopper.NUM_WARPS, maxnreg=hopper.MAX_REGISTERS)).asm
    ptx = asm["ptx"]
    case = (head_dim, causal, keys, kv_block_scales, lane_sums)
    # A (batch, head)'s start in Out and Lse in 64 bits: B * H * N * D may pass 2^31.
    for name, dtype in (("Out", "bf16"), ("Lse", "f32")):
        assert re.search(rf"tt\.addptr %{name}, %\w+ : !tt\.ptr<{dtype}>, i64", asm["ttgir"]), (name, case)
    # FP8 wgmma, both products: S (N = each tile's keys), P V (N = head dim)
    for n in {tile_a, tile_b or tile_a, head_dim}:
        assert f"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3" in ptx, case
    # P V, one product a tile, left in flight under the softmax
    assert f"wgmma.wait_group.sync.aligned {2 if tile_b else 1}" in ptx, case
    # P packed in place: no shuffles between threads (one broadcasts the warp index at the start).
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and ptx.count("shfl.sync.idx") <= 1, case
    # Buffers handed back per warp through named barriers, not one thread's mbarrier arrive.
    assert "bar.arrive" in ptx and "mbarrier.arrive.shared::cta" not in ptx, case
    # Part of the exponentials on the FMA pipe where asked: its rounding constant, 1.5 x 2^23.
    assert "ex2.approx" in ptx and ("0f4B400000" in ptx) == (hopper.FMA_SHARE[head_dim] > 0), case
    # The consumers' turns at the exponentials: named barriers whose id is computed (`_turn_barrier`).
    assert ("bar.sync id" in ptx and "bar.arrive id" in ptx) == hopper.EXP_TURNS[head_dim], case
    if hopper.EXP_TURNS[head_dim] and hopper.FMA_SHARE[head_dim] == 0:
        # ptxas moves barriers across arithmetic. In the SASS, the exponentials come after a turn's wait
        # (bar.sync, id in a register, 256 threads; consumer 0's first step has none) and before its
        # hand-over (bar.arrive, the same): a run of them is ended by a hand-over, never by a wait.
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(asm["cubin"])
            cubin.flush()
            sass = subprocess.run([NVDISASM, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
        exponentials, ends = 0, []  # ends: per run of exponentials, the turn barrier after it
        # Shuffles since a turn's wait; None outside one. Consumer 0's first step has no wait, and
        # there ptxas may run the second row's max under the first row's exponentials: unchecked.
        shuffles = None
        for line in sass.splitlines():
            turn = re.search(r"BAR\.(SYNC|ARV)\S* R\d+, 0x100", line)
            if turn:
                ends.append((turn.group(1), exponentials))
                if turn.group(1) == "ARV" and shuffles is not None:
                    # Row sums per lane: no shuffles in a turn; per step: the sum's (a live control).
                    assert bool(shuffles) == (not lane_sums), (case, ends, shuffles)
                exponentials = 0
                shuffles = 0 if turn.group(1) == "SYNC" else None
            exponentials += "MUFU.EX2" in line
            if shuffles is not None:
                shuffles += "SHFL" in line
        # Two-tile steps carry P packed (`hopper._carried`): carried in float32, it spilled in the
        # loop. A few values set once may be spilled at the kernel's entry, before its first matmul
        # (the quantized D = 128 build: 8 bytes, reloaded once a tile).
        spills_after_entry = "STL" in sass[sass.find("QGMMA"):]
        assert not tile_b or not spills_after_entry, (case, sass.count("STL"))
        runs = [end for end, count in ends if count]
        # 2 consumers, each at step 0 and in the loop; every hand-over after a wait, but consumer
        # 0's first (persistent programs keep a wait in step 0's code for their later tiles).
        waits = [end for end, _ in ends].count("SYNC")
        unwaited = sum(end == "ARV" and (i == 0 or ends[i - 1][0] != "SYNC") for i, (end, _) in enumerate(ends))
        assert runs == ["ARV"] * 4 and exponentials == 0, (case, ends)
        assert waits == (4 if persistent else 3) and unwaited == (0 if persistent else 1), (case, ends)

# The portable kernel: its (batch, head) offsets in 64 bits too.
from triton.compiler import ASTSource
from flashdispatch.backends.fp8_hopper.kernel import fp8_attention_forward

fn = fp8_attention_forward
for wide in (False, True):
    constexprs = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=128, CAUSAL=False, WIDE=wide)
    types = {name: "*fp8e4nv" for name in ("Q", "K", "Vt")} | {"Out": "*bf16", "Lse": "*fp32", "QDescale": "*fp32",
                                                               "KDescale": "*fp32", "VDescale": "*fp32", "scale": "fp32"}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ttgir"]
    for name in ("Q", "K", "Vt", "Out"):
        assert re.search(rf"tt\.addptr %{name}, %\w+ : !tt\.ptr<\w+>, i64", ttgir), name
    # Tiles of 64-bit offsets only where asked: they spilled and ran 10x slower (H100, 2026-12-06).
    assert bool(re.search(r"tensor<\d+x\d+xi64", ttgir)) == wide, wide
print("ok")
"""


def test_the_hopper_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.experimental.gluon")
    # In a subprocess: the test session may set TRITON_INTERPRET=1, under which nothing is compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]


def test_explain_shows_the_fp8_forward_and_why_no_backward(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (q8, k8, v8), _ = _fp8_inputs()
    report = explain(q8, k8, v8)
    assert report.forward == "fp8-hopper" and report.backward is None
    assert "no backward pass (forward only)" in report.error
    assert any("FP8 matmuls" in note for note in report.notes["fp8-hopper"])
    assert ("kernel: the portable Triton one (kernel.py), slower: the Gluon one does not take this: it runs on "
            "CUDA GPUs only, not in Triton's interpreter") in report.notes["fp8-hopper"]


def test_the_kernel_note_names_the_gluon_kernel_or_why_not(monkeypatch):
    pytest.importorskip("triton.experimental.gluon")
    import dataclasses

    from flashdispatch.backends import fp8_hopper

    monkeypatch.setattr(fp8_hopper, "triton_interpreting", lambda: False)
    (q8, k8, v8), descales = _fp8_inputs(d=128)
    on_gpu = dataclasses.replace(build_problem(q8, k8, v8, descales=descales), device_type="cuda")
    assert fp8_hopper._kernel_note(on_gpu).startswith("kernel: the warp-specialized Gluon one (hopper.py)")
    negative = dataclasses.replace(on_gpu, scale=-0.5)
    assert fp8_hopper._kernel_note(negative) == ("kernel: the portable Triton one (kernel.py), slower: the Gluon one "
                                                 "does not take this: positive scales only (the row max is taken "
                                                 "before scaling)")
