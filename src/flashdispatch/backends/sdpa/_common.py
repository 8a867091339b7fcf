"""What the SDPA backends share: layout handling and the state PyTorch's backward ops expect."""

from __future__ import annotations

import torch

from ..base import Backend, from_bhsd, to_bhsd


def kernel_inputs(tensors, layout: str):
    """(B, H, N, D) views with a unit last stride, as PyTorch's fused kernels require."""
    views = []
    for t in tensors:
        t = to_bhsd(t, layout)
        views.append(t if t.stride(-1) == 1 else t.contiguous())
    return views


def no_dropout_rng(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox seed and offset for a backward op: unused without dropout, but the ops take them."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return zero, zero


class SdpaBackend(Backend):
    """A backend over one of PyTorch's private SDPA ops, which return the LSE and take it back."""

    op_name: str  # the aten op this backend calls

    def unavailable_reasons(self) -> list[str]:
        if not hasattr(torch.ops.aten, self.op_name):
            return [f"this PyTorch ({torch.__version__}) has no aten.{self.op_name}"]
        return []

    @staticmethod
    def to_layout(grads, layout: str):
        return tuple(from_bhsd(g, layout) for g in grads)
