"""The `cuda` backend's host side on any machine, and (GPU-marked) its kernels through attention()."""

from __future__ import annotations

import importlib

import pytest
import torch

from flashdispatch import attention, capabilities, explain
from flashdispatch.dispatcher.problem import build_problem

cuda_backend = importlib.import_module("flashdispatch.backends.cuda")  # flashdispatch.backends is also a function


def test_without_cupy_or_a_gpu_the_backend_says_why(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ModuleNotFoundError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    reasons = cuda_backend.CudaBackend().unavailable_reasons()
    assert len(reasons) == 1 and "CuPy does not import" in reasons[0]
    assert "flashdispatch[cuda12]" in reasons[0] and "flashdispatch[cuda13]" in reasons[0]


def test_declared_support_refuses_what_the_kernels_do_not_do():
    backend = cuda_backend.CudaBackend()
    caps = capabilities(torch.device("cpu"))
    q = torch.empty(1, 4, 64, 96, dtype=torch.float16)
    reasons = " ".join(backend.support.reasons(build_problem(q, q, q, window=(8, 0)), caps))
    assert "head_dim 96 not supported" in reasons and "sliding-window" in reasons and "runs on cuda" in reasons


def test_shared_memory_of_each_kernel_fits_an_h100_and_an_a100():
    for head_dim in (64, 128):
        assert cuda_backend.forward_shared_bytes(head_dim) <= 163 * 1024  # A100's opt-in limit
        assert cuda_backend.decode_shared_bytes(head_dim) <= 227 * 1024  # H100's
    # The decoding kernel reuses its K and V rings for the warps' float32 states.
    warps, keys, stages = cuda_backend.DECODE_WARPS, cuda_backend.DECODE_WARP_KEYS, cuda_backend.DECODE_STAGES
    assert 2 * stages * warps * keys * 128 * 2 >= warps * 16 * (128 + 2) * 4


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seqlen_q, seqlen_k, causal", [(300, 300, True), (1, 5000, False), (7, 3000, True)])
def test_gpu_attention_through_cuda_matches_the_reference_on_a_side_stream(seqlen_q, seqlen_k, causal):
    pytest.importorskip("cupy")
    q = torch.randn(2, 8, seqlen_q, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, seqlen_k, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the kernels must run on PyTorch's current stream
        out, lse = attention(q, k, v, causal=causal, backend="cuda", return_lse=True)
    torch.cuda.synchronize()
    kr, vr = (t.double().repeat_interleave(4, dim=1) for t in (k, v))
    s = q.double() @ kr.transpose(-1, -2) / 128**0.5
    if causal:
        visible = torch.arange(seqlen_k, device="cuda")[None, :] <= torch.arange(seqlen_q, device="cuda")[:, None] + seqlen_k - seqlen_q
        s = s.masked_fill(~visible, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.softmax(s, -1) @ vr
    assert (out.double() - ref).abs().max() < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-3
    notes = " ".join(explain(q, k, v, causal=causal, backend="cuda").notes["cuda"])
    assert ("decode.cu" if seqlen_q <= 16 else "forward.cu") in notes
