"""`sdpa-cudnn`: cuDNN's fused attention through PyTorch (`aten._scaled_dot_product_cudnn_attention`).

Observed on PyTorch 2.11 with cuDNN 9.19 (H100): fp16/bf16 only (float32 returns NaN without an
error), head dims up to 256 in multiples of 8, native grouped-query attention, v's head dim may
differ, causal aligned top-left, seqlen_q = seqlen_k = 1 rejected, LSE shaped (B, H, N, 1). cuDNN
builds an execution plan for each new shape (tens of milliseconds), which is why the shipped policy
prefers sdpa-flash for decoding, where the key length changes every step.
"""

from __future__ import annotations

import torch

from ...dispatcher.capabilities import Capabilities
from ...dispatcher.problem import Problem
from ..base import Support, from_bhsd
from ._common import SdpaBackend, kernel_inputs, no_dropout_rng, stride_order_like

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16),
    devices=("cuda",),
    min_compute_capability=(8, 0),
    max_head_dim=256,
    head_dim_multiple=8,
    causal=True,
    causal_unequal_lengths=False,
    gqa=True,
    backward=True,
    deterministic_backward=False,
)


class CudnnBackend(SdpaBackend):
    name = "sdpa-cudnn"
    support = SUPPORT
    description = "cuDNN's fused attention kernel, through PyTorch SDPA"
    op_name = "_scaled_dot_product_cudnn_attention"

    def unavailable_reasons(self) -> list[str]:
        if not torch.backends.cudnn.is_available():
            return ["cuDNN is not available to this PyTorch"]
        return super().unavailable_reasons()

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        if problem.seqlen_q == 1 and problem.seqlen_k == 1:
            return ["cuDNN rejects seqlen_q = seqlen_k = 1"]
        return []

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        q, k, v = kernel_inputs((q, k, v), problem.layout)
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, problem.needs_lse, 0.0, problem.causal, False, scale=problem.scale)[:2]
        return from_bhsd(out, problem.layout), (lse.view(lse.shape[:3]) if problem.needs_lse else None)

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        dout, q, k, v, out = kernel_inputs((dout, q, k, v, out), problem.layout)
        # cuDNN reuses the plan of the first backward call with the same shapes and q/k/v strides,
        # whatever the strides of out and dout: give them the layout of q, as its forward's out has.
        out, dout = stride_order_like(out, q), stride_order_like(dout, q)
        seed, offset = no_dropout_rng(q.device)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, None, None,
            problem.seqlen_q, problem.seqlen_k, 0.0, problem.causal, scale=problem.scale)
        return self.to_layout(grads, problem.layout)
