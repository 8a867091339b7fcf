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


def physical_bnhd(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, D) view whose memory is laid out (B, N, H, D), copying only if it is not already."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def stride_order_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` (B, H, N, D) laid out in memory in the same dimension order as `ref` (bhsd or bnhd)."""
    return physical_bnhd(t) if ref.stride(1) < ref.stride(2) else t.contiguous()


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
