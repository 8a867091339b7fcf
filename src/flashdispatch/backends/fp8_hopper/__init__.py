"""`fp8-hopper`: the attention forward with both matmuls in float8 e4m3, FlashAttention-3's FP8 path.

Two ways in:

- float16/bfloat16 q, k, v with precision="fp8": `quantize.py`'s fused kernel rotates Q and K by
  one random-sign Hadamard matrix (QK^T is unchanged, outliers are spread over the head dim),
  quantizes Q, K and V with one scale per block of rows (the tile of the kernel that runs:
  `quantization_blocks`) and writes V transposed, in one pass over each tensor. The output has
  the inputs' dtype.
- float8_e4m3fn q, k, v (pre-quantized) with optional float32 (B, Hkv) descales, as
  FlashAttention-3 takes them. V is rearranged in each call into the layout the kernel reads
  (transposed; for the Hopper kernel with its keys permuted), unless it comes from
  `to_kernel_layout` (the Hopper kernel then reads it as it is; the portable one still copies it
  back into key order). The output is bfloat16.

Two kernels: `hopper.py` (Gluon, warp-specialized, D 64, 128 and 256) and `kernel.py` (Triton:
the CPU interpreter, and whatever the first cannot take). Both change the numerics (FP8 rounds Q,
K, V and P to 3 mantissa bits), so the backend runs only for calls that ask for precision="fp8",
never for a plain float16/bfloat16 call; and only on compute capability 9.x (Hopper's FP8 wgmma,
QGMMA). Forward only: there is no FP8 backward.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...dispatcher.capabilities import Capabilities, triton_interpreting
from ...dispatcher.problem import FP8_DTYPE, Problem
from ..base import Backend, Support, from_bhsd, to_bhsd, triton_grid_reasons
from .quantize import head_dim_addressable, padded_length, permute_keys, rearrange_v

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, FP8_DTYPE),
    devices=("cuda", "cpu"),  # the CPU only under TRITON_INTERPRET=1 (tests)
    min_head_dim=64,
    max_head_dim=256,
    head_dim_multiple=64,
    head_dim_v_must_equal=True,
    causal=True,
    gqa=True,
    layouts=("bhsd", "bshd"),
    precisions=("fp8",),
)
HEAD_DIMS = (64, 128, 256)


def tiles(head_dim: int, causal: bool) -> tuple[int, int, int, int]:
    """(query rows, keys, warps, pipeline stages) per program of the portable kernel (`kernel.py`),
    whose rows and keys are the quantization blocks of Q and of K and V when it runs. From a sweep on the
    H100 (D = 128 / 64, N = 16k: docs/notes/fp8.md): 128 x 128 keys with 4 warps non-causal (768
    TFLOP/s at D = 128, 8 warps 636), 64 rows causal (773; 128 rows with 4 warps fell to 376); D =
    256 keeps its 128 x 64 tile in registers with 8 warps."""
    if head_dim > 128:
        return 128, 64, 8, 3
    return (64 if causal else 128), 128, 4, 3


def _gluon_reasons(problem: Problem) -> list[str]:
    """Why the Gluon kernel (`hopper.py`) does not take this problem (empty: it does)."""
    if problem.device_type != "cuda" or triton_interpreting():
        return ["it runs on CUDA GPUs only, not in Triton's interpreter"]
    hopper, failure = _hopper_module()
    return [failure] if hopper is None else hopper.problem_reasons(problem)


@functools.lru_cache(maxsize=1)
def _hopper_module():
    """(the `hopper` module, None), or (None, why it does not import): tried once, since a failed
    import is not cached by Python and selection asks on every call."""
    try:
        from . import hopper
    except Exception as exc:  # noqa: BLE001 - Gluon is experimental: a Triton without it runs kernel.py
        return None, f"this Triton has no Gluon for it ({type(exc).__name__}: {exc})"[:200]
    return hopper, None


def _warp_specialized(problem: Problem) -> bool:
    """Whether the Gluon kernel (`hopper.py`) runs this problem; else the portable one."""
    return not _gluon_reasons(problem)


def _kernel_note(problem: Problem) -> str:
    reasons = _gluon_reasons(problem)
    if not reasons:
        if problem.dtype != FP8_DTYPE:
            return "kernel: the warp-specialized Gluon one (hopper.py)"
        return ("kernel: the warp-specialized Gluon one (hopper.py), or the portable one, slower, where TMA cannot "
                "read q or k (data not starting at a multiple of 16 bytes, a stride that is zero or not a multiple of "
                "16 bytes, or a last dim that is not contiguous; logged once)")
    return f"kernel: the portable Triton one (kernel.py), slower: the Gluon one does not take this: {'; '.join(reasons)}"


def quantization_blocks(problem: Problem, warp_specialized: bool | None = None) -> tuple[int, int]:
    """(query rows, keys) per quantization block: the tile of the Gluon kernel (warp_specialized)
    or the portable one; None: of the one that will run."""
    if _warp_specialized(problem) if warp_specialized is None else warp_specialized:
        return hopper_tile(problem.head_dim, problem.causal, problem.seqlen_k)
    return tiles(problem.head_dim, problem.causal)[:2]


log = logging.getLogger("flashdispatch")
_signs: dict[tuple, torch.Tensor] = {}  # (head dim, seed, device) -> the rotation's signs


def _rotation_signs(head_dim: int, device: torch.device) -> torch.Tensor | None:
    """The policy's random signs for the Hadamard rotation of Q and K, or None when it is off."""
    from ...dispatcher.policy import active_policy
    from .quantize import random_signs

    policy = active_policy()
    if not policy.fp8_rotation:
        return None
    key = (head_dim, policy.fp8_seed, device)
    if key not in _signs:
        _signs[key] = random_signs(head_dim, policy.fp8_seed, device)
    return _signs[key]


