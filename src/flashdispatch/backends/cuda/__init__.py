"""`cuda`: hand-written CUDA C++ kernels, compiled at run time by NVRTC through CuPy.

The kernels ship as `.cu` sources in `kernels/` and compile on first use for the GPU in the
machine (sm_80 and later), one module per source file, dtype and head dim; `compiler.py` caches
the binaries on disk. Two kernels do the work:

- `forward.cu`: FlashAttention-2 on the tensor cores (mma.sync m16n8k16, ldmatrix, cp.async
  double buffering), bottom-right causal with fully masked key blocks skipped, GQA by addressing;
- `decode.cu`: split-KV decoding for at most 16 queries: the query heads of a GQA group share a
  block, so each key is read once per group; the keys are split across blocks so that a small
  batch fills every SM, and the last block of each group of splits combines them by LSE.

Tensors stay PyTorch's: the kernels get their device pointers and strides (no copy, no DLPack
round trip on the hot path) and launch on PyTorch's current stream; nothing synchronises the host.
Each kernel, once loaded and opted into its shared memory, is kept under a small tuple key, so a
repeated call (a decoding step, above all) only allocates its outputs and launches.
A tensor whose rows are not 16-byte aligned (a last-dim stride other than 1, say) is copied to a
contiguous one first, since the kernels load rows in 16-byte pieces. Forward only: the LSE is the
standard one, so the dispatcher pairs this forward with another backend's backward.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...dispatcher.capabilities import Capabilities, capabilities
from ...dispatcher.problem import Problem
from ..base import MAX_GRID_Y, Backend, Support

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16),
    devices=("cuda",),
    min_compute_capability=(8, 0),
    min_head_dim=64,
    max_head_dim=128,
    head_dim_multiple=64,
    head_dim_v_must_equal=True,
    causal=True,
    gqa=True,
    layouts=("bhsd", "bshd"),
)

KERNELS = Path(__file__).parent / "kernels"
FORWARD_WARPS = 4
FORWARD_M_TILES = 2  # 16-row tiles per warp: 128 query rows per block
FORWARD_BLOCK_N = 64  # keys per shared-memory tile
DECODE_MAX_QUERIES = 16
# Decoding tiles: 8 warps x 16 keys, 2 stages (132 KiB of shared memory at D = 128, one block per
# SM): within 1% of every other shape swept on the H100 grid and the fastest at B = 8
# (`check_cuda_gpu.py --part decode-sweep`). A persistent grid (each block streaming several
# items through one ring) measured 1-3% slower at B = 32 and was dropped.
DECODE_WARPS = 8
DECODE_WARP_KEYS = 16  # keys per warp in each shared-memory tile: 128-key tiles
DECODE_STAGES = 2
DECODE_BLOCKS_PER_SM = 1  # resident decoding blocks per SM
DECODE_MIN_KEYS_PER_SPLIT = 256
LOG2E = math.log2(math.e)

_TYPE_NAMES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


def _decoding(problem: Problem) -> bool:
    return problem.seqlen_q <= DECODE_MAX_QUERIES


def _decode_groups(problem: Problem) -> int:
    """Decoding blocks before the keys are split: (batch, KV head, block of 16 packed rows)."""
    return problem.batch * problem.heads_kv * _cdiv(problem.seqlen_q * problem.group_size, 16)


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


def forward_kernels(dtype: torch.dtype, head_dim: int) -> list[str]:
    """The forward.cu instantiations one (dtype, head dim) module holds."""
    t = _TYPE_NAMES[dtype]
    return [f"fd::flash_forward<{t}, {head_dim}, {FORWARD_WARPS}, {FORWARD_M_TILES}, {FORWARD_BLOCK_N}, {_bool(c)}>"
            for c in (False, True)]


def decode_kernels(dtype: torch.dtype, head_dim: int) -> list[str]:
    """The decode.cu instantiations one (dtype, head dim) module holds."""
    t = _TYPE_NAMES[dtype]
    return [f"fd::flash_decode<{t}, {head_dim}, {DECODE_WARPS}, {DECODE_WARP_KEYS}, {DECODE_STAGES}, {_bool(s)}>"
            for s in (False, True)]


def forward_shared_bytes(head_dim: int) -> int:
    rows = _forward_block_m() + 4 * FORWARD_BLOCK_N  # Q, then two stages of K and of V
    return rows * head_dim * 2


def decode_shared_bytes(head_dim: int) -> int:
    rings = 2 * DECODE_STAGES * DECODE_WARP_KEYS * DECODE_WARPS * head_dim * 2  # K and V, 16-bit
    # float32 outputs, maxima, sums and weights of the warps, and 16 LSEs, in the rings' memory once they are done
    warp_states = DECODE_WARPS * 16 * (head_dim + 3) * 4 + 16 * 4
    return 16 * head_dim * 2 + max(rings, warp_states)  # after Q


def _forward_block_m() -> int:
    return 16 * FORWARD_M_TILES * FORWARD_WARPS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows_aligned(t: torch.Tensor) -> bool:
    """Rows load in 16-byte pieces: unit last stride, 16-byte aligned start and row strides."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])


