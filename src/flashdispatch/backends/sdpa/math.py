"""`sdpa-math`: PyTorch's composite math attention (`aten._scaled_dot_product_attention_math`).

Any device and dtype; masks (bottom-right causal, windows) go in as an explicit additive mask, so it
materialises O(N^2) scores and refuses problems whose scores would not fit in memory. The kernel
does not zero rows with no visible key (it attends to every key there), so this wrapper does. No softcap. The LSE is computed
from the scores in float32; the backward recomputes the forward under autograd.
"""

from __future__ import annotations

import math

import torch

from ...dispatcher.capabilities import Capabilities
from ...dispatcher.problem import Problem
from ..base import Support, from_bhsd, visible_keys
from ..reference import MEMORY_FRACTION, free_memory
from ._common import SdpaBackend, kernel_inputs

SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    devices=("cpu", "cuda"),
    causal=True,
    window=True,
    gqa=True,
    backward=True,
    deterministic_backward=True,
)

# Score-sized buffers alive at once in forward + backward (scores, mask, probabilities, gradients).
SCORE_BUFFERS = 4


class MathBackend(SdpaBackend):
    name = "sdpa-math"
    support = SUPPORT
    description = "PyTorch SDPA's composite math implementation (O(N^2) memory)"
    op_name = "_scaled_dot_product_attention_math"

    def extra_reasons(self, problem: Problem, caps: Capabilities) -> list[str]:
        need = problem.score_elements * SCORE_BUFFERS * max(4, problem.dtype.itemsize)
        free = free_memory(caps, problem.device_index)
        if free is not None and need > MEMORY_FRACTION * free:
            return [f"its score matrices need {need / 2**30:.1f} GiB, more than half the free memory "
                    f"({free / 2**30:.1f} GiB)"]
        return []

    @staticmethod
    def _attend(q, k, v, problem: Problem):
        """(B, H, N, D) -> (out, visible): the math kernel, with rows that see no key zeroed."""
        visible = visible_keys(q.shape[2], k.shape[2], problem.window_left, problem.window_right, q.device)
        bias = None
        if visible is not None:
            # The aten op adds its mask to the scores (the public API converts boolean masks first).
            # Rows with no visible key see every key here, so nothing turns NaN, and are zeroed below.
            has_key = visible.any(-1, keepdim=True)
            bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~(visible | ~has_key), -math.inf)
        out = torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, bias, 0.0, False, None, scale=problem.scale, enable_gqa=problem.group_size > 1)[0]
        if visible is not None:
            out = torch.where(has_key, out, 0.0)
        return out, visible

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        q, k, v = kernel_inputs((q, k, v), problem.layout)
        out, visible = self._attend(q, k, v, problem)
        lse = None
        if problem.needs_lse:
            kg = k.float().repeat_interleave(problem.group_size, dim=1)
            scores = (q.float() @ kg.transpose(-1, -2)) * problem.scale
            if visible is not None:
                scores = scores.masked_fill(~visible, -math.inf)
            lse = torch.logsumexp(scores, dim=-1)
        return from_bhsd(out, problem.layout), lse

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        dout, q, k, v = kernel_inputs((dout, q, k, v), problem.layout)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            recomputed, _ = self._attend(*inputs, problem)
            grads = torch.autograd.grad(recomputed, inputs, dout)
        return self.to_layout(grads, problem.layout)