def _per_block(descale: torch.Tensor | None, batch: int, heads: int, group: int, blocks: int,
               device: torch.device) -> torch.Tensor:
    """A (B, Hkv) descale (None: 1) as the kernel's float32 (B, heads, blocks), one per block."""
    if descale is None:
        return torch.ones(batch, heads, blocks, dtype=torch.float32, device=device)
    return descale.repeat_interleave(group, dim=1)[:, :, None].expand(batch, heads, blocks).contiguous()


class Fp8HopperBackend(Backend):
    name = "fp8-hopper"
    support = SUPPORT
    description = "FP8 (e4m3) forward on Hopper in Triton, FlashAttention-3's FP8 path: block scales, Hadamard rotation"

    def unavailable_reasons(self) -> list[str]:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure is a reason, not a crash
            return [f"triton does not import: {type(exc).__name__}: {exc}"]
        return []

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        reasons = []
        if problem.device_type == "cpu" and not triton_interpreting():
            reasons.append("runs on the CPU only in Triton's interpreter (TRITON_INTERPRET=1), for tests")
        if problem.device_type == "cuda" and caps.compute_capability is not None and caps.compute_capability[0] != 9:
            major, minor = caps.compute_capability
            reasons.append(f"needs compute capability 9.x (Hopper's FP8 wgmma), this GPU is {major}.{minor}")
        if problem.device_type == "cpu" and problem.dtype == torch.bfloat16:
            reasons.append("bfloat16 inputs are wrong in Triton's CPU interpreter (3.4-3.9); float16 and float8 work")
        if problem.head_dim not in HEAD_DIMS:
            reasons.append(f"head_dim {problem.head_dim} not supported (supports {', '.join(map(str, HEAD_DIMS))})")
        return reasons + triton_grid_reasons(problem, per_head_offsets=True)

    def notes(self, problem: Problem, caps: Capabilities) -> list[str]:
        from ...dispatcher.policy import active_policy

        policy = active_policy()
        if problem.dtype == FP8_DTYPE:
            how = "pre-quantized float8_e4m3fn inputs with their (batch, KV head) descales; bfloat16 output"
        else:
            rotation = (f"Q and K rotated by a random-sign Hadamard matrix (seed {policy.fp8_seed})"
                        if policy.fp8_rotation else "no rotation (the policy's fp8.rotation is off)")
            rows, keys = quantization_blocks(problem)
            how = f"quantized to float8_e4m3fn with one scale per {rows} query rows and per {keys} keys per head; {rotation}"
        return [f"FP8 matmuls (precision='fp8' was asked for: not exact, FP8 rounds Q, K, V and P to 3 mantissa bits); "
                f"{how}", _kernel_note(problem), "forward only: no FP8 backward"]

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        v_in_kernel_layout = _kernel_layout_v(v, problem)
        q, k, v = (to_bhsd(t, problem.layout) for t in (q, k, v))  # (B, H, N, D) views
        result = None
        if _warp_specialized(problem):
            result = _run(q, k, v, descales, v_in_kernel_layout, problem, warp_specialized=True)
        if result is None:  # not for the Gluon kernel, its TMA cannot address the tensors, or it failed
            result = _run(q, k, v, descales, v_in_kernel_layout, problem, warp_specialized=False)
        out, lse = result
        return from_bhsd(out, problem.layout), lse