def _bhsd_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, D) or (B, N, H, D) tensor."""
    b, x, y, _ = t.stride()
    return (b, x, y) if layout == "bhsd" else (b, y, x)


def _positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """The kernels keep each row's running max in raw-score units and apply the scale inside exp2,
    which needs scale > 0. softmax(Q K^T s) = softmax((-Q) K^T |s|), and with s = 0 every score
    is 0 x (Q K^T) = (0 Q) K^T: both rewrites are exact (negating or zeroing a float rounds
    nothing), and cost an elementwise pass over Q only for these rare scales."""
    if scale > 0:
        return q, scale
    return (-q, -scale) if scale < 0 else (q * 0.0, 1.0)


class CudaBackend(Backend):
    name = "cuda"
    support = SUPPORT
    description = "hand-written CUDA C++ (NVRTC through CuPy): FlashAttention-2 forward and split-KV decoding"

    def unavailable_reasons(self) -> list[str]:
        try:
            import cupy
        except Exception as exc:  # noqa: BLE001 - any import failure is a reason, not a crash
            return [f"CuPy does not import ({type(exc).__name__}: {exc}); install flashdispatch[cuda12] on a "
                    f"CUDA 12 machine or flashdispatch[cuda13] on a CUDA 13 one"]
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return ["no CUDA device"]
        except Exception as exc:  # noqa: BLE001
            return [f"no CUDA device ({type(exc).__name__}: {exc})"]
        return []

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        if problem.softcap or problem.has_window:
            return []  # Support has refused them already
        if _decoding(problem) and problem.batch * problem.heads_kv > MAX_GRID_Y:
            return [f"batch x KV heads = {problem.batch * problem.heads_kv}: at most {MAX_GRID_Y} (the decoding "
                    f"kernel's second grid axis)"]
        if not _decoding(problem) and _cdiv(problem.seqlen_q, _forward_block_m()) > MAX_GRID_Y:
            return [f"seqlen_q = {problem.seqlen_q}: at most {MAX_GRID_Y * _forward_block_m()} (query blocks on the "
                    f"forward kernel's second grid axis)"]
        limit = caps.smem_per_block_optin
        need = decode_shared_bytes(problem.head_dim) if _decoding(problem) else forward_shared_bytes(problem.head_dim)
        if limit is not None and need > limit:
            return [f"needs {need // 1024} KiB of shared memory per block, this GPU allows {limit // 1024} KiB"]
        return []

    def notes(self, problem: Problem, caps: Capabilities) -> list[str]:
        from . import compiler

        source, names = self._kernels(problem)
        module = compiler.loaded(KERNELS / source, names, caps.compute_capability)
        state = module.describe() if module is not None else "not compiled yet in this process: the first call compiles it (or loads it from the disk cache)"
        backward = "no native backward: the dispatcher pairs this forward with the policy's backward, which takes its standard LSE"
        return [f"{source}: {state}"] + ([backward] if problem.needs_grad else [])

    @staticmethod
    def _kernels(problem: Problem) -> tuple[str, list[str]]:
        if _decoding(problem):
            return "decode.cu", decode_kernels(problem.dtype, problem.head_dim)
        return "forward.cu", forward_kernels(problem.dtype, problem.head_dim)

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        import cupy

        q, k, v = (t if _rows_aligned(t) else t.contiguous() for t in (q, k, v))
        q, scale = _positive_scale(q, problem.scale)
        device = q.device
        out = torch.empty(q.shape[:-1] + (problem.head_dim_v,), dtype=q.dtype, device=device)
        lse = torch.empty(problem.batch, problem.heads_q, problem.seqlen_q, dtype=torch.float32, device=device)
        pointers = [cupy.uint64(t.data_ptr()) for t in (q, k, v, out, lse)]
        strides = [cupy.int64(s) for t in (q, k, v, out) for s in _bhsd_strides(t, problem.layout)]
        scale_log2 = cupy.float32(scale * LOG2E)
        stream = _cupy_stream(_current_stream_handle(device), device.index)
        with cupy.cuda.Device(device.index):
            if _decoding(problem):
                self._decode(problem, device, pointers, strides, scale_log2, stream)
            else:
                grid = (problem.batch * problem.heads_q, _cdiv(problem.seqlen_q, _forward_block_m()))
                _kernel(problem, device, int(problem.causal))(
                    grid, (FORWARD_WARPS * 32,), (*pointers, *strides, cupy.int32(problem.seqlen_q),
                                                 cupy.int32(problem.seqlen_k), cupy.int32(problem.heads_q),
                                                 cupy.int32(problem.group_size), scale_log2),
                    shared_mem=forward_shared_bytes(problem.head_dim), stream=stream)
        return out, lse

    @staticmethod
    def _decode(problem, device, pointers, strides, scale_log2, stream):
        import cupy

        groups = _decode_groups(problem)
        resident = (capabilities(device).sm_count or 1) * DECODE_BLOCKS_PER_SM
        # As many splits as give every resident block work, when the groups alone do not.
        splits = max(1, min(resident // groups, problem.seqlen_k // DECODE_MIN_KEYS_PER_SPLIT))
        tile = DECODE_WARP_KEYS * DECODE_WARPS
        keys_per_split = _cdiv(_cdiv(problem.seqlen_k, splits), tile) * tile
        splits = _cdiv(problem.seqlen_k, keys_per_split)
        extra = [cupy.uint64(0)] * 3
        if splits > 1:
            # One buffer for both partial results: (splits, rows, D) outputs, then (splits, rows)
            # LSEs. It is freed when forward() returns: PyTorch's allocator reuses its memory for
            # later work on this stream only, which runs after the kernel has read it.
            rows = problem.batch * problem.heads_q * problem.seqlen_q
            partials = torch.empty(splits * rows * (problem.head_dim_v + 1), dtype=torch.float32, device=device)
            counters = _split_counters(stream, device, groups)
            extra = [cupy.uint64(partials.data_ptr()), cupy.uint64(partials.data_ptr() + splits * rows * problem.head_dim_v * 4),
                     cupy.uint64(counters.data_ptr())]
        grid = (splits, problem.batch * problem.heads_kv, _cdiv(problem.seqlen_q * problem.group_size, 16))
        _kernel(problem, device, int(splits > 1))(
            grid, (DECODE_WARPS * 32,),
            (*pointers, *extra, *strides, cupy.int32(problem.batch), cupy.int32(problem.seqlen_q),
             cupy.int32(problem.seqlen_k), cupy.int32(problem.heads_kv), cupy.int32(problem.group_size),
             cupy.int32(keys_per_split), cupy.bool_(problem.causal), scale_log2),
            shared_mem=decode_shared_bytes(problem.head_dim), stream=stream)


# (device index, dtype, head dim, decoding, which of the module's kernels) -> the kernel, its
# shared memory opted into. A tuple key rather than the problem: a decoding KV cache grows by a
# key per step, and every step must find its kernel without compiling, hashing paths or
# converting names again (tens of microseconds of a decoding call's host time).
_ready_kernels: dict[tuple, object] = {}


def _kernel(problem: Problem, device: torch.device, which: int):
    key = (device.index, problem.dtype, problem.head_dim, _decoding(problem), which)
    kernel = _ready_kernels.get(key)
    if kernel is None:
        from . import compiler

        source, names = CudaBackend._kernels(problem)
        kernel = compiler.load_module(KERNELS / source, names, capabilities(device).compute_capability).function(names[which])
        shared = decode_shared_bytes(problem.head_dim) if _decoding(problem) else forward_shared_bytes(problem.head_dim)
        if shared > 48 * 1024:  # dynamic shared memory above 48 KiB must be opted into
            kernel.max_dynamic_shared_size_bytes = shared
        _ready_kernels[key] = kernel
    return kernel


def _current_stream_handle(device: torch.device) -> int:
    """The raw handle of PyTorch's current stream on `device` (the public path builds a Stream
    object per call, several microseconds of a decoding call's host time)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device.index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


_streams: dict[tuple[int, int], object] = {}  # (PyTorch stream handle, device) -> the CuPy view of it


def _cupy_stream(handle: int, device_index: int):
    """CuPy's handle on one of PyTorch's streams, made once per stream."""
    stream = _streams.get((handle, device_index))
    if stream is None:
        import warnings

        import cupy

        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream for Stream.from_external,
            warnings.simplefilter("ignore", DeprecationWarning)  # which CuPy 13 does not have
            stream = _streams[(handle, device_index)] = cupy.cuda.ExternalStream(handle, device_index)
    return stream


_counters: dict[tuple[int, int], torch.Tensor] = {}  # (stream handle, device) -> zeroed int32 counters


def _split_counters(stream, device: torch.device, count: int) -> torch.Tensor:
    """Counters the decoding kernel's split blocks count themselves in with (the last one merges
    the splits and resets its counter to 0): one buffer per stream, since launches on one stream
    never overlap, zeroed once and grown when a launch needs more."""
    key = (stream.ptr, device.index)
    counters = _counters.get(key)
    if counters is None or counters.numel() < count:
        counters = _counters[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return counters
