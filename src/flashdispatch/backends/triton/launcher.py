"""Launch a Triton kernel through its compiled form once its specialisation has been seen.

`kernel[grid](*args, **constexprs)` binds every argument, builds the specialisation key and looks
the compiled kernel up on every call: about 50 us of host time for the forward kernel's 45
arguments on the lent H100's host (`check_triton_gpu.py --part launch`), while a direct launch
of the compiled kernel takes about 19 us. A decoding step runs for about 100 us on the GPU, so
the difference decides whether the host keeps up.

`Launcher(kernel)(grid, *args, **kwargs)` does what `kernel[grid](*args, **kwargs)` does. The first
launch of each specialisation goes through Triton; later ones call the compiled kernel directly.
The key mirrors what Triton specialises a kernel on: each tensor's dtype and 16-byte alignment,
each integer's value (only its 32/64-bit range for the `do_not_specialize` ones), the types of
the other scalars, each TMA descriptor's dtype, block shape and padding, the constexpr and launch
options by name, the current device. An argument of any other kind takes Triton's own path every
time, and so does every launch in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

INT32_RANGE = range(-(2**31), 2**31)  # Triton types an integer argument i32 in here, i64 up to 2^63, u64 above
MAX_COMPILED = 1024  # keys per kernel; a loop whose strides change every step makes a new key each time


def _tensor_key(t: torch.Tensor):
    return t.dtype, t.data_ptr() % 16 == 0


class Launcher:
    """A Triton JIT kernel with a direct launch path. Runtime arguments go positionally, constexpr
    arguments and launch options (num_warps, num_stages) by keyword; the constexpr parameters
    must come after the runtime ones in the kernel's signature (they do in `kernels.py`)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}  # key -> (compiled kernel, constexpr values in signature order)
        params = getattr(kernel, "params", None)  # None in the interpreter: no compiled form
        self._direct = params is not None
        if params is None:
            return
        from triton.tools.tensor_descriptor import TensorDescriptor

        self._descriptor = TensorDescriptor
        runtime = [p for p in params if not p.is_constexpr]
        if any(p.is_constexpr for p in params[: len(runtime)]):
            raise ValueError(f"{getattr(kernel, '__name__', kernel)}: constexpr parameters must follow the runtime ones")
        self._loose = tuple(p.do_not_specialize for p in runtime)  # integers keyed by range only
        self._constexpr_names = tuple(p.name for p in params if p.is_constexpr)

    def _key(self, args, kwargs):
        if not self._direct or len(args) != len(self._loose):
            return None
        key = [torch.cuda.current_device(), tuple(kwargs.items())]
        for arg, loose in zip(args, self._loose):
            kind = type(arg)
            if kind is torch.Tensor or isinstance(arg, torch.Tensor):
                key.append(_tensor_key(arg))
            elif kind is int:
                key.append((arg in INT32_RANGE, arg < 2**63) if loose else arg)
            elif kind is float:
                key.append(float)
            elif arg is None or kind is bool:
                key.append(arg)
            elif kind is self._descriptor:
                key.append((arg.base.dtype, tuple(arg.block_shape), arg.padding))
            else:
                return None
        return tuple(key)

    def __call__(self, grid: tuple, *args, **kwargs):
        key = self._key(args, kwargs)
        known = self._compiled.get(key) if key is not None else None
        if known is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None and compiled is not None and all(n in kwargs for n in self._constexpr_names):
                if len(self._compiled) >= MAX_COMPILED:
                    self._compiled.clear()
                compiled = compiled.result() if hasattr(compiled, "result") else compiled
                self._compiled[key] = (compiled, tuple(kwargs[name] for name in self._constexpr_names))
            return
        compiled, constexprs = known
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexprs)