def _run(q, k, v, descales, v_in_kernel_layout, problem, warp_specialized):
    """(out, lse) from the Gluon kernel (warp_specialized; None where it cannot run them) or the
    portable one, with the inputs quantized and V laid out for the kernel that runs."""
    if problem.dtype == FP8_DTYPE:
        out_dtype = torch.bfloat16
        q8, k8 = q, k
        if warp_specialized and (why := _unaddressable(q8, k8)):
            _log_once(f"fp8-hopper: the portable kernel, slower, runs this call: TMA cannot read {why}")
            return None
        vt8 = _v_transposed(v, v_in_kernel_layout, warp_specialized)
    else:
        from .quantize import quantize

        rows, keys = quantization_blocks(problem, warp_specialized)
        signs = _rotation_signs(problem.head_dim, q.device)
        out_dtype = q.dtype
        q8, q_scales = quantize(q, rows, signs)
        k8, k_scales = quantize(k, keys, signs)
        # The Gluon kernel reads V^T in its key order, up to the zero padding (a multiple of 16).
        vt8, v_scales = quantize(v, keys, None, transpose=True, key_order=warp_specialized)
        if not warp_specialized:
            vt8 = vt8[..., :problem.seqlen_k]
        descales = (q_scales, k_scales, v_scales)
    if not warp_specialized:
        return _portable_forward(q8, k8, vt8, descales, out_dtype, problem)
    from . import hopper

    per_head = problem.dtype == FP8_DTYPE
    if per_head:
        ones = torch.ones(1, 1, dtype=torch.float32, device=q.device).expand(problem.batch, problem.heads_kv)
        descales = tuple(ones if d is None else d for d in descales)
    return hopper.forward(q8, k8, vt8, descales, problem.group_size if per_head else 1, out_dtype, problem)


