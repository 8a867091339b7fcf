"""`fp8-hopper`: the attention forward with both matmuls in float8 e4m3, FlashAttention-3's FP8 path.

Two ways in:

- float16/bfloat16 q, k, v with precision="fp8": `quantize.py`'s fused kernel rotates Q and K by
  one random-sign Hadamard matrix (QK^T is unchanged, outliers are spread over the head dim),
  quantizes Q, K and V with one scale per block of rows (the attention kernel's tile) and writes
  V transposed, in one pass over each tensor. The output has the inputs' dtype.
- float8_e4m3fn q, k, v (pre-quantized) with optional float32 (B, Hkv) descales, as
  FlashAttention-3 takes them. V is used as it lies when its memory is already K-major (a
  (B, H, D, N)-contiguous tensor viewed as (B, H, N, D)), else transposed once. The output is
  bfloat16.

`kernel.py` runs the attention itself. It changes the numerics (FP8 rounds Q, K, V and P to 3
mantissa bits), so it runs only for calls that ask for precision="fp8", never for a plain
float16/bfloat16 call; and only on compute capability 9.x, where Triton compiles its float8 dots
to Hopper's FP8 wgmma (QGMMA). Forward only: there is no FP8 backward.
"""

from __future__ import annotations

import os

import torch

from ...dispatcher.capabilities import Capabilities
from ...dispatcher.problem import FP8_DTYPE, Problem
from ..base import Backend, Support, from_bhsd, to_bhsd

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
    """(query rows, keys, warps, pipeline stages) per program; the rows and keys are also the
    quantization blocks of Q and of K and V. From a sweep on the H100 (D = 128 / 64, N = 16k:
    docs/notes/fp8.md): 128 x 128 keys with 4 warps non-causal (768 TFLOP/s at D = 128, 8 warps
    636), 64 rows causal (773; 128 rows with 4 warps fell to 376); D = 256 keeps its 128 x 64
    tile in registers with 8 warps."""
    if head_dim > 128:
        return 128, 64, 8, 3
    return (64 if causal else 128), 128, 4, 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
        if problem.device_type == "cpu" and not _interpreting():
            reasons.append("runs on the CPU only in Triton's interpreter (TRITON_INTERPRET=1), for tests")
        if problem.device_type == "cuda" and caps.compute_capability is not None and caps.compute_capability[0] != 9:
            major, minor = caps.compute_capability
            reasons.append(f"needs compute capability 9.x (Hopper's FP8 wgmma), this GPU is {major}.{minor}")
        if problem.device_type == "cpu" and problem.dtype == torch.bfloat16:
            reasons.append("bfloat16 inputs are wrong in Triton's CPU interpreter (3.4-3.9); float16 and float8 work")
        if problem.head_dim not in HEAD_DIMS:
            reasons.append(f"head_dim {problem.head_dim} not supported (supports {', '.join(map(str, HEAD_DIMS))})")
        return reasons

    def notes(self, problem: Problem, caps: Capabilities) -> list[str]:
        from ...dispatcher.policy import active_policy

        policy = active_policy()
        if problem.dtype == FP8_DTYPE:
            how = "pre-quantized float8_e4m3fn inputs with their (batch, KV head) descales; bfloat16 output"
        else:
            rotation = (f"Q and K rotated by a random-sign Hadamard matrix (seed {policy.fp8_seed})"
                        if policy.fp8_rotation else "no rotation (the policy's fp8.rotation is off)")
            rows, keys, _, _ = tiles(problem.head_dim, problem.causal)
            how = f"quantized to float8_e4m3fn with one scale per {rows} query rows and per {keys} keys per head; {rotation}"
        return [f"FP8 matmuls (precision='fp8' was asked for: not exact, FP8 rounds Q, K, V and P to 3 mantissa bits); "
                f"{how}", "forward only: no FP8 backward"]

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        import triton

        from .kernel import fp8_attention_forward

        q, k, v = (to_bhsd(t, problem.layout) for t in (q, k, v))  # (B, H, N, D) views
        batch, heads_q, seqlen_q, head_dim = q.shape
        heads_kv, seqlen_k = k.shape[1], k.shape[2]
        group = problem.group_size
        rows, keys, warps, stages = tiles(head_dim, problem.causal)
        q_blocks, k_blocks = triton.cdiv(seqlen_q, rows), triton.cdiv(seqlen_k, keys)
        device = q.device
        if problem.dtype == FP8_DTYPE:
            q_descale, k_descale, v_descale = descales
            q8, k8 = q, k
            vt = v.transpose(2, 3)  # (B, Hkv, D, N): K-major as it lies, or transposed once
            vt = vt if vt.stride(3) == 1 else vt.contiguous()
            q_scales = _per_block(q_descale, batch, heads_q, group, q_blocks, device)
            k_scales = _per_block(k_descale, batch, heads_kv, 1, k_blocks, device)
            v_scales = _per_block(v_descale, batch, heads_kv, 1, k_blocks, device)
            out_dtype, per_block_v = torch.bfloat16, False
        else:
            from .quantize import quantize

            signs = _rotation_signs(head_dim, device)
            q8, q_scales = quantize(q, rows, signs)
            k8, k_scales = quantize(k, keys, signs)
            vt, v_scales = quantize(v, keys, None, transpose=True)
            out_dtype, per_block_v = q.dtype, True
        out = torch.empty(batch, heads_q, seqlen_q, head_dim, dtype=out_dtype, device=device)
        lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=device)
        fp8_attention_forward[(q_blocks, batch * heads_q)](
            q8, k8, vt, out, lse, q_scales, k_scales, v_scales,
            *q8.stride(), *k8.stride(), *vt.stride(), *out.stride(),
            *q_scales.stride(), *k_scales.stride()[:2], *v_scales.stride()[:2],
            heads_q, group, seqlen_q, seqlen_k, problem.scale,
            HEAD_DIM=head_dim, BLOCK_M=rows, BLOCK_N=keys, CAUSAL=problem.causal, PER_BLOCK_V=per_block_v,
            num_warps=warps, num_stages=stages)
        return from_bhsd(out, problem.layout), lse
