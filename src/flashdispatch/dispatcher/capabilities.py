"""What this device is and can do: the facts backends decide support from.

`capabilities(device)` is computed once per device and cached; on a machine with no GPU it
describes the CPU and says that no GPU is present.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Toolchain:
    """A kernel toolchain (Triton, CuPy/NVRTC): whether it imports and works here, and why not."""

    name: str
    works: bool
    version: str | None
    detail: str  # what was checked, or why it does not work

    def __str__(self) -> str:
        state = "works" if self.works else "unavailable"
        version = f" {self.version}" if self.version else ""
        return f"{self.name}{version}: {state} ({self.detail})"


@dataclass(frozen=True)
class Capabilities:
    """The hardware and software facts of one device. Sizes are in bytes; None where unknown."""

    device: str  # "cuda:0", "cpu"
    device_type: str
    name: str
    compute_capability: tuple[int, int] | None
    sm_count: int | None  # streaming multiprocessors (cores on a CPU)
    smem_per_block_optin: int | None  # the most shared memory one block may opt into
    smem_per_sm: int | None
    l2_bytes: int | None
    total_memory: int | None
    native_dtypes: tuple[str, ...]  # dtypes the hardware computes natively (matrix units on GPUs)
    has_tma: bool  # Hopper's tensor memory accelerator (bulk tensor copies)
    has_wgmma: bool  # Hopper's warpgroup matrix multiply
    torch_version: str
    cuda_version: str | None
    cudnn_version: int | None
    triton: Toolchain
    cupy: Toolchain
    note: str = ""

    @property
    def arch(self) -> str:
        """The policy key of this device: 'sm90', 'sm80', ... or 'cpu'."""
        if self.compute_capability is None:
            return self.device_type
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs for printing."""

        def size(n):
            return "unknown" if n is None else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"

        cc = self.compute_capability
        return [
            ("device", f"{self.device} ({self.name})"),
            ("compute capability", "n/a" if cc is None else f"{cc[0]}.{cc[1]} ({self.arch})"),
            ("SMs" if self.device_type == "cuda" else "cores", str(self.sm_count)),
            ("shared memory per block (opt-in)", size(self.smem_per_block_optin)),
            ("shared memory per SM", size(self.smem_per_sm)),
            ("L2 cache", size(self.l2_bytes)),
            ("memory", size(self.total_memory)),
            ("native dtypes", ", ".join(self.native_dtypes)),
            ("TMA / wgmma", f"{'yes' if self.has_tma else 'no'} / {'yes' if self.has_wgmma else 'no'}"),
            ("torch", self.torch_version),
            ("CUDA / cuDNN", f"{self.cuda_version or 'none'} / {self.cudnn_version or 'none'}"),
            ("Triton", str(self.triton)),
            ("CuPy / NVRTC", str(self.cupy)),
        ] + ([("note", self.note)] if self.note else [])

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1) in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_status(has_gpu: bool) -> Toolchain:
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return Toolchain("triton", False, None, f"does not import: {type(exc).__name__}: {exc}")
    version = getattr(triton, "__version__", None)
    if triton_interpreting():
        return Toolchain("triton", True, version, "TRITON_INTERPRET=1: kernels run in the CPU interpreter")
    if not has_gpu:
        return Toolchain("triton", False, version, "imports, but there is no CUDA GPU to compile for")
    return Toolchain("triton", True, version, "imports; compiles for this GPU")


def _cupy_status(has_gpu: bool) -> Toolchain:
    if not has_gpu:
        return Toolchain("cupy", False, None, "no CUDA GPU")
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        return Toolchain("cupy", False, None, f"does not import: {type(exc).__name__}: {exc}")
    try:
        nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        kernel = cupy.RawKernel(r'extern "C" __global__ void probe(int* x) { x[0] = 1; }', "probe")
        kernel.compile()
    except Exception as exc:  # noqa: BLE001
        return Toolchain("cupy", False, cupy.__version__, f"NVRTC does not compile here: {type(exc).__name__}: {exc}")
    return Toolchain("cupy", True, cupy.__version__, f"NVRTC {nvrtc} compiled a test kernel")


def _cpuinfo_field(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# The hot path of `capabilities(q.device)`: a complete torch.device (the CPU, or a GPU with its
# index) -> its Capabilities, skipping the torch.cuda queries below. Only complete devices are kept:
# "cuda", torch.device("cuda") and None mean the *current* GPU, which can change. Entries are what
# `_capabilities` returned for the same device and stay right as long as its cache does: to forget
# them, call `clear_cache()`, which empties both.
_complete: dict = {}


def clear_cache() -> None:
    """Forget every device's capabilities (the next call probes the device again)."""
    _complete.clear()
    _capabilities.cache_clear()


def capabilities(device=None) -> Capabilities:
    """Describe `device` (default: the current CUDA device, else the CPU)."""
    caps = _complete.get(device) if type(device) is torch.device else None
    if caps is not None:
        return caps
    given = device
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this machine has no CUDA GPU that torch can use")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    caps = _capabilities(device)
    if type(given) is torch.device and (given.type != "cuda" or given.index is not None):
        _complete[given] = caps
    return caps


@functools.lru_cache(maxsize=None)
def _capabilities(device: torch.device) -> Capabilities:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but this machine has no CUDA GPU that torch can use")
        props = torch.cuda.get_device_properties(device)
        cc = (props.major, props.minor)
        native = ["float32", "float64", "float16"]
        if cc >= (8, 0):
            native.append("bfloat16")
        if cc >= (8, 9):
            native += ["float8_e4m3fn", "float8_e5m2"]
        return Capabilities(
            device=str(device),
            device_type="cuda",
            name=props.name,
            compute_capability=cc,
            sm_count=props.multi_processor_count,
            smem_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
            smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", None),
            l2_bytes=getattr(props, "L2_cache_size", None),
            total_memory=props.total_memory,
            native_dtypes=tuple(native),
            has_tma=cc[0] >= 9,
            has_wgmma=cc[0] == 9,
            torch_version=torch.__version__,
            cuda_version=torch.version.cuda,
            cudnn_version=cudnn,
            triton=_triton_status(True),
            cupy=_cupy_status(True),
        )
    native = ["float32", "float64"]
    cpu_flags = (_cpuinfo_field("flags") or "").split()
    if "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags:
        native.append("bfloat16")
    if "avx512_fp16" in cpu_flags or "amx_fp16" in cpu_flags:
        native.append("float16")
    return Capabilities(
        device=str(device),
        device_type=device.type,
        name=_cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu",
        compute_capability=None,
        sm_count=os.cpu_count(),
        smem_per_block_optin=None,
        smem_per_sm=None,
        l2_bytes=None,
        total_memory=_host_memory(),
        native_dtypes=tuple(native),
        has_tma=False,
        has_wgmma=False,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cudnn_version=cudnn,
        triton=_triton_status(torch.cuda.is_available()),
        cupy=_cupy_status(False),
        note="" if torch.cuda.is_available() else "no CUDA GPU on this machine: CPU backends only",
    )
