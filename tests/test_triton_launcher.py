"""The direct launch path of the Triton backend (`launcher.py`), with stand-in kernels: no GPU needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flashdispatch.backends.triton.launcher import Launcher


class _Compiled:
    """What kernel[grid](...) returns: launchable as compiled[grid](*all arguments)."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Kernel:
    """A JIT kernel stand-in: (x, n, m, scale, BLOCK: constexpr), `m` not specialised."""

    def __init__(self):
        self.log = []
        self.params = [SimpleNamespace(name=name, is_constexpr=name == "BLOCK", do_not_specialize=name == "m")
                       for name in ("x", "n", "m", "scale", "BLOCK")]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)
        return run


@pytest.fixture(autouse=True)
def _device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_first_launch_goes_through_triton_and_later_ones_direct_with_constexprs_in_place():
    kernel = _Kernel()
    launch = Launcher(kernel)
    x = torch.zeros(8)
    launch((2, 3), x, 32, 5, 0.5, BLOCK=64, num_warps=4)
    launch((2, 3), x, 32, 7, 0.25, BLOCK=64, num_warps=4)
    assert [entry[0] for entry in kernel.log] == ["jit", "direct"]
    assert kernel.log[1] == ("direct", (2, 3, 1), (x, 32, 7, 0.25, 64))


@pytest.mark.parametrize("change", [
    dict(n=48),  # a specialised integer's value
    dict(m=2**31),  # a loose integer past 32 bits: i64, not i32
    dict(x=torch.zeros(8, dtype=torch.float16)),  # a tensor's dtype
    dict(x=torch.zeros(9)[1:]),  # a tensor's 16-byte alignment
    dict(BLOCK=128),  # a constexpr
    dict(num_warps=8),  # a launch option
])
def test_what_triton_specialises_on_makes_a_new_key(change):
    kernel = _Kernel()
    launch = Launcher(kernel)
    base = dict(x=torch.zeros(8), n=32, m=5, scale=0.5, BLOCK=64, num_warps=4)
    launch((1,), base["x"], base["n"], base["m"], base["scale"], BLOCK=base["BLOCK"], num_warps=base["num_warps"])
    new = {**base, **change}
    launch((1,), new["x"], new["n"], new["m"], new["scale"], BLOCK=new["BLOCK"], num_warps=new["num_warps"])
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_tma_descriptors_are_keyed_by_dtype_and_block_shape():
    pytest.importorskip("triton")
    from triton.tools.tensor_descriptor import TensorDescriptor

    kernel = _Kernel()
    launch = Launcher(kernel)
    t = torch.zeros(2, 64, 32)

    def descriptor(block_rows, tensor=t):
        return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [1, block_rows, 32])

    launch((1,), descriptor(16), 32, 5, 0.5, BLOCK=64)
    launch((1,), descriptor(16, torch.ones(2, 64, 32)), 32, 5, 0.5, BLOCK=64)  # another tensor, same kind
    launch((1,), descriptor(32), 32, 5, 0.5, BLOCK=64)
    assert [entry[0] for entry in kernel.log] == ["jit", "direct", "jit"]


def test_arguments_it_cannot_key_always_take_tritons_path():
    kernel = _Kernel()
    launch = Launcher(kernel)
    for _ in range(2):
        launch((1,), object(), 32, 5, 0.5, BLOCK=64)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_interpreted_kernels_have_no_direct_path():
    log = []

    class _Interpreted:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append(grid)

    launch = Launcher(_Interpreted())
    launch((1,), torch.zeros(2), BLOCK=16)
    launch((1,), torch.zeros(2), BLOCK=16)
    assert log == [(1,), (1,)]


def test_constexpr_parameters_must_come_last():
    kernel = _Kernel()
    kernel.params = kernel.params[::-1]
    with pytest.raises(ValueError, match="constexpr parameters must follow"):
        Launcher(kernel)


def test_every_kernel_of_the_backend_puts_its_constexpr_parameters_last():
    pytest.importorskip("triton")
    import inspect

    from flashdispatch.backends.triton import kernels

    for name in ("attention_forward", "merge_splits", "attention_backward_delta", "attention_backward_dkdv",
                 "attention_backward_dq"):
        params = inspect.signature(getattr(kernels, name).fn).parameters.values()
        constexpr = ["constexpr" in str(p.annotation) for p in params]
        assert constexpr == sorted(constexpr) and any(constexpr), name
