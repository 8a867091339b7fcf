"""`sdpa-efficient`: the memory-efficient (xformers-derived) kernel (`aten._scaled_dot_product_efficient_attention`).

Observed on PyTorch 2.11 (H100): fp16/bf16/fp32, any head dim tried up to 512 (multiples of 8), v's
head dim may differ, causal aligned top-left, no grouped-query attention (query and key heads must
match), LSE padded to a multiple of 32 queries.
"""

from __future__ import annotations

import torch

from ...dispatcher.problem import Problem
from ..base import Support, from_bhsd
from ._common import SdpaBackend, kernel_inputs, no_dropout_rng, physical_bnhd

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    devices=("cuda",),
    min_compute_capability=(5, 0),
    max_head_dim=512,
    head_dim_multiple=8,
    causal=True,
    causal_unequal_lengths=False,
    gqa=False,
    backward=True,
    deterministic_backward=False,
)

LSE_ROW_MULTIPLE = 32  # the kernel's LSE is padded to this many queries


class EfficientBackend(SdpaBackend):
    name = "sdpa-efficient"
    support = SUPPORT
    description = "PyTorch SDPA's memory-efficient kernel"
    op_name = "_scaled_dot_product_efficient_attention"

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        q, k, v = kernel_inputs((q, k, v), problem.layout)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, problem.needs_lse, 0.0, problem.causal, scale=problem.scale)[:2]
        return from_bhsd(out, problem.layout), (lse[..., : problem.seqlen_q] if problem.needs_lse else None)

    def backward(self, dout, q, k, v, out, lse, problem: Problem, cu_seqlens_q=None, cu_seqlens_k=None):
        dout, q, k, v, out = kernel_inputs((dout, q, k, v, out), problem.layout)
        # The kernel's backward is only right for `out` laid out (B, N, H, D), as its own forward
        # writes it; another backend's forward may hand over any layout.
        out, dout = physical_bnhd(out), physical_bnhd(dout)
        rows = -(-problem.seqlen_q // LSE_ROW_MULTIPLE) * LSE_ROW_MULTIPLE
        padded_lse = lse.new_zeros(lse.shape[:2] + (rows,))
        padded_lse[..., : problem.seqlen_q] = lse
        seed, offset = no_dropout_rng(q.device)
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, padded_lse, seed, offset, 0.0, [True, True, True, False],
            problem.causal, scale=problem.scale)[:3]
        return self.to_layout(grads, problem.layout)
