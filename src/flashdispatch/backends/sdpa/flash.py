"""`sdpa-flash`: PyTorch's FlashAttention-2 kernel (`aten._scaled_dot_product_flash_attention`).

Observed on PyTorch 2.11: bottom-right causal when seqlen_q < seqlen_k (FlashAttention-2's own
alignment), native grouped-query attention, head dims up to 256, fp16/bf16 only, v's head dim equal
to q's, a non-deterministic backward (atomic adds).
"""

from __future__ import annotations

import torch

from ...dispatcher.capabilities import Capabilities
from ...dispatcher.problem import Problem
from ..base import Support, from_bhsd
from ._common import SdpaBackend, kernel_inputs, no_dropout_rng

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16),
    devices=("cuda",),
    min_compute_capability=(8, 0),
    max_head_dim=256,
    head_dim_multiple=8,
    head_dim_v_must_equal=True,
    causal=True,
    causal_unequal_lengths=True,
    gqa=True,
    backward=True,
    deterministic_backward=False,
)


class FlashBackend(SdpaBackend):
    name = "sdpa-flash"
    support = SUPPORT
    description = "PyTorch SDPA's FlashAttention-2 kernel"
    op_name = "_scaled_dot_product_flash_attention"

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        if problem.causal and problem.seqlen_q > problem.seqlen_k:
            return ["causal with seqlen_q > seqlen_k leaves rows with no visible key, which this kernel "
                    "does not give the output 0 and LSE -inf that flashdispatch promises"]
        return []

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        q, k, v = kernel_inputs((q, k, v), problem.layout)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, problem.causal, False, scale=problem.scale)[:2]
        return from_bhsd(out, problem.layout), lse

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        dout, q, k, v, out = kernel_inputs((dout, q, k, v, out), problem.layout)
        seed, offset = no_dropout_rng(q.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, problem.seqlen_q, problem.seqlen_k, 0.0,
            problem.causal, seed, offset, scale=problem.scale)
        return self.to_layout(grads, problem.layout)