def _unaddressable(q8: torch.Tensor, k8: torch.Tensor) -> str | None:
    """Why the Gluon kernel's TMA cannot read pre-quantized q8 or k8 ("q: ..."), or None. (V always
    reaches it in a layout of its own, and quantized inputs are fresh tensors.)"""
    from .hopper import unaddressable

    for name, t in (("q", q8), ("k", k8)):
        if why := unaddressable(t):
            return f"{name}: {why}"
    return None


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def hopper_tile(head_dim: int, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """The blocks the backend quantizes Q and K, V in for the Gluon kernel at `head_dim`, with a
    causal mask or not, for seqlen_k keys: (query rows, keys), its tile for inputs with a descale
    per block. Pre-quantized inputs, one descale a head, may take other key steps
    (`hopper.STEP_KEYS`)."""
    from . import hopper

    return hopper.BLOCK_M, hopper.step_keys(head_dim, causal, True, seqlen_k)


class KernelLayoutV(torch.Tensor):
    """The type of `to_kernel_layout`'s result. Tensors derived from it (a slice, a copy, `.to()`)
    keep the type but not the layout, so attention() takes only the very tensor it returned, and
    only while nothing has written into it."""

    def _flashdispatch_plain_(self) -> torch.Tensor:
        """This V as a plain tensor marked as being in the kernel's layout (ValueError for a tensor
        derived from `to_kernel_layout`'s result): what attention() and explain() work with, since
        every attribute read of a tensor subclass costs 2-3 us (measured: `shape` 3.2 against 0.3).
        The plain tensor stays inside the call; it carries the identity checked here, checked
        again by the backend."""
        plain = _check_made(self)
        plain._fp8_kernel_layout = self._made
        return plain


def to_kernel_layout(v: torch.Tensor) -> torch.Tensor:
    """Pre-quantized V (B, Hkv, N, D) float8_e4m3fn, rearranged once for the FP8 kernel: a (B, Hkv,
    N, D) view of V^T ((B, Hkv, D, N_pad) memory, N contiguous, zero-padded to a multiple of 16)
    with each 16-key group in the order the Hopper kernel multiplies P by V in. Pass it, as
    returned, as `v` to attention() (layout="bhsd") with the same descales: each call then skips
    the rearrangement of V (a V that stays fixed over calls: a prompt's cache, a benchmark) where
    the Hopper kernel runs; the portable kernel (`kernel.py`) copies it back into key order in each
    call. It is read-only: rearrange again after changing V. Other V tensors are rearranged in each
    call (`quantize.rearrange_v`, which also checks v: e4m3, 4-d, a power-of-two head dim of 16 or
    more)."""
    view = rearrange_v(v).transpose(2, 3)[:, :, :v.shape[2]].as_subclass(KernelLayoutV)
    view._made = _identity(view)
    return view


def _identity(v: torch.Tensor) -> tuple:
    return v.data_ptr(), tuple(v.shape), v.stride(), v._version


_DERIVED = ("v: a tensor derived from to_kernel_layout()'s result (sliced, copied, moved or written into) no longer "
            "has its layout: pass the tensor it returned, or call it again")


def _check_made(v: KernelLayoutV) -> torch.Tensor:
    """v as a plain tensor, after checking that it is `to_kernel_layout`'s result, untouched."""
    plain = v.as_subclass(torch.Tensor)  # its attributes are read without the subclass's overhead
    if getattr(v, "_made", None) != _identity(plain):
        raise ValueError(_DERIVED)
    return plain


def _kernel_layout_v(v: torch.Tensor, problem: Problem) -> bool:
    """Whether v is `to_kernel_layout`'s result, as it returned it or as attention() unwrapped it
    (`KernelLayoutV._flashdispatch_plain_`); ValueError for a tensor derived from one or written
    into, or one passed with layout="bshd"."""
    if isinstance(v, KernelLayoutV):
        _check_made(v)
    elif not hasattr(v, "_fp8_kernel_layout"):  # the mark of KernelLayoutV._flashdispatch_plain_
        return False
    elif v._fp8_kernel_layout != _identity(v):
        raise ValueError(_DERIVED)
    if problem.layout != "bhsd":
        raise ValueError(f"v: a to_kernel_layout() V is (B, Hkv, N, D): pass layout='bhsd', got {problem.layout!r}")
    return True


def _v_transposed(v: torch.Tensor, in_kernel_layout: bool, warp_specialized: bool) -> torch.Tensor:
    """V^T as the kernel that runs reads it: (B, H, D, N_pad) in `to_kernel_layout`'s order, padding
    included (a 16-key group holds keys from its whole range), for the Gluon kernel; (B, H, D, N) in
    key order for the portable one. v's own memory where it already lies so."""
    vt = v.transpose(2, 3)
    seqlen = v.shape[2]
    if in_kernel_layout:
        vt = vt.as_subclass(torch.Tensor)  # a KernelLayoutV where the backend is called directly
        vt = vt.as_strided((*vt.shape[:3], padded_length(seqlen)), vt.stride())
        return vt if warp_specialized else permute_keys(vt, inverse=True)[..., :seqlen]
    if warp_specialized:
        return rearrange_v(v)
    return vt if vt.stride(3) == 1 else vt.contiguous()


def _portable_forward(q8, k8, vt8, descales, out_dtype, problem):
    """(out, lse) from `kernel.py`: every head dim, the CPU interpreter. descales as the backend's
    forward has them: (B, Hkv) per head for pre-quantized inputs, (B, H, blocks) when quantized."""
    import triton

    from .kernel import fp8_attention_forward

    batch, heads_q, seqlen_q, head_dim = q8.shape
    heads_kv, seqlen_k = k8.shape[1], k8.shape[2]
    group = problem.group_size
    rows, keys, warps, stages = tiles(head_dim, problem.causal)
    q_blocks, k_blocks = triton.cdiv(seqlen_q, rows), triton.cdiv(seqlen_k, keys)
    if problem.dtype != FP8_DTYPE:  # quantized here: one descale per block already
        q_scales, k_scales, v_scales = descales
    else:
        device = q8.device
        q_scales = _per_block(descales[0], batch, heads_q, group, q_blocks, device)
        k_scales, v_scales = (_per_block(d, batch, heads_kv, 1, k_blocks, device) for d in descales[1:])
    out = torch.empty(batch, heads_q, seqlen_q, head_dim, dtype=out_dtype, device=q8.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q8.device)
    # The kernel's head-dim offsets are 32-bit (V^T's head dim is its dim 2); its rows' and keys'
    # are 64-bit only where they would pass 2^31 (WIDE: slower, kernel.py).
    q8, k8 = head_dim_addressable(q8), head_dim_addressable(k8)
    vt8 = head_dim_addressable(vt8.transpose(2, 3)).transpose(2, 3)
    wide = not (_offsets_fit(q8, 2, rows) and _offsets_fit(out, 2, rows) and _offsets_fit(k8, 2, keys)
                and _offsets_fit(vt8, 3, keys))
    fp8_attention_forward[(q_blocks, batch * heads_q)](
        q8, k8, vt8, out, lse, q_scales, k_scales, v_scales,
        *q8.stride(), *k8.stride(), *vt8.stride(), *out.stride(),
        *q_scales.stride(), *k_scales.stride()[:2], *v_scales.stride()[:2],
        heads_q, group, seqlen_q, seqlen_k, problem.scale,
        HEAD_DIM=head_dim, BLOCK_M=rows, BLOCK_N=keys, CAUSAL=problem.causal, WIDE=wide,
        num_warps=warps, num_stages=stages)
    return out, lse


def _offsets_fit(t: torch.Tensor, axis: int, tile: int) -> bool:
    """Whether the offsets along `axis` of the 4-d t (its rows or keys), a tile past its end
    included, fit in 32 bits. The kernel adds each axis's offsets to the pointer on its own."""
    return (t.shape[axis] + tile) * abs(t.stride(axis)) < 2**31
