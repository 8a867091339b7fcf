"""`triton`: FlashAttention-2 forward and backward written in Triton, every feature of the API.

Forward: online softmax in float32 with the scale folded into exp2, bottom-right causal and
sliding windows that skip fully masked key blocks and do no mask arithmetic on fully visible ones,
softcap, GQA by addressing (K and V are never repeated), packed variable-length batches, both
layouts through strides. Decoding (at most 16 queries) packs the query heads of a GQA group into
one block, so each key is read once per group, and splits the keys across programs when the grid
would leave SMs idle; the splits are merged by their LSE.

Backward (FlashAttention-2): delta = rowsum(dO * O) in a small kernel, then one kernel for dK/dV
per key block (the query heads of a group summed in the program, no atomics: deterministic) and
one for dQ per query block, both recomputing P from the saved LSE, so it accepts any forward
backend's state.

On Hopper the forward of dense float16/bfloat16 problems at head dims 64 and 128 (causal or not,
GQA) has a second kernel, `hopper.py`, written in Gluon: a TMA producer warp and two consumer
warpgroups that ping-pong on the tensor cores and overlap each softmax with the previous block's
P V product (FlashAttention-3's scheme). The tuner offers it first and falls back to the portable
kernel if it fails.

Launch configurations come from `configs.py`: a pruned candidate list per kernel, GPU generation
and head-dim class, tuned once per shape bucket on the first call.

float32 inputs are computed with 3xTF32 dots (three TF32 tensor-core products per product), which
keep float32-level accuracy; plain TF32 would not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...dispatcher.capabilities import Capabilities, capabilities, triton_interpreting
from ...dispatcher.problem import Problem
from ..base import Backend, Support, triton_grid_reasons
from .configs import TUNER, Config, candidates, hopper_reasons
from .launcher import Launcher

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    devices=("cuda", "cpu"),  # the CPU only under TRITON_INTERPRET=1 (tests)
    min_compute_capability=(8, 0),
    min_head_dim=16,
    max_head_dim=256,
    causal=True,
    window=True,
    softcap=True,
    gqa=True,
    varlen=True,
    backward=True,
    deterministic_backward=True,
)

DECODE_MAX_QUERIES = 16  # forward problems up to this many queries take the decoding path
# Split-KV decoding: enough programs for this many per SM, each with at least this many key blocks.
DECODE_PROGRAMS_PER_SM = 4
DECODE_MIN_BLOCKS_PER_SPLIT = 2


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a tensor in `layout` (batch stride 0 when packed)."""
    return _strides_of(t.stride(), layout)


def _strides_of(strides: tuple, layout: str) -> tuple:
    """`_strides` from a stride() tuple."""
    if layout == "bhsd":
        return strides
    if layout == "bshd":
        return strides[0], strides[2], strides[1], strides[3]
    return 0, strides[1], strides[0], strides[2]  # packed (tokens, heads, dim)


def _lse_strides(problem: Problem) -> tuple[int, int]:
    """(batch, head) strides of the LSE: (B, Hq, Nq) dense, (Hq, total_q) packed."""
    if problem.varlen:
        return 0, problem.total_q
    return problem.heads_q * problem.seqlen_q, problem.seqlen_q


