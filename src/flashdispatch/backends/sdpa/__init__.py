"""PyTorch's own SDPA kernels, one backend each: `sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient`, `sdpa-math`.

Each module declares what its kernel really accepts, as observed by `scripts/probe_sdpa.py` on
PyTorch 2.11 (H100, results in `scripts/probe_sdpa_h100.txt`), so the dispatcher never hands a
kernel a problem it would reject or compute differently.
"""

from .cudnn import CudnnBackend
from .efficient import EfficientBackend
from .flash import FlashBackend
from .math import MathBackend

__all__ = ["CudnnBackend", "EfficientBackend", "FlashBackend", "MathBackend"]
