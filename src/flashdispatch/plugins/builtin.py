"""The built-in plugin: registers flashdispatch's own backends, exactly as a third-party plugin would."""

from ..backends.cuda import CudaBackend
from ..backends.fp8_hopper import Fp8HopperBackend
from ..backends.reference import ReferenceBackend
from ..backends.sdpa import CudnnBackend, EfficientBackend, FlashBackend, MathBackend
from ..backends.tiled import TiledBackend
from ..backends.triton import TritonBackend
from .hookspecs import hookimpl


@hookimpl
def flashdispatch_backends():
    return [ReferenceBackend(), TiledBackend(), TritonBackend(), FlashBackend(), CudnnBackend(), EfficientBackend(),
            MathBackend(), CudaBackend(), Fp8HopperBackend()]