def _block(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _descriptors(k, v, problem: Problem, config: Config):
    """(K, V) as (B, Hkv, N, D) TMA tensor descriptors of (1, 1, BLOCK_N, D) blocks, or None where
    TMA cannot address them: unaligned base or strides, a non-unit last stride, or a padded head
    dim (the tile would be wider than the tensor)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    descriptors = []
    for t, dim in ((k, problem.head_dim), (v, problem.head_dim_v)):
        if dim != _block(dim):
            return None
        batch_stride, head_stride, token_stride, dim_stride = _strides(t, problem.layout)
        if problem.varlen:
            shape = [1, t.shape[1], t.shape[0], dim]
            batch_stride = t.shape[0] * token_stride
        else:
            shape = [problem.batch, problem.heads_kv, problem.seqlen_k, dim]
        strides = [batch_stride, head_stride, token_stride, dim_stride]
        if dim_stride != 1 or t.data_ptr() % 16 or any(x * t.element_size() % 16 for x in strides[:3]):
            return None
        descriptors.append(TensorDescriptor(t, shape, strides, [1, 1, config.block_n, dim]))
    return descriptors


@functools.cache
def _launcher(kernel) -> Launcher:
    return Launcher(kernel)


def _runner(kernel, grid, compile_only: bool = False):
    """kernel[grid], launched directly once compiled (`launcher.py`); with compile_only, the same
    call compiles the kernel without launching it."""
    return functools.partial(kernel.warmup, grid=grid) if compile_only else functools.partial(_launcher(kernel), grid)


def _kernel_args(config: Config, problem: Problem) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=problem.head_dim,
                HEAD_DIM_V=problem.head_dim_v, BLOCK_D=_block(problem.head_dim), BLOCK_DV=_block(problem.head_dim_v),
                num_warps=config.num_warps, num_stages=config.num_stages)


def _decoding(problem: Problem) -> bool:
    return problem.seqlen_q <= DECODE_MAX_QUERIES and not problem.varlen


# An int32 tensor with no elements per device: the cu_seqlens arguments of a batch that is not
# variable-length, which the kernels never read. Made once per device instead of once per call.
_no_offsets: dict = {}


def _empty_int32(device: torch.device) -> torch.Tensor:
    t = _no_offsets.get(device)
    if t is None:
        t = _no_offsets[device] = torch.empty(0, dtype=torch.int32, device=device)
    return t


@dataclass(frozen=True)
class _ForwardPlan:
    """What a forward launch derives from the problem and the configuration alone: the grid, the
    key splits, the shapes and strides of the buffers it allocates, the kernels' keyword arguments.
    Computed once per (problem, config, SM count, interpreter or not) and kept in `_plans`."""

    grid: tuple[int, int, int]
    splits: int
    keys_per_split: int
    out_shape: tuple  # one split: the output, in the caller's layout; several: (S, B, Hq, Nq, Dv) float32
    lse_shape: tuple  # one split: the LSE; several: (S,) + the LSE's shape
    out_strides: tuple  # (split, batch, head, token, dim) of the buffer of out_shape
    lse_strides: tuple  # (split, batch, head)
    constants: dict  # attention_forward's constexpr and launch keyword arguments, TMA and gluon aside
    merged_shape: tuple  # several splits: the merged output and LSE, and merge_splits' arguments
    merged_lse_shape: tuple
    merge_grid: tuple
    merge_strides: tuple  # the partial outputs' (split, batch, head, token) strides, the partial LSE's split
                          # stride, then the merged output's (batch, head, token, dim) strides
    merge_constants: dict


# (problem, config, SM count, interpreting) -> _ForwardPlan. Everything in a plan follows from its key
# (fresh torch.empty buffers of one shape always have the same strides), so it never goes stale; it
# is emptied when full, as a decoding loop whose cache grows makes a new problem each step.
_plans: dict = {}
MAX_PLANS = 1024


def _contiguous_strides(shape: tuple) -> tuple:
    """The strides torch.empty(shape) gets (row-major; a dimension of size 0 or 1 counts as 1)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _forward_plan(problem: Problem, config: Config, sm_count: int | None, interpreting: bool) -> _ForwardPlan:
    key = (problem, config, sm_count, interpreting)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    decoding = _decoding(problem)
    pack = decoding and problem.group_size > 1
    rows = problem.seqlen_q * (problem.group_size if pack else 1)
    heads = problem.heads_kv if pack else problem.heads_q
    if problem.varlen:
        out_shape, lse_shape = (problem.total_q, problem.heads_q, problem.head_dim_v), (problem.heads_q, problem.total_q)
    else:
        lse_shape = (problem.batch, problem.heads_q, problem.seqlen_q)
        out_shape = ((problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim_v) if problem.layout == "bhsd"
                     else (problem.batch, problem.seqlen_q, problem.heads_q, problem.head_dim_v))
    block_m = config.block_m
    if decoding:
        block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
    programs = _cdiv(rows, block_m) * problem.batch * heads
    splits = 1
    if decoding:
        # The interpreter splits short caches too, so that the tests reach the merge.
        min_keys = config.block_n * (1 if interpreting else DECODE_MIN_BLOCKS_PER_SPLIT)
        splits = max(1, min(_cdiv(DECODE_PROGRAMS_PER_SM * (sm_count or 1), programs), problem.seqlen_k // min_keys))
    keys_per_split = _cdiv(_cdiv(problem.seqlen_k, splits), config.block_n) * config.block_n
    splits = _cdiv(problem.seqlen_k, keys_per_split)
    merged_shape, merged_lse_shape, merge_grid, merge_strides, merge_constants = (), (), (), (), {}
    if splits == 1:
        buffer_strides = _contiguous_strides(out_shape)
        out_strides = (0,) + _strides_of(buffer_strides, problem.layout)
        lse_strides = (0,) + _lse_strides(problem)
    else:
        # Normalised partial results per split, (S, B, Hq, Nq, Dv), merged by LSE afterwards.
        merged_shape, merged_lse_shape = out_shape, lse_shape
        out_shape = (splits, problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim_v)
        lse_shape = (splits,) + lse_shape
        out_strides = _contiguous_strides(out_shape)
        lse_split_stride = _contiguous_strides(lse_shape)[0]
        lse_strides = (lse_split_stride,) + _lse_strides(problem)
        merged_strides = _strides_of(_contiguous_strides(merged_shape), problem.layout)
        merge_grid = (problem.seqlen_q, problem.batch * problem.heads_q)
        merge_strides = out_strides[:4] + (lse_split_stride,) + merged_strides
        merge_constants = dict(HEAD_DIM_V=problem.head_dim_v, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
                               BLOCK_DV=_block(problem.head_dim_v), num_warps=4)
    constants = dict(VARLEN=problem.varlen, PACK_GQA=pack, SOFTCAP=bool(problem.softcap),
                     SCALE_FIRST=problem.scale <= 0, FLOAT32=problem.dtype == torch.float32,
                     **_kernel_args(Config(block_m, config.block_n, config.num_warps, config.num_stages), problem))
    plan = _ForwardPlan((_cdiv(rows, block_m), problem.batch * heads, splits), splits, keys_per_split,
                        out_shape, lse_shape, out_strides, lse_strides, constants, merged_shape, merged_lse_shape,
                        merge_grid, merge_strides, merge_constants)
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


class TritonBackend(Backend):
    name = "triton"
    support = SUPPORT
    description = "FlashAttention-2 in Triton: every feature, forward and deterministic backward"

    def unavailable_reasons(self) -> list[str]:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return [f"triton does not import: {type(exc).__name__}: {exc}"]
        return []

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        if problem.device_type == "cpu" and not triton_interpreting():
            return ["runs on the CPU only in Triton's interpreter (TRITON_INTERPRET=1), for tests"]
        if problem.device_type == "cpu" and problem.dtype == torch.bfloat16:
            return ["bfloat16 dots are wrong in Triton's CPU interpreter (3.4-3.9)"]
        return triton_grid_reasons(problem)

    def notes(self, problem: Problem, caps: Capabilities) -> list[str]:
        kernels = ["decode" if _decoding(problem) else "forward"] + (["dkdv", "dq"] if problem.needs_grad else [])
        notes = []
        for kernel in kernels:
            known = TUNER.known(kernel, problem, caps)
            if known is not None:
                notes.append(f"{kernel} kernel: {known.config} ({known.how})")
            else:
                count = len(candidates(kernel, problem, caps))
                notes.append(f"{kernel} kernel: not run yet in this shape bucket; the first call "
                             + (f"times {count} candidate configurations" if count > 1 else "compiles it"))
        return notes

    # Forward

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        from . import kernels

        device = q.device
        caps = capabilities(device)
        layout = problem.layout
        decoding = _decoding(problem)
        interpreting = triton_interpreting()
        if not problem.varlen:
            cu_seqlens_q = cu_seqlens_k = _empty_int32(device)

        def launch(config: Config, compile_only: bool = False):
            plan = _forward_plan(problem, config, caps.sm_count, interpreting)
            splits = plan.splits
            out = torch.empty(plan.out_shape, dtype=q.dtype if splits == 1 else torch.float32, device=device)
            lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=device)
            if config.gluon and not decoding and not interpreting and not hopper_reasons(problem):
                from . import hopper

                result = hopper.forward(q, k, v, problem, lambda t: _strides(t, layout), compile_only)
                if result is not None:
                    return result
            tma = None
            sm90 = interpreting or (caps.compute_capability or (0, 0)) >= (9, 0)
            if config.tma and sm90:
                tma = _descriptors(k, v, problem, config)
            _runner(kernels.attention_forward, plan.grid, compile_only)(
                q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                *(tma or (None, None)),
                *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *plan.out_strides, *plan.lse_strides,
                problem.seqlen_q, problem.seqlen_k, problem.heads_kv, problem.group_size, plan.keys_per_split,
                problem.scale, problem.softcap or 1.0, problem.window_left, problem.window_right,
                TMA=tma is not None, **plan.constants,
            )
            if splits == 1 or compile_only:
                return out, lse
            merged = torch.empty(plan.merged_shape, dtype=q.dtype, device=device)
            merged_lse = torch.empty(plan.merged_lse_shape, dtype=torch.float32, device=device)
            _runner(kernels.merge_splits, plan.merge_grid)(
                out, lse, merged, merged_lse, *plan.merge_strides, splits, problem.heads_q, problem.seqlen_q,
                **plan.merge_constants,
            )
            return merged, merged_lse

        return launch(TUNER.choose("decode" if decoding else "forward", problem, caps, launch))

    # Backward

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        from . import kernels

        caps = capabilities(q.device)
        layout = problem.layout
        dummy = q.new_empty(0, dtype=torch.int32)
        cu_q = cu_seqlens_q if problem.varlen else dummy
        cu_k = cu_seqlens_k if problem.varlen else dummy
        lse = lse.contiguous()
        delta = torch.empty_like(lse)  # rowsum(dO * O), float32, in the LSE's layout
        _runner(kernels.attention_backward_delta, (_cdiv(problem.seqlen_q, 64), problem.batch * problem.heads_q))(
            out, dout, delta, cu_q, *_strides(out, layout), *_strides(dout, layout), *_lse_strides(problem),
            problem.seqlen_q, problem.heads_q, VARLEN=problem.varlen, BLOCK_M=64, HEAD_DIM_V=problem.head_dim_v,
            BLOCK_DV=_block(problem.head_dim_v), num_warps=4,
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flags = dict(VARLEN=problem.varlen, SOFTCAP=bool(problem.softcap), FLOAT32=q.dtype == torch.float32)
        scalars = (problem.seqlen_q, problem.seqlen_k, problem.heads_kv, problem.group_size,
                   problem.scale, problem.softcap or 1.0, problem.window_left, problem.window_right)
        inputs = (*_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout))

        def launch_dkdv(config: Config, compile_only: bool = False):
            grid = (_cdiv(problem.seqlen_k, config.block_n), problem.batch * problem.heads_kv)
            _runner(kernels.attention_backward_dkdv, grid, compile_only)(
                q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *inputs, *_strides(dk, layout), *_strides(dv, layout),
                *_lse_strides(problem), *scalars, **flags, **_kernel_args(config, problem))

        def launch_dq(config: Config, compile_only: bool = False):
            grid = (_cdiv(problem.seqlen_q, config.block_m), problem.batch * problem.heads_q)
            _runner(kernels.attention_backward_dq, grid, compile_only)(
                q, k, v, dout, lse, delta, dq, cu_q, cu_k, *inputs, *_strides(dq, layout), *_lse_strides(problem),
                *scalars, **flags, **_kernel_args(config, problem))

        launch_dkdv(TUNER.choose("dkdv", problem, caps, launch_dkdv))
        launch_dq(TUNER.choose("dq", problem, caps, launch_dq))
        return dq, dk, dv
