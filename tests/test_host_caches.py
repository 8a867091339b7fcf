"""The per-call caches of the host path (attention() -> the triton backend's forward) stay correct.

The hot path keeps: each device's capabilities, the parsed FLASHDISPATCH_TRITON_CONFIG, one empty
int32 tensor per device, and a launch plan (grid, splits, buffer shapes and strides, constexprs) per
(problem, config). These tests check that a changed variable, a different problem or a cleared
cache is seen on the next call, and that a plan's precomputed strides are those of the buffers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from flashdispatch import attention  # noqa: E402
from flashdispatch.backends.reference import attention_math  # noqa: E402
from flashdispatch.backends import triton as triton_backend  # noqa: E402
from flashdispatch.backends.triton import configs, kernels  # noqa: E402
from flashdispatch.dispatcher import capabilities as capabilities_module  # noqa: E402
from flashdispatch.dispatcher.capabilities import capabilities  # noqa: E402
from flashdispatch.dispatcher.problem import build_problem  # noqa: E402


class _Recording:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, kwargs))

        return run


def _qkv(b=1, hq=2, hkv=2, nq=32, nk=48, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


def test_a_changed_triton_config_variable_takes_effect_on_the_next_call(monkeypatch):
    forward = _Recording()
    monkeypatch.setattr(kernels, "attention_forward", forward)
    q, k, v = _qkv()

    def blocks():
        attention(q, k, v, backend="triton")
        _, kwargs = forward.launches[-1]
        return kwargs["BLOCK_M"], kwargs["BLOCK_N"]

    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=32,16,4,1")
    assert blocks() == (32, 16)
    assert blocks() == (32, 16)
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=16,32,4,1")
    assert blocks() == (16, 32)
    monkeypatch.delenv("FLASHDISPATCH_TRITON_CONFIG")
    assert blocks() == (configs.INTERPRETER.block_m, configs.INTERPRETER.block_n)
    # A bad value is not remembered: it raises on every call, and a good one works again after it.
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=1,2")
    for _ in range(2):
        with pytest.raises(ValueError, match="FLASHDISPATCH_TRITON_CONFIG"):
            attention(q, k, v, backend="triton")
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=32,16,4,1")
    assert blocks() == (32, 16)


def test_forced_configurations_are_read_only():
    with pytest.raises(TypeError):
        configs._forced()["forward"] = configs.Config(16, 16, 4, 1)


def test_a_cached_plan_is_not_reused_for_another_problem(monkeypatch):
    # Two decoding problems that differ only in the cache length split the keys differently.
    forward, merge = _Recording(), _Recording()
    monkeypatch.setattr(kernels, "attention_forward", forward)
    monkeypatch.setattr(kernels, "merge_splits", merge)
    grids = []
    for nk in (64, 64 * 5, 64):
        q, k, v = _qkv(hq=4, hkv=2, nq=1, nk=nk, dtype=torch.float16)
        attention(q, k, v, backend="triton")
        grids.append(forward.launches[-1][0])
    assert grids[0] == grids[2] != grids[1]
    assert grids[1][2] > 1 and merge.launches  # the longer cache is split and merged


@pytest.mark.parametrize("nk", [48, 64 * 5])
def test_results_stay_exact_across_problems_sharing_the_caches(nk):
    # Real kernels (interpreter): alternate problems so each call runs on a plan made by an earlier one.
    cases = [_qkv(nq=1, nk=nk), _qkv(nq=20, nk=nk), _qkv(b=2, hq=4, hkv=2, nq=1, nk=nk)]
    for _ in range(2):
        for q, k, v in cases:
            out = attention(q, k, v, backend="triton")
            ref, _ = attention_math(q, k, v, scale=q.shape[-1] ** -0.5)
            torch.testing.assert_close(out, ref.to(out.dtype), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "varlen"])
@pytest.mark.parametrize("nq", [1, 5, 33])
def test_plan_strides_are_those_of_the_buffers_torch_allocates(layout, nq):
    b, hq, hkv, nk, d, dv = 2, 4, 2, 64 * 5, 16, 32
    if layout == "varlen":
        q, k, v = torch.randn(b * nq, hq, d), torch.randn(b * nk, hkv, d), torch.randn(b * nk, hkv, dv)
        cu_q = torch.tensor([0, nq, 2 * nq], dtype=torch.int32)
        cu_k = torch.tensor([0, nk, 2 * nk], dtype=torch.int32)
        problem = build_problem(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        shape = (lambda h, n, dim: (b, h, n, dim)) if layout == "bhsd" else (lambda h, n, dim: (b, n, h, dim))
        q, k, v = torch.randn(*shape(hq, nq, d)), torch.randn(*shape(hkv, nk, d)), torch.randn(*shape(hkv, nk, dv))
        problem = build_problem(q, k, v, layout=layout)
    plan = triton_backend._forward_plan(problem, configs.INTERPRETER, 132, False)
    out = torch.empty(plan.out_shape)
    lse = torch.empty(plan.lse_shape)
    if plan.splits == 1:
        assert plan.out_shape == q.shape[:-1] + (dv,)
        assert plan.out_strides == (0,) + triton_backend._strides(out, problem.layout)
        assert plan.lse_strides == (0,) + triton_backend._lse_strides(problem)
    else:
        merged = torch.empty(plan.merged_shape)
        assert plan.merged_shape == q.shape[:-1] + (dv,)
        assert plan.out_strides == out.stride()
        assert plan.lse_strides == (lse.stride(0),) + triton_backend._lse_strides(problem)
        assert plan.merge_strides == out.stride()[:4] + (lse.stride(0),) + triton_backend._strides(merged, problem.layout)
    # The same key gives the same plan; another SM count (another GPU) its own.
    assert triton_backend._forward_plan(problem, configs.INTERPRETER, 132, False) is plan
    assert triton_backend._forward_plan(problem, configs.INTERPRETER, 16, False) is not plan


def test_capabilities_fast_path_and_clear_cache():
    caps = capabilities(torch.device("cpu"))
    assert capabilities(torch.device("cpu")) is caps is capabilities("cpu")
    # Only complete devices are kept: "cuda" and torch.device("cuda") name whichever GPU is current.
    assert all(d.type != "cuda" or d.index is not None for d in capabilities_module._complete)
    capabilities_module.clear_cache()
    try:
        fresh = capabilities(torch.device("cpu"))
        assert fresh is not caps and fresh == caps
    finally:
        capabilities_module.clear_cache()
