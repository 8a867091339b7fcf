"""`capabilities()`: a frozen description of the device; on a machine without a GPU, the CPU."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import flashdispatch
from flashdispatch import Capabilities, capabilities
from flashdispatch.dispatcher.capabilities import Toolchain

from conftest import HAS_GPU


def test_cpu_capabilities_is_a_frozen_dataclass():
    caps = capabilities("cpu")
    assert isinstance(caps, Capabilities)
    assert dataclasses.is_dataclass(caps)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.name = "something else"
    hash(caps)  # frozen: usable as a key


def test_cpu_facts():
    caps = capabilities(torch.device("cpu"))
    assert caps.arch == "cpu"
    assert caps.device_type == "cpu"
    assert caps.compute_capability is None
    assert caps.sm_count == os.cpu_count()
    assert not caps.has_tma and not caps.has_wgmma
    assert "float32" in caps.native_dtypes and "float64" in caps.native_dtypes
    assert caps.torch_version == torch.__version__
    assert isinstance(caps.triton, Toolchain) and isinstance(caps.cupy, Toolchain)
    assert not caps.cupy.works  # no GPU to compile for on the CPU


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU note")
def test_cpu_note_says_there_is_no_gpu():
    caps = capabilities()
    assert caps.device == "cpu"
    assert "no CUDA GPU" in caps.note


def test_str_lists_the_facts():
    caps = capabilities("cpu")
    text = str(caps)
    assert text.count("\n") >= 10
    for fragment in ("device", "cpu", "cores", str(os.cpu_count()), "torch", torch.__version__, "Triton", "CuPy"):
        assert fragment in text
    if caps.note:
        assert caps.note in text
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in caps.rows())


def test_capabilities_is_cached():
    assert capabilities("cpu") is capabilities(torch.device("cpu"))


def test_toolchain_str():
    assert str(Toolchain("triton", True, "3.1", "imports")) == "triton 3.1: works (imports)"
    assert str(Toolchain("cupy", False, None, "no CUDA GPU")) == "cupy: unavailable (no CUDA GPU)"


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_gpu_raises_value_error(device):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        capabilities(device)


def test_arch_keys_from_compute_capability():
    caps = dataclasses.replace(capabilities("cpu"), device="cuda:0", device_type="cuda", compute_capability=(9, 0))
    assert caps.arch == "sm90"
    from flashdispatch.dispatcher.policy import arch_keys

    assert arch_keys(caps) == ["sm90", "sm9x", "cuda", "default"]
    assert arch_keys(capabilities("cpu")) == ["cpu", "default"]


@pytest.mark.gpu
def test_gpu_capabilities():
    caps = capabilities("cuda")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert caps.device_type == "cuda"
    assert caps.device == f"cuda:{torch.cuda.current_device()}"
    assert caps.name == torch.cuda.get_device_name()
    assert caps.sm_count == props.multi_processor_count > 0
    assert caps.compute_capability == torch.cuda.get_device_capability()
    major, minor = caps.compute_capability
    assert caps.arch == f"sm{major}{minor}"
    assert caps.total_memory == props.total_memory
    assert caps.has_tma == (major >= 9)
    assert "float16" in caps.native_dtypes
    assert ("bfloat16" in caps.native_dtypes) == (major >= 8)
    assert caps.name in str(caps) and "SMs" in str(caps)
    assert capabilities() is caps  # the default device is the current GPU
    assert flashdispatch.capabilities(torch.device("cuda", torch.cuda.current_device())) is caps
