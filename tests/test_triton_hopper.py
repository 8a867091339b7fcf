"""The Gluon Hopper forward's host side, on the CPU: which problems it takes, the tensor descriptors
it builds, where the tuner offers it, and the fallback when it fails. Its exactness on the GPU is
checked by the conformance tier (where it is the first candidate) and by
`scripts/check_triton_gpu.py --part gluon`; that it compiles for sm90, by test_triton_compile.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")
hopper = pytest.importorskip("flashdispatch.backends.triton.hopper")

from flashdispatch.backends.triton import configs  # noqa: E402
from flashdispatch.backends.triton import _strides  # noqa: E402
from flashdispatch.dispatcher.capabilities import capabilities  # noqa: E402
from flashdispatch.dispatcher.problem import build_problem  # noqa: E402


def _caps(cc):
    return dataclasses.replace(capabilities(torch.device("cpu")), compute_capability=cc)


def _qkv(shape=(2, 4, 300, 128), dtype=torch.bfloat16):
    return (torch.randn(shape, dtype=dtype) for _ in range(3))


def test_problems_it_takes_and_why_not_the_others():
    q, k, v = _qkv()
    assert hopper.problem_reasons(build_problem(q, k, v, causal=True)) == []
    assert hopper.problem_reasons(build_problem(q, k, v, window=(64, 0))) == ["no sliding window"]
    assert hopper.problem_reasons(build_problem(q, k, v, softcap=30.0)) == ["no softcap"]
    assert "positive scales only" in hopper.problem_reasons(build_problem(q, k, v, scale=-0.5))[0]
    q32, k32, v32 = _qkv(dtype=torch.float32)
    assert hopper.problem_reasons(build_problem(q32, k32, v32)) == ["float16 or bfloat16 only"]
    q96, k96, v96 = _qkv(shape=(2, 4, 300, 96))
    assert "head dims 64 or 128 only" in hopper.problem_reasons(build_problem(q96, k96, v96))[0]


def test_the_tuner_offers_it_first_on_hopper_only_and_only_where_it_applies(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    dense = build_problem(q, k, v, causal=True)
    assert configs.candidates("forward", dense, _caps((9, 0)))[0] == configs.GLUON
    assert configs.GLUON not in configs.candidates("forward", dense, _caps((8, 0)))
    assert configs.GLUON not in configs.candidates("dq", dense, _caps((9, 0)))
    windowed = build_problem(q, k, v, window=(64, 0))
    assert configs.GLUON not in configs.candidates("forward", windowed, _caps((9, 0)))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_descriptors_address_both_layouts_through_their_strides(layout):
    shape = (2, 4, 300, 128) if layout == "bhsd" else (2, 300, 4, 128)
    t = torch.randn(shape, dtype=torch.bfloat16)
    descriptor = hopper._descriptor(t, _strides(t, layout), 2, 4, 300, 128, 128)
    assert list(descriptor.shape) == [2, 4, 300, 128]
    assert list(descriptor.strides) == list(_strides(t, layout))
    assert list(descriptor.block_shape) == [1, 1, 128, 128]


def test_descriptors_refuse_what_tma_cannot_address():
    t = torch.randn(2, 4, 300, 129, dtype=torch.bfloat16)[..., :128]  # rows of 129 elements: 258 bytes
    assert hopper._descriptor(t, _strides(t, "bhsd"), 2, 4, 300, 128, 128) is None
    t = torch.randn(2, 4, 128, 300, dtype=torch.bfloat16).transpose(-1, -2)  # dim stride 300
    assert hopper._descriptor(t, _strides(t, "bhsd"), 2, 4, 300, 128, 128) is None
    t = torch.randn(2, 1, 300, 128, dtype=torch.bfloat16).expand(2, 4, 300, 128)  # broadcast heads: stride 0
    assert hopper._descriptor(t, _strides(t, "bhsd"), 2, 4, 300, 128, 128) is None
    # A size-1 dimension's stride never moves the address, so an odd one is no obstacle.
    t = torch.randn(1, 1, 300, 128, dtype=torch.bfloat16)
    assert hopper._descriptor(t, (7, 3, 128, 1), 1, 1, 300, 128, 128) is not None


def test_a_kernel_that_fails_falls_back_and_says_why(monkeypatch, caplog):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("an API Triton moved")
            return launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(hopper, "hopper_attention_forward", Broken())
    monkeypatch.setattr(hopper, "_failure", None)
    q, k, v = _qkv()
    problem = build_problem(q, k, v)
    with caplog.at_level("WARNING", logger="flashdispatch"):
        assert hopper.forward(q, k, v, problem, lambda t: _strides(t, "bhsd")) is None
    assert "an API Triton moved" in caplog.text
    assert "the Gluon kernel failed in this process" in hopper.problem_reasons(problem)[0]
    assert configs.GLUON not in configs.candidates("forward", problem, _caps((9, 0)))
